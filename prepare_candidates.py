"""
Teacher-aligned candidates, on their own: for every layer of a frozen teacher, train each cheap operator to copy
that layer's attention output. dash.py does this on demand; this script does it ahead of a search.

    python prepare_candidates.py                                  # the shipped small model, on CPU
    python prepare_candidates.py --model Qwen/Qwen2.5-3B-Instruct # one CUDA GPU
    torchrun --nproc-per-node 4 prepare_candidates.py --model ... # 4 GPUs, each a quarter of every batch

The alignment itself, its fingerprint and its file live in dash.py ("candidate alignment and cache"): this is its
command line. The result is one safetensors file per fingerprint of everything that shapes the weights (teacher
and operator definitions by content, data by content, settings); a rerun finds it and does nothing, an
interrupted run resumes from its .partial checkpoint, and a file made for something else is refused.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import dash
from dash import DashError, flag


@dataclass
class PrepConfig:
    model: str = flag(str(dash.SMALL_MODEL), "HF model id or local directory")
    candidates: str = flag("swa,gla,gdn", "operators to align (those without parameters are only measured)")
    tokens: int | None = flag(None, "alignment tokens (default: 8.4M for real models, 131k for the small model)")
    seq_len: int | None = flag(None, "tokens per sequence (default: 2048; 1024 for the small model)")
    batch_size: int | None = flag(None, "sequences per step (default: 4)")
    lr: float = flag(3e-3, "AdamW peak learning rate (cosine decay, 5% warm-up)")
    window: int | None = flag(None, "sliding window of 'swa' (default as dash.py)")
    data: str | None = flag(None, "training text, as dash.py --data")
    seed: int = flag(0, "seed of data order and initialisation (dash.py's --prep-seed)")
    cache: str | None = flag(None, "output .safetensors (default: candidates/<model>-<fingerprint>.safetensors)")
    held_out: int = flag(2, "held-out batches for the alignment report (the text before the alignment's)")
    checkpoint_every: int = flag(50, "steps between resumable checkpoints")
    device: str = flag("auto", "cuda, cpu or auto")
    dtype: str = flag("auto", "bfloat16, float32 or auto")
    kernels: str = flag("auto", "fla (CUDA only), torch or auto")
    fsdp: bool = flag(False, "under torchrun, shard the frozen teacher over the GPUs (as dash.py --fsdp)")


def search_config(pcfg: PrepConfig) -> dash.Config:
    """The dash.py settings whose search would prepare exactly these candidates (same file, same fingerprint)."""
    return dash.Config(model=pcfg.model, candidates="full," + pcfg.candidates, prep_tokens=pcfg.tokens,
                       seq_len=pcfg.seq_len, batch_size=pcfg.batch_size, prep_lr=pcfg.lr, window=pcfg.window,
                       data=pcfg.data, prep_seed=pcfg.seed, cache=pcfg.cache, held_out=pcfg.held_out,
                       checkpoint_every=pcfg.checkpoint_every, device=pcfg.device, dtype=pcfg.dtype,
                       kernels=pcfg.kernels, fsdp=pcfg.fsdp)


def main(argv=None):
    try:
        cfg = search_config(dash.parse_args(argv, PrepConfig, "Prepare teacher-aligned candidates for DASH"))
        names = [n for n in dash.candidate_names(cfg.candidates) if n != "full"]
        device, dtype = dash.devices(cfg)
        device = dash.init_distributed(device)  # under torchrun: the layers split over the ranks (dash.align)
        model, tokenizer = dash.load_model(cfg.model, "cpu" if cfg.fsdp else device, dtype)
        cfg = dash.resolve(cfg, len(model.model.layers))
        if cfg.fsdp:
            dash.shard_teacher(model, device)
        print(json.dumps(asdict(cfg), indent=1))
        data = dash.load_data(tokenizer, cfg, parts=("held_out", "prep"))
        fp = dash.fingerprint(model, names, cfg, data)
        path = Path(cfg.cache) if cfg.cache else dash.default_cache(fp)
        if dash.from_main(path.exists()):  # every rank takes rank 0's answer
            dash.read_candidates(path, fp)
            print(f"{path} is prepared already, for this model, these operators and this data: nothing to do")
        else:
            dash.align(model, names, cfg, data, path, fp)
    except DashError as e:
        raise SystemExit(f"prepare_candidates: {dash.failed_where()}{e}")
    dash.leave_distributed()


if __name__ == "__main__":
    main()
