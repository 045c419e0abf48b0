"""Train the small Qwen2 teacher that ships with dash, so `python dash.py` runs offline on CPU.

A 6.7M-parameter Qwen2 (8 layers, GQA, RoPE, tied embeddings) trained from scratch on text that exists offline:
Python source (the standard library plus a fixed 100 MB sample of the installed site-packages) and RULER-format
long-context documents made with ruler.make_samples (needle-in-a-haystack over noise and over Python
source, variable tracking, common/frequent words). Retrieving a needle from 1K tokens back has to go through
attention, which is what DASH then probes layer by layer.

    python small_model/train.py --out small_model --minutes 6             # H100: 6 min training, ~7.5 in all
    python small_model/train.py --out /tmp/t --device cpu --tiny --steps 3  # smoke test: seconds on CPU

Writes to --out: config.json, model.safetensors (bf16), generation_config.json, tokenizer.json,
tokenizer_config.json, metrics.json (loss curve, steps, tokens, time, per-task RULER accuracy) and
search_data.jsonl.gz (held-out documents of the training mixture, {"text": ...} a line: dash.py's default
search data).
"""

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ruler as er  # noqa: E402

EOS = "<|endoftext|>"
# Qwen2's pre-tokenizer split: digits one by one, so a 7-digit needle value is 7 tokens to copy.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Share of synthetic documents per RULER task. The multi-needle tasks get more: they are the slow ones to learn.
TASK_WEIGHTS = {"niah_single_1": 1, "niah_single_2": 1, "niah_single_3": 1, "niah_multikey_1": 2,
                "niah_multikey_2": 2, "niah_multikey_3": 1, "niah_multivalue": 1.5, "niah_multiquery": 1.5,
                "vt": 1, "cwe": 0.5, "fwe": 0.5}
TARGET_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue",
                "niah_multiquery"]  # the >= 90% target; multikey_2/3 are reported beside it


# ---- config ----

@dataclass
class TrainConfig:
    out: str = "small_model"
    minutes: float = 6.0          # wall-clock training budget (evals excluded); the LR decays over it
    steps: int = 0                # also stop after this many steps (0: the budget alone)
    device: str = "auto"          # auto: cuda if available
    tiny: bool = False            # smoke mode: tiny model, data and eval; seconds on CPU
    compile: bool = True          # torch.compile the training step's forward on CUDA: ~1.6x steps/s, ~25 s to compile
    seed: int = 0
    # data
    seq_len: int = 1024           # train at the length we evaluate at
    vocab_size: int = 4096
    heldout_every: int = 10       # every 10th file (by name hash) is held out: eval haystack, search data
    # The stdlib alone (~2.4M tokens) is memorised within minutes (held-out loss 3.0 -> 6.7 in a 6-min run);
    # 100 MB of installed packages' source keeps the teacher a real LM (held-out loss falls to 2.2). "": stdlib only.
    extra_code: str = "site-packages"  # this Python's site-packages, or a directory of *.py files
    extra_code_mb: float = 100.0       # at most this much of it: a fixed sample (files ordered by path hash)
    synthetic_frac: float = 0.5   # rows that start with a RULER-format document; the rest is Python code
    answer_weight: float = 10.0   # loss weight of the answer tokens of synthetic documents (Mixture.document)
    workers: int = 10             # data-loader processes making synthetic documents
    # model: Qwen2.5-like, small enough for CPU
    n_layer: int = 8
    hidden: int = 256
    n_head: int = 8
    n_kv_head: int = 2            # GQA, 4 query heads per key-value head
    intermediate: int = 704       # 2.75 x hidden keeps the bf16 directory under 16 MB
    rope_theta: float = 10000.0   # contexts stay <= 2K tokens; Qwen's 1e6 is for 32K+
    # optimisation
    batch_size: int = 64          # rows of seq_len tokens per step
    lr: float = 3e-3              # small models take a high LR
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # logging and eval
    log_every: int = 25
    eval_every_s: float = 60.0    # seconds of training between quick evals
    eval_n: int = 5               # held-out samples per niah task in a quick eval
    final_eval_n: int = 50        # held-out samples per task in the final eval
    search_tokens: int = 600_000  # size of search_data.jsonl.gz
    max_files: int = 0            # use only this many stdlib files (0: all)


TINY = dict(n_layer=2, hidden=64, n_head=4, n_kv_head=2, intermediate=128, vocab_size=2048,
            batch_size=2, workers=0, eval_n=1, final_eval_n=1, search_tokens=4000, max_files=40, warmup_steps=2,
            log_every=1, eval_every_s=0.0, extra_code="")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """CLI flags are TrainConfig's fields; --tiny swaps in the TINY defaults, explicit flags still win."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.type is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=f.type, default=None, help=f"default {f.default}")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    cfg = TrainConfig()
    if given.get("tiny"):
        cfg = dataclasses.replace(cfg, **TINY)
    return dataclasses.replace(cfg, **given)


# ---- data: Python source and a byte-level BPE over it ----

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}


def python_texts(root: Path, heldout_every: int, max_files: int = 0, max_mb: float = 0,
                 max_file_kb: float = 0) -> tuple[list[str], list[str]]:
    """(train, heldout) texts of the *.py files under root, without tests, nested site-packages and the
    encodings' code tables (and files over max_file_kb: generated tables). Files go in the order of a hash of
    their path under root, so max_files / max_mb take a fixed sample and every heldout_every-th file is held
    out: the same split on every machine."""
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if not SKIP_DIRS & set(rel.parts[:-1]) and (not max_file_kb or f.stat().st_size <= max_file_kb * 1e3):
            files.append((zlib.crc32(rel.as_posix().encode()), f))
    files.sort()
    train, heldout, size = [], [], 0
    for h, f in files[:max_files or None]:
        if max_mb and size > max_mb * 1e6:
            break
        text = f.read_text(encoding="utf-8", errors="replace")
        size += len(text)
        (heldout if h % heldout_every == 0 else train).append(text)
    if not heldout or len(train) < 2:
        raise RuntimeError(f"found only {len(files)} usable *.py files under {root}")
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's NFC normalizer and split (AutoTokenizer reloads it as a Qwen2Tokenizer, which
    sets both); EOS doubles as BOS and PAD. The RULER templates and word list are added to the training text
    so their words are single tokens, as they would be for a real LLM."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    ruler = [t["template"] + t["answer_prefix"] for t in er.TEMPLATES.values()] + [er.NOISE, er.NEEDLE]
    ruler += [" ".join(words) for words in er.WORDS.values()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ruler * 50, trainer)
    # left padding: batched generation appends to the right end of every row
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   padding_side="left")


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """All texts as one token stream, EOS after each."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return np.array([t for doc in ids for t in doc + [tok.eos_token_id]], dtype=np.uint16)


# ---- data: the training mixture ----

class Mixture(torch.utils.data.IterableDataset):
    """Endless rows of seq_len + 1 tokens with a loss weight per token. A row is, with probability
    synthetic_frac, one RULER-format document (build_prompt + answer + EOS, as eval_ruler scores it) at
    position 0, like the prompts at eval time, then Python code up to the row's end; otherwise a random window
    of Python code. Each data-loader worker draws from its own seeded stream."""

    def __init__(self, cfg: TrainConfig, tok, code: np.ndarray, haystack_texts: list[str], seed: int):
        self.cfg, self.tok, self.code, self.seed = cfg, tok, code, seed
        # haystacks: no near-empty files, and no files with long unbroken runs (data blobs), since RULER's
        # haystack unit is a whitespace-separated word
        self.hay = [t for t in haystack_texts if len(t) > 2000 and max(map(len, t.split())) <= 100]
        self.tasks, self.weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())

    def __iter__(self):
        warnings.filterwarnings("ignore", message="no essay haystack")  # noise-haystack variants are on purpose
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}/{info.id if info else 0}")
        pending: dict[tuple[str, bool], list[dict]] = {}
        while True:
            ids, w = self.document(rng, pending) if rng.random() < self.cfg.synthetic_frac else ([], [])
            start = rng.randrange(len(self.code) - self.cfg.seq_len - 1)
            fill = self.code[start:start + self.cfg.seq_len + 1 - len(ids)].tolist()
            code_only = not ids
            ids, w = torch.tensor(ids + fill), torch.tensor(w + [1.0] * len(fill))
            yield ids[:-1], ids[1:], w[1:], code_only  # inputs, targets, weight of each target, row kind

    def document(self, rng: random.Random, pending: dict) -> tuple[list[int], list[float]]:
        """One synthetic document's tokens and weights. Answer tokens weigh answer_weight: they are ~1% of
        a row, and without the extra weight the retrieval signal is drowned by easy haystack tokens
        (weight 1 keeps the haystack a real language-modelling target)."""
        task = rng.choices(self.tasks, self.weights)[0]
        essay = er.TASKS[task].get("type_haystack") == "essay" and rng.random() < 0.5  # else the noise haystack
        if not pending.get((task, essay)):  # 8 samples a call amortise make_samples' length search
            pending[(task, essay)] = self.samples(task, essay, rng)
        s = pending[(task, essay)].pop()
        prompt = self.tok.encode(er.build_prompt(s, self.tok), add_special_tokens=False)
        answer = self.tok.encode(er.answer_text(s), add_special_tokens=False) + [self.tok.eos_token_id]
        return prompt + answer, [1.0] * len(prompt) + [self.cfg.answer_weight] * len(answer)

    def samples(self, task: str, essay: bool, rng: random.Random, draws: int = 20) -> list[dict]:
        """8 samples of a task. About a third of cwe's wonderwords draws do not fit 1024 tokens of this tokenizer
        (make_samples raises): those are drawn again with a new seed, up to `draws` times."""
        for draw in range(draws):
            try:
                return er.make_samples(task, self.tok, self.cfg.seq_len, 8, seed=rng.getrandbits(40),
                                       haystack=self.haystack(rng) if essay else "noise")
            except ValueError:
                if draw == draws - 1:
                    raise

    def haystack(self, rng: random.Random) -> list[str]:
        """Python source from a random point of a random file (RULER reads its essays from the start)."""
        first, second = rng.choice(self.hay), rng.choice(self.hay)
        return [first[rng.randrange(len(first) // 2 + 1):], second]


# ---- model ----

def make_model(cfg: TrainConfig, tok) -> Qwen2ForCausalLM:
    eos = tok.eos_token_id
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.hidden // cfg.n_head, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return Qwen2ForCausalLM(config)


def log(msg: str) -> None:
    """A log line that a piped, tee'd log shows at once, printed around the progress bar."""
    tqdm.write(msg)
    sys.stdout.flush()


def lr_at(step: int, frac: float, cfg: TrainConfig) -> float:
    """Linear warmup over steps, then cosine decay to min_lr_frac over the fraction of the budget used."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


# ---- eval: RULER at the training length, greedy ----

def autocast(device: str):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    return torch.autocast(device.split(":")[0], torch.bfloat16, enabled=device.startswith("cuda"))


@torch.no_grad()
def evaluate(model, tok, samples: list[dict], device: str, max_new_tokens: int | None = None,
             batch_size: int = 64) -> dict[str, float]:
    """RULER score per task: plain greedy model.generate, batched with left padding."""
    model.eval()
    preds: dict[str, list[str]] = {}
    refs: dict[str, list[list[str]]] = {}
    samples = sorted(samples, key=lambda s: s["max_new_tokens"])  # one generation length per batch
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        enc = tok([er.build_prompt(s, tok) for s in chunk], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(device)
        with autocast(device):
            out = model.generate(**enc, max_new_tokens=max_new_tokens or chunk[-1]["max_new_tokens"],
                                 do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        for s, text in zip(chunk, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            preds.setdefault(s["task"], []).append(text)
            refs.setdefault(s["task"], []).append(s["outputs"])
    model.train()
    return {task: er.score(task, preds[task], refs[task]) for task in preds}


@torch.no_grad()
def code_loss(model, code: np.ndarray, seq_len: int, device: str, n_rows: int = 32) -> float:
    """Mean next-token loss on the first n_rows windows of held-out code (the held-out stdlib comes first):
    watches overfitting, since the code is seen many times."""
    n_rows = max(1, min(n_rows, (len(code) - 1) // seq_len))
    rows = np.stack([code[i * seq_len:(i + 1) * seq_len + 1] for i in range(n_rows)]).astype(np.int64)
    rows = torch.from_numpy(rows).to(device)  # (n_rows, seq_len + 1)
    model.eval()
    with autocast(device):
        logits = model(input_ids=rows[:, :-1], use_cache=False).logits
    model.train()
    return round(F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten()).item(), 4)


def summarize(acc: dict[str, float]) -> dict[str, float]:
    niah = [acc[t] for t in er.NIAH_TASKS if t in acc]
    target = [acc[t] for t in TARGET_TASKS if t in acc]
    return {"niah_avg": round(sum(niah) / max(len(niah), 1), 2),
            "target_avg": round(sum(target) / max(len(target), 1), 2)}


def eval_samples(tok, tasks: list[str], n: int, length: int, haystack: list[str], seed: int) -> list[dict]:
    return [s for t in tasks for s in er.make_samples(t, tok, length, n, seed=seed, haystack=haystack)]


# ---- search data ----

def write_search_data(path: Path, cfg: TrainConfig, tok, heldout_code: np.ndarray, heldout_texts: list[str]) -> int:
    """Held-out documents of the training mixture: RULER-format documents (held-out seeds and haystacks) and
    seq_len windows of held-out code, in the training ratio. Returns the token count."""
    rng = random.Random(f"search/{cfg.seed}")
    mix = Mixture(cfg, tok, heldout_code, heldout_texts, seed=0)
    pending: dict = {}
    n_tokens, pos, lines = 0, 0, []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no essay haystack")
        while n_tokens < cfg.search_tokens:
            if rng.random() < cfg.synthetic_frac:
                ids = mix.document(rng, pending)[0][:-1]  # text without the EOS: the line ends the document
            else:
                if pos + cfg.seq_len > len(heldout_code):
                    pos = 0  # the held-out code is used up; go round again
                ids, pos = heldout_code[pos:pos + cfg.seq_len].tolist(), pos + cfg.seq_len
            lines.append(json.dumps({"text": tok.decode(ids)}))
            n_tokens += len(ids)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return n_tokens


# ---- main ----

def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    cuda = device.startswith("cuda")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print("config:", json.dumps(dataclasses.asdict(cfg)), flush=True)
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_texts, heldout_stdlib = python_texts(stdlib, cfg.heldout_every, cfg.max_files)
    tok = train_tokenizer(train_texts, cfg.vocab_size)  # on the stdlib alone: fixed whatever else is installed
    heldout_texts = list(heldout_stdlib)
    extra = None
    if cfg.extra_code:
        extra = Path(sysconfig.get_paths()["purelib"] if cfg.extra_code == "site-packages" else cfg.extra_code)
        more_train, more_heldout = python_texts(extra, cfg.heldout_every, max_mb=cfg.extra_code_mb, max_file_kb=300)
        train_texts, heldout_texts = train_texts + more_train, heldout_texts + more_heldout
    code, heldout_code = encode_stream(tok, train_texts), encode_stream(tok, heldout_texts)
    print(f"data: {len(train_texts)} train / {len(heldout_texts)} held-out files (stdlib {stdlib}"
          f"{f', {extra}' if extra else ''}), {len(code):,} / {len(heldout_code):,} tokens, vocab {len(tok)} "
          f"({time.time() - t_start:.0f}s)", flush=True)

    # held-out eval samples: seeds >= 2**40 never occur in training (those are getrandbits(40))
    essay = heldout_stdlib  # the eval "essay": held-out stdlib files, fixed like RULER's Paul Graham essays
    quick = eval_samples(tok, er.NIAH_TASKS, cfg.eval_n, cfg.seq_len, essay, seed=2**40)
    final = eval_samples(tok, er.DEFAULT_TASKS, cfg.final_eval_n, cfg.seq_len, essay, seed=2**40 + 1)
    gen_cap = 4 if cfg.tiny else None  # the smoke test only checks that generation runs

    model = make_model(cfg, tok).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2 {cfg.n_layer} layers, hidden {cfg.hidden}, {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=cuda)
    torch.set_float32_matmul_precision("high")
    forward = torch.compile(model) if cfg.compile and cuda else model  # generate() uses the plain module

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # workers fork after the batch encodes above
    loader = torch.utils.data.DataLoader(
        Mixture(cfg, tok, code, train_texts, seed=cfg.seed), batch_size=cfg.batch_size, num_workers=cfg.workers,
        pin_memory=cuda, prefetch_factor=4 if cfg.workers else None, persistent_workers=cfg.workers > 0)

    budget_s = cfg.minutes * 60
    curve, evals, step, tokens, train_s = [], [], 0, 0, 0.0
    bar = tqdm(total=cfg.steps or round(budget_s), unit="step" if cfg.steps else "s", file=sys.stderr,
               disable=not sys.stderr.isatty())  # a piped log gets the step lines alone
    t_step, t_eval = time.time(), 0.0
    for x, y, w, code_only in loader:
        frac = max(train_s / budget_s, step / cfg.steps if cfg.steps else 0.0)
        if frac >= 1.0:
            break
        lr = lr_at(step, frac, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y, w = (t.to(device, non_blocking=True) for t in (x, y, w))
        with autocast(device):
            logits = forward(input_ids=x, use_cache=False).logits  # (B, T, V)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (B*T,)
        loss = (ce * w.flatten()).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step, tokens = step + 1, tokens + x.numel()

        if step % cfg.log_every == 0 or step == 1:
            answer = w.flatten() > 1  # answer tokens of the synthetic documents
            ans_loss = ce[answer].mean().item() if answer.any() else float("nan")
            rows = code_only.to(device).repeat_interleave(x.shape[1])  # tokens of code-only rows
            code_l = ce[rows].mean().item() if rows.any() else float("nan")
            loss_val = loss.item()  # syncs the GPU, so the timing below is honest
            now = time.time()
            train_s += now - t_step
            t_step = now
            curve.append(dict(step=step, time_s=round(train_s, 1), loss=round(loss_val, 4),
                              answer_loss=round(ans_loss, 4), code_loss=round(code_l, 4)))
            bar.set_postfix(loss=f"{loss_val:.3f}", refresh=False)
            bar.update((step if cfg.steps else min(round(train_s), bar.total)) - bar.n)
            log(f"step {step:6d} | {train_s:6.0f}s | loss {loss_val:.4f} | answer loss {ans_loss:.4f} | "
                       f"code loss {code_l:.4f} | lr {lr:.2e} | {tokens / max(train_s, 1e-9) / 1e3:.0f}k tok/s")
            if train_s - t_eval >= cfg.eval_every_s:
                t_eval = train_s
                acc = evaluate(model, tok, quick, device, gen_cap)
                evals.append(dict(step=step, time_s=round(train_s, 1), **summarize(acc),
                                  heldout_code_loss=code_loss(model, heldout_code, cfg.seq_len, device), **acc))
                log(f"eval  {step:6d} | " + " ".join(f"{k} {v:.4g}" for k, v in evals[-1].items()
                                                           if k not in ("step", "time_s")))
                t_step = time.time()  # eval time is not training time
    bar.close()

    t_final = time.time()
    acc = evaluate(model, tok, final, device, gen_cap)
    final_eval = dict(**summarize(acc), heldout_code_loss=code_loss(model, heldout_code, cfg.seq_len, device),
                      **{t: acc[t] for t in er.DEFAULT_TASKS})
    print(f"final eval (%, {cfg.final_eval_n} samples per task at {cfg.seq_len} tokens):", flush=True)
    for k, v in final_eval.items():
        print(f"  {k:18s} {v:6.1f}", flush=True)
    eval_s = time.time() - t_final

    model.config.use_cache = True
    model.generation_config.update(do_sample=False, pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=tok.eos_token_id)
    model.to(torch.bfloat16).save_pretrained(out)  # safetensors, tied embeddings stored once
    tok.save_pretrained(out)
    n_search = write_search_data(out / "search_data.jsonl.gz", cfg, tok, heldout_code, heldout_texts)
    metrics = dict(
        config=dataclasses.asdict(cfg), n_params=n_params, steps=step, tokens=tokens, train_time_s=round(train_s, 1),
        final_eval_time_s=round(eval_s, 1), total_time_s=round(time.time() - t_start, 1),
        final_loss=round(float(np.mean([c["loss"] for c in curve[-10:]])), 4), loss_curve=curve, evals=evals,
        final_eval=final_eval, final_eval_samples_per_task=cfg.final_eval_n, eval_length=cfg.seq_len,
        data=dict(stdlib=str(stdlib), extra_code=str(extra) if extra else None, python=platform.python_version(),
                  train_files=len(train_texts), heldout_files=len(heldout_texts), train_code_tokens=len(code),
                  heldout_code_tokens=len(heldout_code), search_data_tokens=n_search),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    print(f"saved {out}/ ({size_mb:.1f} MB), {step} steps, {tokens / 1e6:.1f}M tokens, "
          f"{train_s:.0f}s training, {time.time() - t_start:.0f}s in all", flush=True)
    return metrics


if __name__ == "__main__":
    main()
