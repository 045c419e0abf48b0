"""The RULER harness: a DASH hybrid against its teacher and against selector baselines that keep the same number
of full-attention layers (K) with the same prepared candidates, plus what the hybrid saves at inference (CUDA).
RULER itself (tasks, haystacks, metrics, averages) is ruler.py; this file picks layers, builds models and runs.

    python eval_ruler.py --arch out/arch.json                          # all baselines, the shipped prose haystack
    python eval_ruler.py --arch out/arch.json --haystack essays/ --template chat --lengths 4096,8192
    python eval_ruler.py --arch out/arch.json --squad squad.json --hotpotqa hotpotqa.json   # all 13 tasks

Sections: config, selectors (which K layers keep full attention), inference speed, the run.
"""

import json
import math
import random
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dash
import plots
import ruler

# Published placements for Qwen2.5-3B-Instruct (36 layers, 0-indexed), taken as data.
# Jet-Nemotron-4B (Gu et al. 2025, PostNAS): full attention in 3 layers, sliding-window attention in 7.
JET_NEMOTRON = dict(full=[17, 20, 32], swa=[5, 16, 19, 21, 22, 25, 27])
# fla-org/hybrid-distillation (KL-guided layer selection, ICLR 2026) @ d7467e37d359ac873242d2902d23a9fd47de746b,
# configs/qwen2_3b_gdn_v4_hybrid_{0_125,0_25,0_33,0_5}_{selector}/stage2.yaml, student_model.keep_full_attention_layers
# (the layers that keep softmax attention; all others are Gated DeltaNet). ga_s2 is the paper's KL-guided selector.
HYBRID_DISTILLATION = {
    "uniform": {5: [0, 8, 16, 24, 32], 9: [0, 4, 8, 12, 16, 20, 24, 28, 32],
                12: [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33],
                18: [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34]},
    "smart": {5: [3, 11, 19, 27, 35], 9: [3, 7, 11, 15, 19, 23, 27, 31, 35],
              12: [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35],
              18: [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27, 29, 31, 33, 35]},
    "mse": {5: [0, 1, 31, 34, 35], 9: [0, 1, 8, 30, 31, 32, 33, 34, 35],
            12: [0, 1, 3, 8, 12, 27, 30, 31, 32, 33, 34, 35],
            18: [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 27, 28, 30, 31, 32, 33, 34, 35]},
    "ppl": {5: [0, 1, 32, 34, 35], 9: [0, 1, 27, 30, 31, 32, 33, 34, 35],
            12: [0, 1, 5, 6, 12, 27, 30, 31, 32, 33, 34, 35],
            18: [0, 1, 2, 4, 5, 6, 7, 8, 9, 12, 27, 29, 30, 31, 32, 33, 34, 35]},
    "ar": {5: [0, 1, 18, 20, 27], 9: [0, 1, 18, 20, 21, 24, 25, 26, 27],
           12: [0, 1, 8, 12, 18, 19, 20, 21, 24, 25, 26, 27],
           18: [0, 1, 7, 8, 12, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 33, 35]},
    "ar_multihop": {5: [0, 1, 21, 26, 27], 9: [0, 1, 5, 16, 20, 21, 23, 26, 27],
                    12: [0, 1, 5, 6, 16, 18, 20, 21, 23, 24, 26, 27],
                    18: [0, 1, 3, 5, 6, 8, 9, 13, 16, 17, 18, 20, 21, 22, 23, 24, 26, 27]},
    "kl_guided": {5: [20, 21, 22, 32, 33], 9: [5, 17, 19, 20, 21, 22, 25, 32, 33],
                  12: [3, 4, 5, 17, 19, 20, 21, 22, 25, 31, 32, 33],
                  18: [3, 4, 5, 10, 13, 17, 19, 20, 21, 22, 25, 26, 27, 29, 30, 31, 32, 33]},
}


# Every baseline --baselines can name; 'random' and 'hd' name families (random-<seed>, hd-<selector>).
SELECTORS = {
    "uniform": "evenly spaced from layer 0 (hybrid-distillation's uniform)",
    "first-K": "the first K layers", "last-K": "the last K layers",
    "random": "random placements, one per seed (--random-seeds)",
    "alignment-loss": "the layers whose best cheap operator aligns worst (the preparation report)",
    "recall-importance": "answer-NLL rise when a layer's attention output is zeroed",
    "retrieval-score": "the layer's best head's attention on the needle (retrieval heads, Wu et al. 2024)",
    "ar": "hybrid-distillation's layer_selection/evaluate_layer_importance.py: key-value sum accuracy drop",
    "nll": "NLL-guided (arXiv 2606.27791): answer-NLL rise when a layer becomes a sliding window",
    "halo": "HALO's attn-layer-selection/layer_analysis.py: retrieval drop over commonsense drop",
    "ga-s2": "hybrid-distillation's KL-guided selection: restore one layer to full attention in the all-cheap "
             "student, distil briefly (finetune.py), lowest held-out KL keeps full attention",
    "jet-nemotron": "Jet-Nemotron's published placement (Qwen2.5-3B only)",
    "hd": "hybrid-distillation's published placements, hd-<selector> (Qwen2.5-3B only)",
}


@dataclass
class EvalConfig:
    arch: str = dash.flag("out/arch.json", "architecture JSON written by dash.py")
    cache: str | None = dash.flag(None, "candidate weights (.safetensors; default: the architecture's candidate_cache)")
    tasks: str | None = dash.flag(None, "comma-separated RULER tasks (default: the 11 synthetic ones, and qa_1 / qa_2 "
                                       "when --squad / --hotpotqa are given)")
    lengths: str | None = dash.flag(None, "comma-separated context lengths (default: 4096,8192,16384,32768; the "
                                         "search's sequence length for the small model)")
    samples: int = dash.flag(50, "samples per task and length (RULER's default is 500)")
    seed: int = dash.flag(1, "seed of the samples (the small model trained on seed 0's distribution, other draws)")
    haystack: str | None = dash.flag(None, "the essay tasks' haystack: a text file or a folder of .txt files (RULER: "
                                          "Paul Graham's essays); default: the shipped public-domain prose, "
                                          "data/factbook_prose.txt.gz; 'noise': RULER's noise sentence")
    template: str = dash.flag("auto", "base (RULER's default), chat (the tokenizer's chat template) or auto (chat "
                                     "when the tokenizer has one); the template's tokens count in the length")
    baselines: str = dash.flag("all", "all, none, or a comma-separated subset of: " + ", ".join(SELECTORS))
    random_seeds: int = dash.flag(3, "random placements to average")
    probes: int = dash.flag(16, "probe samples of the probe-based selectors (recall-importance, retrieval-score, "
                               "ar, nll, halo)")
    ga_tokens: int | None = dash.flag(None, "ga-s2: distillation tokens per restored layer, the same for every layer, "
                                           "after the search's (default: 4M; 32,768 for the small model)")
    fill: str = dash.flag("best", "operator of the baselines' other layers: best (lowest alignment loss of the "
                                 "layer, from the preparation report) or an operator name")
    batch_size: int = dash.flag(8, "prompts generated together (left-padded)")
    squad: str | None = dash.flag(None, "RULER's SQuAD json for qa_1")
    hotpotqa: str | None = dash.flag(None, "RULER's HotpotQA json for qa_2")
    lm_eval: str | None = dash.flag(None, "comma-separated lm-evaluation-harness tasks to run on the teacher and the "
                                         "DASH hybrid (needs lm-eval installed)")
    speed: bool = dash.flag(True, "on CUDA, measure prefill, decode, memory and cache of teacher and hybrid")
    out: str = dash.flag("out/ruler", "folder for results.md and results.json")
    device: str = dash.flag("auto", "cuda, cpu or auto")
    dtype: str = dash.flag("auto", "bfloat16, float32 or auto")
    kernels: str = dash.flag("auto", "fla (CUDA only), torch or auto")

# -- selectors: which K layers keep full attention


def wanted(spec: str):
    """--baselines as a test `want(name)`: 'all', 'none', or names; a name's first word keeps every selector
    that starts with it ('random': random-0, random-1, ...; 'hd': every hd-<selector>; 'first': first-K)."""
    names = {"all": [], "none": []}.get(spec, spec.split(","))
    known = set(SELECTORS) | {n.split("-")[0] for n in SELECTORS} | {f"hd-{s}" for s in HYBRID_DISTILLATION}
    unknown = [n for n in names if n not in known and not re.fullmatch(r"random-\d+", n)]
    if unknown:
        raise ValueError(f"--baselines: unknown {', '.join(unknown)}; allowed: all, none, {', '.join(SELECTORS)}")
    return lambda name: spec == "all" or name in names or name.split("-")[0] in names


def uniform(L: int, K: int) -> list[int]:
    """Evenly spaced from layer 0, as hybrid-distillation's 'uniform' (a step of ceil(L/K) where it fits)."""
    step = math.ceil(L / K)
    return [i * step for i in range(K)] if (K - 1) * step < L else [i * L // K for i in range(K)]


def top(scores: list[float], K: int) -> list[int]:
    """The K layers with the highest scores (ties: the lower layer)."""
    return sorted(sorted(range(len(scores)), key=lambda l: -scores[l])[:K])


def answer_positions(tokenizer, sample: dict):
    """Token ids of prompt + reference answer, the positions that predict the answer tokens, and the positions
    of the first reference answer inside the context (the needle)."""
    prompt = ruler.build_prompt(sample, tokenizer)
    full = prompt + ruler.answer_text(sample)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    ids = torch.tensor(enc.input_ids)[None]
    start = prompt.find(sample["outputs"][0])  # in the context: the question does not hold the value
    needle = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < start + len(sample["outputs"][0]) and b > start]
    return ids, torch.arange(n_prompt - 1, ids.shape[1] - 1), torch.tensor(needle)


def answer_scores(model, tokenizer, probes: list[dict]) -> tuple[float, float]:
    """Under teacher forcing: the answer tokens' NLL (summed per probe, mean over probes) and the fraction of
    answer tokens that are the model's greedy prediction."""
    nll = correct = count = 0.0
    for s in probes:
        ids, pos, _ = answer_positions(tokenizer, s)
        with torch.no_grad():
            logp = model(input_ids=ids.to(model.device)).logits[0, pos].float().log_softmax(-1)  # (answer, V)
        target = ids[0, pos + 1].to(model.device)
        nll -= logp.gather(-1, target[:, None]).sum().item()
        correct += (logp.argmax(-1) == target).sum().item()
        count += len(pos)
    return nll / len(probes), correct / count


@contextmanager
def zeroed(attn):
    """One layer's attention output set to zero (hybrid-distillation's zero_out_attention_hook)."""
    hook = attn.register_forward_hook(lambda m, args, out: (torch.zeros_like(out[0]), None))
    try:
        yield
    finally:
        hook.remove()


def recall_importance(model, tokenizer, probes: list[dict]) -> list[float]:
    """Associative-recall importance: how much the teacher's NLL of the recalled values rises when one layer's
    attention output is zeroed (a smooth form of the ar selector's accuracy drop)."""
    base, rises = answer_scores(model, tokenizer, probes)[0], []
    for attn in tqdm(dash.teacher_attention(model), desc="recall importance", leave=False):
        with zeroed(attn):
            rises.append(answer_scores(model, tokenizer, probes)[0] - base)
    return rises


def retrieval_scores(model, tokenizer, probes: list[dict]) -> list[float]:
    """Retrieval score per layer: attention mass that the positions writing the answer put on the needle, for
    the layer's most retrieving head (retrieval heads, Wu et al. 2024), averaged over probes."""
    L = len(model.model.layers)
    total, hooks = [0.0] * L, []
    for l, attn in enumerate(dash.teacher_attention(model)):
        def hook(m, args, kwargs, out, l=l):
            p = dash.project(m, kwargs["hidden_states"], kwargs["position_embeddings"])
            q, k = p.q_rope, p.k_rope
            q = q[0, state["pos"]].float()                                   # (n, H, D)
            k = k[0].float().repeat_interleave(m.num_key_value_groups, 1)     # (T, H, D)
            att = torch.einsum("nhd,thd->hnt", q, k) * m.scaling
            att = att.masked_fill(torch.arange(k.shape[0], device=k.device) > state["pos"][:, None].to(k.device),
                                  -torch.inf).softmax(-1)
            total[l] += att[..., state["needle"]].sum(-1).mean(-1).max().item() / len(probes)
        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        for s in probes:
            ids, pos, needle = answer_positions(tokenizer, s)
            state = dict(pos=pos.to(model.device), needle=needle.to(model.device))
            with torch.no_grad():
                model.model(input_ids=ids.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return total


AR_PAIRS, AR_NEW_TOKENS = 50, 200  # evaluate_layer_importance.py: --num_pairs default, max_new_tokens


def ar_prompts(tokenizer, n: int, seed: int, pairs: int = AR_PAIRS) -> list[tuple[str, str]]:
    """hybrid-distillation's key-value sum prompts (fla-org/hybrid-distillation @ d7467e3, create_ar_dataset in
    layer_selection/evaluate_layer_importance.py): `pairs` alphabetic vocabulary words as keys, values 0-9, and
    the question for the sum of three keys' values. Returns (prompt, answer) pairs."""
    vocab = sorted({w for w in (tokenizer.decode([i]).strip() for i in tokenizer.get_vocab().values())
                    if re.fullmatch(r"[a-zA-Z]{3,}", w)})
    if len(vocab) < pairs:
        raise ValueError(f"ar: the tokenizer has {len(vocab)} alphabetic words of 3+ letters; {pairs} are needed")
    rng, out = random.Random(seed), []
    for _ in range(n):
        keys, values = rng.sample(vocab, pairs), [rng.randint(0, 9) for _ in range(pairs)]
        q = rng.sample(range(pairs), 3)
        listing = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
        out.append((f"Given the following key-value pairs:\n{listing}\nWhat is the value of {keys[q[0]]} + "
                    f"{keys[q[1]]} + {keys[q[2]]}?", str(sum(values[j] for j in q))))
    return out


def ar_importance(model, tokenizer, prompts: list[tuple[str, str]], batch_size: int) -> list[float]:
    """hybrid-distillation's ar selector (run_experiment in evaluate_layer_importance.py): the accuracy drop when
    one layer's attention output is zeroed; a prompt counts as right when the sum appears anywhere in 200 greedy
    tokens (its evaluate())."""
    def accuracy() -> float:
        preds = ruler.generate(model, tokenizer, [p for p, _ in prompts], AR_NEW_TOKENS, batch_size)
        return sum(answer in pred for (_, answer), pred in zip(prompts, preds)) / len(prompts)
    base, drops = accuracy(), []
    for attn in tqdm(dash.teacher_attention(model), desc="ar", leave=False):
        with zeroed(attn):
            drops.append(base - accuracy())
    return drops


def one_converted(model, L: int, layer: int, op: str, weights: dict, cfg):
    """The teacher with only `layer` running `op` (its prepared weights)."""
    return dash.make_hybrid(model, [op if l == layer else "full" for l in range(L)], weights, cfg)


def nll_rise(model, tokenizer, probes: list[dict], weights: dict, cfg) -> list[float]:
    """NLL-guided selection (arXiv 2606.27791): the rise in the answer tokens' NLL when one layer's attention
    becomes a sliding window ('swa', --window tokens)."""
    L = len(model.model.layers)
    base, rises = answer_scores(dash.restore_teacher(model), tokenizer, probes)[0], []
    for l in tqdm(range(L), desc="nll", leave=False):
        rises.append(answer_scores(one_converted(model, L, l, "swa", weights, cfg), tokenizer, probes)[0] - base)
    dash.restore_teacher(model)
    return rises


def next_token_accuracy(model, ids: torch.Tensor) -> float:
    """Fraction of the tokens of `ids` (B, T) that are the model's greedy prediction from their prefix."""
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits[:, :-1]
    return (logits.argmax(-1) == ids[:, 1:].to(model.device)).float().mean().item()


def halo_scores(model, tokenizer, probes: list[dict], text: torch.Tensor, fill: list[str], weights: dict,
                cfg) -> list[float]:
    """HALO's layer score (thunlp/hybrid-linear-attention @ 229e301, attn-layer-selection/layer_analysis.py,
    combine() in mode 'halo'): convert one layer (here: to its fill operator, the prepared cheap candidate),
    measure retrieval (rt) and commonsense (cs); score = (max rt - rt) / (max cs - cs + 1e-10), capped at 50, the
    maxima taken over the converted models as there (halo_combine). HALO's retrieval is lm-eval's
    ruler_qa_squad, fda and swde, its commonsense HellaSwag and ARC; at this scale retrieval is the answer-token
    accuracy on the needle probes and commonsense the next-token accuracy on the search data (`text`)."""
    L = len(model.model.layers)
    rt, cs = [], []
    for l in tqdm(range(L), desc="halo", leave=False):
        one_converted(model, L, l, fill[l], weights, cfg)
        rt.append(answer_scores(model, tokenizer, probes)[1])
        cs.append(next_token_accuracy(model, text))
    dash.restore_teacher(model)
    return halo_combine(rt, cs)


def halo_combine(rt: list[float], cs: list[float]) -> list[float]:
    """layer_analysis.py's combine(mode='halo'): retrieval drop over commonsense drop, from the best layer's."""
    return [min(50.0, (max(rt) - r) / (max(cs) - c + 1e-10)) for r, c in zip(rt, cs)]


def ga_s2_kls(model, tokenizer, ecfg: EvalConfig, cfg, weights: dict, fill: list[str], costs: dict) -> list[float]:
    """GA-S2 (finetune.ga_s2) with finetune.py's default train set and learning rate: per layer, the held-out KL of
    the all-cheap student with that layer restored, after a brief distillation. Its cost goes into `costs`."""
    import finetune  # eval_ruler builds on finetune.py, never the reverse
    small = dash.is_small_model(cfg.model)
    fcfg = finetune.FinetuneConfig(model=cfg.model, tokens=ecfg.ga_tokens or (32_768 if small else 4_000_000),
                                   log_every=10 ** 9,
                                   **{k: (finetune.SMALL if small else finetune.PAPER)[k] for k in ("lr", "lr_other")})
    data = dash.load_data(tokenizer, cfg, parts=("held_out", "finetune"), finetune_tokens=fcfg.tokens)
    result = finetune.ga_s2(dash.restore_teacher(model), fill, weights, cfg, data["finetune"], data["held_out"], fcfg)
    costs["ga-s2"] = {**result, "train": fcfg.train, "lr": fcfg.lr}
    print(f"ga-s2: {result['tokens']:,} tokens ({result['tokens_per_layer']:,} per layer), {result['wall_time_s']} s")
    return result["kl"]


def placements(model, tokenizer, arch: dict, ecfg: EvalConfig, cfg, weights: dict, report: dict | None,
               fill: list[str], probe_len: int, costs: dict | None = None) -> dict:
    """The baselines --baselines asks for: name -> {layer: operator} for its full-attention (and, for
    Jet-Nemotron, window) layers. Only the selectors asked for run; those that train record their cost in
    `costs`."""
    want = wanted(ecfg.baselines)
    L, K = len(model.model.layers), len(arch["full_layers"])
    picks = {}
    if want("uniform"):
        picks["uniform"] = uniform(L, K)
    if want("first-K"):
        picks["first-K"] = list(range(K))
    if want("last-K"):
        picks["last-K"] = list(range(L - K, L))
    for s in range(ecfg.random_seeds):
        if want(f"random-{s}"):
            picks[f"random-{s}"] = sorted(random.Random(s).sample(range(L), K))
    if report and want("alignment-loss"):  # layer-wise distillation: the layers hardest to replace by a trained
        trained = trained_operators(report)   # operator keep full attention
        picks["alignment-loss"] = top([min(v["after"] for n, v in layer.items() if n in trained)
                                       for layer in report["layers"]], K)
    if any(want(n) for n in ("recall-importance", "retrieval-score", "nll", "halo")):
        probes = ruler.make_samples("niah_multikey_2", tokenizer, probe_len, ecfg.probes, seed=1000 + ecfg.seed,
                              template=ecfg.template)
    if want("recall-importance"):
        picks["recall-importance"] = top(recall_importance(model, tokenizer, probes), K)
    if want("retrieval-score"):
        picks["retrieval-score"] = top(retrieval_scores(model, tokenizer, probes), K)
    if want("ar"):
        prompts = ar_prompts(tokenizer, ecfg.probes, seed=1000 + ecfg.seed)
        picks["ar"] = top(ar_importance(model, tokenizer, prompts, ecfg.batch_size), K)
    if want("nll"):
        picks["nll"] = top(nll_rise(model, tokenizer, probes, weights, cfg), K)
    if want("halo"):
        text = dash.token_stream(tokenizer, cfg.data, 4 * probe_len).view(4, probe_len)  # the held-out text first
        picks["halo"] = top(halo_scores(model, tokenizer, probes, text, fill, weights, cfg), K)
    if want("ga-s2"):  # the lowest KL after distillation keeps full attention
        picks["ga-s2"] = top([-kl for kl in ga_s2_kls(model, tokenizer, ecfg, cfg, weights, fill,
                                                      {} if costs is None else costs)], K)
    out = {n: {l: "full" for l in layers} for n, layers in picks.items()}
    if L == 36:  # published placements for Qwen2.5-3B-Instruct
        if want("jet-nemotron"):
            out["jet-nemotron"] = {**{l: "full" for l in JET_NEMOTRON["full"]},
                                   **{l: "swa" for l in JET_NEMOTRON["swa"]}}
        for sel, by_k in HYBRID_DISTILLATION.items():
            if K in by_k and want(f"hd-{sel}"):
                out[f"hd-{sel}"] = {l: "full" for l in by_k[K]}
    return out


def trained_operators(report: dict) -> list[str]:
    """The operators that preparation trained (all of them if none was). Reports from before it listed them: those
    whose alignment loss moved."""
    names = list(report["layers"][0])
    moved = [n for n in names if any(layer[n]["after"] != layer[n]["before"] for layer in report["layers"])]
    return report.get("trained", moved) or names


def fill_layers(arch: dict, report: dict | None, how: str) -> list[str]:
    """The operator of every layer a baseline does not place itself."""
    cheap = [n for n in arch["candidates"] if n != "full"]
    if how != "best":
        return [how] * len(arch["layers"])
    if report is None:  # no preparation report: the hybrid's most common cheap operator
        common = max(cheap, key=[n for n in arch["layers"] if n != "full"].count)
        return [common] * len(arch["layers"])
    return [min(cheap, key=lambda n: layer[n]["after"]) for layer in report["layers"]]

# -- what the hybrid saves


def cache_bytes(cache) -> int:
    tensors = []
    for layer in cache.layers:
        tensors += [getattr(layer, n, None) for n in ("keys", "values", "state")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def speed(model, length: int, new_tokens: int = 64) -> dict:
    """Prefill latency, decode tokens/s, peak memory and cache bytes for one sequence of `length` tokens."""
    from transformers import DynamicCache
    ids = torch.randint(100, 1000, (1, length), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        for warm in (True, False):
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:]
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            for _ in range(new_tokens if not warm else 2):
                logits = model(input_ids=logits.argmax(-1), past_key_values=cache, use_cache=True).logits
            torch.cuda.synchronize()
            t2 = time.perf_counter()
    return dict(prefill_s=round(t1 - t0, 4), decode_tok_s=round(new_tokens / (t2 - t1), 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                cache_mib=round(cache_bytes(cache) / 2 ** 20, 1))

# -- the run


def need_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("--lm-eval needs lm-evaluation-harness, which is not installed (pip install lm-eval)")


def lm_eval_scores(model, tokenizer, tasks: str, batch_size: int) -> dict:
    """lm-evaluation-harness tasks on the model as it is now (its HFLM wrapper takes a model object)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=tasks.split(","))["results"]


def int_list(spec: str, flag: str) -> list[int]:
    if not re.fullmatch(r"\d+(,\d+)*", spec):
        raise ValueError(f"{flag} {spec!r}: give comma-separated whole numbers, e.g. 4096,8192")
    return [int(x) for x in spec.split(",")]


def evaluate(ecfg: EvalConfig) -> dict:
    if ecfg.samples < 1:
        raise ValueError(f"--samples {ecfg.samples}: need at least 1")
    wanted(ecfg.baselines)  # a bad name fails before the model loads
    if ecfg.lm_eval:
        need_lm_eval()
    haystack = ruler.load_haystack(ecfg.haystack)
    arch = dash.read_arch(ecfg.arch)
    cfg = dash.arch_config(arch)
    cfg.device, cfg.dtype, cfg.kernels = ecfg.device, ecfg.dtype, ecfg.kernels
    device, dtype = dash.devices(cfg)
    model, tokenizer = dash.load_model(arch["model"], device, dtype)
    template = ruler.resolve_template(ecfg.template, tokenizer)
    small = dash.is_small_model(arch["model"])
    lengths = int_list(ecfg.lengths or (str(cfg.seq_len) if small else "4096,8192,16384,32768"), "--lengths")
    qa = {"qa_1": ecfg.squad, "qa_2": ecfg.hotpotqa}
    tasks = ecfg.tasks.split(",") if ecfg.tasks else ruler.SYNTHETIC_TASKS + [t for t, f in qa.items() if f]
    samples = {f"{t}@{length}": ruler.make_samples(t, tokenizer, length, ecfg.samples, ecfg.seed, haystack, qa.get(t),
                                             template) for length in lengths for t in tasks}
    cache = ecfg.cache or arch["candidate_cache"]
    weights = dash.candidates_for(model, {**arch, "candidate_cache": cache, "layers": arch["candidates"]}, cfg)
    report_path = Path(cache).with_suffix(".json")
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    fill = fill_layers(arch, report, ecfg.fill)
    models = {"teacher": ["full"] * len(fill), "dash": arch["layers"],
              "dash (placement, fill)": ["full" if n == "full" else f for n, f in zip(arch["layers"], fill)]}
    costs = {}
    for name, placed in placements(model, tokenizer, arch, ecfg, cfg, weights, report, fill, min(lengths),
                                   costs).items():
        models[name] = [placed.get(l, f) for l, f in enumerate(fill)]
    # a finetuned architecture (finetune.py): the dash row is the finetuned hybrid, a copy; the others are not
    finetuned = dash.build_hybrid(arch, model, weights, cfg)[0] if "finetune" in arch else None

    def hybrid(name: str, layers: list[str]):
        return finetuned if name == "dash" and finetuned is not None else dash.make_hybrid(model, layers, weights, cfg)

    results = {}
    for name, layers in models.items():
        results[name] = {**ruler.run_tasks(hybrid(name, layers), tokenizer, samples, ecfg.batch_size, name),
                         "layers": "".join(dash.CANDIDATES[n].code for n in layers)}  # one letter a layer
        print(f"{name:>24}: avg {results[name]['avg']:.1f}")
    rand = [r["avg"] for n, r in results.items() if n.startswith("random-")]
    if rand:
        print(f"random placements: mean {sum(rand) / len(rand):.1f}, min {min(rand):.1f}, max {max(rand):.1f}")
    speeds, lm_scores = {}, {}
    for name in ("teacher", "dash"):
        m = hybrid(name, models[name])
        if ecfg.speed and device.startswith("cuda"):
            for length in lengths:
                speeds[f"{name}@{length}"] = speed(m, length)
        if ecfg.lm_eval:
            lm_scores[name] = lm_eval_scores(m, tokenizer, ecfg.lm_eval, ecfg.batch_size)
    dash.restore_teacher(model)
    essay = any(t in ruler.ESSAY_TASKS for t in tasks)
    md = ruler.table(results, f"RULER, {ecfg.samples} samples per task, {arch['model']}, K={arch['k']}, {template} "
                        f"template, essay haystack: {haystack.name if essay else 'none'}; averages over "
                        f"{ruler.coverage(tasks)}")
    if speeds:
        md += "\n\n" + ruler.table(speeds, "inference: prefill latency, decode speed, peak memory, cache size")
    out = Path(ecfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(dict(
        config=asdict(ecfg), arch=arch["layers"], finetune=arch.get("finetune") and {
            k: v for k, v in arch["finetune"].items() if k != "history"}, selector_costs=costs,
        results=results, speed=speeds, lm_eval=lm_scores, lengths=lengths,
        tasks=tasks, averaged_over=ruler.coverage(tasks), template=template,
        haystack=haystack.describe() if essay else None), indent=1))
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    if plots.ruler_figure(results, out / "results.png", speeds, f"RULER, {arch['model']}, K={arch['k']}"):
        print(f"wrote {out / 'results.png'}")
    return results


def main(argv=None):
    try:
        evaluate(dash.parse_args(argv, EvalConfig, "RULER for a DASH hybrid, the teacher and selector baselines"))
    except (dash.DashError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval_ruler: {e}")


if __name__ == "__main__":
    main()
