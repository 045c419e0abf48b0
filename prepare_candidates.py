"""
Teacher-aligned candidates: for every layer of a frozen teacher, train each cheap operator to copy that layer's
attention output. The search (dash.py) only mixes frozen operators, so it is only as good as these.

    python prepare_candidates.py                                  # the shipped small model, on CPU
    python prepare_candidates.py --model Qwen/Qwen2.5-3B-Instruct # one CUDA GPU

What trains: each operator's own small parameters (dash.py says which: per-head q/k maps, gates, an output
norm); the teacher's q/k/v/o projections are copied, i.e. shared, and frozen. The loss is the normalised MSE
of the layer's attention output (after o_proj, so errors count as the residual stream sees them):
    nmse_l = |o_proj(op(x_l)) - attn_l(x_l)|^2 / |attn_l(x_l)|^2
plus any term the operator adds itself (Operator.extra_loss(): NAtS' sparsity). After alignment, each operator
sees the held-out batches (Operator.observe(): NAtS measures its share of kept tokens, its cost in the search);
the report gives per layer and operator the nmse before and after, and the cost at the sequence length.
All layers learn from one teacher forward pass per batch: hooks keep each layer's attention input and output,
then each layer's operators take a step in turn, so only one layer's graph is alive at a time.
The result is one safetensors file per model and operator set, named by a fingerprint of everything that
shapes the weights (model, operators, tokens, data, seed); a rerun finds it and does nothing, an
interrupted run resumes from its .partial checkpoint, and a file made for something else is refused.
"""
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dash
from dash import DashError, opt

# ----------------------------------------------------------------------------- config


@dataclass
class PrepConfig:
    model: str = opt(str(dash.SMALL_MODEL), "HF model id or local directory")
    candidates: str = opt("swa,gla,gdn", "operators to align (those without parameters are only measured)")
    tokens: int | None = opt(None, "alignment tokens (default: 8.4M for real models, 131k for the small model)")
    seq_len: int | None = opt(None, "tokens per sequence (default: 2048; 1024 for the small model)")
    batch_size: int | None = opt(None, "sequences per step (default: 4)")
    lr: float = opt(3e-3, "AdamW peak learning rate (cosine decay, 5% warm-up)")
    window: int | None = opt(None, "sliding window of 'swa' (default as dash.py)")
    data: str | None = opt(None, "training text, as dash.py --data")
    seed: int = opt(0, "seed of data order and initialisation")
    cache: str | None = opt(None, "output .safetensors (default: candidates/<model>-<fingerprint>.safetensors)")
    eval_batches: int = opt(2, "held-out batches for the alignment report")
    save_every: int = opt(50, "steps between resumable checkpoints")
    device: str = opt("auto", "cuda, cpu or auto")
    dtype: str = opt("auto", "bfloat16, float32 or auto")
    kernels: str = opt("auto", "fla (CUDA only), torch or auto")


PREP_PAPER = dict(tokens=8_388_608, seq_len=2048, batch_size=4)
PREP_SMALL = dict(tokens=131_072, seq_len=1024, batch_size=4)


def resolve(pcfg: PrepConfig) -> PrepConfig:
    small = Path(pcfg.model).resolve() == dash.SMALL_MODEL
    for name, value in (PREP_SMALL if small else PREP_PAPER).items():
        if getattr(pcfg, name) is None:
            setattr(pcfg, name, value)
    search_defaults = dash.SMALL if small else dash.PAPER
    if pcfg.window is None:
        pcfg.window = search_defaults["window"]
    if pcfg.data is None:
        own = Path(pcfg.model, "search_data.jsonl.gz")
        pcfg.data = str(own) if own.exists() else search_defaults["data"]
    return pcfg


def from_search(cfg: dash.Config, names: list[str]) -> PrepConfig:
    """The preparation a search with cfg needs: its operators, model, data, sequences and kernels."""
    return resolve(PrepConfig(model=cfg.model, candidates=",".join(n for n in names if n != "full"),
                              tokens=cfg.prep_tokens, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                              window=cfg.window, data=cfg.data, cache=cfg.cache, device=cfg.device,
                              dtype=cfg.dtype, kernels=cfg.kernels))

# ----------------------------------------------------------------------------- fingerprint and cache


def fingerprint(model, names: list[str], pcfg: PrepConfig) -> dict:
    """Everything that shapes the prepared weights. The model is named by its config and a hash of its first
    layer's query weights (in bf16, so fp32 and bf16 loads of one checkpoint agree)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version", "architectures")}
    attn = dash.teacher_attention(model)[0]
    q = attn.q_proj.weight.detach().to("cpu", torch.bfloat16)
    ops = {n: dash.CANDIDATES[n](attn, pcfg) for n in names}
    return dict(model=Path(pcfg.model).name if Path(pcfg.model).exists() else pcfg.model,
                config=hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
                weights=hashlib.sha256(q.view(torch.int16).numpy().tobytes()).hexdigest()[:16],
                operators={n: {**op.settings(), **{k: list(t.shape) for k, t in op.state_dict().items()}}
                           for n, op in ops.items()},
                tokens=pcfg.tokens, seq_len=pcfg.seq_len, batch_size=pcfg.batch_size, lr=pcfg.lr,
                data=pcfg.data, seed=pcfg.seed)


def default_path(fp: dict) -> Path:
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]
    return dash.HERE / "candidates" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', fp['model'])}-{digest}.safetensors"


def read_cache(path: Path, fp: dict) -> dict[str, torch.Tensor]:
    """The weights of a finished cache, after checking it was made for this model and these operators."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "fingerprint" not in meta:
        raise DashError(f"{path} is not a candidate cache (no fingerprint in its metadata)")
    theirs = json.loads(meta["fingerprint"])
    for key in ("config", "weights"):
        if theirs.get(key) != fp[key]:
            raise DashError(f"{path} was prepared for another model ({theirs.get('model')}, {key} "
                            f"{theirs.get(key)} != {fp[key]}): prepare candidates for {fp['model']}")
    for n, settings in fp["operators"].items():
        if theirs["operators"].get(n) != settings:
            raise DashError(f"{path} was prepared with other settings for {n!r} ({theirs['operators'].get(n)} != "
                            f"{settings}): prepare again, or pass the matching cache")
    return load_file(str(path))


def load_or_prepare(model, tokenizer, names: list[str], cfg: dash.Config) -> tuple[str, dict]:
    """dash.py's entry: the candidate weights for this search, prepared first if there are none yet."""
    pcfg = from_search(cfg, names)
    fp = fingerprint(model, pcfg.candidates.split(","), pcfg)
    path = Path(pcfg.cache) if pcfg.cache else default_path(fp)
    if not path.exists():
        if not cfg.prepare:
            raise DashError(f"no candidate cache at {path} and --no-prepare: run python prepare_candidates.py "
                            f"--model {cfg.model} first, or drop --no-prepare")
        print(f"no prepared candidates for this model and operator set: preparing {path.name}")
        prepare(model, tokenizer, pcfg, path, fp)
    return str(path), read_cache(path, fp)

# ----------------------------------------------------------------------------- alignment


def capture(model, ids: torch.Tensor) -> list[tuple]:
    """One teacher forward pass; per layer (attention input x, rope, attention output)."""
    seen, hooks = [], []
    for attn in dash.teacher_attention(model):
        hooks.append(attn.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((kwargs["hidden_states"], kwargs["position_embeddings"], out[0])),
            with_kwargs=True))
    try:
        with torch.no_grad():
            dash.final_hidden(model, ids)  # the layers as in model.model(ids), without its host sync
    finally:
        for h in hooks:
            h.remove()
    return seen


def nmse(op, attn, x, rope, target) -> torch.Tensor:
    """Normalised MSE of one operator against the teacher's attention output of its layer."""
    with torch.no_grad():
        p = dash.project(attn, x, rope)  # the shared, frozen projections
    y = attn.o_proj(op(p).flatten(2))
    return (y.float() - target.float()).pow(2).mean() / target.float().pow(2).mean()


def aligned_loss(op, attn, x, rope, target) -> torch.Tensor:
    """What preparation minimises: the nmse, plus the term the operator adds to it (Operator.extra_loss(), e.g. NAtS'
    sparsity), from the same forward pass."""
    loss = nmse(op, attn, x, rope, target)
    extra = op.extra_loss()
    return loss if extra is None else loss + extra


def calibrate(model, ops, ids):
    """Start each output norm at its least-squares scale against the teacher, so training starts below nmse 1:
    a linear read-out has no softmax normaliser, and unit RMS per head can be far from the teacher's."""
    attns = dash.teacher_attention(model)
    with torch.no_grad():
        for l, (x, rope, target) in enumerate(capture(model, ids)):
            for op in ops[l].values():
                if isinstance(getattr(op, "norm", None), torch.nn.Parameter):
                    y = attns[l].o_proj(op(dash.project(attns[l], x, rope)).flatten(2)).float()
                    op.norm.mul_(((y * target.float()).sum() / y.pow(2).sum()).clamp_min(1e-3))


def evaluate(model, ops, batches, observe: bool = False) -> list[dict[str, float]]:
    """Per layer and operator, the mean nmse over held-out batches. observe: first show each operator the batch
    (Operator.observe(): what its cost needs measured, after alignment)."""
    attns, total = dash.teacher_attention(model), [{n: 0.0 for n in ops[0]} for _ in ops]
    for ids in batches:
        for l, (x, rope, target) in enumerate(capture(model, ids)):
            with torch.no_grad():
                for n, op in ops[l].items():
                    if observe:
                        op.observe(dash.project(attns[l], x, rope))
                    total[l][n] += nmse(op, attns[l], x, rope, target).item() / len(batches)
    return total


def prepare(model, tokenizer, pcfg: PrepConfig, path: Path, fp: dict, data: torch.Tensor | None = None) -> dict:
    """Align every operator in every layer; write the weights (with the fingerprint) and a report.
    data: (steps + eval_batches, batch, seq) token ids, instead of reading pcfg.data (the benchmark's)."""
    names = pcfg.candidates.split(",")
    device = next(model.parameters()).device
    dash.restore_teacher(model)
    torch.manual_seed(pcfg.seed)
    ops = dash.make_ops(model, names, pcfg)
    params = [p for layer in ops for op in layer.values() for p in op.parameters()]
    steps = max(1, pcfg.tokens // (pcfg.batch_size * pcfg.seq_len))
    if data is None:
        data = dash.token_batches(tokenizer, pcfg.data, steps + pcfg.eval_batches, pcfg.batch_size, pcfg.seq_len)
    train, held_out = data[:steps], data[steps:].to(device)
    print(f"aligning {', '.join(names)} in {len(ops)} layers: {sum(p.numel() for p in params):,} new parameters, "
          f"{steps} steps of {pcfg.batch_size}x{pcfg.seq_len} tokens; teacher and its projections frozen")
    opt = torch.optim.AdamW(params, lr=pcfg.lr, weight_decay=0.0) if params else None
    warm = max(1, steps // 20)
    sched = opt and torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))
    partial, start, t0 = path.with_suffix(".partial.pt"), 0, time.time()
    ck = torch.load(partial, map_location=device) if partial.exists() else None
    if ck and ck["fingerprint"] == fp:  # resume an interrupted run: same data order, so skip what was done
        dash.load_candidates(ops, ck["weights"], str(partial))
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, t0, before = ck["step"], time.time() - ck["elapsed"], ck["before"]
        print(f"resuming from {partial} at step {start}")
    else:
        calibrate(model, ops, train[0].to(device))
        before = evaluate(model, ops, held_out)
    attns, curve, step_times = dash.teacher_attention(model), [], []
    bar = tqdm(range(start, steps), desc="align", unit="step", initial=start, total=steps)
    for step in bar:
        losses = []
        for l, (x, rope, target) in enumerate(capture(model, train[step].to(device))):
            trainable = [op for op in ops[l].values() if dash.trainable(op)]
            if trainable:  # one layer's graph at a time: backward right away
                loss = sum(aligned_loss(op, attns[l], x, rope, target) for op in trainable)
                loss.backward()
                losses.append(loss.detach() / len(trainable))
        if opt:
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        curve.append(torch.stack(losses).mean().item() if losses else 0.0)  # one host sync per step
        step_times.append(time.time() - t0)
        bar.set_postfix(nmse=f"{curve[-1]:.4f}")
        if opt and ((step + 1) % pcfg.save_every == 0) and step + 1 < steps:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dict(fingerprint=fp, step=step + 1, elapsed=time.time() - t0, weights=state_dict(ops),
                            opt=opt.state_dict(), sched=sched.state_dict(), before=before), partial)
    after = evaluate(model, ops, held_out, observe=True)
    report = dict(fingerprint=fp, tokens=steps * pcfg.batch_size * pcfg.seq_len, wall_time_s=round(time.time() - t0, 1),
                  device=str(device), curve=[round(c, 5) for c in curve], step_times=[round(t, 3) for t in step_times],
                  trained=[n for n in names if dash.trainable(ops[0][n])],
                  layers=[{n: dict(before=round(b[n], 5), after=round(a[n], 5), cost=round(at[n].cost(pcfg.seq_len), 5))
                           for n in names} for b, a, at in zip(before, after, ops)])  # cost at the sequence length
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(ops), str(path), metadata={"fingerprint": json.dumps(fp)})
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    partial.unlink(missing_ok=True)
    print(table(report))
    print(f"wrote {path} and {path.with_suffix('.json')} ({report['tokens']:,} tokens, {report['wall_time_s']} s)")
    return report


def state_dict(ops) -> dict[str, torch.Tensor]:
    """Every operator's parameters and persistent buffers (what it measured), as dash.load_op() reads them."""
    return {f"layers.{l}.{n}.{k}": t.detach().float().cpu().contiguous()
            for l, layer in enumerate(ops) for n, op in layer.items() for k, t in op.state_dict().items()}


def table(report: dict) -> str:
    """The alignment report: held-out nmse per layer and operator (before -> after). Low = easy to replace."""
    names = list(report["layers"][0])
    rows = ["layer " + "".join(f"{n:>18}" for n in names)]
    for l, layer in enumerate(report["layers"]):
        rows.append(f"{l:>5} " + "".join(f"{layer[n]['before']:>8.4f} -> {layer[n]['after']:<6.4f}" for n in names))
    return "\n".join(rows)


def main(argv=None):
    try:
        pcfg = dash.parse_args(argv, PrepConfig, "Prepare teacher-aligned candidates for DASH")
        names = [n for n in dash.candidate_names("full," + pcfg.candidates) if n != "full"]
        device, dtype = dash.devices(pcfg)
        model, tokenizer = dash.load_model(pcfg.model, device, dtype)
        pcfg = resolve(pcfg)
        print(json.dumps(asdict(pcfg), indent=1))
        fp = fingerprint(model, names, pcfg)
        path = Path(pcfg.cache) if pcfg.cache else default_path(fp)
        if path.exists():
            read_cache(path, fp)
            print(f"{path} is prepared already, for this model and these settings: nothing to do")
            return
        prepare(model, tokenizer, pcfg, path, fp)
    except DashError as e:
        raise SystemExit(f"prepare_candidates: {e}")


if __name__ == "__main__":
    main()
