"""Speed and memory of the search and of the candidate preparation on a Qwen2.5-3B-shaped model (random weights:
same speed and memory as the real one). Run by hand on a CUDA GPU; not collected by pytest.

    python tests/benchmark.py --out bench.json

Measures, after a warm-up, in one run: the teacher's forward-only tokens/s on the same batches, search tokens/s in
steady state, peak GPU memory, time to the first search step (autotuning included), preparation tokens/s, and
model FLOPs utilisation from a FLOP count of the steps. Prints a table, writes JSON."""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402
import eval_ruler  # noqa: E402
import ruler  # noqa: E402

# Published config.json shapes (random weights: same speed and memory as the real model). --shape picks one.
SHAPES = {
    "qwen2.5-3b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                       num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                                       rms_norm_eps=1e-6)),
    # Qwen/Qwen3-4B: per-head q/k norms; head_dim 128 is not hidden / heads (80)
    "qwen3-4b": ("Qwen3Config", dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                     max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True,
                                     rms_norm_eps=1e-6)),
    "qwen2.5-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                                       rms_norm_eps=1e-6)),
    "llama-3.1-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                         max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
                                         rms_norm_eps=1e-5, rope_scaling=dict(rope_type="llama3", factor=8.0,
                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192))),
    # Qwen/Qwen2.5-32B-Instruct: 64 x (5120 hidden, 40 q / 8 kv heads of 128, 27648 MLP), untied 152064 vocab. Too
    # big for one GPU next to its activations: tests/benchmark_dist.py --fsdp shards it (torchrun, 4 GPUs)
    "qwen2.5-32b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                                        rms_norm_eps=1e-6)),
}
QWEN3B = SHAPES["qwen2.5-3b"][1]


def shape_model(name: str = "qwen2.5-3b"):
    """A random-weight model of a published shape, bf16 on the GPU, frozen."""
    import transformers
    from transformers import AutoModelForCausalLM
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    cls, kw = SHAPES[name]
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw), dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def qwen3b():
    return shape_model("qwen2.5-3b")


def flops_per_token(c: dict, T: int, W: int, names: list[str]) -> dict:
    """Matmul FLOPs per token (2 per multiply-add). Linear layers: 2 x params forward, 2 x params for the input
    gradient alone (no weight gradients). Causal attention reads T/2 keys on average: 4 (T/2) H D forward
    (QK and AV), 2.5x that backward. Linear candidates (chunk 64): about 4 (64 + D) H D per token forward."""
    L, C, I, V = c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
    D = c.get("head_dim", C // H)
    body = 2 * L * (2 * C * H * D + 2 * C * Hkv * D + 3 * C * I)      # q, o, k, v, gate/up/down
    head = 2 * C * V
    full = L * 4 * (T / 2) * H * D
    ops = {"full": full, "swa": L * 4 * min(W, T / 2) * H * D, "gla": L * 4 * (64 + D) * H * D,
           "gdn": L * 6 * (64 + D) * H * D}
    mixed = sum(ops[n] for n in names)
    teacher_fwd = body + head + full
    search = (body + full + head             # teacher forward (its head inside the fused KL)
              + body + mixed + head          # mixed forward
              + body + 2.5 * mixed + head)   # backward, input gradients only (the KL's is made in its forward)
    search_teacher = search - 2.5 * (mixed - full)  # --grad teacher: cheap operators run forward only
    prep = body + full + 3 * (2 * C * H * D + ops["gla"] + ops["gdn"]) / 1  # teacher fwd; per op o_proj + op, fwd+bwd
    return dict(teacher_forward=teacher_fwd, search=search, search_teacher=search_teacher, prepare=prep)


def measured_peak() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t)


def teacher_forward(model, batches) -> float:
    """tokens/s of the plain causal-LM forward (with logits), no grad."""
    with torch.no_grad():
        model(input_ids=batches[0].cuda())  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for ids in batches[1:]:
            model(input_ids=ids.cuda()).logits
        torch.cuda.synchronize()
    return batches[1:].numel() / (time.perf_counter() - t)


def time_finetune(args) -> dict:
    """finetune.py's step on a shape, for each train set of --finetune: the teacher's pass, the hybrid's pass and
    backward, the fused KL, AdamW on fp32 masters. The hybrid: 5 full-attention layers at hybrid-distillation's
    KL-guided placement (36 layers; else every 7th), --finetune-op elsewhere, its new parameters at their initial
    values (the same speed as prepared ones). Tokens/s over the steps after the first 3, peak memory; an OOM is
    recorded, not raised."""
    import finetune
    B, T, kw = args.batch_size, args.seq_len, SHAPES[args.shape][1]
    teacher, L = shape_model(args.shape), kw["num_hidden_layers"]
    full = eval_ruler.HYBRID_DISTILLATION["kl_guided"][5] if L == 36 else list(range(0, L, 7))
    layers = ["full" if l in full else args.finetune_op for l in range(L)]
    cfg = dash.Config(model=args.shape, window=args.window, kernels="fla", seq_len=T, batch_size=B)
    state = dash.candidate_state(dash.make_ops(teacher, [args.finetune_op], cfg))
    batches = torch.randint(0, kw["vocab_size"], (args.steps, B, T), generator=torch.Generator().manual_seed(0))
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, shape=args.shape, batch=B, seq_len=T,
               layers="".join(dash.CANDIDATES[n].code for n in layers), finetune={})
    runs = [(t, float(w)) for t in args.finetune.split(",") for w in args.finetune_hidden.split(",")]
    for train, hidden in runs:
        name = train if not hidden else f"{train}+hidden{hidden:g}"  # the per-layer loss keeps each layer's output
        fcfg = finetune.FinetuneConfig(train=train, lr=finetune.PAPER["lr"], lr_other=finetune.PAPER["lr_other"],
                                       hidden_weight=hidden, log_every=10 ** 9)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            # no generation check: nothing generates here, and on random weights in bf16 the logits are so flat
            # that 31 gdn layers' prefill-vs-decode rounding reached 0.057 of their spread (H100), over its 0.05
            student = finetune.student_of(teacher, layers, state, cfg, check=False)
            groups = finetune.parameter_groups(student, layers, train, fcfg.lr, fcfg.lr_other)
            times = [h["time"] for h in finetune.distil(student, teacher, batches, groups, fcfg)["history"]]
            skip = min(3, len(times) - 2)
            r = dict(tok_s=(len(times) - 1 - skip) * B * T / (times[-1] - times[skip]), first_step_s=times[0],
                     peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                     trained_weights=sum(p.numel() for g in groups for _, p in g["params"]))
            r["hours_for_20M"] = finetune.PAPER["tokens"] / r["tok_s"] / 3600
        except torch.cuda.OutOfMemoryError as e:
            r = dict(oom=str(e).split("\n")[0], peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
        student = groups = None
        res["finetune"][name] = r
        print("finetune", name, r, flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


def dump_fla_configs(out: Path):
    """fla's autotuning results of this process, in the format fla reads from FLA_CONFIG_DIR
    ({kernel}.json: autotune_entries keyed by the hash of the autotune key)."""
    import triton
    from fla.ops.utils.cache import AutotuneKey, CachedAutotuner
    out.mkdir(parents=True, exist_ok=True)
    for tuner in (o for o in gc.get_objects() if isinstance(o, CachedAutotuner) and o.cache):
        entries = {AutotuneKey.key_hash(key): dict(autotune_key=AutotuneKey.normalize_autotune_key(list(key)),
                                                   config=dict(kwargs=c.kwargs, num_warps=c.num_warps,
                                                               num_stages=c.num_stages, num_ctas=getattr(c, "num_ctas", 1),
                                                               maxnreg=getattr(c, "maxnreg", None)))
                   for key, c in tuner.cache.items()}
        path = out / f"{tuner.kernel_name}.json"
        if path.exists():  # one kernel name, several autotuners (e.g. forward and backward instances)
            entries = {**json.loads(path.read_text())["autotune_entries"], **entries}
        path.write_text(json.dumps(dict(kernel_name=tuner.kernel_name, triton_version=triton.__version__,
                                        autotune_entries=entries), indent=1))
    print(f"wrote fla autotune configs for {len(list(out.glob('*.json')))} kernels to {out}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40, help="search steps (the first 10 are warm-up)")
    ap.add_argument("--prep-steps", type=int, default=25, help="preparation steps (the first 5 are warm-up)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--skip-below", type=float, default=dash.Config.skip_below)
    ap.add_argument("--candidates", default="full,swa,gla,gdn")
    ap.add_argument("--grads", default="exact,teacher", help="search variants (dash.py --grad) to time")
    ap.add_argument("--micro-batches", default="", help="also time each variant with these dash.py --micro-batch "
                                                       "values, e.g. 2,1 (the whole batch is always timed)")
    ap.add_argument("--modes", default="eager", help="eager,compile: time each variant eager, with dash.py --compile")
    ap.add_argument("--collapsed", action="store_true", help="also time each variant at the end of a search: "
                                                            "one operator left per layer, the others skipped")
    ap.add_argument("--profile", action="store_true", help="profile 3 search steps of each variant (all active): "
                                                            "top CUDA ops, GPU against wall time per step")
    ap.add_argument("--fla-configs", default=None, help="load fla autotune configs from here (FLA_CACHE_MODE=fuzzy)")
    ap.add_argument("--dump-fla-configs", default=None, help="write fla's autotuning results here at the end")
    ap.add_argument("--lengths", default="4096,8192,16384,32768", help="context lengths of the inference table "
                                                                      "('' for none)")
    ap.add_argument("--polish-moves", type=int, default=0, help="time the discrete polish (dash.py --polish) from the "
                                                                  "collapsed state, on one held-out batch")
    ap.add_argument("--shape", default="qwen2.5-3b", help="published model shape: " + ", ".join(SHAPES))
    ap.add_argument("--finetune", default="", help="time finetune.py's step instead, for these train sets "
                                                    "(ops,attn,all), --steps steps each, and stop")
    ap.add_argument("--finetune-hidden", default="0", help="finetune.py --hidden-weight values to time with each "
                                                            "train set, e.g. 0,3 (the per-layer loss)")
    ap.add_argument("--finetune-op", default="gdn", help="the cheap layers' operator of the finetuned hybrid")
    ap.add_argument("--out", default="bench.json")
    args = ap.parse_args()
    if args.fla_configs:  # before fla is imported
        os.environ.update(FLA_CONFIG_DIR=args.fla_configs, FLA_CACHE_MODE="fuzzy")
    if args.finetune:
        return time_finetune(args)
    B, T = args.batch_size, args.seq_len
    names = dash.candidate_names(args.candidates)
    gpu = torch.cuda.get_device_name()
    peak_flops = measured_peak()
    model = shape_model(args.shape)
    shape = SHAPES[args.shape][1]
    L = shape["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, shape["vocab_size"], (max(args.steps, args.prep_steps + 1), B, T), generator=g)
    flops = flops_per_token(shape, T, args.window, names)
    res = dict(shape=args.shape, config=shape, gpu=gpu, torch=torch.__version__, batch=B, seq_len=T, candidates=names,
               window=args.window,
               skip_below=args.skip_below, measured_bf16_tflops=round(peak_flops / 1e12), flops_per_token=flops)
    res["teacher_tok_s"] = teacher_forward(model, batches[:6])
    res["teacher_mfu"] = res["teacher_tok_s"] * flops["teacher_forward"] / peak_flops

    # preparation: teacher forward with hooks, then each layer's gla and gdn take a step
    weights = {}
    if args.prep_steps:
        pcfg = dash.Config(model="qwen3b-shaped", candidates="full,gla,gdn", seq_len=T, batch_size=B,
                           prep_tokens=args.prep_steps * B * T, window=args.window, held_out=1, kernels="fla",
                           data="random", checkpoint_every=10 ** 9)
        parts = dict(held_out=batches[:1], prep=batches[1:args.prep_steps + 1])
        data = dict(parts, record=dash.data_record(parts, pcfg, dict(held_out=(0, 1), prep=(1, args.prep_steps + 1))))
        fp = dash.fingerprint(model, ["gla", "gdn"], pcfg, data)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        report = dash.align(model, ["gla", "gdn"], pcfg, data, Path("/tmp/bench_cands.safetensors"), fp)
        times = report["step_times"]
        skip = min(5, len(times) - 2)
        res["prepare_first_step_s"] = times[0]
        res["prepare_tok_s"] = (len(times) - 1 - skip) * B * T / (times[-1] - times[skip])
        res["prepare_wall_s"] = time.perf_counter() - t0
        res["prepare_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        res["prepare_minutes_default"] = dash.PAPER["prep_tokens"] / res["prepare_tok_s"] / 60
        res["prepare_mfu"] = res["prepare_tok_s"] * flops["prepare"] / peak_flops
        print("prepare", {k: v for k, v in res.items() if k.startswith("prepare")}, flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        weights = dash.read_candidates("/tmp/bench_cands.safetensors", fp)

    # search: every candidate in every layer, KL in chunks, only alpha trains
    # lr 0: the operator weights stay where they start, so each row times one state (all active, or collapsed);
    # a learning search with prepared candidates would drop operators, and compile for each new set, mid-timing
    cfg = dash.resolve(dash.Config(model="qwen3b-shaped", candidates=",".join(names), k=5, tokens=args.steps * B * T,
                                   seq_len=T, batch_size=B, lr=0.0, window=args.window, kernels="fla",
                                   skip_below=args.skip_below, log_every=10 ** 9, check_samples=0), L)
    ops = dash.make_ops(model, names, cfg)
    if weights:
        dash.load_candidates([{n: op for n, op in layer.items() if n in ("gla", "gdn")} for layer in ops], weights)
    dash.install(model, ops)

    # The end of a search: every operator weight has collapsed to one operator per layer (5 full-attention layers
    # at hybrid-distillation's KL-guided placement, the cheap operators in turn elsewhere), so the others are skipped.
    full5 = eval_ruler.HYBRID_DISTILLATION["kl_guided"][5] if L == 36 else [round(i * L / 5) for i in range(5)]
    cheap = [n for n in names if n != "full"]
    one = [names.index("full") if l in full5 else names.index(cheap[l % len(cheap)]) for l in range(L)]
    collapsed = torch.nn.functional.one_hot(torch.tensor(one), len(names)).float() * 20  # w(other) < 1e-8

    def time_search(grad: str, name: str, alpha0=None):
        cfg.grad = grad
        torch.cuda.reset_peak_memory_stats()
        try:
            result = dash.search(model, batches[:args.steps], names, cfg, alpha0)
        except torch.cuda.OutOfMemoryError:  # the table says so: this shape needs --micro-batch
            res[f"search_{name}"] = dict(oom=True, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
            print(name, "out of memory", flush=True)
            torch.cuda.empty_cache()
            return
        times = [h["time"] for h in result["history"]]
        skip = min(10, len(times) - 2)
        r = res[f"search_{name}"] = dict(first_step_s=times[0], peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                                         tok_s=(len(times) - 1 - skip) * B * T / (times[-1] - times[skip]))
        r["vs_teacher"] = r["tok_s"] / res["teacher_tok_s"]
        r["minutes_for_12.3M"] = 12.3e6 / r["tok_s"] / 60
        if alpha0 is None:  # the FLOP count is of the full mixture
            r["mfu"] = r["tok_s"] * flops["search" if grad == "exact" else "search_teacher"] / peak_flops
        print(name, r, flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))  # as it goes: a run cut off keeps what it measured

    def profile_search(grad: str, name: str):
        """Where a step's time goes: the top CUDA ops of 3 steps, and GPU time against wall time per step (a GPU
        busy far less than the wall time waits for the CPU to launch its kernels)."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        cfg.grad = grad
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = dash.search(model, batches[:3], names, cfg)
        events = prof.key_averages()
        # kernels only, as the table's total does: an op's self device time is its kernels', counted again
        gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        times = [h["time"] for h in result["history"]]
        res[f"search_{name}"].update(profile_gpu_ms_per_step=gpu_us / 3e3,
                                     profile_wall_ms_per_step=(times[-1] - times[0]) / 2 * 1e3)  # steps 2 and 3
        table = events.table(sort_by="self_cuda_time_total", row_limit=40)
        Path(args.out).with_suffix(f".profile-{name.replace(' --', '-').replace(' ', '-')}.txt").write_text(table)
        print(table, "\n", name, {k: v for k, v in res[f"search_{name}"].items() if k.startswith("profile")}, flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))

    for mode in args.modes.split(","):
        cfg.compile = mode == "compile"  # the layers and the KL
        dash.compile_layers(model, on=cfg.compile)
        suffix = " --compile" if mode == "compile" else ""
        for micro in [None] + [int(m) for m in args.micro_batches.split(",") if m]:
            cfg.micro_batch = micro
            if micro and cfg.compile:
                torch._dynamo.reset()  # graphs for the new batch shape, not a dynamic-shape recompile
            name = suffix + (f" --micro-batch {micro}" if micro else "")
            for grad in args.grads.split(","):
                time_search(grad, grad + name)
                if args.profile:
                    profile_search(grad, grad + name)
                if args.collapsed:
                    time_search(grad, grad + name + " collapsed", collapsed)
        cfg.micro_batch = None
        if args.micro_batches and cfg.compile:
            torch._dynamo.reset()
    if args.polish_moves:  # the discrete polish after the export: K (L - K) forward passes per move, no backward
        cfg.polish = args.polish_moves
        probs = torch.softmax(collapsed, -1)
        layers = dash.choose_layers(probs, names, 5)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = dash.polish(model, probs, names, layers, batches[:1], cfg)
        torch.cuda.synchronize()
        res["polish"] = dict(moves=cfg.polish, wall_s=time.perf_counter() - t0, placements=out["placements_scored"],
                             held_out_tokens=B * T, compiled=cfg.compile, moved=len(out["moves"]))
        print("polish", res["polish"], flush=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    dash.compile_layers(model, on=False)
    if args.dump_fla_configs:
        dump_fla_configs(Path(args.dump_fla_configs))

    # inference: what a hybrid saves (batch 1, prefill then 64 greedy tokens). K = 5 full-attention layers at
    # hybrid-distillation's KL-guided placement, the other 31 all Gated DeltaNet or all a 512-token window.
    dash.restore_teacher(model)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    hybrids = {} if not lengths or not weights else {
        "teacher": ["full"] * L, f"5 full + {L - 5} gdn": ["full" if l in full5 else "gdn" for l in range(L)],
        f"5 full + {L - 5} swa": ["full" if l in full5 else "swa" for l in range(L)]}
    res["inference"] = {}
    for name, layers in hybrids.items():
        dash.make_hybrid(model, layers, weights, cfg)
        for length in lengths:
            res["inference"][f"{name} @ {length}"] = eval_ruler.speed(model, length)
            print(name, length, res["inference"][f"{name} @ {length}"], flush=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    dash.restore_teacher(model)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.dump_fla_configs and lengths:  # again, with the decoding kernels' configs
        dump_fla_configs(Path(args.dump_fla_configs))
    if res["inference"]:
        print(ruler.table(res["inference"], "inference, batch 1: prefill, 64 decoded tokens"))
    rows = [("GPU", gpu), ("batch x seq", f"{B} x {T}"), ("candidates", ",".join(names)),
            ("teacher forward", f"{res['teacher_tok_s'] / 1e3:.1f}k tok/s  (MFU {res['teacher_mfu']:.0%})")]
    for grad in (k[len("search_"):] for k in res if k.startswith("search_")):
        r = res[f"search_{grad}"]
        if r.get("oom"):
            rows += [(f"search --grad {grad}", "out of memory")]
            continue
        mfu = f"MFU {r['mfu']:.0%}, " if "mfu" in r else ""
        rows += [(f"search --grad {grad}", f"{r['tok_s'] / 1e3:.1f}k tok/s  ({mfu}{r['vs_teacher']:.2f}x teacher forward)"),
                 (f"search --grad {grad}: 12.3M tokens", f"{r['minutes_for_12.3M']:.1f} min"),
                 (f"search --grad {grad}: first step", f"{r['first_step_s']:.1f} s"),
                 (f"search --grad {grad}: peak memory", f"{r['peak_gib']:.1f} GiB")]
    if args.prep_steps:
        rows += [(f"prepare gla+gdn x {L}", f"{res['prepare_tok_s'] / 1e3:.1f}k tok/s  (MFU {res['prepare_mfu']:.0%})"),
                 ("prepare: default budget", f"{res['prepare_minutes_default']:.1f} min for "
                                             f"{dash.PAPER['prep_tokens'] / 1e6:.1f}M tokens"),
                 ("prepare: first step", f"{res['prepare_first_step_s']:.1f} s"),
                 ("prepare: peak memory", f"{res['prepare_peak_gib']:.1f} GiB")]
    rows += [("FLOP/token search", f"{flops['search'] / 1e9:.1f} G (measured bf16 peak {res['measured_bf16_tflops']} T)")]
    print("\n".join(f"| {a} | {b} |" for a, b in rows))


if __name__ == "__main__":
    main()
