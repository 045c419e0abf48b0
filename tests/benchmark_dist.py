"""Search speed and peak memory per GPU under torchrun, for a published shape (tests/benchmark.py's SHAPES) with
random weights: data parallel over N GPUs, or the teacher sharded with FSDP2 (--fsdp); also one GPU with and without
--recompute-mlp. Run by hand on CUDA GPUs; not collected by pytest.

    torchrun --nproc-per-node 4 tests/benchmark_dist.py --shape qwen2.5-32b --fsdp --out bench-32b-fsdp4.json
    torchrun --nproc-per-node 2 tests/benchmark_dist.py --shape qwen2.5-3b --out bench-3b-dp2.json
    python tests/benchmark_dist.py --shape qwen2.5-3b --recompute-mlp off,on --out bench-3b-recompute.json
    torchrun --nproc-per-node 4 tests/benchmark_dist.py --shape qwen2.5-3b --cuda-graph off,on --out bench-3b-dp4.json

Times dash.search() itself on random token batches of the global size (--batch-size, split over the ranks by the
search), every operator active (lr 0: the state timed does not change mid-run), as tests/benchmark.py does for one
GPU. tokens/s counts the global batch; peak memory is each rank's torch.cuda.max_memory_allocated. Rank 0 prints a
table and writes the JSON."""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dash  # noqa: E402
from benchmark import SHAPES  # noqa: E402


def build(shape: str, device: str, fsdp: bool):
    """A random-weight bf16 model of the shape, frozen: whole on this rank's GPU, or (fsdp) sharded over the ranks,
    built without ever holding the whole model: on the meta device, then empty CPU tensors (untouched, so no memory)
    of which fully_shard moves each rank's shard to its GPU, where the values are drawn."""
    import transformers
    from transformers import AutoModelForCausalLM
    cls, kw = SHAPES[shape]
    config = getattr(transformers, cls)(**kw)
    if not fsdp:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        return model.eval().requires_grad_(False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its inv_freq is computed, not loaded
    model.eval().requires_grad_(False)
    dash.shard_teacher(model, device)
    torch.manual_seed(dash.rank())  # each rank draws its own shards (and the same replicated weights below)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0, config.initializer_range)
        torch.manual_seed(0)
        for part in (model.model.embed_tokens, model.get_output_embeddings()):
            part.weight.normal_(0, config.initializer_range)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-3b", choices=list(SHAPES))
    ap.add_argument("--fsdp", action="store_true", help="shard the teacher over the ranks (dash.py --fsdp)")
    ap.add_argument("--steps", type=int, default=30, help="search steps (the first 10 are warm-up)")
    ap.add_argument("--batch-size", type=int, default=4, help="global batch, split over the ranks")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--candidates", default="full,swa,gla,gdn")
    ap.add_argument("--grad", default="exact", help="dash.py --grad")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="dash.py --compile")
    ap.add_argument("--recompute-mlp", default="off", help="off, on, or off,on to time both (dash.py --recompute-mlp)")
    ap.add_argument("--cuda-graph", default="off", help="off, on, or off,on to time both (dash.py --cuda-graph)")
    ap.add_argument("--out", default="bench_dist.json")
    args = ap.parse_args()
    device = dash.init_distributed("cuda")
    dash.use_fla_configs()  # fla's shipped autotuning results for this GPU, as dash.py uses them
    B, T, names = args.batch_size, args.seq_len, dash.candidate_names(args.candidates)
    model = build(args.shape, device, args.fsdp)
    L = len(model.model.layers)
    cfg = dash.resolve(dash.Config(model=f"{args.shape}-shaped", candidates=",".join(names), tokens=args.steps * B * T,
                                   seq_len=T, batch_size=B, lr=0.0, window=args.window, kernels="fla", grad=args.grad,
                                   compile=args.compile, fsdp=args.fsdp, log_every=10 ** 9, check_samples=0), L)
    dash.install(model, dash.make_ops(model, names, cfg))  # candidates at their initial values, replicated
    dash.compile_layers(model, on=cfg.compile)
    batches = torch.randint(0, SHAPES[args.shape][1]["vocab_size"], (args.steps, B, T),
                            generator=torch.Generator().manual_seed(0))  # the same on every rank
    res = dict(shape=args.shape, gpu=torch.cuda.get_device_name(), gpus=dash.world(), fsdp=args.fsdp,
               batch=B, per_rank_batch=B // dash.world(), seq_len=T, candidates=names, grad=args.grad,
               compile=args.compile, torch=torch.__version__,
               parameters=sum(p.numel() for p in model.parameters()), runs={})
    variants = [(r, g) for r in args.recompute_mlp.split(",") for g in args.cuda_graph.split(",")]
    for recompute, graph in variants:
        cfg.recompute_mlp, cfg.cuda_graph = recompute == "on", graph == "on"
        dash.recompute_mlp(model, on=cfg.recompute_mlp)
        torch._dynamo.reset()  # new graphs for the MLP's new forward (compiled during the warm-up steps)
        torch.cuda.reset_peak_memory_stats()
        result = dash.search(model, batches, names, cfg)
        times = [h["time"] for h in result["history"]]
        skip = min(10, len(times) - 2)
        peaks = [None] * dash.world()
        mine = dict(peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                    reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
        if dash.world() > 1:
            dist.all_gather_object(peaks, mine)
        else:
            peaks = [mine]
        name = f"recompute_mlp {recompute}" + (f", cuda_graph {graph}" if args.cuda_graph != "off" else "")
        r = res["runs"][name] = dict(
            tok_s=(len(times) - 1 - skip) * B * T / (times[-1] - times[skip]), first_step_s=times[0],
            peak_gib_per_gpu=[round(p["peak_gib"], 2) for p in peaks],
            reserved_gib_per_gpu=[round(p["reserved_gib"], 2) for p in peaks])
        r["minutes_for_12.3M"] = 12.3e6 / r["tok_s"] / 60
        print(name, r, flush=True)
        if dash.is_main():
            Path(args.out).write_text(json.dumps(res, indent=1))  # as it goes
    rows = [(f"{res['gpus']} x {res['gpu']}" + (" FSDP" if args.fsdp else ""), f"{args.shape}, batch {B} x {T}")]
    for name, r in res["runs"].items():
        rows += [(f"search {name}", f"{r['tok_s'] / 1e3:.1f}k tok/s ({r['minutes_for_12.3M']:.1f} min for 12.3M), "
                                    f"peak {max(r['peak_gib_per_gpu']):.1f} GiB per GPU")]
    print("\n".join(f"| {a} | {b} |" for a, b in rows))
    dash.leave_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
