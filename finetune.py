"""Finetune an exported hybrid by distillation from its teacher: KL(teacher || hybrid) on text that neither the
candidates' preparation nor the search saw (the paper's optional light finetune; seed 004's stage 1).

    python finetune.py --arch out/arch.json --out out/finetuned          # the small teacher: minutes on a CPU
    python finetune.py --arch out/arch.json --tokens 50000000 --top-k 64   # a longer run (GPU), top-k KL
    python eval_ruler.py --arch out/finetuned/arch.json --baselines none  # RULER of the finetuned hybrid

The hybrid is dash.build_hybrid's; the teacher is the same model before surgery, frozen. Only the parameters that
--train names get gradients:
  ops    the cheap operators' new parameters (q/k maps, gates, output norms; swa has none)
  attn   those, plus the q/k/v/o projections of the cheap layers
  all    every weight but the embeddings and the LM head, with --lr inside attention (operators and projections,
         every layer) and --lr-other outside it (MLPs, norms), as hybrid-distillation's stage 2 (1e-4 and 7e-6)
The loss is dash's fused chunked KL (no full-vocabulary logits), or with --top-k a decoupled top-k KL; with
--long-weight each token's KL is weighted by how much the teacher needs the long context to predict it (LongCE);
with --hidden-weight (the small model's default) a per-layer loss on each layer's output joins it.
Writes <out>/arch.json, the same schema as dash.py's, plus a "finetune" record, and <out>/finetuned.safetensors
with the trained weights only: build_hybrid() and eval_ruler.py --arch rebuild the finetuned model from them.
Also here: hybrid-distillation's KL-guided layer selection (GA-S2) at small scale, ga_s2(), for eval_ruler.py.

Sections: config, loss, the student, training, GA-S2, main. Imports flow one way: this file imports dash, never
the reverse.
"""
import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import dash
from dash import DashError, flag

# ----------------------------------------------------------------------------- config

TRAIN_SETS = ("ops", "attn", "all")


@dataclass
class FinetuneConfig:
    arch: str = flag("out/arch.json", "architecture JSON written by dash.py")
    out: str = flag("out/finetuned", "folder for the finetuned arch.json, its weights and checkpoints")
    model: str | None = flag(None, "the teacher (default: the architecture's model)")
    cache: str | None = flag(None, "candidate weights (default: the architecture's candidate_cache)")
    train: str = flag("all", "what trains: ops (the cheap operators' new parameters), attn (those and the cheap "
                             "layers' q/k/v/o projections), all (everything but embeddings and head, --lr-other "
                             "outside attention). all: the lowest held-out KL on the small teacher (README)")
    tokens: int | None = flag(None, "finetuning tokens, after the search's (default: 20M; 327,680 for the small "
                                    "model, all its shipped text holds: under 5 minutes on a 2-core CPU)")
    lr: float | None = flag(None, "AdamW peak learning rate of the operators and attention projections (default: "
                                  "1e-4 as hybrid-distillation's stage 2; 1e-3 for the small model's few steps)")
    lr_other: float | None = flag(None, "peak learning rate outside attention, with --train all (default: 7e-6 as "
                                        "hybrid-distillation's stage 2; 7e-5 for the small model, the same ratio)")
    warmup: float = flag(0.05, "share of the steps with linear warm-up; cosine decay to 0 after")
    top_k: int = flag(0, "0: full-vocabulary KL; k > 0: decoupled top-k KL on the teacher's k most likely tokens")
    hidden_weight: float | None = flag(None, "weight of the per-layer loss beside the KL: each layer's output against "
                                             "the teacher's (default: 0; 3 for the small model, which lowers its "
                                             "held-out KL and keeps more needles, README)")
    long_weight: float = flag(0.0, "0: every token's KL alike; g > 0: weight each token by min(p / p_short, g), p the "
                                   "teacher's probability of the next token, p_short the teacher's with the "
                                   "architecture's swa window in every layer (LongCE): tokens that need the long "
                                   "context count more. 20: more retrieval, a higher KL (README)")
    batch_size: int | None = flag(None, "sequences per optimizer step (default: the search's batch size; 1 for the "
                                        "small model: the same tokens in more steps, a lower held-out KL, README)")
    epochs: int = flag(1, "passes over the finetuning tokens, each in a new order (the small teacher's text holds "
                          "327,680 finetuning tokens: a longer run repeats them)")
    seed: int = flag(0, "seed of the finetuning tokens' order")
    data: str | None = flag(None, "text (default: the architecture's); finetuning reads the tokens after the search's")
    log_every: int = flag(10, "steps between loss lines in the log")
    checkpoint_every: int = flag(50, "steps between checkpoints in --out")
    resume: bool = flag(False, "continue from the checkpoint in --out")
    kl_chunk: int = flag(1024, "tokens per chunk of the KL: full-vocabulary fp32 logits exist for one chunk only")
    device: str = flag("auto", "cuda, cpu or auto")
    dtype: str = flag("auto", "bfloat16, float32 or auto (bfloat16 on CUDA: trained weights keep fp32 masters)")
    kernels: str = flag("auto", "fla (CUDA only), torch or auto")


# Defaults that depend on the model, as in dash.py: the paper's scale, and CPU minutes for the small teacher.
PAPER = dict(tokens=20_000_000, lr=1e-4, lr_other=7e-6, hidden_weight=0.0)
SMALL = dict(tokens=327_680, lr=1e-3, lr_other=7e-5, hidden_weight=3.0, batch_size=1)


def resolve(fcfg: FinetuneConfig, arch: dict) -> FinetuneConfig:
    """Fill the model-dependent defaults and check the flags that do not need the model."""
    fcfg.model = fcfg.model or arch["model"]
    for name, value in (SMALL if dash.is_small_model(fcfg.model) else PAPER).items():
        if getattr(fcfg, name) is None:
            setattr(fcfg, name, value)
    if fcfg.train not in TRAIN_SETS:
        raise DashError(f"--train {fcfg.train!r}: choose one of {', '.join(TRAIN_SETS)}")
    if fcfg.epochs < 1:
        raise DashError(f"--epochs {fcfg.epochs} must be at least 1")
    if fcfg.batch_size is not None and fcfg.batch_size < 1:
        raise DashError(f"--batch-size {fcfg.batch_size} must be at least 1")
    if fcfg.tokens < 1 or fcfg.lr <= 0 or fcfg.lr_other < 0 or fcfg.top_k < 0 or not 0 <= fcfg.warmup < 1:
        raise DashError(f"--tokens {fcfg.tokens}, --lr {fcfg.lr}, --lr-other {fcfg.lr_other}, --top-k {fcfg.top_k}, "
                        f"--warmup {fcfg.warmup}: need tokens >= 1, lr > 0, lr-other >= 0, top-k >= 0, 0 <= warmup < 1")
    if fcfg.hidden_weight < 0:
        raise DashError(f"--hidden-weight {fcfg.hidden_weight} must be at least 0 (0: the KL alone)")
    if fcfg.long_weight < 0 or (fcfg.long_weight and fcfg.top_k):
        raise DashError(f"--long-weight {fcfg.long_weight}: 0 (off) or a cap > 0, and not with --top-k")
    if "finetune" in arch:
        raise DashError(f"{fcfg.arch} is already finetuned; finetune the architecture it came from "
                        f"({arch['finetune']['from']}) with more --tokens, or continue a run with --resume")
    return fcfg


def search_config(fcfg: FinetuneConfig, arch: dict) -> dash.Config:
    """dash's Config of the architecture, with this run's device, text and seed: its data ranges, batch size and
    sequence length place the finetuning tokens after the search's."""
    cfg = dash.arch_config(arch)
    cfg.device, cfg.dtype, cfg.kernels, cfg.seed, cfg.kl_chunk = fcfg.device, fcfg.dtype, fcfg.kernels, fcfg.seed, \
        fcfg.kl_chunk
    cfg.data = fcfg.data or cfg.data
    return cfg

# ----------------------------------------------------------------------------- loss


def topk_terms(k: int):
    """dash.kl_terms' contract (a chunk of logits -> summed loss and its gradient w.r.t. the student's logits) for a
    decoupled top-k KL. With S the teacher's k most likely tokens, p_S and q_S the teacher's and the student's mass
    on them, p|S and q|S their distributions renormalised on S:
        L = KL([p_S, 1 - p_S] || [q_S, 1 - q_S]) + KL(p|S || q|S)
    the mass on the head, and the shape within it, as two terms (as decoupled KD splits target and non-target; the
    full KL would weigh the second by p_S and add the tail's shape, which the student then need not copy). With
    k = vocabulary, p_S = q_S = 1 and L is the full KL. The gradient comes from autograd on the chunk alone."""
    def terms(z_student: torch.Tensor, z_teacher: torch.Tensor, n: int):
        with torch.enable_grad():
            z = z_student.detach().float().requires_grad_()                       # (chunk, V)
            log_p, log_q = F.log_softmax(z_teacher.float(), -1), F.log_softmax(z, -1)
            top = log_p.topk(min(k, log_p.shape[-1]), -1).indices                 # (chunk, k)
            lp, lq = log_p.gather(-1, top), log_q.gather(-1, top)
            lp_s, lq_s = lp.logsumexp(-1), lq.logsumexp(-1)                        # log mass on the head, (chunk,)
            tail_p = torch.log1p(-lp_s.exp().clamp(max=1 - 1e-6))
            tail_q = torch.log1p(-lq_s.exp().clamp(max=1 - 1e-6))
            mass = lp_s.exp() * (lp_s - lq_s) + tail_p.exp() * (tail_p - tail_q)
            shape = ((lp - lp_s[:, None]).exp() * ((lp - lp_s[:, None]) - (lq - lq_s[:, None]))).sum(-1)
            loss = (mass + shape).sum()
            grad, = torch.autograd.grad(loss / n, z)
        return loss.detach(), grad.to(z_student.dtype)
    return terms


def loss_terms(fcfg: FinetuneConfig):
    return dash.kl_terms if fcfg.top_k == 0 else topk_terms(fcfg.top_k)


def loss_name(fcfg: FinetuneConfig) -> str:
    if fcfg.top_k:
        name = f"decoupled top-{fcfg.top_k} KL"
    else:
        name = f"KL, tokens weighted by min(p / p_short, {fcfg.long_weight}) (LongCE)" if fcfg.long_weight else "kl"
    return name + (f" + {fcfg.hidden_weight} x per-layer hidden-state loss" if fcfg.hidden_weight else "")


def weighted_terms(weights: torch.Tensor):
    """dash.kl_terms with token t's KL and its gradient scaled by weights[t], weights (N,) for the N tokens of one
    ChunkedKL call, which hands over its chunks in order."""
    seen = [0]

    def weighted(z_student: torch.Tensor, z_teacher: torch.Tensor, n: int):
        w = weights[seen[0]:seen[0] + len(z_student)]
        seen[0] += len(z_student)
        log_q, log_p = F.log_softmax(z_student.float(), -1), F.log_softmax(z_teacher.float(), -1)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(-1)                                          # (chunk,)
        return (w * kl).sum(), ((log_q.exp() - p) * (w / n)[:, None]).to(z_student.dtype)
    return weighted


def hidden_loss(student_layers: list[torch.Tensor], teacher_layers: list[torch.Tensor]) -> torch.Tensor:
    """The per-layer loss beside the KL: each layer's output (B, T, C) against the teacher's on the same tokens,
    squared error over the teacher's mean square (so that every layer counts alike, whatever its scale), averaged
    over the layers. The KL reaches a cheap layer only through every layer above it; this tells each layer directly
    what the teacher's residual stream was there (the alignment of prepare_candidates, now end to end)."""
    total = 0.0
    for s, t in zip(student_layers, teacher_layers):
        t = t.float()  # one fp32 copy of the teacher's layer, for the error and the scale
        total = total + F.mse_loss(s.float(), t) / t.square().mean()
    return total / len(teacher_layers)


def next_token_logprob(h: torch.Tensor, ids: torch.Tensor, head, chunk: int) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) from final hidden states h (B, T, C): (B, T - 1), a chunk of tokens at a time."""
    hs, target = h[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    out = torch.cat([F.log_softmax(head(hs[i:i + chunk]).float(), -1).gather(-1, target[i:i + chunk, None])[:, 0]
                     for i in range(0, len(hs), chunk)])
    return out.view(ids.shape[0], -1)


def long_weights(h_teacher, h_short, ids, head, chunk: int, cap: float) -> torch.Tensor:
    """LongCE's token weights (Fang et al., ICLR 2025), with the frozen teacher as the judge: min(p / p_short, cap),
    p and p_short the teacher's probability of the next token with all of the context and with a sliding window.
    A retrieved answer (p ~ 1, p_short ~ 0) gets the cap; a token the window predicts as well gets about 1. The last
    position (no next token) gets 1; the weights are scaled to mean 1, so the learning rate means the same."""
    lsd = next_token_logprob(h_teacher, ids, head, chunk) - next_token_logprob(h_short, ids, head, chunk)
    w = torch.cat([lsd.exp().clamp(max=cap), lsd.new_ones(ids.shape[0], 1)], 1)     # (B, T)
    return (w / w.mean()).flatten()


def held_out_kl(student, teacher, batches: torch.Tensor, chunk: int) -> float:
    """Mean full-vocabulary KL(teacher || student) over held-out batches (n, B, T): what each train set is scored on."""
    device, head = next(student.parameters()).device, student.get_output_embeddings()
    with torch.no_grad():
        return sum(dash.chunked_kl(dash.final_hidden(student, ids.to(device)),
                                   dash.final_hidden(teacher, ids.to(device)), head, chunk).item()
                   for ids in batches) / len(batches)

# ----------------------------------------------------------------------------- the student


def student_of(teacher, layers: list[str], state: dict, cfg: dash.Config, check: bool = True):
    """The hybrid to train: a copy of the teacher with each layer's operator (its prepared weights); the teacher
    stays as it is, the reference of the KL. check: dash.check_generation (off only where nothing generates)."""
    return dash.make_hybrid(copy.deepcopy(teacher), layers, state, cfg, check=check)


def parameter_groups(student, layers: list[str], train: str, lr: float, lr_other: float) -> list[dict]:
    """The optimizer's groups of (name, parameter) for a train set, switched to get gradients; everything else
    stays frozen. The embeddings and the LM head never train: the fused KL's gradient stops at the final hidden
    state (the head's weight gets none)."""
    cheap = {l for l, n in enumerate(layers) if n != dash.FULL}
    inside, outside = [], []
    for name, p in student.named_parameters():
        parts = name.split(".")  # model.layers.<l>.self_attn.(op|attn).<...>
        layer = int(parts[2]) if parts[1] == "layers" else None
        attention = layer is not None and parts[3] == "self_attn"
        if train == "all" and "embed_tokens" not in name and "lm_head" not in name:
            (inside if attention else outside).append((name, p))
        elif layer in cheap and attention and (parts[4] == "op" or train == "attn"):
            inside.append((name, p))
    groups = [dict(params=inside, lr=lr)] + ([dict(params=outside, lr=lr_other)] if outside else [])
    if not inside:
        raise DashError(f"--train {train}: nothing to train in this hybrid ({' '.join(layers)}): swa has no "
                        f"parameters of its own; use --train attn or all")
    for g in groups:
        for _, p in g["params"]:
            p.requires_grad_(True)
    return groups


class MasterAdamW:
    """AdamW on fp32 masters of the trained parameters: in bf16 (8 bits of mantissa) a step of lr 1e-4 relative to
    the weight rounds away. fp32 parameters are their own masters. Frozen parameters are never seen."""

    def __init__(self, groups: list[dict]):
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_())
                      for g in groups for _, p in g["params"]]
        master = {id(p): m for p, m in self.pairs}
        self.opt = torch.optim.AdamW([dict(params=[master[id(p)] for _, p in g["params"]], lr=g["lr"])
                                      for g in groups], betas=(0.9, 0.95), weight_decay=0.0)
        self.peak = [g["lr"] for g in groups]

    def step(self, scale: float):
        for g, peak in zip(self.opt.param_groups, self.peak):
            g["lr"] = peak * scale
        for p, m in self.pairs:
            if m is not p:  # the fp32 gradient replaces the bf16 one at once: one of them alive per tensor
                m.grad, p.grad = None if p.grad is None else p.grad.float(), None
        self.opt.step()
        with torch.no_grad():
            for p, m in self.pairs:
                if m is not p:
                    p.copy_(m)
                p.grad = None

    def state_dict(self) -> dict:
        return dict(opt=self.opt.state_dict(), masters=[m.detach().cpu() for _, m in self.pairs])

    def load_state_dict(self, state: dict):
        with torch.no_grad():
            for (p, m), saved in zip(self.pairs, state["masters"]):
                m.copy_(saved)
                if m is not p:
                    p.copy_(m)
        self.opt.load_state_dict(state["opt"])


def lr_scale(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over the first `warmup` share of the steps, then cosine decay to 0."""
    w = max(1, round(warmup * steps)) if warmup else 0
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))

# ----------------------------------------------------------------------------- training


def distil(student, teacher, batches: torch.Tensor, groups: list[dict], fcfg: FinetuneConfig,
           checkpoint: Path | None = None, run_key: str = "", desc: str = "finetune", short=None) -> dict:
    """Train the parameters in `groups` on KL(teacher || student), plus --hidden-weight x hidden_loss, over batches
    (n, B, T), one step a batch.
    short: the teacher with a sliding window in every layer, for --long-weight's token weights. Returns the loss curve
    and the wall time; checkpoints every --checkpoint-every steps (and resumes with --resume)."""
    device, steps = next(student.parameters()).device, len(batches)
    head, terms = student.get_output_embeddings(), loss_terms(fcfg)
    opt = MasterAdamW(groups)
    history, start, elapsed = [], 0, 0.0
    if checkpoint is not None and fcfg.resume:
        if not checkpoint.exists():
            raise DashError(f"--resume: no checkpoint at {checkpoint} (a run saves one every --checkpoint-every steps)")
        ck = torch.load(checkpoint, map_location=device)
        if ck["run_key"] != run_key:
            raise DashError(f"--resume: {checkpoint} was saved by a run with other settings, data or architecture; "
                            f"drop --resume to start over")
        opt.load_state_dict(ck["optimizer"])
        history, start, elapsed = ck["history"], ck["step"], ck["elapsed"]
        print(f"resuming the finetuning from {checkpoint} at step {start} of {steps}")
    t0 = time.time() - elapsed
    bar = tqdm(range(start, steps), desc=desc, unit="step", initial=start, total=steps)
    for step in bar:
        ids = batches[step].to(device)                                          # (B, T)
        kt, ks = ([], []) if fcfg.hidden_weight else (None, None)  # each layer's output, for --hidden-weight
        with torch.no_grad():
            h_teacher = dash.final_hidden(teacher, ids, kt)                     # (B, T, C)
            if short is not None:
                w = long_weights(h_teacher, dash.final_hidden(short, ids), ids, head, fcfg.kl_chunk, fcfg.long_weight)
        loss = dash.chunked_kl(dash.final_hidden(student, ids, ks), h_teacher, head, fcfg.kl_chunk,
                               terms if short is None else weighted_terms(w))
        hidden = hidden_loss(ks, kt) if fcfg.hidden_weight else None
        (loss if hidden is None else loss + fcfg.hidden_weight * hidden).backward()
        scale = lr_scale(step, steps, fcfg.warmup)
        opt.step(scale)
        history.append(dict(step=step, loss=round(loss.item(), 6), lr_scale=round(scale, 4),
                            time=round(time.time() - t0, 2)))
        if hidden is not None:
            history[-1]["hidden"] = round(hidden.item(), 6)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if (step + 1) % fcfg.log_every == 0 or step == steps - 1:
            recent = [h["loss"] for h in history[-fcfg.log_every:]]
            tqdm.write(f"{desc} step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f} (mean of the last "
                       f"{len(recent)})  lr x{scale:.3f}")
        if checkpoint is not None and (step + 1) % fcfg.checkpoint_every == 0 and step + 1 < steps:
            dash.save_atomic(dict(run_key=run_key, step=step + 1, optimizer=opt.state_dict(), history=history,
                                  elapsed=time.time() - t0), checkpoint)
    return dict(history=history, wall_time_s=round(time.time() - t0, 1))


def trained_state(groups: list[dict]) -> dict[str, torch.Tensor]:
    """The trained weights, keyed by the hybrid's parameter names, in the model's dtype (what it computes with)."""
    return {name: p.detach().cpu().contiguous() for g in groups for name, p in g["params"]}


def finetune_key(fcfg: FinetuneConfig, arch_sha: str, record: dict) -> str:
    """What a checkpoint must agree on to be resumed: the settings, the architecture and the data."""
    settings = {k: v for k, v in asdict(fcfg).items() if k not in ("resume", "log_every", "checkpoint_every", "out")}
    return hashlib.sha256(json.dumps([settings, arch_sha, record], sort_keys=True).encode()).hexdigest()[:16]


def prepare(fcfg: FinetuneConfig):
    """Everything a run needs: the architecture, the teacher, the candidate weights and the data."""
    arch = dash.read_arch(fcfg.arch)
    fcfg = resolve(fcfg, arch)
    cfg = search_config(fcfg, arch)
    device, dtype = dash.devices(cfg)
    torch.manual_seed(fcfg.seed)
    teacher, tokenizer = dash.load_model(fcfg.model, device, dtype)
    L = len(teacher.model.layers)
    if len(arch["layers"]) != L:
        raise DashError(f"{fcfg.arch} was made for a model of {len(arch['layers'])} layers ({arch['model']}); "
                        f"{fcfg.model} has {L}: pass the architecture's own model")
    state = dash.candidates_for(teacher, {**arch, "candidate_cache": fcfg.cache or arch["candidate_cache"]}, cfg)
    ranges = dash.data_ranges(cfg, fcfg.tokens)
    why = (f"held out, preparation and search first, then {fcfg.tokens:,} tokens of finetuning in whole batches "
           f"of {cfg.batch_size}x{cfg.seq_len}, tokens {ranges['finetune'][0]:,} to {ranges['finetune'][1]:,}: "
           f"lower finetune.py's --tokens, or give more text with --data"
           + ("; for the small teacher, python small_model/more_text.py --out DIR writes more of its text"
              if dash.is_small_model(fcfg.model) else ""))
    data = dash.load_data(tokenizer, cfg, parts=("held_out", "finetune"), finetune_tokens=fcfg.tokens, why=why)
    seqs = data["finetune"].flatten(0, 1)                                        # (n B, T)
    if fcfg.epochs > 1:  # every pass its own order of the sequences
        seqs = torch.cat([seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(fcfg.seed + e))]
                          for e in range(fcfg.epochs)])
    b = fcfg.batch_size or cfg.batch_size
    if len(seqs) < b:
        raise DashError(f"--batch-size {b}: the finetuning text holds {len(seqs)} sequences of {cfg.seq_len} tokens; "
                        f"lower --batch-size or raise --tokens")
    data["finetune"] = seqs[:len(seqs) // b * b].view(-1, b, cfg.seq_len)      # (steps, b, T): whole batches
    return arch, fcfg, cfg, teacher, state, data


def run(fcfg: FinetuneConfig) -> tuple[dict, object]:
    """Finetune, write <out>/arch.json and the trained weights; returns (the written architecture, the model)."""
    arch, fcfg, cfg, teacher, state, data = prepare(fcfg)
    print(json.dumps(asdict(fcfg), indent=1))
    out = Path(fcfg.out)
    out.mkdir(parents=True, exist_ok=True)
    student = student_of(teacher, arch["layers"], state, cfg)
    groups = parameter_groups(student, arch["layers"], fcfg.train, fcfg.lr, fcfg.lr_other)
    n_trained = sum(p.numel() for g in groups for _, p in g["params"])
    print(f"trainable ({fcfg.train}): {n_trained:,} weights in {sum(len(g['params']) for g in groups)} tensors; "
          f"frozen: {sum(p.numel() for p in student.parameters()) - n_trained:,} weights and the teacher")
    kl_before = held_out_kl(student, teacher, data["held_out"], cfg.kl_chunk)
    arch_sha = hashlib.sha256(Path(fcfg.arch).read_bytes()).hexdigest()
    # --long-weight's judge of which tokens need the long context: the teacher with swa's window in every layer
    short = student_of(teacher, ["swa"] * len(arch["layers"]), {}, cfg, check=False) if fcfg.long_weight else None
    result = distil(student, teacher, data["finetune"], groups, fcfg, out / "finetune.ckpt.pt",
                    finetune_key(fcfg, arch_sha, data["record"]), short=short)
    kl_after = held_out_kl(student, teacher, data["held_out"], cfg.kl_chunk)
    print(f"held-out KL(teacher || hybrid): {kl_before:.4f} -> {kl_after:.4f}")
    from safetensors.torch import save_file
    weights = (out / "finetuned.safetensors").resolve()
    save_file(trained_state(groups), str(weights))
    record = dict(**{"from": str(Path(fcfg.arch).resolve()), "from_sha256": arch_sha},
                  weights=str(weights), sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                  train=fcfg.train, trained=[n for g in groups for n, _ in g["params"]],
                  lrs=[g["lr"] for g in groups], trained_weights=n_trained, loss=loss_name(fcfg),
                  tokens=int(data["finetune"].numel()), epochs=fcfg.epochs,
                  held_out_kl=dict(before=round(kl_before, 6), after=round(kl_after, 6)),
                  wall_time_s=result["wall_time_s"], data=data["record"], config=asdict(fcfg),
                  versions=dash.versions(), history=result["history"])
    arch_out = {**arch, "model": fcfg.model, "candidate_cache": fcfg.cache or arch["candidate_cache"],
                "finetune": record}  # the model and candidates it was finetuned from, so that they rebuild it
    arch_out.pop("retrieval_check", None)  # the search's check was of the hybrid before finetuning
    (out / "arch.json").write_text(json.dumps(arch_out, indent=1))
    (out / "finetune.ckpt.pt").unlink(missing_ok=True)
    print(f"wrote {out / 'arch.json'} and {weights.name} ({n_trained:,} weights, {record['tokens']:,} tokens, "
          f"{record['wall_time_s']} s)")
    return arch_out, student

# ----------------------------------------------------------------------------- GA-S2


def ga_s2(teacher, fill: list[str], state: dict, cfg: dash.Config, batches: torch.Tensor, held_out: torch.Tensor,
          fcfg: FinetuneConfig) -> dict:
    """hybrid-distillation's KL-guided layer selection (GA-S2, ICLR 2026) at small scale. From the all-cheap student
    (every layer its `fill` operator with its aligned weights: stage-1's all-linear model), for each layer l: restore
    l to the teacher's attention, distil the whole student on the same batches (--train of fcfg), and score the
    held-out KL after training. The K layers whose restoration leaves the lowest KL keep full attention (one shot).
    Returns per-layer KLs and the cost (tokens, wall time)."""
    t0, kls = time.time(), []
    for l in range(len(fill)):
        layers = [dash.FULL if i == l else op for i, op in enumerate(fill)]
        student = student_of(teacher, layers, state, cfg)
        groups = parameter_groups(student, layers, fcfg.train, fcfg.lr, fcfg.lr_other)
        distil(student, teacher, batches, groups, fcfg, desc=f"ga-s2 layer {l}")
        kls.append(held_out_kl(student, teacher, held_out, cfg.kl_chunk))
        tqdm.write(f"ga-s2: layer {l} restored, held-out KL after distillation {kls[-1]:.4f}")
        del student, groups
    return dict(kl=kls, tokens=int(batches.numel()) * len(fill), tokens_per_layer=int(batches.numel()),
                wall_time_s=round(time.time() - t0, 1))

# ----------------------------------------------------------------------------- main


def main(argv=None):
    try:
        run(dash.parse_args(argv, FinetuneConfig, "finetune a DASH hybrid by distillation from its teacher"))
    except DashError as e:
        sys.exit(f"finetune: {e}")


if __name__ == "__main__":
    main()
