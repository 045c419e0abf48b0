"""
DASH: differentiable architecture search for hybrid-attention LLMs (arXiv 2605.20936), in one file.

    python dash.py                                     # the small teacher shipped in small_model/, CPU, minutes
    python dash.py --model Qwen/Qwen2.5-3B-Instruct    # the paper's setting: one CUDA GPU, 12.3M tokens
    torchrun --nproc-per-node 4 dash.py --model ...    # the same search on 4 GPUs: each takes a quarter of every batch

A hybrid LLM keeps full softmax attention in a few layers and cheap operators (linear attention, a sliding
window) in the rest; which layers keep full attention decides its quality. DASH finds them by search:
  1. teacher-aligned candidates: every cheap operator, in every layer, is trained once to copy that layer's
     attention output (align(); cached in a file tied to the code, teacher and data that made it);
  2. each layer's attention becomes the mixture  sum_i softmax(alpha_l / tau)_i * op_i(x)  and only the
     architecture logits alpha (layers x operators) train, to minimise KL(teacher || mixture) plus
     regularizers; the teacher's and the candidates' weights stay frozen;
  3. export: the K layers that most want full attention keep it, the others take their most probable
     cheap operator; a discrete polish then moves full attention where the held-out KL says; the architecture
     is a JSON file, and build_hybrid() turns it back into a model, checked to generate as it computes.
The file reads top to bottom: config, candidate operators, mixed layer, model surgery, data, candidate alignment
and cache, objective, search loop, export and polish, the hybrid, main. It imports no other file of the project
(ruler.py, the RULER port, aside): prepare_candidates.py and eval_ruler.py build on it, never the reverse.
"""
import argparse
import functools
import gzip
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import plots  # figures, when matplotlib is installed (it imports nothing of dash)
import ruler  # the RULER port: the closing retrieval check (it imports nothing of dash)

HERE = Path(__file__).resolve().parent
SMALL_MODEL = HERE / "small_model"  # the small pretrained teacher that ships with the project
C4_SHARD = "hub:allenai/c4/en/c4-train.00000-of-01024.json.gz"  # ~356k English web documents, ~170M tokens


class DashError(Exception):
    """Bad input: main() prints the message alone, no traceback."""

# ----------------------------------------------------------------------------- config


def flag(default, help):
    """A config field, and so a command-line flag (--name-with-dashes) with this help."""
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = flag(str(SMALL_MODEL), "HF model id or local directory of a causal LM (Qwen2/Llama-style attention)")
    candidates: str = flag("full,swa,gla,gdn", "operators to search over, comma-separated; 'full' must be one")
    k: int | None = flag(None, "full-attention layers to keep (default: one in seven layers, at least 2)")
    threshold: float | None = flag(None, "export full attention where p(full) > threshold instead of the top K")
    tokens: int | None = flag(None, "search tokens (default: 12.3M as in the paper; 131k for the small model)")
    seq_len: int | None = flag(None, "tokens per sequence (default: 2048; 1024 for the small model)")
    batch_size: int | None = flag(None, "sequences per step (default: 4)")
    micro_batch: int | None = flag(None, "sequences per pass: a step sums its gradient over passes of this many, "
                                        "keeping activations for these only: less memory, more kernel launches "
                                        "(default: the whole batch)")
    lr: float | None = flag(None, "Adam learning rate of the logits (default: 0.01; 0.1 for the small model's few steps)")
    tau_start: float = flag(1.0, "softmax temperature at the first step ...")
    tau_end: float = flag(0.1, "... annealed exponentially to this at the last: late choices become decisive")
    budget: float = flag(1.0, "weight of the budget term that drives the expected number of full layers to K")
    cost: float = flag(0.0, "weight of the compute-cost term (operator cost at --cost-len, relative to full)")
    cost_len: int = flag(32768, "context length at which operator costs are compared")
    entropy: float = flag(0.05, "weight of the entropy term, ramped up over the search: decisive choices at the end")
    continuity: float = flag(0.0, "weight of the continuity term: adjacent layers prefer the same operator")
    skip_below: float = flag(1e-3, "prune: an operator whose probability in a layer falls below this leaves that "
                                   "layer's search for good (saves compute; 0: never)")
    grad: str = flag("exact", "exact: backpropagate through every operator; teacher: through the teacher's "
                             "attention only (straight-through; cheap operators run forward only: faster, less memory)")
    window: int | None = flag(None, "sliding-window size of 'swa' (default: 512; 64 for the small model)")
    data: str | None = flag(None, "text: .txt/.jsonl/.jsonl.gz files or folders, or hub:owner/name/path (default: "
                                 "the model folder's search_data.jsonl.gz if it has one, else a C4 shard)")
    seed: int = flag(0, "seed of the search's data order (its sequences, shuffled)")
    out: str = flag("out", "folder for the architecture JSON")
    device: str = flag("auto", "cuda, cpu or auto")
    dtype: str = flag("auto", "bfloat16, float32 or auto (bfloat16 on CUDA, float32 on CPU)")
    kernels: str = flag("auto", "fla (CUDA only), torch, or auto (fla on CUDA)")
    cache: str | None = flag(None, "candidate weights (.safetensors); default: candidates/<model>-<fingerprint>")
    prepare: bool = flag(True, "prepare missing candidate weights (--no-prepare: fail instead)")
    prep_tokens: int | None = flag(None, "tokens to align candidates on, if they must be prepared (default: 8.4M; "
                                         "131k for the small model)")
    prep_lr: float = flag(3e-3, "AdamW peak learning rate of the alignment (cosine decay, 5% warm-up)")
    prep_seed: int = flag(0, "seed of the alignment's data order and of the candidates' initialisation")
    held_out: int = flag(2, "batches of held-out text (before the preparation's and the search's tokens): the "
                            "alignment report and the polish are scored on them")
    polish: int = flag(3, "moves of the discrete polish after the top-K export: move one full-attention layer "
                          "where it lowers the held-out KL most (0: off)")
    checkpoint_every: int = flag(50, "steps between checkpoints of the search and of the alignment")
    resume: bool = flag(False, "continue the search from its checkpoint in --out")
    compile: bool | None = flag(None, "torch.compile the decoder layers for the search (default: on with CUDA)")
    fsdp: bool = flag(False, "under torchrun, shard the frozen teacher over the GPUs (FSDP2, gathered a layer at a "
                             "time): for teachers too big for one GPU; candidates and alpha stay replicated")
    cuda_graph: bool = flag(False, "replay each search step as a CUDA graph (two warm-up steps and a capture each; "
                                   "a new one once a quarter of its operators are pruned): the CPU launches one "
                                   "graph instead of thousands of kernels; for few sequences per GPU under torchrun")
    recompute_mlp: bool = flag(False, "recompute each MLP's gate and up projections in the search's backward pass "
                                      "instead of keeping them: less memory, two more matmuls per layer and step")
    kl_chunk: int = flag(1024, "tokens per chunk of the KL: full-vocabulary fp32 logits exist for one chunk only")
    log_every: int = flag(25, "steps between views of the operator probabilities")
    check_samples: int = flag(10, "samples per task of the retrieval check after the search (0: skip)")


# Defaults that depend on the model: the paper's for real models, CPU-minutes for the shipped small one.
PAPER = dict(tokens=12_300_000, prep_tokens=8_388_608, seq_len=2048, batch_size=4, lr=0.01, window=512, data=C4_SHARD)
SMALL = dict(tokens=131_072, prep_tokens=131_072, seq_len=1024, batch_size=4, lr=0.1, window=64,
             data=str(SMALL_MODEL / "search_data.jsonl.gz"))


def is_small_model(model: str) -> bool:
    """The shipped small teacher, here or in a copy of the project (by its config, not its path)."""
    config, small = Path(model, "config.json"), SMALL_MODEL / "config.json"
    return config.is_file() and small.is_file() and config.read_bytes() == small.read_bytes()


def resolve(cfg: Config, n_layers: int) -> Config:
    """Fill the model-dependent defaults and check the values that do not need the model loaded."""
    small = is_small_model(cfg.model)
    for name, value in (SMALL if small else PAPER).items():
        if getattr(cfg, name) is None:
            if name == "data" and Path(cfg.model, "search_data.jsonl.gz").exists():
                value = str(Path(cfg.model, "search_data.jsonl.gz"))
            setattr(cfg, name, value)
    if cfg.k is None:
        cfg.k = max(2, round(n_layers / 7))
    if not 0 < cfg.k < n_layers:
        raise DashError(f"--k {cfg.k} is out of range: the model has {n_layers} layers, so 1 <= K <= {n_layers - 1}")
    if cfg.batch_size < 1 or cfg.batch_size % world():
        raise DashError(f"--batch-size {cfg.batch_size} does not split over {world()} processes: the global batch "
                        f"is shared equally, so give a multiple of {world()} (or run fewer processes)")
    per_rank = cfg.batch_size // world()
    if cfg.micro_batch is not None and not (0 < cfg.micro_batch <= per_rank and per_rank % cfg.micro_batch == 0):
        raise DashError(f"--micro-batch {cfg.micro_batch} must divide --batch-size {cfg.batch_size}"
                        + (f" over {world()} processes, {per_rank} each" if world() > 1 else ""))
    if cfg.fsdp and world() == 1:
        raise DashError("--fsdp shards the teacher over the processes of a torchrun launch: run it under "
                        "torchrun --nproc-per-node N with N > 1, or drop --fsdp")
    if cfg.grad not in ("exact", "teacher"):
        raise DashError(f"--grad {cfg.grad!r}: choose exact or teacher")
    if cfg.threshold is not None and not 0 < cfg.threshold < 1:
        raise DashError(f"--threshold {cfg.threshold} must be a probability in (0, 1)")
    n_ops = len(cfg.candidates.split(","))
    if not 0 <= cfg.skip_below < 1 / n_ops:
        raise DashError(f"--skip-below {cfg.skip_below} must be below 1/{n_ops} (the uniform start), or every "
                        f"operator of a layer would be pruned at once")
    for name in ("tokens", "prep_tokens", "held_out", "checkpoint_every"):
        if getattr(cfg, name) < 1:
            raise DashError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1")
    return cfg

# ----------------------------------------------------------------------------- distributed
# torchrun --nproc-per-node N dash.py ...: data parallel over N processes, one GPU each (or CPU processes, gloo).
# The global batch and the number of steps stay as they are; each rank takes an equal share of every batch. The
# search's only trainable tensor is alpha (layers x operators, a few hundred numbers), and its gradient enters
# through dKL/dw, computed outside any module: so a plain all_reduce of the KL and dKL/dw does what DDP would,
# without its buckets and hooks around a module. Alpha and Adam then take the same step from the same numbers on
# every rank and stay identical (checked at the end). Preparation splits the layers over the ranks instead
# (gather_layers). Rank 0 alone writes files, prints and draws progress bars. With one process (python dash.py)
# world() is 1 and every helper here does nothing.


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, which alone writes files, logs and progress bars."""
    return rank() == 0


def all_reduce_mean(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The mean over the ranks of each tensor, in one collective of fp32 numbers (the tensors as they are in one
    process). Each rank's KL is a mean over an equal share of the batch, so the mean of the ranks' is the batch's."""
    if world() == 1:
        return ts
    flat = torch.cat([t.detach().float().flatten() for t in ts])
    dist.all_reduce(flat)
    flat /= world()
    return tuple(part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in ts]), ts))


def share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch (B, T): (B / world, T), rank r the r-th block (resolve() checks B % world)."""
    return batch.chunk(world())[rank()]


def from_main(obj):
    """Rank 0's value of a small Python object, on every rank: for decisions that all ranks must take alike (whether
    the candidates are to be prepared: a rank that looked a moment later might find rank 0's file)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def check_replicated(t: torch.Tensor, what: str):
    """Fail loudly if a tensor that every rank should hold alike (alpha) differs from rank 0's."""
    if world() == 1:
        return
    ref = t.detach().clone()
    dist.broadcast(ref, 0)
    diff = (t.detach() - ref).abs().max().reshape(1).float()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if diff.item() > 0:
        raise DashError(f"{what} differs between the ranks (by up to {diff.item():.3g}): the processes did not take "
                        f"the same steps; the result would depend on the rank that wrote it")


def init_distributed(device: str) -> str:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR), if it launched more than one process; return this process's device: cuda:LOCAL_RANK with NCCL,
    or the CPU with gloo. The other ranks' stdout goes to /dev/null: it would repeat rank 0's log N times (stderr,
    with warnings and errors, stays)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if not dist.is_initialized():
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    elif device.startswith("cuda"):
        device = f"cuda:{torch.cuda.current_device()}"
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def leave_distributed():
    """At the end of a torchrun launch: wait for rank 0 (which writes and checks the result alone), then leave."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def failed_where() -> str:
    """Under torchrun, which rank failed: torchrun then stops the other ranks and ends the run with its own summary
    (exit code and rank of the first failure). An error in one rank only (a missing file on one node, a CUDA error)
    thus ends the whole run; an error of the input is seen by every rank, and each says so."""
    return f"rank {rank()} of {world()}: " if world() > 1 else ""


def shard_teacher(model, device: str):
    """--fsdp: shard the frozen teacher's weights over the ranks (FSDP2), each rank keeping 1/N of every layer and
    gathering a layer's weights just before it runs (again in the backward pass). The units: each attention
    projection and q/k norm on its own (the candidates and preparation call them directly, outside the layer's forward),
    then the rest of each decoder layer (MLP, norms). The embeddings, final norm and LM head stay whole on every rank
    (the KL reads the head's weight directly): for a 32B model, 3 GB of 65. Candidates and alpha are not the
    teacher's and stay replicated: install() adds them after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.split(":")[0], (world(),))
    # reshard_after_forward=True, said explicitly: the layers are called one by one (final_hidden), never through
    # the model's forward, so each is an FSDP root, and a root left to the default keeps its weights gathered
    for layer in model.model.layers:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):  # project() calls each
            if hasattr(layer.self_attn, proj):
                fully_shard(getattr(layer.self_attn, proj), mesh=mesh, reshard_after_forward=True)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    for part in (model.model.embed_tokens, model.model.rotary_emb, model.model.norm, model.get_output_embeddings()):
        part.to(device)  # what stays whole (fully_shard moved the shards to the mesh's device already)
    return model


# ----------------------------------------------------------------------------- candidate operators
# Every candidate is built from the teacher's attention module of its layer and, at run time, gets the teacher's
# own projections of the layer input, computed once per layer and shared by all candidates:
#   x (B, T, C) the normed layer input; q (B, T, H, D); k, v (B, T, Hkv, D) before RoPE (after the teacher's q/k
#   norms, where it has them: Qwen3, OLMo 2, Gemma 3); q_rope, k_rope after.
# It returns the per-head output (B, T, H, D), which the teacher's o_proj turns into the layer's output.
# Sharing is what makes a mixed layer cheap: o_proj is linear, so sum_i w_i o_proj(y_i) = o_proj(sum_i w_i y_i).
# With `cache` (generation), an operator keeps what it needs in its layer's slot of HF's cache, a slot of dash's
# own (KVSlot, StateSlot, NAtSSlot): no hybrid depends on how HF's cache layers behave, which changes between
# releases.


@dataclass
class LayerInput:
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_rope: torch.Tensor              # q and k rotated by RoPE, for the softmax operators (computed once)
    k_rope: torch.Tensor
    attn: nn.Module                   # the teacher's attention module of this layer
    mask: torch.Tensor | None = None  # HF's 4D attention mask (None: causal, no padding)
    cache: object = None              # HF's Cache during generation
    window: int | None = None         # the teacher's own sliding window in this layer (None: full attention)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Qwen2 and Llama apply it: t (B, T, heads, D), cos and sin (B, T, D) from the model's rotary_emb. In
    t's dtype: OLMo 2's rotary_emb gives fp32 cos and sin in a bf16 model (its own forward casts back, as here)."""
    half = t.shape[-1] // 2
    return (t * cos[:, :, None] + torch.cat((-t[..., half:], t[..., :half]), -1) * sin[:, :, None]).to(t.dtype)


def teacher_window(attn: nn.Module) -> int | None:
    """The teacher's own sliding window in this layer: per layer in Qwen2/3 and Gemma 3 (config.layer_types), the
    same in every layer in Mistral (config.sliding_window); None for full attention."""
    return getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))


def project(attn: nn.Module, x: torch.Tensor, rope, mask=None, cache=None) -> LayerInput:
    """The teacher's q, k, v of x, as its own forward makes them. Its q/k norms sit in one of two places: over the
    whole projection before the head split (OLMo 2), or per head (Qwen3, Gemma 3, whose (1 + w) RMSNorm is its own
    module's business)."""
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)            # (B, T, heads * D)
    per_head = hasattr(attn, "q_norm") and attn.q_norm.weight.numel() == attn.head_dim
    if hasattr(attn, "q_norm") and not per_head:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)              # (B, T, heads, D)
    if per_head:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return LayerInput(x, q, k, v, rotate(q, *rope), rotate(k, *rope), attn, mask, cache, teacher_window(attn))


def keep_mask(mask, T: int, S: int, device, window: int | None = None) -> torch.Tensor:
    """Which of S keys each of the last T queries may see, as bool (B or 1, 1, T, S). `mask` is HF's 4D mask:
    None (causal, no padding; within `window` if given), bool (True = keep) or additive float (0 = keep). In a
    layer where the teacher attends to a window, HF's mask already is that window."""
    if mask is None:
        lag = torch.arange(S - T, S, device=device)[:, None] - torch.arange(S, device=device)
        return ((lag >= 0) & (lag < (window or S + 1)))[None, None]
    mask = mask[..., -T:, -S:]
    return mask if mask.dtype == torch.bool else mask == 0


def valid_tokens(p: LayerInput) -> torch.Tensor | None:
    """(B, T) False at padding tokens: the mask's diagonal (a token sees itself unless it is padding, under a full
    mask and a sliding-window one alike); None: no padding."""
    if p.mask is None:
        return None
    T = p.x.shape[1]
    return keep_mask(p.mask, T, T, p.x.device).diagonal(dim1=-2, dim2=-1)[:, 0]


class Slot(DynamicLayer):
    """A layer's slot in HF's cache, of dash's own. HF's position and mask bookkeeping may ask any layer's slot for
    its length, so every slot counts the tokens it has seen and reports the sizes of a full causal mask; each
    operator cuts the part it needs (a window, or nothing for a recurrent state) itself."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0


class KVSlot(Slot):
    """Keys and values (B, Hkv, S, D) of the last `keep` tokens (None: all of them)."""

    def __init__(self, keep: int | None = None):
        super().__init__()
        self.keep = keep

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's keys and values; return those the step attends to (the kept ones and the new ones)."""
        self.seen += k.shape[-2]
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], -2), torch.cat([self.values, v], -2)
        drop = 0 if self.keep is None else max(0, k.shape[-2] - self.keep)
        self.keys, self.values, self.is_initialized = k[..., drop:, :], v[..., drop:, :], True
        return k, v


class StateSlot(Slot):
    """The recurrent state (B, H, K, V) of a linear-attention layer, instead of keys and values."""

    def __init__(self):
        super().__init__()
        self.state = None

    def write(self, state: torch.Tensor, new_tokens: int):
        self.state, self.seen, self.is_initialized = state, self.seen + new_tokens, True


def cache_slot(cache, layer_idx: int, make) -> Slot:
    """This layer's slot in HF's cache: made by `make()` on first use, in place of HF's own slot (which a cache
    made without a config only adds when a layer first writes)."""
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    if not isinstance(cache.layers[layer_idx], Slot):
        cache.layers[layer_idx] = make()
    return cache.layers[layer_idx]


class Operator(nn.Module):
    """A candidate operator: built from the teacher's attention module of its layer and the config, it maps a
    LayerInput to a per-head output (B, T, H, D). Besides forward(), it declares all that the rest of dash needs to
    know about it, so that no code outside the class and its registry line names an operator:
      code          one letter for its layers in tables of architectures (eval_ruler.py)
      slot          the kind of Slot it keeps in HF's cache during generation (slot_in() makes or finds it)
      cost(T)       token-mixing FLOPs per token at context T, relative to full attention (the search's cost term)
      settings()    what shapes its prepared weights besides its parameters' shapes (the candidate cache's fingerprint)
      extra_loss()  a term that preparation adds to the alignment loss of the forward pass just run (None: none)
      observe(p)    preparation shows it each held-out batch after aligning it: to measure what cost() needs
    Whether it has parameters to align is trainable(op); its parameters and persistent buffers are what
    preparation saves and load_op() loads."""
    code = "?"
    slot = KVSlot

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__()
        self.layer_idx = attn.layer_idx

    def new_slot(self) -> Slot:
        return self.slot()

    def slot_in(self, p: LayerInput) -> Slot | None:
        """This operator's slot in the cache of a generation step (None without a cache)."""
        return None if p.cache is None else cache_slot(p.cache, self.layer_idx, self.new_slot)

    def cost(self, T: int) -> float:
        return 1.0

    def settings(self) -> dict:
        return {}

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def observe(self, p: LayerInput):
        pass


def windowed_attention(p: LayerInput, q, k, v, scaling: float, window: int, kernels: str) -> torch.Tensor:
    """Softmax attention of each query over the last `window` keys (its own included), and never beyond the teacher's
    own window in this layer: fla's kernel without padding on CUDA, sdpa with an explicit mask otherwise. q (B, T, H,
    D); k, v (B, S, Hkv, D), the last S positions, ending at the last query. Returns (B, T, H, D)."""
    window = min(window, p.window or window)
    T, S = q.shape[1], k.shape[1]
    if p.mask is None and T == S and use_fla(q, kernels):
        from fla.ops.attn import parallel_attn
        return torch.compiler.disable(parallel_attn)(q, k, v, scale=scaling, window_size=window)
    lag = torch.arange(S - T, S, device=q.device)[:, None] - torch.arange(S, device=q.device)  # query - key position
    keep = (lag >= 0) & (lag < window) & keep_mask(p.mask, T, S, q.device)
    keep = keep | (lag == 0)  # a padding query sees itself: no all-masked row, no NaN
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=keep, scale=scaling, enable_gqa=True)
    return y.transpose(1, 2)


class FullAttention(Operator):
    """The teacher's own softmax attention: its attention function on its projections, exactly. In a layer where the
    teacher attends to a sliding window of its own (Gemma 3's local layers, Mistral, Qwen's layer_types), 'full'
    means that: the teacher's attention as it is, which costs what its window costs. The search then decides between
    the teacher's own operator and the cheap ones in every layer, whatever the teacher's is."""
    code = "F"

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        self.window, self.kernels = teacher_window(attn), cfg.kernels

    def new_slot(self) -> Slot:
        return KVSlot(keep=None if self.window is None else self.window - 1)

    def cost(self, T: int) -> float:
        return 1.0 if self.window is None else min(self.window, T / 2) / (T / 2)

    def forward(self, p: LayerInput) -> torch.Tensor:
        attn = p.attn
        q, k, v = (t.transpose(1, 2) for t in (p.q_rope, p.k_rope, p.v))  # (B, heads, T, D) for HF's functions
        if p.cache is not None:
            k, v = self.slot_in(p).append(k, v)
        if self.window is not None:  # HF's sdpa takes its window from the mask, which the search does not pass
            return windowed_attention(p, *(t.transpose(1, 2) for t in (q, k, v)), attn.scaling, self.window,
                                      self.kernels)
        fn = ALL_ATTENTION_FUNCTIONS[attn.config._attn_implementation]  # load_model() asks for sdpa
        y, _ = fn(attn, q, k, v, p.mask, dropout=0.0, scaling=attn.scaling)
        return y  # (B, T, H, D)


class SlidingWindowAttention(Operator):
    """The teacher's softmax attention limited to the last `window` tokens (the query's own included).
    Nothing new to train; during generation it keeps only a window of keys and values."""
    code = "S"

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        self.scaling, self.window, self.kernels = attn.scaling, cfg.window, cfg.kernels

    def new_slot(self) -> Slot:
        return KVSlot(keep=self.window - 1)  # window - 1 tokens: with the next one, a whole window

    def cost(self, T: int) -> float:
        """A query reads min(W, T/2) keys on average, full attention T/2."""
        return min(self.window, T / 2) / (T / 2)

    def settings(self) -> dict:
        return dict(window=self.window)

    def forward(self, p: LayerInput) -> torch.Tensor:
        q, k, v = p.q_rope, p.k_rope, p.v  # (B, T, heads, D)
        if p.cache is not None:
            k, v = (t.transpose(1, 2) for t in self.slot_in(p).append(k.transpose(1, 2), v.transpose(1, 2)))
        return windowed_attention(p, q, k, v, self.scaling, self.window, self.kernels)


# --- linear attention: the recurrence is the definition, the chunked form computes the same thing fast on a CPU,
# --- and fla's kernels are the fast path on CUDA (tested against the recurrence). State S: (B, H, K, V), fp32.

def gla_recurrent(q, k, v, g, scale, state=None):
    """Gated Linear Attention, one token at a time:  S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale q_t S_t.
    q, k, g: (B, T, H, K) with g the log forget gate (<= 0); v: (B, T, H, V). Returns o (B, T, H, V), S."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float) if state is None else state.float()
    q, k, v, g = (t.float() for t in (q, k, v, g))
    out = []
    for t in range(T):
        S = S * g[:, t, :, :, None].exp() + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(out, 1), S


def gdn_recurrent(q, k, v, g, beta, scale, state=None):
    """Gated DeltaNet, one token at a time: decay the memory, then write v_t at key k_t with strength beta_t:
    S_t = a_t S_{t-1} + beta_t k_t^T (v_t - a_t k_t S_{t-1}),  a_t = exp(g_t),  o_t = scale q_t S_t.
    q, k: (B, T, H, K), L2-normalised; v: (B, T, H, V); g, beta: (B, T, H). Returns o (B, T, H, V), S."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float) if state is None else state.float()
    q, k, v, g, beta = (t.float() for t in (q, k, v, g, beta))
    out = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))  # what is new at k_t
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(out, 1), S


def chunks(C: int, *ts):
    """Pad the time axis to a multiple of C (zero k and v write nothing, zero g decays nothing) and split it:
    (B, T, H, ...) -> (B, H, N, C, ...)."""
    pad = -ts[0].shape[1] % C
    out = []
    for t in ts:
        t = F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad))
        out.append(rearrange(t, "b (n c) h ... -> b h n c ...", c=C))
    return out


def gla_chunked(q, k, v, g, scale, state=None, C=16):
    """gla_recurrent, C tokens at a time: inside a chunk, attention weighted by the decays exp(G_i - G_j) of each
    key channel (G the cumulative log gate), factored as (q_i e^G_i).(k_j e^-G_j); across chunks, through the
    state. With g >= -5 per token (GLA.floor), e^(16 * 5) stays inside fp32. Same arguments and results."""
    B, T, H, K = q.shape
    q, k, v, g = chunks(C, q * scale, k, v, g)                       # (B, H, N, C, K|V)
    G = g.cumsum(-2)                                                 # log decay from chunk start to position i
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    A = ((q * G.exp()) @ (k * (-G).exp()).transpose(-1, -2)).masked_fill(~causal, 0)  # (B, H, N, C, C)
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float()
    out = []
    for qn, kn, vn, Gn, An in zip(*(t.unbind(2) for t in (q, k, v, G, A))):  # chunk by chunk
        out.append(An @ vn + (qn * Gn.exp()) @ S)
        S = S * Gn[:, :, -1, :, None].exp() + (kn * (Gn[:, :, -1:] - Gn).exp()).transpose(-1, -2) @ vn
    o = rearrange(torch.stack(out, 2), "b h n c v -> b (n c) h v")[:, :T]
    return o, S


def gdn_chunked(q, k, v, g, beta, scale, state=None, C=32):
    """gdn_recurrent, C tokens at a time. Inside a chunk the new values u_i = beta_i (v_i - a k_i S_{i-1}) solve
    the triangular system (I + A) U = beta V - beta exp(G) K S0, A_ij = beta_i exp(G_i - G_j) k_i.k_j for j < i,
    (the WY form of Yang et al. 2024); then o_i = exp(G_i) q_i S0 + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) u_j."""
    B, T, H, K = q.shape
    q, k, v, g, beta = chunks(C, q * scale, k, v, g[..., None], beta[..., None])
    G = g.squeeze(-1).cumsum(-1)                                     # (B, H, N, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, -math.inf).exp()  # (B, H, N, C, C)
    A = (beta * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(C, device=q.device)
    Tinv = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False)  # (I + A)^-1
    U0 = Tinv @ (beta * v)                                           # U = U0 - KS @ S0
    KS = Tinv @ (beta * G.exp()[..., None] * k)
    QK = (q @ k.transpose(-1, -2)) * decay
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float()
    out = []
    for qn, kn, Gn, U0n, KSn, QKn in zip(*(t.unbind(2) for t in (q, k, G, U0, KS, QK))):  # chunk by chunk
        U = U0n - KSn @ S
        out.append((qn * Gn.exp()[..., None]) @ S + QKn @ U)
        S = S * Gn[:, :, -1, None, None].exp() + (kn * (Gn[:, :, -1:] - Gn).exp()[..., None]).transpose(-1, -2) @ U
    o = rearrange(torch.stack(out, 2), "b h n c v -> b (n c) h v")[:, :T]
    return o, S


def use_fla(t: torch.Tensor, kernels: str) -> bool:
    """fla's kernels on CUDA in half precision (they refuse float32); the torch forms otherwise."""
    return t.is_cuda and kernels != "torch" and t.dtype in (torch.bfloat16, torch.float16)


@torch.compiler.disable  # --compile: fla's Triton kernels and autotuners run as they are, between compiled graphs
def gla(q, k, v, g, state=None, final=False, kernels="auto"):
    """GLA on the fast path that fits: fla's kernels on CUDA (one token: the decoding kernel), else the chunked
    torch form. Returns o (B, T, H, V) and the final state (None from fla unless `final`)."""
    scale = q.shape[-1] ** -0.5
    if use_fla(q, kernels):
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        fn = fused_recurrent_gla if q.shape[1] == 1 else chunk_gla
        return fn(q, k, v, g, scale=scale, initial_state=state, output_final_state=final)
    return gla_chunked(q, k, v, g, scale, state)


@torch.compiler.disable
def gdn(q, k, v, g, beta, state=None, final=False, kernels="auto"):
    """Gated DeltaNet on the fast path that fits, as gla()."""
    scale = q.shape[-1] ** -0.5
    if use_fla(q, kernels):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        fn = fused_recurrent_gated_delta_rule if q.shape[1] == 1 else chunk_gated_delta_rule
        return fn(q, k, v, g, beta=beta, scale=scale, initial_state=state, output_final_state=final)
    return gdn_chunked(q, k, v, g, beta, scale, state)


class LinearAttention(Operator):
    """What GLA, Gated DeltaNet and RWKV-7 share. Copied from the teacher, frozen and shared with the other candidates:
    the q/k/v/o projections. New, and trained by prepare_candidates.py: per-head maps on q and k (identity at
    the start), each operator's gates, and a per-head output RMSNorm, since a linear-attention read-out has
    no softmax normaliser and its scale is not the teacher's. All new parameters are fp32 (they are small).
    During generation it keeps a recurrent state (B, H, D, D) per layer."""
    slot = StateSlot

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        c = attn.config
        self.kernels, self.head_dim, D = cfg.kernels, attn.head_dim, attn.head_dim
        self.heads, self.groups = c.num_attention_heads, attn.num_key_value_groups
        self.q_map = nn.Parameter(torch.eye(D).repeat(c.num_attention_heads, 1, 1))   # (H, D, D)
        self.k_map = nn.Parameter(torch.eye(D).repeat(c.num_key_value_heads, 1, 1))   # (Hkv, D, D)
        self.norm = nn.Parameter(torch.ones(D))
        self.norm_eps = 1e-6

    def qkv(self, p: LayerInput):
        q = torch.einsum("bthd,hde->bthe", p.q, self.q_map.to(p.q.dtype))
        k = torch.einsum("bthd,hde->bthe", p.k, self.k_map.to(p.k.dtype))
        # the kernels want as many key/value heads as query heads
        k, v = (repeat(t, "b t h d -> b t (h g) d", g=self.groups) for t in (k, p.v))
        valid = valid_tokens(p)
        if valid is not None:  # padding writes nothing to the state
            k, v = (t * valid[:, :, None, None] for t in (k, v))
        return q, k, v

    def cost(self, T: int) -> float:
        """A token reads and writes a D x D state per head: about 2D keys' worth, against T/2 for full attention."""
        return min(1.0, 2 * self.head_dim / (T / 2))

    def run(self, p: LayerInput, kernel, *args) -> torch.Tensor:
        """Run the recurrence, from and into this layer's cache slot during generation; normalise per head."""
        slot = self.slot_in(p)
        o, state = kernel(*args, state=None if slot is None else slot.state, final=slot is not None,
                          kernels=self.kernels)
        if slot is not None:
            slot.write(state, p.x.shape[1])
        return F.rms_norm(o.to(p.x.dtype), (o.shape[-1],), self.norm.to(p.x.dtype), eps=self.norm_eps)


class GLA(LinearAttention):
    """Gated Linear Attention (Yang et al. 2024): a per-key-channel forget gate from a rank-16 projection,
    logsigmoid / 16 as in the paper, so memory fades slowly at the start; floored at e^-5 per token."""
    code = "G"
    floor = -5.0

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        C = attn.config.hidden_size
        self.gate = nn.Sequential(nn.Linear(C, 16, bias=False), nn.Linear(16, self.heads * attn.head_dim))

    def forward(self, p: LayerInput) -> torch.Tensor:
        q, k, v = self.qkv(p)
        g = (F.logsigmoid(self.gate(p.x.float())) / 16).clamp_min(self.floor).view_as(q)  # (B, T, H, D), fp32
        return self.run(p, gla, q, k, v, g)


class GatedDeltaNet(LinearAttention):
    """Gated DeltaNet (Yang et al. 2025): a delta-rule memory with L2-normalised keys, a write strength beta and
    a decay per head, g = -exp(A_log) softplus(x W + b) as in Mamba2."""
    code = "D"

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        C, H = attn.config.hidden_size, self.heads
        self.beta = nn.Linear(C, H)
        self.dt = nn.Linear(C, H)
        nn.init.zeros_(self.dt.weight)
        nn.init.constant_(self.dt.bias, math.log(math.expm1(0.01)))  # softplus^-1(0.01): slow decay at the start
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, H)))

    def forward(self, p: LayerInput) -> torch.Tensor:
        q, k, v = self.qkv(p)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        x = p.x.float()
        beta = torch.sigmoid(self.beta(x))                          # (B, T, H)
        g = -self.A_log.exp() * F.softplus(self.dt(x))              # (B, T, H) log decay
        valid = valid_tokens(p)
        if valid is not None:
            beta = beta * valid[..., None]
        return self.run(p, gdn, q, k, v, g, beta.to(q.dtype))  # fla wants beta in q's dtype


# --- RWKV-7: a generalised delta rule, S_t = diag(e^w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T, in three forms as
# --- GLA and Gated DeltaNet (the recurrence, a chunked form for the CPU, fla's kernels on CUDA).
# RWKV-7 bounds its log decay below, w = -e^-0.5 sigmoid(.) >= RWKV7_MIN_LOG_DECAY: fla's chunk kernel then runs in
# chunks of 64 on tensor cores (its `lower_bound`), and rwkv7_chunked's factors e^(32 * 0.61) stay far inside fp32.
RWKV7_MIN_LOG_DECAY = -math.exp(-0.5)


def rwkv7_recurrent(q, w, k, v, a, b, scale, state=None):
    """RWKV-7's state update, one token at a time, in fla's convention (fla/ops/generalized_delta_rule/dplr/naive.py,
    which fla.ops.rwkv7 computes): a decay per key channel, then a rank-one correction read from the old state:
        S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,   o_t = scale q_t S_t.
    RWKV-7 takes a = -kk, b = kk * eta: it removes a share eta (the in-context learning rate) of what the memory
    holds at the normalised key kk, and writes v at k. q, w, k, a, b: (B, T, H, K), w the log decay (<= 0);
    v: (B, T, H, V). Returns o (B, T, H, V), S."""
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float) if state is None else state.float()
    q, w, k, v, a, b = (t.float() for t in (q, w, k, v, a, b))
    out = []
    for t in range(T):
        read = torch.einsum("bhk,bhkv->bhv", a[:, t], S)                # a_t^T S_{t-1}: (B, H, V)
        S = S * w[:, t, :, :, None].exp() + b[:, t, :, :, None] * read[:, :, None, :] \
            + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    return torch.stack(out, 1), S


def rwkv7_chunked(q, w, k, v, a, b, scale, state=None, C=32):
    """rwkv7_recurrent, C tokens at a time (the WY form of fla's chunk_dplr, written out). With G_i the cumulative log
    decay from the chunk's start through token i, the reads u_i = a_i^T S_{i-1} solve the triangular system
        (I - A_ab) U = (a e^(G-w)) S0 + A_ak V,   A_xy[i, j] = sum_c x_ic e^(G_(i-1),c - G_jc) y_jc  for j < i,
    and then o_i = (q_i e^G_i) S0 + sum_{j<=i} (q_i e^(G_i - G_j)).(k_j v_j + b_j u_j). The decays are factored,
    (x e^G_i).(y e^-G_j); w >= RWKV7_MIN_LOG_DECAY keeps each factor below e^20. Same arguments and results."""
    B, T, H, K = q.shape
    q, w, k, v, a, b = chunks(C, q * scale, w, k, v, a, b)              # (B, H, N, C, K|V)
    G = w.cumsum(-2)                                                    # decay through token i
    qG, aG = q * G.exp(), a * (G - w).exp()                             # they read S_i and S_(i-1)
    kG, bG = k * (-G).exp(), b * (-G).exp()                             # written at j, seen from the chunk's start
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    upto, before = ones.tril(), ones.tril(-1)                           # j <= i, j < i
    A_qk, A_qb = ((qG @ y.transpose(-1, -2)).masked_fill(~upto, 0) for y in (kG, bG))      # (B, H, N, C, C)
    A_ak, A_ab = ((aG @ y.transpose(-1, -2)).masked_fill(~before, 0) for y in (kG, bG))
    eye = torch.eye(C, device=q.device)
    Tinv = torch.linalg.solve_triangular(eye - A_ab, eye.expand_as(A_ab), upper=False)      # (I - A_ab)^-1
    U0, W = Tinv @ (A_ak @ v), Tinv @ aG                                # U = U0 + W @ S0
    S = q.new_zeros(B, H, K, v.shape[-1]) if state is None else state.float()
    out = []
    for qn, vn, kn, bn, Gn, U0n, Wn, A_qkn, A_qbn in zip(*(t.unbind(2) for t in (qG, v, k, b, G, U0, W, A_qk, A_qb))):
        U = U0n + Wn @ S                                                # the reads a_i^T S_(i-1): (B, H, C, V)
        out.append(qn @ S + A_qkn @ vn + A_qbn @ U)
        decay = (Gn[:, :, -1:] - Gn).exp()                              # from token j to the chunk's end
        S = S * Gn[:, :, -1, :, None].exp() + (kn * decay).transpose(-1, -2) @ vn + (bn * decay).transpose(-1, -2) @ U
    o = rearrange(torch.stack(out, 2), "b h n c v -> b (n c) h v")[:, :T]
    return o, S


@torch.compiler.disable
def rwkv7(q, w, k, v, a, b, state=None, final=False, kernels="auto"):
    """RWKV-7 on the fast path that fits, as gla(): fla.ops.rwkv7 on CUDA (chunk_rwkv7, or fused_recurrent_rwkv7
    for one token), rwkv7_chunked elsewhere. fla's kernels want every input in one dtype."""
    scale = q.shape[-1] ** -0.5
    if use_fla(q, kernels):
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
        if q.shape[1] == 1:
            return fused_recurrent_rwkv7(q, w, k, v, a, b, scale=scale, initial_state=state, output_final_state=final)
        return chunk_rwkv7(q, w, k, v, a, b, scale=scale, initial_state=state, output_final_state=final,
                           lower_bound=RWKV7_MIN_LOG_DECAY)
    return rwkv7_chunked(q, w, k, v, a, b, scale, state)


class RWKV7(LinearAttention):
    """RWKV-7 "Goose" (Peng et al. 2025, arXiv 2503.14456) on the teacher's q/k/v: a delta rule with a decay per key
    channel and an in-context learning rate, built as fla/layers/rwkv7.py builds it:
        w   = -e^-0.5 sigmoid(x W_w)   log decay per channel, in (-0.61, 0)
        eta = sigmoid(x W_a)           in-context learning rate per channel
        kk  = normalize(k * k_k)       the key at which the memory is corrected, per head
        k  <- k * (1 + (eta - 1) k_a)  the key written (k_a = 1: write as much as was removed)
        S_t = diag(e^w_t) S_{t-1} - (kk_t eta_t) (kk_t^T S_{t-1}) + k_t v_t^T   (rwkv7_recurrent: a = -kk, b = kk eta)
    W_w and W_a are rank-16 projections of the layer input (a tanh between for the decay, as in RWKV-7's LoRAs) and
    start at their biases: decays spread over each head's channels from e^-0.0015 (a memory of ~670 tokens) to
    e^-0.38, eta = 1/2. Left out, since the teacher's projections stand in for RWKV's own: token shift, the value
    residual, the output gate and the r_k bonus; the output RMSNorm does the work of RWKV's GroupNorm."""
    code = "R"

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        C, H, D = attn.config.hidden_size, self.heads, attn.head_dim
        self.decay = nn.Sequential(nn.Linear(C, 16, bias=False), nn.Tanh(), nn.Linear(16, H * D))
        self.rate = nn.Sequential(nn.Linear(C, 16, bias=False), nn.Linear(16, H * D))
        with torch.no_grad():
            for up in (self.decay[-1], self.rate[-1]):
                up.weight.zero_()
            self.decay[-1].bias.copy_(torch.linspace(-6, 0.5, D).repeat(H))   # sigmoid: 0.0025 .. 0.62
            self.rate[-1].bias.zero_()
        self.k_k = nn.Parameter(torch.ones(H, D))
        self.k_a = nn.Parameter(torch.ones(H, D))
        # RWKV-7's own GroupNorm epsilon (fla/layers/rwkv7.py: head_dim * 1e-5). At a first token the state is
        # nearly empty and o can be nearly 0: with 1e-6 the norm scales it up to full size, and a rounding that turns
        # it turns the output wholesale; with this one it fades to 0, at a gain of at most 1/sqrt(eps) (28 for
        # D = 128). tests/rwkv7_conditioning.py and tests/rwkv7_eps.py measure both sides.
        self.norm_eps = D * 1e-5

    def forward(self, p: LayerInput) -> torch.Tensor:
        q, k, v = self.qkv(p)                                                     # (B, T, H, D); k, v 0 at padding
        x = p.x.float()
        w = RWKV7_MIN_LOG_DECAY * torch.sigmoid(self.decay(x)).view(q.shape)    # (B, T, H, D), fp32
        eta = torch.sigmoid(self.rate(x)).view(q.shape)
        kk = F.normalize(k.float() * self.k_k, dim=-1)                            # 0 at padding: no correction
        k = k.float() * (1 + (eta - 1) * self.k_a)
        w, k, a, b = (t.to(q.dtype) for t in (w, k, -kk, kk * eta))              # fla: one dtype throughout
        return self.run(p, rwkv7, q, w, k, v, a, b)


# --- NAtS: token-level attention. Each key/value head gives each token one of three types, in this order.
GLOBAL, LOCAL, WINDOW = range(3)


def nats_mask(types, globals_k, pos_k, globals_q, pos_q, window: int) -> torch.Tensor:
    """NAtS' attention mask (Deng & Lindauer 2025): which keys each query sees, from the keys' types, as 0/1 in
    floating point, so that preparation's straight-through types pass their gradient. Query i sees key j <= i if j is
      global  kept to the end;
      local   kept until the next global token: no global token came after j and before i (a global token still
              sees the local tokens before it, and closes their segment, as in NAtS' code);
      window  kept for `window` steps: i - j < window, its own step included.
    types: (B, Hkv, S, 3) one-hot (zeros: a padding token, never seen); globals_k: (B, Hkv, S) global tokens up to and
    including each key; globals_q: (B, Hkv, T) global tokens before each query; pos_k (S,), pos_q (T,) positions.
    Returns (B, Hkv, T, S)."""
    g, l, s = (t[..., None, :] for t in types.unbind(-1))              # (B, Hkv, 1, S)
    lag = pos_q[:, None] - pos_k[None, :]                              # (T, S): how far back key j lies
    between = globals_q[..., :, None] - globals_k[..., None, :]        # global tokens after j, before i: 0 keeps j
    return (g + s * (lag < window) + l * (1 - between).clamp(0, 1)) * (lag >= 0)


def masked_attention(q, k, v, m, scale: float) -> torch.Tensor:
    """Softmax attention over the keys that m (0/1) keeps, written out so that it is differentiable in m too:
    sum_j m_ij e^s_ij v_j / sum_j m_ij e^s_ij, in fp32. q: (B, H, T, D); k, v: (B, H, S, D); m: (B, H, T, S)."""
    dtype, (q, k, v) = q.dtype, (t.float() for t in (q, k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    top = s.masked_fill(m < 0.5, -math.inf).amax(-1, keepdim=True).detach()  # the largest kept score: the sum >= 1
    e = (s - top).clamp(max=60).exp() * m   # clamped: a dropped key far above the kept ones does not overflow
    return ((e @ v) / e.sum(-1, keepdim=True)).to(dtype)


class NAtSSlot(Slot):
    """NAtS' cache: keys and values (B, Hkv, S, D) of the tokens that a later query may still see, with what decides
    for how long (as nats_mask takes it: types, global counts, positions). A column stays while one row or head
    still keeps it; nats_mask masks it where it is gone."""

    def __init__(self):
        super().__init__()
        self.types = self.globals = self.pos = self.globals_so_far = None

    def append(self, k, v, types, globals_k, pos):
        """Add this step's tokens; return the keys, values, types, global counts and positions it attends to."""
        self.seen += k.shape[-2]
        self.globals_so_far = globals_k[..., -1:]                       # (B, Hkv, 1), for the next step's count
        if self.keys is not None:
            k, v, types, globals_k = (torch.cat([old, new], 2) for old, new in
                                      zip((self.keys, self.values, self.types, self.globals), (k, v, types, globals_k)))
            pos = torch.cat([self.pos, pos])
        self.keys, self.values, self.types, self.globals, self.pos = k, v, types, globals_k, pos
        self.is_initialized = True
        return k, v, types, globals_k, pos

    def drop(self, window: int):
        """Drop the tokens that no later query sees, in no row and no head (NAtS' rules never bring one back)."""
        later = nats_mask(self.types, self.globals, self.pos, self.globals_so_far, self.pos[-1:] + 1, window)
        keep = (later[..., 0, :] > 0.5).flatten(0, 1).any(0)           # (S,)
        self.keys, self.values, self.types, self.globals = (t[:, :, keep] for t in
                                                            (self.keys, self.values, self.types, self.globals))
        self.pos = self.pos[keep]


class NAtS(Operator):
    """Neural Attention Search's token-level attention (Deng & Lindauer 2025, arXiv 2502.13251, and the AutoML blog
    post "Neural Attention Search"; code: github.com/automl/NeuralAttentionSearch) as a candidate: the teacher's
    softmax attention, in which each key/value head keeps each token for as long as its type says (nats_mask:
    global, local or window, `--window` steps as swa). A scorer, a linear layer on the layer input, chooses the
    types: one of three per token and key/value head (NAtS' scorer too has one set per key/value head); the first
    token of a sequence is global (NAtS does the same: the attention sink stays). The scorer starts at zero, where
    ties make every token global: the teacher's own attention.
    Preparation trains the scorer on the alignment loss plus `sparsity` times the share of kept (query, key) pairs
    (extra_loss). The choice is straight-through: the forward pass uses the top-scoring type, the gradient flows
    through the softmax of the scores and through the explicit mask (masked_attention). NAtS' code samples the
    choice with Gumbel noise; here it is deterministic, so that preparation is reproducible. sparsity = 0.1: with it,
    keeping every pair costs as much as an alignment loss of 0.1, about what a window alone loses on the small
    teacher (swa's nmse, 0.01 to 0.3 by layer), so a layer keeps more only where a window falls short.
    Elsewhere the types are hard: the search and the hybrids run sdpa with the boolean mask (fla has no kernel for
    this mask, so on CUDA it costs full attention's FLOPs and a (B, H, T, T) mask; the saving is the hybrid's cache,
    which keeps per key/value head only the tokens that a later query may see: NAtSSlot).
    Cost: what preparation measured on held-out batches (observe): the share d of kept pairs at its sequence length
    L and the share g of global tokens. Global tokens stay to the end, the others for a bounded time, so at context
    T the share is about g + (d - g) L / T."""
    code = "N"
    slot = NAtSSlot
    sparsity = 0.1

    def __init__(self, attn: nn.Module, cfg: Config):
        super().__init__(attn, cfg)
        c = attn.config
        self.scaling, self.window = attn.scaling, cfg.window
        self.groups, self.kv_heads = attn.num_key_value_groups, c.num_key_value_heads
        self.scorer = nn.Linear(c.hidden_size, 3 * self.kv_heads)
        nn.init.zeros_(self.scorer.weight)
        nn.init.zeros_(self.scorer.bias)
        self.register_buffer("kept", torch.tensor(1.0))          # measured share of kept (query, key) pairs ...
        self.register_buffer("global_share", torch.tensor(1.0))  # ... and of global tokens ...
        self.register_buffer("kept_len", torch.tensor(1.0))      # ... on sequences of this length
        self.observed, self.kept_now = 0, None

    def settings(self) -> dict:
        return dict(window=self.window, sparsity=self.sparsity)

    def cost(self, T: int) -> float:
        g, d, L = float(self.global_share), float(self.kept), float(self.kept_len)
        return min(1.0, g + max(0.0, d - g) * L / T)

    @property
    def learning(self) -> bool:
        """Preparation trains the scorer: straight-through types and the explicit mask."""
        return torch.is_grad_enabled() and self.scorer.weight.requires_grad

    def types(self, p: LayerInput, first: bool) -> torch.Tensor:
        """(B, Hkv, T, 3) one-hot token types: the scorer's top type (straight-through while learning); none (zeros)
        at padding; global for the first token of each sequence if this step has it."""
        B, T = p.x.shape[:2]
        scores = self.scorer(p.x.float()).view(B, T, self.kv_heads, 3).transpose(1, 2)   # (B, Hkv, T, 3)
        types = F.one_hot(scores.argmax(-1), 3).float()
        if self.learning:
            soft = scores.softmax(-1)
            types = types + soft - soft.detach()
        valid = valid_tokens(p)
        if first:  # the first token after any left padding: (B or 1, T)
            start = (torch.arange(T, device=scores.device) == 0)[None] if valid is None else valid.cumsum(1) == 1
            one_hot = torch.arange(3, device=types.device) == GLOBAL  # GLOBAL's one-hot, made on the device
            types = torch.where(start[:, None, :, None], one_hot.to(types), types)
        return types if valid is None else types * valid[:, None, :, None]

    def mask(self, p: LayerInput, slot: NAtSSlot | None = None):
        """This step's mask over the keys its queries may see, (B, Hkv, T, S), with those keys and values (B, Hkv, S, D)
        and the step's types; with a slot, the step's tokens join it, and what no later query sees leaves it."""
        k, v = p.k_rope.transpose(1, 2), p.v.transpose(1, 2)
        seen = 0 if slot is None else slot.seen
        types = self.types(p, first=seen == 0)
        g = types[..., GLOBAL]                                          # (B, Hkv, T)
        before = g.cumsum(-1) - g + (0 if seen == 0 else slot.globals_so_far)   # global tokens before each query
        pos = torch.arange(seen, seen + k.shape[2], device=k.device)
        keys = (k, v, types, before + g, pos)
        if slot is not None:
            keys = slot.append(*keys)
        k, v, types_k, globals_k, pos_k = keys
        m = nats_mask(types_k, globals_k, pos_k, before, pos, self.window)
        m = torch.where(pos[:, None] == pos_k, 1.0, m)  # every query sees itself (padding too: no empty row)
        if slot is not None:
            slot.drop(self.window)
        return m, k, v, types

    def forward(self, p: LayerInput) -> torch.Tensor:
        m, k, v, types = self.mask(p, self.slot_in(p))
        q = p.q_rope.transpose(1, 2)                                    # (B, H, T, D)
        if self.learning:
            k, v, mh = (t.repeat_interleave(self.groups, 1) for t in (k, v, m))
            y = masked_attention(q, k, v, mh, self.scaling)
            self.kept_now = self.share(m, types)
        else:
            keep = (m > 0.5).repeat_interleave(self.groups, 1)          # (B, H, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scaling, enable_gqa=True)
        return y.transpose(1, 2)                                        # (B, T, H, D)

    @staticmethod
    def share(m: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        """The share of causal (query, key) pairs of real tokens that the mask keeps (a whole sequence: T = S)."""
        real = types.detach().sum(-1) > 0.5                             # (B, Hkv, T): not padding
        pairs = real[..., :, None] & real[..., None, :] & torch.ones_like(m, dtype=torch.bool).tril()
        return (m * pairs).sum() / pairs.sum()

    def extra_loss(self) -> torch.Tensor | None:
        """The sparsity term of the forward pass just run."""
        kept, self.kept_now = self.kept_now, None
        return None if kept is None else self.sparsity * kept

    @torch.no_grad()
    def observe(self, p: LayerInput):
        """Measure the shares of kept pairs and of global tokens (means over the held-out batches shown)."""
        m, _, _, types = self.mask(p)
        real = types.sum(-1) > 0.5
        n = self.observed
        for buf, value in ((self.kept, self.share(m, types)), (self.global_share, types[..., GLOBAL][real].mean())):
            buf.copy_((buf * n + value) / (n + 1))
        self.kept_len.fill_(m.shape[-1])
        self.observed = n + 1


# The registry: its order fixes the columns of alpha. A new operator is one Operator subclass with the constructor
# (attn, cfg), forward(LayerInput) -> (B, T, H, D) and its protocol (code, slot, cost, ...), plus one line here
# (README: "Adding an operator"). FULL, the teacher's own attention, is special by design: every search keeps it.
FULL = "full"
CANDIDATES = {FULL: FullAttention, "swa": SlidingWindowAttention, "gla": GLA, "gdn": GatedDeltaNet, "rwkv7": RWKV7,
              "nats": NAtS}


def candidate_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in CANDIDATES:
            raise DashError(f"unknown operator {n!r}; known operators: {', '.join(CANDIDATES)}")
    if FULL not in names or len(names) < 2 or len(set(names)) != len(names):
        raise DashError(f"--candidates {spec!r}: need '{FULL}' and at least one other operator, each once")
    return names


def trainable(op: nn.Module) -> bool:
    """Whether an operator has parameters to align: prepare_candidates.py trains them, build_hybrid() loads them."""
    return any(True for _ in op.parameters())


# ----------------------------------------------------------------------------- mixed layer


def weighted_sum(w: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    """sum_i w_i y_i in fp32, returned in the ys' dtype."""
    return sum(w_i * y_i.float() for w_i, y_i in zip(w, ys)).to(ys[0].dtype)


class WeightedSum(torch.autograd.Function):
    """y = sum_i w_i y_i: operator outputs ys (each (B, T, H, D), the model's dtype), probabilities w (n,), fp32.
    The sum is taken in fp32, and so is the probabilities' gradient dL/dw_i = <dL/dy, y_i>: the softmax's backward takes
    differences of these nearly equal numbers, which bf16's 0.4% steps would swamp. Saves the ys as they are."""

    @staticmethod
    def forward(ctx, w, *ys):
        ctx.save_for_backward(w, *ys)
        return weighted_sum(w, ys)

    @staticmethod
    def backward(ctx, g):
        w, *ys = ctx.saved_tensors
        g32 = g.float()
        return (torch.stack([(g32 * y_i.float()).sum() for y_i in ys]), *((w_i * g32).to(g.dtype) for w_i in w))


class MixedAttention(nn.Module):
    """DARTS' MixedOp for attention, over frozen operators: sum_i w_i * op_i(x) with w = softmax(alpha_l / tau).
    No Gumbel noise: every operator runs (the search is deterministic and its gradient exact), and no weight
    step alternates with it, since the weights are frozen. Drop-in for the teacher's attention module: same
    call, returns (output, None). Two modes, set every step by set_probs(): the mixture (probabilities w_l of the
    operators still in the search, `active`), and the teacher (probs None: the 'full' operator alone)."""

    def __init__(self, attn: nn.Module, ops: dict[str, nn.Module]):
        super().__init__()
        self.attn = attn
        self.ops = nn.ModuleDict(ops)
        self.probs, self.active, self.grad = None, None, "exact"  # set by set_probs() every step

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers 5.24 renamed the argument
        if cache is not None and self.probs is not None:
            raise DashError("a mixture of operators cannot use a cache (they would share one layer's slot): "
                            "call it with use_cache=False, or build the hybrid to generate")
        p = project(self.attn, hidden_states, position_embeddings, attention_mask, cache)
        if self.probs is None:
            y = self.ops["full"](p)
        else:  # two methods, so that torch.compile fuses the sum (a graph break in its loop would leave it eager)
            y = self.mix(self.outputs(p))
        return self.attn.o_proj(y.flatten(2)), None

    def straight_through(self) -> bool:
        """--grad teacher, in a layer where the teacher's attention is still in the search."""
        return self.grad == "teacher" and self.active[list(self.ops).index("full")]

    def outputs(self, p: LayerInput) -> list[torch.Tensor]:
        """The outputs of the operators still in the search, in registry order. Straight-through, the cheap ones
        run without autograd (forward only)."""
        st = self.straight_through()
        ys = []
        for (name, op), on in zip(self.ops.items(), self.active):
            if on:
                with torch.set_grad_enabled(torch.is_grad_enabled() and (not st or name == "full")):
                    ys.append(op(p))
        return ys

    def mix(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """sum_i w_i y_i over the active operators. Straight-through, a cheap operator's y_i takes the teacher's way
        back: its value is y_i, its derivative that of the teacher's attention. The logits' gradient, y_i . dL/dy,
        stays exact; earlier layers see the teacher's Jacobian."""
        names = [n for n, on in zip(self.ops, self.active) if on]
        if self.straight_through():
            y_full = ys[names.index("full")]
            ys = [y_i if n == "full" else y_i + (y_full - y_full.detach()) for n, y_i in zip(names, ys)]
        # the active weights by stack, not by a list index: indexing with a Python list copies it to the GPU, a
        # host sync that CUDA-graph capture (--cuda-graph) refuses
        w = torch.stack([self.probs[i] for i, on in enumerate(self.active) if on])
        if torch.compiler.is_compiling() and not w.is_cuda:  # torch 2.11 compiles WeightedSum to dL/dw = 0 on the
            # CPU (tests/test_dash.py), not on CUDA (tests/test_gpu.py, where the timings were measured): plain ops
            return weighted_sum(w, ys)
        return WeightedSum.apply(w, *ys)


class HybridAttention(nn.Module):
    """A finished hybrid's layer: one operator in place of the teacher's attention, on the teacher's projections.
    Same call as the teacher's module; with a cache, the operator keeps its own slot (KVSlot or StateSlot)."""

    def __init__(self, attn: nn.Module, op: nn.Module):
        super().__init__()
        self.attn, self.op = attn, op

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers 5.24 renamed the argument
        p = project(self.attn, hidden_states, position_embeddings, attention_mask, cache)
        return self.attn.o_proj(self.op(p).flatten(2)), None

# ----------------------------------------------------------------------------- model surgery


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A real HF causal LM and its tokenizer, frozen, with attention we know how to take apart."""
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(name)
    except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
        raise DashError(f"{name} is not a causal language model that transformers can load: {str(e)[:200]}")
    except OSError as e:
        raise DashError(f"could not load {name} ({str(e)[:200]}); without network, pass a local folder with --model")
    check_attention(name, model)
    model = model.to(device).eval().requires_grad_(False)
    ids = torch.arange(40, device=device)[None] % model.config.vocab_size  # longer than the test models' windows
    with torch.no_grad():
        if not torch.allclose(final_hidden(model, ids), model.model(input_ids=ids).last_hidden_state, 1e-2, 1e-3):
            raise DashError(f"{name}: its forward pass ({type(model.model).__name__}) is not embeddings, layers, "
                            "norm, which the search spells out (final_hidden)")
    return model, tokenizer


def check_attention(name: str, model):
    """Refuse, naming what is missing, the attention dash cannot take apart: it needs separate q/k/v/o projections
    (q/k norms allowed), softmax attention in every layer, full or sliding-window, and logits without soft-capping."""
    c = model.config
    kinds = set(getattr(c, "layer_types", None) or [])
    if kinds - {"full_attention", "sliding_attention"}:  # Qwen3-Next, Qwen3.5: linear_attention layers
        raise DashError(f"{name} is already a hybrid (layer types {sorted(kinds)}): dash searches a teacher whose "
                        f"every layer is softmax attention")
    for l, layer in enumerate(getattr(model.model, "layers", None) or [None]):
        a = getattr(layer, "self_attn", None)
        if a is None:
            raise DashError(f"{name}: layer {l} has no self_attn module; dash needs softmax attention in every layer")
        if hasattr(a, "qkv_proj"):  # Phi-3
            raise DashError(f"{name}: fused q/k/v projection (qkv_proj, {type(a).__name__}); dash needs separate "
                            f"q_proj, k_proj and v_proj")
        if hasattr(a, "kv_a_proj_with_mqa") or hasattr(a, "q_a_proj"):  # DeepSeek V2/V3
            raise DashError(f"{name}: multi-head latent attention ({type(a).__name__}); dash needs q/k/v "
                            f"projections per head")
        missing = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling") if not hasattr(a, n)]
        if missing:
            raise DashError(f"{name}: {type(a).__name__} has no {', '.join(missing)}; dash needs Qwen2/Llama-style "
                            f"attention (q/k/v/o projections)")
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(c, cap, None) is not None:
            raise DashError(f"{name}: {cap} = {getattr(c, cap)}; dash's operators and KL assume no soft-capping")


def final_hidden(model, ids: torch.Tensor, keep: list | None = None) -> torch.Tensor:
    """model.model(ids).last_hidden_state for a batch without padding, spelled out for the search: embeddings
    (Gemma's scale is inside its embedding module), RoPE (one per layer type in Gemma 3), the layers with no mask
    (sdpa's causal attention; dash's operators apply the teacher's windows themselves), the final norm. Given no
    attention mask, HF's forward looks for packed sequences in the position ids, a host sync per call: the CPU could
    not queue a pass ahead of the GPU (on the H100 the search ran 8-12% faster without it). load_model() checks that
    both agree. keep: a list that receives each layer's output (B, T, C), for finetune.py's per-layer loss."""
    m = model.model
    h = m.embed_tokens(ids)
    T = ids.shape[1]
    pos = torch.arange(T, device=ids.device)[None]
    types = getattr(m.config, "layer_types", None) or ["full_attention"] * len(m.layers)
    if "layer_type" in inspect.signature(m.rotary_emb.forward).parameters:  # Gemma 3: local and global RoPE
        ropes = {t: m.rotary_emb(h, pos, t) for t in set(types)}
    else:
        ropes = dict.fromkeys(set(types), m.rotary_emb(h, pos))
    for layer, kind in zip(m.layers, types):
        a, mask = layer.self_attn, None
        if not isinstance(a, (MixedAttention, HybridAttention)) and teacher_window(a) is not None:
            mask = keep_mask(None, T, T, ids.device, teacher_window(a))  # the teacher's own module: its window
        h = layer(h, attention_mask=mask, position_embeddings=ropes[kind], position_ids=pos)
        if keep is not None:
            keep.append(h)
    return m.norm(h)


def teacher_attention(model) -> list[nn.Module]:
    return [getattr(layer.self_attn, "attn", layer.self_attn) for layer in model.model.layers]


def make_ops(model, names: list[str], cfg: Config) -> list[dict[str, nn.Module]]:
    """Fresh operators for every layer: [{name: op}] (new parameters at their initial values)."""
    p = next(model.parameters())
    return [{n: CANDIDATES[n](a, cfg).to(p.device) for n in names} for a in teacher_attention(model)]


def install(model, ops: list[dict[str, nn.Module]]):
    """Swap every layer's attention for a MixedAttention over its operators (frozen)."""
    for layer, attn, layer_ops in zip(model.model.layers, teacher_attention(model), ops):
        layer.self_attn = MixedAttention(attn, layer_ops).requires_grad_(False)
    return model


def compile_layers(model, on: bool = True):
    """torch.compile every decoder layer (on=False: undo). On a GPU a search step spends more time in elementwise
    kernels (RMSNorms, RoPE, SiLU, gates, casts, the weighted sum, and their backward) than in matmuls; compiled,
    they fuse into a few kernels, while fla's kernels run between the graphs as they are. All layers share the
    graphs; a new set of active operators compiles once more."""
    if on:  # graphs per layer kind: teacher, mixture, each set of operators left; never one per layer
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in model.model.layers:
        if on:
            layer.compile()
        else:
            layer._compiled_call_impl = None


def recompute_mlp(model, on: bool = True):
    """--recompute-mlp: the MLP down_proj(act(gate_proj(x)) * up_proj(x)) keeps only its input x for the backward
    pass and computes the gate and up projections again there (torch.utils.checkpoint), instead of keeping them (2-3
    x 11008 numbers per token and layer for Qwen2.5-3B: the frozen down_proj needs no input to pass its gradient
    back). The price: the gate and up matmuls once more per step, most of a layer's matmuls. The forward is replaced
    on the MLP instance, so that parameters keep their names (the candidate cache knows the teacher by them);
    on=False restores it."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        mlp = layer.mlp
        if not on:
            mlp.__dict__.pop("forward", None)
        elif all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):  # Qwen2's and Llama's
            def forward(x, mlp=mlp):
                gated = checkpoint(lambda x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x), x, use_reentrant=False,
                                   preserve_rng_state=False)  # no randomness to replay (and RNG state breaks capture)
                return mlp.down_proj(gated)
            mlp.forward = forward
        else:  # another MLP: recompute all of it
            mlp.forward = functools.partial(checkpoint, type(mlp).forward.__get__(mlp), use_reentrant=False)


def restore_teacher(model):
    for layer, attn in zip(model.model.layers, teacher_attention(model)):
        layer.self_attn = attn
    return model


def set_probs(model, w: torch.Tensor | None, active: list | None = None, grad: str = "exact"):
    """Give layer l the operator probabilities w[l] ((L, n_ops), fp32; None: the teacher) and the operators still in
    its search, active[l] (default: those with w > 0; a host-side list, so no sync per operator and layer)."""
    if w is not None and active is None:
        active = (w.detach() > 0).tolist()
    for l, layer in enumerate(model.model.layers):
        layer.self_attn.probs = None if w is None else w[l]
        layer.self_attn.active = None if w is None else active[l]
        layer.self_attn.grad = grad


def load_op(op: nn.Module, state: dict[str, torch.Tensor], prefix: str, where: str = "the candidate file"):
    """Load prepared parameters (keys '<prefix><name>', prefix 'layers.<l>.<op>.') into one operator: its parameters
    and persistent buffers (what preparation measured, e.g. NAtS' share of kept tokens)."""
    for pname, param in op.state_dict(keep_vars=True).items():
        if prefix + pname not in state:
            raise DashError(f"{where} has no weights for {prefix + pname}: prepare the candidates for this model "
                            f"and operator set (python prepare_candidates.py --model ...)")
        with torch.no_grad():
            param.copy_(state[prefix + pname])


def load_candidates(ops: list[dict[str, nn.Module]], state: dict[str, torch.Tensor], where: str = "the cache"):
    for l, layer_ops in enumerate(ops):
        for name, op in layer_ops.items():
            load_op(op, state, f"layers.{l}.{name}.", where)


def make_hybrid(model, layers: list[str], state: dict[str, torch.Tensor], cfg: Config, check: bool = True):
    """The hybrid: layer l runs operator layers[l] alone, with its prepared weights. Checked before it is returned:
    generation with its caches must equal recomputation (check_generation)."""
    if len(layers) != len(model.model.layers):
        raise DashError(f"the architecture has {len(layers)} layers, the model {len(model.model.layers)}")
    restore_teacher(model)
    p = next(model.parameters())
    for l, (layer, name) in enumerate(zip(model.model.layers, layers)):
        if name not in CANDIDATES:
            raise DashError(f"unknown operator {name!r} in layer {l}; known operators: {', '.join(CANDIDATES)}")
        op = CANDIDATES[name](layer.self_attn, cfg).to(p.device)
        load_op(op, state, f"layers.{l}.{name}.")
        layer.self_attn = HybridAttention(layer.self_attn, op).requires_grad_(False)
    if check:
        check_generation(model)
    return model


def check_generation(model, new_tokens: int = 8, seed: int = 0):
    """Guard against silent breakage: greedy generation with caches (what every evaluation runs) must give the
    logits that recomputing the whole prefix gives. Two left-padded rows of random tokens, `new_tokens` steps:
    milliseconds. Caches lean on transformers' cache API, which has changed between minor releases (5.24 renamed
    the cache argument, and swa hybrids then generated garbage without a word); this makes such a change loud."""
    import transformers
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # the second row is left-padded, as batched evaluation pads
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)
            cached = torch.stack(out.logits, 1).float()                           # (2, new_tokens, vocab)
            mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], 1)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            ref = model(input_ids=out.sequences, attention_mask=mask, position_ids=pos,
                        use_cache=False).logits[:, ids.shape[1] - 1:-1].float()   # the same positions, no cache
        err = ((cached - ref).abs().mean() / (ref - ref.mean(-1, keepdim=True)).abs().mean()).item()
        problem = f"relative error {err:.3g}"
    except Exception as e:  # a changed cache API may as well fail deep inside transformers: say the same thing
        err, problem = math.inf, f"{type(e).__name__}: {str(e)[:200]}"
    tol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.05  # bf16 kernels: prefill vs decode
    if not err <= tol:
        raise DashError(f"this hybrid generates with its caches other logits than it computes without them "
                        f"({problem}; tolerance {tol}) under transformers {transformers.__version__}: its cache "
                        f"API changed. Install a tested version: pip install '{tested('transformers')}'")


def tested(package: str) -> str:
    """The version range of a package that this project was tested with, as requirements.txt states it."""
    for line in (HERE / "requirements.txt").read_text().splitlines():
        if re.match(rf"{package}\b", line):
            return line.split("#")[0].strip()
    return package

# ----------------------------------------------------------------------------- data
# One stream of text (documents joined by EOS), cut into disjoint ranges, so that nothing is fitted and scored on
# the same tokens:
#   [0, H)            held out: the alignment report, the discrete polish, the placement checks
#   [H, H + P)        preparation: the candidates are aligned on these
#   [H + P, H + P + S) the search: alpha trains on these
#   [H + P + S, ...)  finetuning (finetune.py): the exported hybrid's weights train on these, if it asks for them
# Each range is cut into sequences, whose order the seed shuffles.


def read_texts(spec: str):
    """Yield documents from local .txt/.jsonl/.jsonl.gz/.json.gz files or folders of them, or from one file of a
    Hugging Face dataset repository, 'hub:owner/name/path/in/repo' (JSON lines with a "text" field)."""
    if spec.startswith("hub:"):
        owner, name, path = (spec[4:].split("/", 2) + ["", ""])[:3]
        repo = f"{owner}/{name}"
        try:
            from huggingface_hub import hf_hub_download
            files = [Path(hf_hub_download(repo, path, repo_type="dataset"))]
        except Exception as e:  # offline, or no such file: say what to pass instead
            raise DashError(f"could not fetch {spec} from the Hugging Face hub ({type(e).__name__}). Offline, pass "
                            f"local text with --data (.txt, .jsonl or .jsonl.gz files, or a folder of them)")
    else:
        root = Path(spec)
        if not root.exists():
            raise DashError(f"--data {spec}: no such file or folder")
        files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
        files = [f for f in files if f.name.endswith((".txt", ".jsonl", ".jsonl.gz", ".json.gz"))]
        if not files:
            raise DashError(f"--data {spec}: no .txt, .jsonl, .jsonl.gz or .json.gz files there")
    for f in files:
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            if f.name.endswith(".txt"):
                yield fh.read()
            else:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)["text"]


TOO_SHORT = "held out, preparation and search together: lower --tokens or --prep-tokens, or give more text"


def text_batches(texts, need: int):
    """Documents in lists, each closed once it holds 1M characters, or 2 x need for a small need (a token is rarely
    under 2 characters): one tokenizer call per list, which a fast tokenizer spreads over the cores, and little
    text read past the need."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= min(1_000_000, 2 * need):
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_stream(tokenizer, spec: str, need: int, why: str | None = None) -> torch.Tensor:
    """The first `need` tokens of the documents, each followed by EOS: (need,) int64. why: what needs them and what
    to do about it, for the error when the text is too short (default: TOO_SHORT)."""
    ids, eos = [], tokenizer.eos_token_id
    with tqdm(total=need, desc="tokenizing", unit="tok", leave=False, disable=not is_main()) as bar:
        for texts in text_batches(read_texts(spec), need):
            for new in tokenizer(texts, add_special_tokens=False)["input_ids"]:  # a fast tokenizer: on every core
                ids += new + ([eos] if eos is not None else [])
            bar.update(min(len(ids), need) - bar.n)
            if len(ids) >= need:
                break
    if len(ids) < need:
        raise DashError(f"--data {spec} has {len(ids):,} tokens; the run needs {need:,} ({why or TOO_SHORT})")
    return torch.tensor(ids[:need])


def data_ranges(cfg: Config, finetune_tokens: int = 0) -> dict[str, tuple[int, int]]:
    """The token ranges [start, end) of the stream, each a whole number of batches (at least one); a finetune
    range after the search's when finetune_tokens > 0."""
    per_batch = cfg.batch_size * cfg.seq_len
    sizes = {"held_out": cfg.held_out, "prep": max(1, cfg.prep_tokens // per_batch),
             "search": max(1, cfg.tokens // per_batch)}
    if finetune_tokens > 0:
        sizes["finetune"] = max(1, finetune_tokens // per_batch)
    ranges, start = {}, 0
    for name, batches in sizes.items():
        ranges[name] = (start, start + batches * per_batch)
        start += batches * per_batch
    return ranges


def batches_of(stream: torch.Tensor, span: tuple[int, int], cfg: Config, seed: int | None) -> torch.Tensor:
    """Tokens [start, end) of the stream as (n, batch_size, seq_len): sequences in an order the seed shuffles
    (None: in order)."""
    seqs = stream[span[0]:span[1]].view(-1, cfg.seq_len)
    if seed is not None:
        seqs = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))]
    return seqs.view(-1, cfg.batch_size, cfg.seq_len)


def token_digest(t: torch.Tensor) -> str:
    """The content of some token ids, as a short hash (ties results and caches to the text, not to a path)."""
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def data_record(tokens: dict[str, torch.Tensor], cfg: Config, ranges: dict) -> dict:
    """What a run's data is: the text, the seeds, and per range its tokens [start, end) and their content digest
    (in stream order: the seeds only shuffle)."""
    return dict(data=cfg.data, seed=cfg.seed, prep_seed=cfg.prep_seed, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                **{p: dict(tokens=list(ranges[p]), digest=token_digest(t)) for p, t in tokens.items()})


def load_data(tokenizer, cfg: Config, parts=("held_out", "prep", "search"), finetune_tokens: int = 0,
              why: str | None = None) -> dict:
    """The batches of each range (held_out, prep, search, finetune), and a record of what they are: the ranges,
    their content digests and the seeds: preparation shuffles its range with --prep-seed, the search and the
    finetuning theirs with --seed. why: token_stream's, for the error when the text is too short."""
    ranges = data_ranges(cfg, finetune_tokens)
    stream = token_stream(tokenizer, cfg.data, max(ranges[p][1] for p in parts), why)
    seeds = dict(held_out=None, prep=cfg.prep_seed, search=cfg.seed, finetune=cfg.seed)  # held out: in order
    data = {p: batches_of(stream, ranges[p], cfg, seeds[p]) for p in parts}
    return dict(data, record=data_record({p: stream[slice(*ranges[p])] for p in parts}, cfg, ranges))


def zero_start_note(model, batches: torch.Tensor) -> str | None:
    """A note when search sequences (batches: (steps, B, T)) start with a token whose embedding row is exactly zero:
    a padding row that never trained, or a random-weight model's pad token. At position 0 attention sees only that
    token; without attention biases (or with zero ones, as at random init) every layer's input there stays exactly
    zero, and RMSNorm's backward at zero scales the gradient by 1/sqrt(eps) (1000 for eps 1e-6) a layer, so such a
    step's gradient overflows and the search skips it."""
    first = batches[..., 0]                                              # (steps, B)
    tokens = first.unique()
    weight = model.get_input_embeddings().weight
    zero = tokens[~weight[tokens.to(weight.device)].any(-1).cpu()]
    if not len(zero):
        return None
    hit = torch.isin(first, zero)
    return (f"note: {int(hit.sum())} of {first.numel()} search sequences, in {int(hit.any(1).sum())} of {len(first)} "
            f"steps, start with token {', '.join(map(str, zero.tolist()))}, whose embedding row is all zero: their "
            f"gradient may overflow, and the search then skips the step (README, Scaling: the non-finite steps)")

# ----------------------------------------------------------------------------- candidate alignment and cache
# Every cheap operator, in every layer, is trained once to copy that layer's attention output:
#     nmse_l = |o_proj(op(x_l)) - attn_l(x_l)|^2 / |attn_l(x_l)|^2
# (after o_proj, so errors count as the residual stream sees them). Only each operator's own small parameters
# train; the teacher and its q/k/v/o projections stay frozen. All layers learn from one teacher pass per batch:
# hooks keep each layer's attention input and output, then each layer's operators take a step in turn, so only one
# layer's graph is alive at a time. The result is one safetensors file per fingerprint of everything that shapes
# the weights; every load checks the fingerprint (read_candidates), and a mismatch says what differs.


def capture(model, ids: torch.Tensor) -> list[tuple]:
    """One teacher pass; per layer (attention input x, rope, attention output)."""
    seen, hooks = [], []
    for attn in teacher_attention(model):
        hooks.append(attn.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((kwargs["hidden_states"], kwargs["position_embeddings"], out[0])),
            with_kwargs=True))
    try:
        with torch.no_grad():
            final_hidden(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def nmse(op, attn, x, rope, target, norm: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised MSE of one operator against the teacher's attention output of its layer. norm: the mean square of
    the target over the whole batch, when this process holds only a share of it (default: the target's own)."""
    with torch.no_grad():
        p = project(attn, x, rope)  # the shared, frozen projections
    y = attn.o_proj(op(p).flatten(2))
    return (y.float() - target.float()).pow(2).mean() / (target.float().pow(2).mean() if norm is None else norm)


def aligned_loss(op, attn, x, rope, target, norm: torch.Tensor | None = None) -> torch.Tensor:
    """What the alignment minimises: the nmse, plus the term the operator adds to it (Operator.extra_loss(), e.g.
    NAtS' sparsity), from the same forward pass."""
    loss = nmse(op, attn, x, rope, target, norm)
    extra = op.extra_loss()
    return loss if extra is None else loss + extra


def calibrate(model, ops, ids):
    """Start each output norm at its least-squares scale against the teacher, so training starts below nmse 1:
    a linear read-out has no softmax normaliser, and unit RMS per head can be far from the teacher's."""
    attns = teacher_attention(model)
    with torch.no_grad():
        for l, (x, rope, target) in enumerate(capture(model, ids)):
            for op in ops[l].values():
                if isinstance(getattr(op, "norm", None), torch.nn.Parameter):
                    y = attns[l].o_proj(op(project(attns[l], x, rope)).flatten(2)).float()
                    op.norm.mul_(((y * target.float()).sum() / y.pow(2).sum()).clamp_min(1e-3))


def alignment_loss(model, ops, batches, observe: bool = False) -> list[dict[str, float]]:
    """Per layer and operator, the mean nmse over some batches. observe: first show each operator the batch
    (Operator.observe(): what its cost needs measured, after alignment)."""
    attns, total = teacher_attention(model), [{n: 0.0 for n in ops[0]} for _ in ops]
    for ids in batches:
        for l, (x, rope, target) in enumerate(capture(model, ids)):
            with torch.no_grad():
                for n, op in ops[l].items():
                    if observe:
                        op.observe(project(attns[l], x, rope))
                    total[l][n] += nmse(op, attns[l], x, rope, target).item() / len(batches)
    return total


def candidate_state(ops) -> dict[str, torch.Tensor]:
    """Every operator's parameters and persistent buffers (what it measured), keys 'layers.<l>.<op>.<name>', fp32
    on the CPU, as load_op() reads them."""
    return {f"layers.{l}.{n}.{k}": t.detach().float().cpu().contiguous()
            for l, layer in enumerate(ops) for n, op in layer.items() for k, t in op.state_dict().items()}


def save_atomic(obj, path: Path):
    """torch.save to a temporary file, then rename: a run killed while writing leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def gather_layers(seen: list[tuple]) -> list[tuple | None]:
    """Layer-split alignment under torchrun: rank r aligns the layers l with l % N == r, on the whole batch. Each
    rank ran the teacher on its share of the batch (capture); the shares of layer l's input and attention output go
    to that layer's rank (dist.gather, in rank order: the batch's order). RoPE needs no gathering: every row has
    the same positions. Returns per layer (x, rope, target) of the whole batch where this rank aligns it, else None.
    Why not data parallel: with a share of one sequence each, the eager alignment step is bound by the launches
    of 36 layers' kernels, not by its arithmetic, so 4 GPUs ran slower than one (H100s: 13k against 17k tok/s)."""
    out = []
    for l, (x, rope, target) in enumerate(seen):
        mine = l % world() == rank()
        whole = []
        for t in (x, target):
            parts = [torch.empty_like(t) for _ in range(world())] if mine else None
            dist.gather(t.contiguous(), parts, dst=l % world())
            whole.append(torch.cat(parts) if mine else None)
        out.append((whole[0], rope, whole[1]) if mine else None)
    return out


def sync_layers(ops, optimizer, step: int):
    """After layer-split alignment (and before each checkpoint): every rank gets every layer's weights and AdamW
    moments from the rank that aligned it: one all-reduce of a sum to which the other ranks add zeros. Then every
    rank holds the same state, as in data-parallel alignment, and a checkpoint resumes with any number of ranks."""
    slots = []
    for l, layer in enumerate(ops):
        for p in (p for op in layer.values() for p in op.parameters()):
            st = optimizer.state[p]
            if not st:  # another rank's layer: AdamW never stepped it here
                st.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            st["step"] = torch.tensor(float(step))  # every aligned parameter steps once a step
            slots += [(t, l % world() == rank()) for t in (p.data, st["exp_avg"], st["exp_avg_sq"])]
    flat = torch.cat([(t if mine else torch.zeros_like(t)).flatten().float() for t, mine in slots])
    dist.all_reduce(flat)
    for (t, _), part in zip(slots, flat.split([t.numel() for t, _ in slots])):
        t.copy_(part.view_as(t))


def align(model, names: list[str], cfg: Config, data: dict, path: Path, fp: dict) -> dict:
    """Align every operator in every layer on data["prep"]; report the held-out nmse before and after; write the
    weights (with their fingerprint) and the report beside them. Resumes from its checkpoint (<path>.partial.pt)."""
    device = next(model.parameters()).device
    restore_teacher(model)
    torch.manual_seed(cfg.prep_seed)
    ops = make_ops(model, names, cfg)
    params = [p for layer in ops for op in layer.values() for p in op.parameters()]
    train, held_out = data["prep"], data["held_out"].to(device)
    steps = len(train)
    split = world() > 1 and not cfg.fsdp  # layer-split alignment (see gather_layers); --fsdp: data parallel
    how = ("" if world() == 1 else f" ({world()} processes, each aligning 1/{world()} of the layers)" if split
           else f" ({world()} processes of {cfg.batch_size // world()} sequences)")
    print(f"aligning {', '.join(names)} in {len(ops)} layers: {sum(p.numel() for p in params):,} new parameters, "
          f"{steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens{how}; teacher and its projections frozen")
    optimizer = torch.optim.AdamW(params, lr=cfg.prep_lr, weight_decay=0.0) if params else None
    warm = max(1, steps // 20)  # 5% warm-up, then cosine decay
    sched = optimizer and torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1, s / steps))))
    partial, start, t0 = path.with_suffix(".partial.pt"), 0, time.time()
    ck = torch.load(partial, map_location=device) if from_main(partial.exists()) else None  # all ranks alike
    if ck and ck["fingerprint"] == fp:  # resume an interrupted run: same data order, so skip what was done
        load_candidates(ops, ck["state"], str(partial))
        optimizer.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["sched"])
        start, t0, before = ck["step"], time.time() - ck["elapsed"], ck["before"]
        held_out_s = 0.0  # the held-out report's seconds (before and after alignment): its share of the wall time
        print(f"resuming from {partial} at step {start}")
    else:
        calibrate(model, ops, train[0].to(device))
        t_before = time.time()
        before = alignment_loss(model, ops, held_out)
        held_out_s = time.time() - t_before
    attns, curve, step_times = teacher_attention(model), [], []
    for step in tqdm(range(start, steps), desc="align", unit="step", initial=start, total=steps, disable=not is_main()):
        seen = capture(model, share(train[step]).to(device))
        if split:  # the layers this rank aligns, on the whole batch (None for the other ranks' layers)
            seen = gather_layers(seen)
            norms = [None] * len(seen)
        else:  # each layer's nmse divides by the mean square of its target over the whole batch, not this rank's
            # share: then the mean of the ranks' losses is the batch's loss (one all-reduce of L numbers)
            norms, = all_reduce_mean(torch.stack([target.float().pow(2).mean() for _, _, target in seen]))
        losses = []
        for l, layer in enumerate(seen):
            learners = [op for op in ops[l].values() if trainable(op)]
            if layer is not None and learners:  # one layer's graph at a time: backward right away
                loss = sum(aligned_loss(op, attns[l], *layer, norms[l]) for op in learners)
                loss.backward()
                losses.append(loss.detach() / len(learners))
        if optimizer and world() > 1 and not split:  # data parallel: the whole batch's gradient (and loss) is the
            # mean of the ranks'. One all-reduce of all candidates' gradients a step (~100 MB for Qwen2.5-3B), not
            # DDP: a step runs one backward per layer, which DDP's once-a-step hooks do not fit.
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            *grads, loss = all_reduce_mean(*grads, torch.stack(losses).mean())
            for p, g in zip(params, grads):
                p.grad = g
            losses = [loss]
        elif split:  # the mean over all layers: the ranks' sums and counts, summed
            total, = all_reduce_mean(torch.stack([sum(losses, torch.zeros((), device=device)),
                                                  torch.tensor(float(len(losses)), device=device)]))
            losses = [total[0] / total[1].clamp_min(1)]
        if optimizer:
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
        curve.append(torch.stack(losses).mean().item() if losses else 0.0)  # one host sync per step
        step_times.append(round(time.time() - t0, 3))
        if optimizer and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            if split:
                sync_layers(ops, optimizer, step + 1)  # every rank takes part; rank 0 then holds every layer
            if is_main():
                save_atomic(dict(fingerprint=fp, step=step + 1, elapsed=time.time() - t0, state=candidate_state(ops),
                                 optimizer=optimizer.state_dict(), sched=sched.state_dict(), before=before), partial)
    if optimizer and split:
        sync_layers(ops, optimizer, steps)
    t_after = time.time()
    after = alignment_loss(model, ops, held_out, observe=True)
    held_out_s += time.time() - t_after
    report = dict(fingerprint=fp, data=data["record"], wall_time_s=round(time.time() - t0, 1), device=str(device),
                  held_out_s=round(held_out_s, 1),
                  world_size=world(), per_rank_batch=cfg.batch_size // world(), layer_split=split,
                  curve=[round(c, 5) for c in curve], step_times=step_times,
                  trained=[n for n in names if trainable(ops[0][n])],
                  layers=[{n: dict(before=round(b[n], 5), after=round(a[n], 5), cost=round(at[n].cost(cfg.seq_len), 5))
                           for n in names} for b, a, at in zip(before, after, ops)])  # cost at the sequence length
    if is_main():  # every rank holds the same weights: rank 0 writes them, the others wait to read them
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(candidate_state(ops), str(path), metadata={"fingerprint": json.dumps(fp)})
        path.with_suffix(".json").write_text(json.dumps(report, indent=1))
        partial.unlink(missing_ok=True)
    if world() > 1:
        dist.barrier()
    print(alignment_table(report))
    print(f"wrote {path} and {path.with_suffix('.json')} ({steps * cfg.batch_size * cfg.seq_len:,} tokens, "
          f"{report['wall_time_s']} s)")
    return report


def alignment_table(report: dict) -> str:
    """The alignment report: held-out nmse per layer and operator (before -> after). Low = easy to replace."""
    names = list(report["layers"][0])
    rows = ["layer " + "".join(f"{n:>18}" for n in names)]
    for l, layer in enumerate(report["layers"]):
        rows.append(f"{l:>5} " + "".join(f"{layer[n]['before']:>8.4f} -> {layer[n]['after']:<6.4f}" for n in names))
    return "\n".join(rows)


@functools.lru_cache  # once per process: the code that runs, even if its file is edited during a long run
def definition_digest(cls: type) -> str:
    """A hash of what defines an operator: the source of its class and its base classes, and of every function or
    class of dash (or of the operator's own module) that their code uses, followed through what those use in turn
    (GLA -> gla -> gla_chunked -> chunks ...). Editing any of them (GLA's gate floor, say) changes the digest, and
    weights prepared before the edit are refused. A class without source (made by exec) counts by its bytecode."""
    mine = {__name__, cls.__module__} - {"builtins"}
    todo, seen, parts = [cls], set(), []
    while todo:
        obj = inspect.unwrap(todo.pop())  # through @torch.compiler.disable
        if obj in seen or (obj is not cls and getattr(obj, "__module__", None) not in mine):
            continue
        seen.add(obj)
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):
            parts.append(bytecode_text(obj))
        todo += [ref for ref in used_globals(obj) if inspect.isfunction(ref) or inspect.isclass(ref)]
        if inspect.isclass(obj):
            todo += obj.__bases__
    return hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]


def code_objects(obj) -> list:
    """The code objects of a function, or of a class's methods, nested ones (comprehensions, lambdas) included."""
    import types
    fns = [obj] if not inspect.isclass(obj) else [getattr(v, "__func__", v) for v in vars(obj).values()]
    todo = [f.__code__ for f in fns if hasattr(f, "__code__")]
    out = []
    while todo:
        c = todo.pop()
        out.append(c)
        todo += [x for x in c.co_consts if isinstance(x, types.CodeType)]
    return out


def used_globals(obj) -> list:
    """What the code of a function or class reads as global names (and, through a module it reads, the attributes
    it takes of it: dash.gla in a fork's operator)."""
    import dis
    scope = getattr(obj, "__globals__", None) or vars(sys.modules[obj.__module__])
    if inspect.isclass(obj):
        fns = [getattr(v, "__func__", v) for v in vars(obj).values() if hasattr(getattr(v, "__func__", v), "__globals__")]
        scope = fns[0].__globals__ if fns else scope
    out = []
    for c in code_objects(obj):
        ins = list(dis.get_instructions(c))
        for i, op in enumerate(ins):
            if op.opname in ("LOAD_GLOBAL", "LOAD_NAME") and op.argval in scope:
                ref = scope[op.argval]
                out.append(ref)
                if inspect.ismodule(ref) and i + 1 < len(ins) and ins[i + 1].opname in ("LOAD_ATTR", "LOAD_METHOD"):
                    out.append(getattr(ref, ins[i + 1].argval, None))
    return out


def bytecode_text(obj) -> str:
    """A class's or function's definition as text, from its bytecode and constants, and for a class also its plain
    attributes (a gate floor, say). Stable within one Python version."""
    code = [(c.co_code, c.co_names, [repr(x) for x in c.co_consts if not hasattr(x, "co_code")])
            for c in code_objects(obj)]
    attributes = sorted((k, repr(v)) for k, v in vars(obj).items()
                        if not k.startswith("__") and not callable(v)) if isinstance(obj, type) else []
    return repr((code, attributes))


def model_digest(model) -> dict:
    """The teacher by content: its config, and a hash of every weight (in bf16, so that fp32 and bf16 loads of one
    checkpoint agree)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("dtype", "torch_dtype", "transformers_version", "architectures")}
    h = hashlib.sha256()
    for name, p in teacher_parameters(model):
        if hasattr(p, "full_tensor"):  # --fsdp: this rank's shard; the digest is of the whole weight
            p = p.full_tensor()
        h.update(name.encode())
        h.update(p.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return dict(config=hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
                weights=h.hexdigest()[:16])


def teacher_parameters(model):
    """The teacher's own parameters by their own names, also in a model whose attention dash has wrapped (the
    wrapper keeps the teacher's module as .attn, and its operators as .ops or .op)."""
    return [(n.replace("self_attn.attn.", "self_attn."), p) for n, p in model.named_parameters()
            if "self_attn.ops." not in n and "self_attn.op." not in n]


def operator_settings(model, names: list[str], cfg: Config) -> dict:
    """Per operator: the digest of its definition, and its settings (Operator.settings(): a window, say)."""
    attn = teacher_attention(model)[0]
    return {n: dict(source=definition_digest(CANDIDATES[n]), **CANDIDATES[n](attn, cfg).settings()) for n in names}


def fingerprint(model, names: list[str], cfg: Config, data: dict) -> dict:
    """Everything that shapes prepared candidate weights: the teacher (config and weights, by content), the
    operators (definitions and settings), the data actually used (by content), dtype and training settings."""
    return dict(model=Path(cfg.model).name, **model_digest(model), operators=operator_settings(model, names, cfg),
                dtype=str(next(model.parameters()).dtype), data=data["record"]["prep"], seq_len=cfg.seq_len,
                batch_size=cfg.batch_size, lr=cfg.prep_lr, seed=cfg.prep_seed)


def default_cache(fp: dict) -> Path:
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:10]
    return HERE / "candidates" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', fp['model'])}-{digest}.safetensors"


def differences(theirs: dict, ours: dict, prefix: str = "") -> list[str]:
    """The keys of `ours` whose values differ in `theirs`, nested keys joined by dots."""
    out = []
    for k, v in ours.items():
        if isinstance(v, dict) and isinstance(theirs.get(k), dict):
            out += differences(theirs[k], v, f"{prefix}{k}.")
        elif theirs.get(k) != v:
            out.append(f"{prefix}{k} ({theirs.get(k)} != {v})")
    return out


def read_candidates(path: str | Path, expect: dict) -> dict[str, torch.Tensor]:
    """The one way to load prepared candidate weights: check that the file exists, is a candidate file, and was
    made with everything `expect` holds (a fingerprint, or the part of one that the caller can compute), then
    load it. Any difference is refused with what differs."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise DashError(f"candidate weights {path} not found: pass the file (--cache) or prepare it "
                        f"(python prepare_candidates.py --model ...)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DashError(f"{path} is not a readable candidate file ({e})")
    if "fingerprint" not in meta:
        raise DashError(f"{path} is not a candidate file (no fingerprint in its metadata)")
    diff = differences(json.loads(meta["fingerprint"]), {k: v for k, v in expect.items() if k != "model"})
    if diff:
        raise DashError(f"{path} was prepared for something else: {'; '.join(diff)}. Prepare the candidates again "
                        f"(python prepare_candidates.py, or dash.py does it), or pass the matching --cache")
    return state


def hybrid_expectation(model, names: list[str], cfg: Config) -> dict:
    """What a built hybrid can check of its candidate file: the teacher and the operators' definitions."""
    return dict(**model_digest(model), operators=operator_settings(model, names, cfg))


def load_or_prepare(model, names: list[str], cfg: Config, data: dict) -> tuple[str, dict]:
    """The candidate weights for these operators, read after checking their fingerprint, or prepared first if
    there are none yet (unless --no-prepare). Returns (path, state)."""
    names = [n for n in names if n != "full"]
    fp = fingerprint(model, names, cfg, data)
    path = Path(cfg.cache) if cfg.cache else default_cache(fp)
    if not from_main(path.exists()):
        if not cfg.prepare:
            raise DashError(f"no candidate weights at {path} and --no-prepare: run python prepare_candidates.py "
                            f"--model {cfg.model} first, or drop --no-prepare")
        print(f"no prepared candidates for this model, operator set and data: preparing {path.name}")
        align(model, names, cfg, data, path, fp)
    return str(path), read_candidates(path, fp)

# ----------------------------------------------------------------------------- objective


def kl_terms(z_student: torch.Tensor, z_teacher: torch.Tensor, n: int):
    """One chunk of logits: the summed KL(p || q) of its tokens and its gradient (q - p) / n w.r.t. the student's
    logits, in fp32 (with --compile, fused into a few kernels instead of a dozen full-vocabulary passes)."""
    log_q, log_p = F.log_softmax(z_student.float(), -1), F.log_softmax(z_teacher.float(), -1)
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(), ((log_q.exp() - p) / n).to(z_student.dtype)


class ChunkedKL(torch.autograd.Function):
    """Mean per-token KL(teacher || student) from final hidden states (N, C) through the LM head, a chunk of
    tokens at a time, so that full-vocabulary fp32 logits exist for `chunk` tokens only (151936 x 4 bytes each
    for Qwen). Its gradient is computed on the way, as fused cross-entropy kernels do: for one token,
    dKL/d(student logits) = q - p (the two softmaxes), so dKL/dh_student = (q - p) W / N, and the backward pass
    only scales it: no logits are kept or recomputed."""

    @staticmethod
    def forward(ctx, h_student, h_teacher, weight, bias, chunk, terms=kl_terms):
        hs, ht = h_student.flatten(0, -2), h_teacher.flatten(0, -2)
        N, total = hs.shape[0], torch.zeros((), device=hs.device)
        grad = torch.empty_like(hs) if ctx.needs_input_grad[0] else None
        for i in range(0, N, chunk):
            kl, dz = terms(F.linear(hs[i:i + chunk], weight, bias), F.linear(ht[i:i + chunk], weight, bias), N)
            total += kl
            if grad is not None:
                grad[i:i + chunk] = dz @ weight
        ctx.save_for_backward(grad)
        ctx.shape = h_student.shape
        return total / N

    @staticmethod
    def backward(ctx, g):
        grad, = ctx.saved_tensors
        return (g * grad).view(ctx.shape), None, None, None, None, None


def chunked_kl(h_student, h_teacher, head: nn.Linear, chunk: int, terms=kl_terms) -> torch.Tensor:
    return ChunkedKL.apply(h_student, h_teacher, head.weight, head.bias, chunk, terms)


def regularizers(w: torch.Tensor, names: list[str], cfg: Config, costs: torch.Tensor, progress: float) -> dict:
    """The terms added to the KL, each already weighted. w: (L, n_ops) operator probabilities.
    budget     = b * (E - K)^2 / L          E = sum_l w_l[full], the expected number of full-attention layers
    cost       = c * mean_l sum_i w_li cost_li              cost_li: Operator.cost() at --cost-len, full = 1
    entropy    = e * progress * mean_l H(w_l) / log(n_ops)  ramped in: explore first, decide at the end
    continuity = s * mean_l 1/2 |w_l - w_{l-1}|_1           total variation between adjacent layers"""
    L, n = w.shape
    expected_full = w[:, names.index("full")].sum()
    terms = {"budget": cfg.budget * (expected_full - cfg.k) ** 2 / L}
    if cfg.cost:
        terms["cost"] = cfg.cost * (w * costs).sum(-1).mean()  # costs: (L, n_ops), or (n_ops,) alike in all layers
    if cfg.entropy:
        terms["entropy"] = cfg.entropy * progress * -(w * w.clamp_min(1e-12).log()).sum(-1).mean() / math.log(n)
    if cfg.continuity:
        terms["continuity"] = cfg.continuity * 0.5 * (w[1:] - w[:-1]).abs().sum(-1).mean()
    return terms

# ----------------------------------------------------------------------------- search loop


def tau_at(step: int, steps: int, cfg: Config) -> float:
    """Exponential annealing from tau_start to tau_end."""
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, steps - 1))


def heatmap(w: torch.Tensor, names: list[str]) -> str:
    """Operator probabilities as text, one row per operator and one column per layer."""
    shades = " ▁▂▃▄▅▆▇█"
    rows = [f"{'layer':>6} " + "".join(str(l % 10) for l in range(w.shape[0]))]
    for i, n in enumerate(names):
        rows.append(f"{n:>6} " + "".join(shades[round(float(p) * 8)] for p in w[:, i]))
    return "\n".join(rows)


def kl_and_grad(model, ids: torch.Tensor, w: torch.Tensor, active: list, cfg: Config, terms=kl_terms):
    """The costly part of a search step: the teacher's pass, the mixture's pass with operator probabilities w
    (L, n_ops, fp32) over the operators in `active`, the mean KL(teacher || mixture), and its gradient w.r.t. w by
    backpropagation through every layer (fp32, see WeightedSum). Returns both, detached: the logits' side of the
    step (softmax, regularizers) is cheap. With cfg.micro_batch, the batch goes through in parts and the parts'
    KLs and gradients add up (same result, activations kept for one part only)."""
    parts = ids.split(cfg.micro_batch or len(ids))
    kl, dkl_dw = 0, 0
    for part in parts:
        with torch.no_grad():  # the teacher: same model, every layer its own full attention
            set_probs(model, None)
            h_teacher = final_hidden(model, part)
        w_part = w.detach().float().requires_grad_()
        set_probs(model, w_part, active, cfg.grad)
        kl_part = chunked_kl(final_hidden(model, part), h_teacher, model.get_output_embeddings(), cfg.kl_chunk,
                             terms) / len(parts)
        grad, = torch.autograd.grad(kl_part, w_part)
        kl, dkl_dw = kl + kl_part.detach(), dkl_dw + grad
    return kl, dkl_dw


GRAPH_SLACK = 0.25  # --cuda-graph: a graph keeps running pruned operators, at weight 0, up to this share of its own


def graph_covers(graph: list | None, active: list, grad: str) -> bool:
    """--cuda-graph: whether the graph captured for the operators `graph` (L lists of n_ops bools) may run a step
    whose operators still in the search are `active`. It may if it runs every active operator and the pruned ones
    it still runs are under GRAPH_SLACK of its operators: a pruned operator's weight is exactly 0, so the mixture,
    the KL and the active operators' dKL/dw are those of `active`. Pruning comes in many small events (85 on the
    Qwen2.5-3B shape, 4 GPUs), and each new graph costs about 2 s (two warm-up steps, recompiled layers, a capture)
    where a pruned operator costs a fraction of a percent of a step: with the slack, a handful of captures.
    --grad teacher captures at every change: whether a layer's full attention is active decides its backward."""
    if graph is None:
        return False
    if graph == active:
        return True
    pairs = [(g, a) for g_l, a_l in zip(graph, active) for g, a in zip(g_l, a_l)]
    if grad != "exact" or any(a and not g for g, a in pairs):
        return False
    return sum(g and not a for g, a in pairs) < GRAPH_SLACK * sum(g for g, _ in pairs)


def graphed(step_fn):
    """--cuda-graph: step_fn (kl_and_grad) captured once as a CUDA graph and then replayed with each step's tokens
    and probabilities copied into its inputs. The CPU launches one graph instead of the step's thousands of kernels,
    which bound the step when each GPU has few sequences (4 GPUs, batch 4: one each). A graph holds one set of
    operators and one batch shape; after pruning it runs on while graph_covers() allows. A new set costs two
    warm-up steps (kernels built and tuned, layers compiled, on a side stream as capture wants) and a capture, and
    the previous graph and its memory go. run.captures counts them."""
    saved = {}

    def run(model, ids, w, active, cfg, terms):
        if not graph_covers(saved.get("active"), active, cfg.grad) or saved["shape"] != tuple(ids.shape):
            saved.clear()
            ids_in, w_in = ids.clone(), w.detach().clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step_fn(model, ids_in, w_in, active, cfg, terms)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step_fn(model, ids_in, w_in, active, cfg, terms)
            saved.update(active=active, shape=tuple(ids.shape), graph=graph, ids=ids_in, w=w_in, out=out)
            run.captures += 1
        saved["ids"].copy_(ids)
        saved["w"].copy_(w.detach())
        saved["graph"].replay()
        kl, dkl_dw = (t.clone() for t in saved["out"])
        if saved["active"] != active:  # the operators pruned since the capture: no gradient, as if they had not run
            dkl_dw = torch.where(w > 0, dkl_dw, 0)
        return kl, dkl_dw
    run.captures = 0
    return run


NONFINITE_LIMIT = 10  # steps in a row with a non-finite KL gradient before the search gives up


def skip_step(step: int, kl: torch.Tensor, dkl_dw: torch.Tensor, run: int, replay: dict, checkpoint: Path | None):
    """A search step whose KL or dKL/dw (L, n_ops) is not finite: say in which layers, save what replays it beside
    the checkpoint (tests/replay_step.py; the first of a run of them), give up after NONFINITE_LIMIT in a row."""
    layers = (~torch.isfinite(dkl_dw)).any(-1).nonzero().flatten().tolist()
    tqdm.write(f"step {step + 1}: the KL ({kl.item():.4g}) or its gradient is not finite in layers {layers} "
               f"(it flows down the layers: it started above the highest of them): step skipped")
    if checkpoint is not None:
        save_atomic(replay, checkpoint.with_name(f"nonfinite-step-{step + 1}.pt"))
    if run == NONFINITE_LIMIT:
        raise DashError(f"the KL or its gradient was not finite for {run} steps in a row (the last, step {step + 1}: "
                        f"layers {layers}): the gradient overflows on this model. `python tests/replay_step.py "
                        f"OUT/nonfinite-step-{step + 2 - run}.pt --all` replays the first of them and shows where "
                        f"the gradient grows")


def masked_softmax(alpha: torch.Tensor, alive: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(alpha_l / tau) over the operators still in layer l's search; 0 (and no gradient) for the others."""
    return F.softmax((alpha / tau).masked_fill(~alive, -math.inf), dim=-1)


def search(model, batches: torch.Tensor, names: list[str], cfg: Config, alpha0: torch.Tensor | None = None,
           checkpoint: Path | None = None, run_key: str = "") -> dict:
    """Train only the architecture logits alpha (L, n_ops) to bring the mixture close to the teacher.
    Pruning: once an operator's probability in a layer falls below --skip-below, it leaves that layer's search for
    good (P-DARTS' search-space approximation): it stops running, its probability is exactly 0 and its logit never
    changes again. So every operator that runs gets its exact gradient; a skipped one would otherwise get a made-up
    dKL/dw = 0 that Adam turns into full-size steps. A step whose KL gradient is not finite (an overflow) is
    skipped and recorded; NONFINITE_LIMIT of them in a row end the search with an error.
    alpha0: the logits to start from (default zeros: uniform).
    checkpoint: where to save the state every --checkpoint-every steps (and resume from, with --resume)."""
    L, steps = len(model.model.layers), len(batches)
    device = next(model.parameters()).device
    alpha = nn.Parameter(torch.zeros(L, len(names), device=device) if alpha0 is None else alpha0.clone().to(device))
    alive = torch.ones(L, len(names), dtype=torch.bool, device=device)
    optimizer = torch.optim.Adam([alpha], lr=cfg.lr, betas=(0.5, 0.999))   # DARTS' optimizer for the logits
    frozen = sum(p.numel() for p in model.parameters())
    print(f"trainable: alpha {tuple(alpha.shape)} = {alpha.numel()} logits; frozen: {frozen:,} weights")
    costs = torch.tensor([[layer.self_attn.ops[n].cost(cfg.cost_len) for n in names] for layer in model.model.layers],
                         device=device)  # (L, n_ops): an operator's cost may depend on its layer (NAtS)
    history, start, elapsed, bad_run = [], 0, 0.0, 0
    if checkpoint is not None and cfg.resume:
        ck = torch.load(checkpoint, map_location=device)
        if ck["run_key"] != run_key:
            raise DashError(f"--resume: {checkpoint} was saved by a run with other settings, data or candidates; "
                            f"drop --resume to start over")
        with torch.no_grad():
            alpha.copy_(ck["alpha"])
        alive, history, start, elapsed = ck["alive"].to(device), ck["history"], ck["step"], ck["elapsed"]
        optimizer.load_state_dict(ck["optimizer"])
        print(f"resuming the search from {checkpoint} at step {start} of {steps}")
    alive_host = alive.tolist()
    t0 = time.time() - elapsed
    kl_fn = torch.compile(kl_terms, dynamic=False) if cfg.compile else kl_terms
    step_fn = graphed(kl_and_grad) if cfg.cuda_graph else kl_and_grad
    bar = tqdm(range(start, steps), desc="search", unit="step", initial=start, total=steps, disable=not is_main())
    for step in bar:
        ids = share(batches[step]).to(device)  # this rank's rows of the step's batch
        tau = tau_at(step, steps, cfg)
        w = masked_softmax(alpha, alive, tau)
        keep = (alive & (w.detach() >= cfg.skip_below)).tolist()  # one host copy a step decides what runs
        if keep != alive_host:  # some operators fell below the threshold: prune them, renormalise the rest
            alive_host, alive = keep, torch.tensor(keep, device=device)
            w = masked_softmax(alpha, alive, tau)
        kl, dkl_dw = all_reduce_mean(*step_fn(model, ids, w, alive_host, cfg, kl_fn))  # the whole batch's
        terms = regularizers(w, names, cfg, costs, step / max(1, steps - 1))
        loss = kl + sum(terms.values())
        finite = bool(torch.isfinite(dkl_dw).all() & torch.isfinite(kl))  # a host sync, as .tolist() below
        if finite:
            bad_run = 0
            optimizer.zero_grad(set_to_none=True)
            (loss + (dkl_dw * w).sum()).backward()  # the KL's gradient enters through w; autograd does the softmax
            before = alpha.detach().clone()
            optimizer.step()
            with torch.no_grad():  # a pruned logit gets no update (Adam's momentum would move it)
                alpha.copy_(torch.where(alive, alpha, before))
        else:  # an overflow (e.g. a sequence that starts at a zero embedding: zero_start_note): skip the step, as
            # AMP's GradScaler does, rather than poison alpha
            bad_run += 1
            replay = dict(run_key=run_key, config=asdict(cfg), step=step, ids=batches[step].clone(), tau=tau,
                          alpha=alpha.detach().cpu(), alive=alive.cpu())  # clone: a view would save every batch
            skip_step(step, kl, dkl_dw, bad_run, replay, checkpoint if bad_run == 1 and is_main() else None)
        with torch.no_grad():
            w = masked_softmax(alpha, alive, tau)
            values = torch.cat([torch.stack([loss, kl, w[:, names.index("full")].sum()]), w.flatten()]).tolist()
        rec = dict(step=step, **dict(zip(("loss", "kl", "full"), values[:3])), tau=tau, time=time.time() - t0,
                   probs=[[round(p, 4) for p in values[3 + l * len(names):3 + (l + 1) * len(names)]]
                          for l in range(L)], **({} if finite else dict(skipped=True)))
        history.append(rec)
        bar.set_postfix(loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", full=f"{rec['full']:.2f}", tau=f"{tau:.2f}")
        if (step + 1) % cfg.log_every == 0 or step == steps - 1:
            tqdm.write(f"step {step + 1}/{steps}  kl {rec['kl']:.4f}  E[full] {rec['full']:.2f}  tau {tau:.3f}\n"
                       + heatmap(w.cpu(), names))
        if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps and is_main():
            save_atomic(dict(run_key=run_key, step=step + 1, alpha=alpha.detach().cpu(), alive=alive.cpu(),
                             optimizer=optimizer.state_dict(), history=history, elapsed=time.time() - t0),
                        checkpoint)
    set_probs(model, None)
    check_replicated(alpha, "alpha")
    w = masked_softmax(alpha.detach(), alive, tau_at(steps - 1, steps, cfg)).cpu()
    return dict(alpha=alpha.detach().cpu(), probs=w, alive=alive.cpu(), history=history,
                skipped_steps=[r["step"] for r in history if r.get("skipped")], wall_time_s=time.time() - t0,
                graph_captures=getattr(step_fn, "captures", None))

# ----------------------------------------------------------------------------- export and polish


def choose_layers(probs: torch.Tensor, names: list[str], k: int | None = None, threshold: float | None = None):
    """Full attention in the K layers with the highest p(full) (or where p(full) > threshold); every other layer
    takes its most probable other operator."""
    full = names.index("full")
    if threshold is not None:
        keep = set(torch.nonzero(probs[:, full] > threshold).flatten().tolist())
        if not keep:
            raise DashError(f"--threshold {threshold}: no layer has p(full) above it (the highest is "
                            f"{probs[:, full].max():.3f}); lower it, or export the top K with --k")
    else:
        keep = set(torch.topk(probs[:, full], k).indices.tolist())
    return ["full" if l in keep else cheapest_other(probs[l], names) for l in range(len(probs))]


def cheapest_other(p: torch.Tensor, names: list[str]) -> str:
    """A layer's most probable operator other than full attention."""
    others = p.clone()
    others[names.index("full")] = -1
    return names[int(others.argmax())]


def placement_kl(model, placements: list[list[str]], names: list[str], held_out: torch.Tensor, cfg: Config,
                 desc: str = "placements") -> list[float]:
    """Exact KL(teacher || hybrid) on held-out batches (n, B, T), for each placement (an operator per layer): the
    mixture with one-hot probabilities is that hybrid. Forward passes only; the teacher's pass once per batch.
    Under torchrun each rank scores its share of every batch, and all get the mean (the same moves on every rank)."""
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    with torch.no_grad():
        set_probs(model, None)
        teacher = [final_hidden(model, share(ids).to(device)) for ids in held_out]
        out = []
        for layers in tqdm(placements, desc=desc, leave=False, disable=not is_main()):
            w = torch.tensor([[float(n == op) for op in names] for n in layers], device=device)
            set_probs(model, w)
            out.append(sum(chunked_kl(final_hidden(model, share(ids).to(device)), h, head, cfg.kl_chunk)
                           for ids, h in zip(held_out, teacher)) / len(held_out))
    set_probs(model, None)
    return all_reduce_mean(torch.stack(out))[0].tolist()  # one host sync for all placements


def polish(model, probs: torch.Tensor, names: list[str], layers: list[str], held_out: torch.Tensor,
           cfg: Config) -> dict:
    """Beyond the paper: a discrete polish of the exported placement. Its neighbours move one full-attention layer
    elsewhere (K (L - K) of them; a layer that gives up full attention takes its most probable cheap operator);
    take the best move while it lowers the held-out KL, --polish moves at most."""
    cheap = [cheapest_other(p, names) for p in probs]

    def arch_of(full: frozenset) -> list[str]:
        return ["full" if l in full else cheap[l] for l in range(len(cheap))]

    full = frozenset(l for l, n in enumerate(layers) if n == "full")
    kl_start = kl = placement_kl(model, [layers], names, held_out, cfg, "polish")[0]
    moves, scored, t0 = [], 1, time.time()
    for move in range(cfg.polish):
        neighbours = [full - {a} | {b} for a in sorted(full) for b in range(len(cheap)) if b not in full]
        kls = placement_kl(model, [arch_of(n) for n in neighbours], names, held_out, cfg, f"polish move {move + 1}")
        scored += len(kls)
        best = min(range(len(kls)), key=kls.__getitem__)
        if kls[best] >= kl:
            break
        moves.append(dict(drop=sorted(full - neighbours[best])[0], add=sorted(neighbours[best] - full)[0],
                          kl=round(kls[best], 6)))
        full, kl = neighbours[best], kls[best]
        print(f"polish: full attention moves from layer {moves[-1]['drop']} to {moves[-1]['add']}: held-out KL "
              f"{kl:.5f}")
    layers = arch_of(full) if moves else layers
    return dict(layers=layers, full_layers=sorted(full), kl=round(kl, 6), kl_relaxed=round(kl_start, 6),
                moves=moves, placements_scored=scored, wall_time_s=round(time.time() - t0, 1))


def export(result: dict, names: list[str], cfg: Config, cache: str, data: dict, polished: dict | None) -> dict:
    """The architecture JSON: the layers, the relaxed top-K pick and the polished one, the probabilities and
    logits behind them, and everything that produced it (config, data ranges and digests, candidate file)."""
    relaxed = choose_layers(result["probs"], names, cfg.k, cfg.threshold)
    layers = polished["layers"] if polished else relaxed
    return dict(model=cfg.model, candidates=names, k=cfg.k, threshold=cfg.threshold,
                mode="threshold" if cfg.threshold is not None else "top-k", layers=layers,
                full_layers=[l for l, n in enumerate(layers) if n == "full"],
                relaxed=dict(layers=relaxed, full_layers=[l for l, n in enumerate(relaxed) if n == "full"],
                             kl=polished and polished["kl_relaxed"]),
                polished=polished, probabilities=[[round(float(p), 5) for p in row] for row in result["probs"]],
                alpha=[[round(float(a), 5) for a in row] for row in result["alpha"]],
                pruned=[[n for n, on in zip(names, row) if not on] for row in result["alive"].tolist()],
                tokens=int(data["search"].numel()), skipped_steps=result["skipped_steps"],
                graph_captures=result.get("graph_captures"), wall_time_s=round(result["wall_time_s"], 1), seed=cfg.seed,
                distributed=dict(world_size=world(), per_rank_batch=cfg.batch_size // world(), fsdp=cfg.fsdp,
                                 backend=dist.get_backend() if dist.is_initialized() else None),
                data=data["record"], candidate_cache=cache, config=asdict(cfg),
                versions=versions(), kl_first=result["history"][0]["kl"], kl_last=result["history"][-1]["kl"],
                history=result["history"])


def versions() -> dict:
    import transformers
    out = dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__)
    try:
        import fla
        out["fla"] = fla.__version__
    except ImportError:
        pass
    return out

# ----------------------------------------------------------------------------- the hybrid


def read_arch(arch: dict | str | Path) -> dict:
    """An architecture JSON written by dash.py (a dict or a path), checked for what building it needs."""
    where = "the architecture"
    if not isinstance(arch, dict):
        where, path = str(arch), Path(arch)
        if not path.is_file():
            raise DashError(f"architecture {arch} not found (dash.py writes out/arch.json)")
        try:
            arch = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DashError(f"{arch} is not JSON ({e})")
    missing = [k for k in ("model", "layers", "candidates", "config", "candidate_cache") if k not in arch]
    if missing:
        raise DashError(f"{where} is not an architecture written by dash.py: it has no {', '.join(missing)}")
    return arch


def arch_config(arch: dict) -> Config:
    """The Config an architecture was made with (fields a newer or older dash does not know are left out)."""
    return Config(**{k: v for k, v in arch["config"].items() if k in {f.name for f in fields(Config)}})


def candidates_for(model, arch: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """The prepared weights of an architecture's operators, checked against this teacher and the operators'
    definitions (read_candidates); nothing to read if none of its layers has trainable parameters."""
    attn = teacher_attention(model)[0]
    if not any(trainable(CANDIDATES[n](attn, cfg)) for n in set(arch["layers"]) if n in CANDIDATES):
        return {}
    return read_candidates(arch["candidate_cache"],
                           hybrid_expectation(model, [n for n in arch["candidates"] if n != "full"], cfg))


def build_hybrid(arch: dict | str, model=None, state: dict | None = None, cfg: Config | None = None):
    """The hybrid HF model of an architecture JSON (a dict or a path): the teacher with each layer's chosen
    operator and its prepared weights, checked (check_generation). An architecture that finetune.py wrote also
    carries the weights that finetuning changed; they go into a copy of a given model, which stays the teacher.
    Returns (model, tokenizer or None)."""
    arch = read_arch(arch)
    cfg = cfg or arch_config(arch)
    tokenizer = None
    if model is None:
        device, dtype = devices(cfg)
        model, tokenizer = load_model(arch["model"], device, dtype)
    elif "finetune" in arch:
        import copy
        model = copy.deepcopy(restore_teacher(model))
    if state is None:
        state = candidates_for(model, arch, cfg)
    if "finetune" not in arch:
        return make_hybrid(model, arch["layers"], state, cfg), tokenizer
    make_hybrid(model, arch["layers"], state, cfg, check=False)
    load_finetuned(model, arch["finetune"])
    check_generation(model)
    return model, tokenizer


def load_finetuned(model, record: dict):
    """Put the weights that finetune.py changed into a hybrid: record["weights"] is a safetensors file keyed by
    the hybrid's parameter names (model.layers.<l>.self_attn.op.<name> for an operator's, ...attn.q_proj.weight
    for the teacher's projections), checked against record["sha256"]."""
    from safetensors.torch import load_file
    path = Path(record["weights"])
    if not path.is_file():
        raise DashError(f"finetuned weights {path} not found (finetune.py writes them beside its arch.json)")
    if hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
        raise DashError(f"{path} is not the file this architecture was finetuned into (its sha256 differs)")
    params = dict(model.named_parameters())
    for name, t in load_file(str(path)).items():
        if name not in params or params[name].shape != t.shape:
            raise DashError(f"{path}: {name} {tuple(t.shape)} is not a parameter of this hybrid")
        with torch.no_grad():
            params[name].copy_(t)

def retrieval_check(model, tokenizer, arch: dict, state: dict, cfg: Config, haystack=None,
                    batch_size: int = 8) -> dict:
    """The search's closing check: the hybrid against the teacher on RULER's needle tasks at the search length
    (haystack: ruler.load_haystack's; default, the shipped prose)."""
    tasks = ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue"]
    hay = ruler.load_haystack(haystack)
    samples = {f"{t}@{cfg.seq_len}": ruler.make_samples(t, tokenizer, cfg.seq_len, cfg.check_samples, seed=1,
                                                        haystack=hay) for t in tasks}
    teacher = ruler.run_tasks(restore_teacher(model), tokenizer, samples, batch_size, "teacher")
    hybrid = ruler.run_tasks(make_hybrid(model, arch["layers"], state, cfg), tokenizer, samples, batch_size, "hybrid")
    restore_teacher(model)
    print(ruler.table({"teacher": teacher, "hybrid": hybrid},
                      f"retrieval check: RULER needles at {cfg.seq_len} tokens (essay haystack: {hay.name}), "
                      f"{cfg.check_samples} samples per task"))
    return dict(teacher=teacher, hybrid=hybrid)

# ----------------------------------------------------------------------------- main


def devices(cfg: Config) -> tuple[str, torch.dtype]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DashError("--device cuda: no CUDA GPU is visible")
    if cfg.kernels not in ("auto", "fla", "torch"):
        raise DashError(f"--kernels {cfg.kernels!r}: choose fla, torch or auto")
    if cfg.kernels == "fla":
        if not device.startswith("cuda"):
            raise DashError("--kernels fla: fla's Triton kernels need a CUDA GPU; use --kernels torch on a CPU")
        try:
            import fla  # noqa: F401
        except ImportError:
            raise DashError("--kernels fla: flash-linear-attention is not installed (pip install -r requirements.txt)")
    dtypes = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
              "bfloat16": torch.bfloat16, "float32": torch.float32}
    if cfg.dtype not in dtypes:
        raise DashError(f"--dtype {cfg.dtype!r}: choose bfloat16, float32 or auto")
    if cfg.kernels == "fla" and dtypes[cfg.dtype] == torch.float32:
        raise DashError("--kernels fla runs in bfloat16; drop --dtype float32 or use --kernels torch")
    if device.startswith("cuda"):
        use_fla_configs()
    return device, dtypes[cfg.dtype]


# Configs tuned on one chip serve the others of its architecture: an H200 or GH200 (sm_90, as the H100) runs the same
# kernels with the same shared memory, so every H100 config is valid there; only their speed ranking may differ. Without
# them a cold H200 autotuned for 3 minutes in its first preparation step (results/cold-h200x4/).
FLA_CONFIGS_BY_ARCH = {(9, 0): ("NVIDIA_H100_80GB_HBM3",)}


def use_fla_configs():
    """fla's autotuning results shipped for this GPU (fla_configs/<GPU>/), so that the first step does not spend
    minutes autotuning. fla reads them at import; an explicit FLA_CONFIG_DIR / FLA_CACHE_MODE wins."""
    # this process's GPU under torchrun (asking for GPU 0 would open a context there from every process)
    rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = re.sub(r"[^0-9A-Za-z]+", "_", torch.cuda.get_device_name(rank)).strip("_")
    found = [d for d in (gpu, *FLA_CONFIGS_BY_ARCH.get(torch.cuda.get_device_capability(rank), ()))
             if (HERE / "fla_configs" / d).is_dir()]
    if found:
        os.environ.setdefault("FLA_CONFIG_DIR", str(HERE / "fla_configs" / found[0]))
        os.environ.setdefault("FLA_CACHE_MODE", "fuzzy")  # fuzzy: a config tuned at one length serves all


def parse_args(argv=None, cls=Config, description="DASH: differentiable search for hybrid-attention LLMs"):
    """The CLI is the config dataclass: one flag per field, its help from the field."""
    ap = argparse.ArgumentParser(description=description)
    for f in fields(cls):
        text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help text ("5% warm-up")
        kind = next((t for t in getattr(f.type, "__args__", (f.type,)) if t is not type(None)))
        if kind is bool:
            ap.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                            default=f.default, help=text)
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            metavar=kind.__name__.upper(), help=text)
    return cls(**vars(ap.parse_args(argv)))


def run_key(cfg: Config, data: dict, cache: str) -> str:
    """What a search checkpoint must agree on to be resumed: the settings that shape the search, its data and
    its candidates."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("resume", "log_every", "check_samples", "out",
                                                                   "checkpoint_every", "polish", "compile", "fsdp",
                                                                   "recompute_mlp", "cuda_graph")}
    blob = json.dumps([settings, data["record"], Path(cache).name], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: Config) -> dict:
    names = candidate_names(cfg.candidates)
    device, dtype = devices(cfg)
    if cfg.cuda_graph and cfg.fsdp:
        raise DashError("--cuda-graph with --fsdp: FSDP gathers the teacher's weights from Python hooks in every "
                        "step, which a graph cannot replay; use one of the two")
    if cfg.cuda_graph and not device.startswith("cuda"):
        raise DashError("--cuda-graph: CUDA graphs need a CUDA GPU; drop --cuda-graph on a CPU")
    t0 = time.time()
    device = init_distributed(device)
    torch.manual_seed(cfg.seed)
    # --fsdp: the whole teacher may not fit one GPU: load it on the CPU, then each rank moves its shard over
    model, tokenizer = load_model(cfg.model, "cpu" if cfg.fsdp else device, dtype)
    cfg = resolve(cfg, len(model.model.layers))
    if cfg.fsdp:
        shard_teacher(model, device)
    if cfg.compile is None:
        cfg.compile = device.startswith("cuda")
    print(json.dumps(asdict(cfg), indent=1))
    per_batch = cfg.batch_size * cfg.seq_len
    if cfg.tokens < per_batch:
        print(f"note: --tokens {cfg.tokens:,} is less than one step of {cfg.batch_size}x{cfg.seq_len} tokens; "
              f"the search runs one step ({per_batch:,} tokens)")
    phase_s = {}  # where an end-to-end run's time goes, recorded in arch.json

    def since() -> float:  # seconds since the end of the last phase
        return time.time() - t0 - sum(phase_s.values())
    phase_s["load"] = since()
    data = load_data(tokenizer, cfg)
    phase_s["data"] = since()
    note = zero_start_note(model, data["search"])
    if note and is_main():
        print(note)
    cache, state = load_or_prepare(model, names, cfg, data)
    phase_s["candidates"] = since()
    ops = make_ops(model, names, cfg)
    load_candidates(ops, state, cache)
    install(model, ops)
    recompute_mlp(model, on=cfg.recompute_mlp)
    compile_layers(model, on=cfg.compile)
    out = Path(cfg.out)
    checkpoint = out / "search.ckpt.pt"
    if cfg.resume and not checkpoint.exists():
        raise DashError(f"--resume: no checkpoint at {checkpoint} (a search saves one every --checkpoint-every "
                        f"steps into --out)")
    result = search(model, data["search"], names, cfg, checkpoint=checkpoint, run_key=run_key(cfg, data, cache))
    phase_s["search"] = since()
    relaxed = choose_layers(result["probs"], names, cfg.k, cfg.threshold)
    polished = polish(model, result["probs"], names, relaxed, data["held_out"], cfg) if cfg.polish else None
    phase_s["polish"] = since()
    compile_layers(model, on=False)  # the check below generates: new shapes every token, eager is better there
    recompute_mlp(model, on=False)
    arch = export(result, names, cfg, cache, data, polished)
    arch["phase_s"] = {k: round(v, 1) for k, v in phase_s.items()}
    if not is_main():  # the same result on every rank (check_replicated): rank 0 writes and checks it
        return arch
    out.mkdir(parents=True, exist_ok=True)
    (out / "arch.json").write_text(json.dumps(arch, indent=1))
    checkpoint.unlink(missing_ok=True)
    print(f"full attention in layers {arch['full_layers']}; architecture: {' '.join(arch['layers'])}")
    print(f"wrote {out / 'arch.json'} ({arch['tokens']:,} tokens, {arch['wall_time_s']} s; seconds by phase: "
          f"{', '.join(f'{k} {v}' for k, v in arch['phase_s'].items())})")
    if plots.search_figure(arch["history"], names, arch["relaxed"]["full_layers"], out / "search.png",
                           polished_layers=arch["full_layers"]):
        print(f"wrote {out / 'search.png'}")
    if cfg.check_samples and cfg.fsdp:
        print("retrieval check skipped: with --fsdp no one rank holds the whole teacher to generate with; "
              "run eval_ruler.py on the architecture where it fits")
    elif cfg.check_samples:
        arch["retrieval_check"] = retrieval_check(model, tokenizer, arch, state, cfg)
        arch["phase_s"]["check"] = round(since(), 1)
        (out / "arch.json").write_text(json.dumps(arch, indent=1))
    return arch


def main(argv=None):
    try:
        run(parse_args(argv))
    except DashError as e:
        sys.exit(f"dash: {failed_where()}{e}")  # no goodbye to the group: the other ranks may be waiting in it
    leave_distributed()


if __name__ == "__main__":
    main()
