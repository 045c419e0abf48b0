"""RULER's synthetic long-context tasks (Hsieh et al. 2024), generated locally, and RULER's metrics.

A port of NVIDIA/RULER (scripts/synthetic.yaml, scripts/data/synthetic/*.py, scripts/eval/synthetic/
constants.py and evaluate.py): the same task configs, templates, answer prefixes, needle formats, haystack
construction, length search and string-match metrics, with nothing downloaded:
- haystacks: RULER's repeated noise sentences; its Paul Graham essays are replaced by any local text corpus
  passed as `haystack` (without one, the essay tasks use the noise haystack, with a warning);
- words: RULER's wonderwords lists are replaced by the short ruler_words.txt beside this file;
- numbers, words and uuids come from a seeded `random.Random`, so `seed` fixes every sample.

    samples = make_samples("niah_single_1", tokenizer, length=4096, n=50, seed=0)
    preds = [generate(build_prompt(s, tokenizer), s["max_new_tokens"]) for s in samples]
    score("niah_single_1", preds, [s["outputs"] for s in samples])   # percent, RULER's string_match_all

Deviations from RULER, each small and deliberate:
- each sample has its own seed ("{task}/{seed}/{i}"), so a sample does not depend on the length search;
- a sample that comes out too long is regenerated 1% smaller (RULER steps 500 essay words or 25 noise
  sentences, which overshoots badly at short lengths); FWE bisects its word count like the other tasks;
- the needle keys of one sample are distinct (a repeated key would make the question ambiguous);
- sentences are split by a regex instead of nltk's punkt;
- the variable-tracking few-shot example gets at most half the prompt budget (RULER's 500 tokens leave no
  room for the question below ~1K tokens);
- CWE falls back to adjective-noun words when it needs more words than ruler_words.txt has (RULER: an
  English dictionary);
- `length` counts the tokens of input + answer_prefix; RULER's `length` also adds tokens_to_generate.
"""

import json
import math
import random
import re
import string
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

import dash

# ---- task configs: RULER's scripts/synthetic.yaml ----

_NIAH = dict(task="niah", type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
             num_needle_k=1, num_needle_v=1, num_needle_q=1)
TASKS: dict[str, dict] = {
    "niah_single_1": {**_NIAH, "type_haystack": "noise"},
    "niah_single_2": {**_NIAH},
    "niah_single_3": {**_NIAH, "type_needle_v": "uuids"},
    "niah_multikey_1": {**_NIAH, "num_needle_k": 4},
    "niah_multikey_2": {**_NIAH, "type_haystack": "needle"},
    "niah_multikey_3": {**_NIAH, "type_haystack": "needle", "type_needle_k": "uuids", "type_needle_v": "uuids"},
    "niah_multivalue": {**_NIAH, "num_needle_v": 4},
    "niah_multiquery": {**_NIAH, "num_needle_q": 4},
    "vt": dict(task="variable_tracking", type_haystack="noise", num_chains=1, num_hops=4),
    "cwe": dict(task="common_words_extraction", freq_cw=30, freq_ucw=3, num_cw=10),
    "fwe": dict(task="freq_words_extraction", alpha=2.0),
    "qa_1": dict(task="qa", dataset="squad"),
    "qa_2": dict(task="qa", dataset="hotpotqa"),
}
NIAH_TASKS: list[str] = [t for t, c in TASKS.items() if c["task"] == "niah"]
DEFAULT_TASKS: list[str] = [t for t, c in TASKS.items() if c["task"] != "qa"]  # qa needs the user's json files

# ---- templates: RULER's scripts/data/synthetic/constants.py (the base-model format: input + answer_prefix) ----

TEMPLATES: dict[str, dict] = {
    "niah": dict(
        tokens_to_generate=128,
        template="Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                 "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                 "magic {type_needle_v} for {query} mentioned in the provided text?",
        answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are"),
    "variable_tracking": dict(
        tokens_to_generate=30,
        template="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                 "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                      "variables are assigned the value {query}, they are: "),
    "common_words_extraction": dict(
        tokens_to_generate=120,
        template="Below is a numbered list of words. In these words, some appear more often than others. "
                 "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
                 "words in the above list?",
        answer_prefix=" Answer: The top 10 words that appear most often in the list are:"),
    "freq_words_extraction": dict(
        tokens_to_generate=50,
        template="Read the following coded text and track the frequency of each coded word. Find the three most "
                 "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                 "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                 "text?",
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:"),
    "qa": dict(
        tokens_to_generate=32,
        template="Answer the question based on the given documents. Only give me the answer and do not output any "
                 "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based "
                 "on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                 "{query}",
        answer_prefix=" Answer:"),
}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40)), needle depths in %


def _load_words(path: Path = Path(__file__).with_name("ruler_words.txt")) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    name = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("["):
            name = line.strip("[]")
            sections[name] = []
        elif line and not line.startswith("#"):
            sections[name] += line.split()
    return sections


WORDS = _load_words()
CWE_WORDS = sorted(set(WORDS["nouns"] + WORDS["adjectives"] + WORDS["verbs"]))  # RULER: nouns + adjs + verbs


def _task_config(task: str) -> dict:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[task]


def count_tokens(tokenizer, text: str) -> int:
    """Tokens of `text` without special tokens, for an HF tokenizer or a bare `tokenizers.Tokenizer`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(getattr(ids, "ids", ids))  # tokenizers.Encoding has .ids, HF tokenizers return a list


# ---- random draws ----

def _draw(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))  # 7 digits, as RULER
    if kind == "words":
        return f"{rng.choice(WORDS['adjectives'])}-{rng.choice(WORDS['nouns'])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; allowed: numbers, words, uuids")


def _distinct(kind: str, n: int, rng: random.Random, taken: set[str] | None = None) -> list[str]:
    """n draws of `kind`, distinct from each other and from `taken` (which is updated)."""
    taken = set() if taken is None else taken
    out = []
    while len(out) < n:
        x = _draw(kind, rng)
        if x not in taken:
            taken.add(x)
            out.append(x)
    return out


# ---- haystacks ----

def _essay_words(haystack: list[str] | str | Path | None) -> list[str] | None:
    """The corpus as RULER's word list (whitespace-collapsed, split on spaces); None means: use noise."""
    if haystack is None:
        warnings.warn("no essay haystack given: RULER's essay tasks (niah_single_2, ...) use the noise "
                      "haystack instead; pass haystack=[texts] or a text file for essay-like context")
        return None
    if isinstance(haystack, (str, Path)):
        if not Path(haystack).is_file():
            raise ValueError(f"haystack must be a list of texts or a text file; no file at {str(haystack)!r}")
        haystack = [Path(haystack).read_text(encoding="utf-8")]
    words = re.sub(r"\s+", " ", " ".join(haystack)).strip().split(" ")
    if words == [""]:
        raise ValueError("the haystack corpus is empty")
    return words


def _essay_with_inserts(words: list[str], size: int, inserts: list[str], rng: random.Random) -> str:
    """First `size` corpus words (the corpus repeated if short), `inserts` placed between sentences at
    random depths, as RULER's essay haystack."""
    text = " ".join(words[i % len(words)] for i in range(size))
    sents = re.split(r"(?<=[.!?])\s+", text)  # stands in for nltk.sent_tokenize
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(inserts))) + [len(sents)]
    parts = []
    for i in range(1, len(cuts)):
        parts.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(inserts):
            parts.append(inserts[i - 1])
    return " ".join(parts)


def _lines_with_inserts(lines: list[str], inserts: list[str], rng: random.Random) -> str:
    """RULER's noise haystack: one insert at each of len(inserts) random line positions, '\n'-joined."""
    for index, insert in zip(sorted(rng.sample(range(len(lines)), len(inserts)), reverse=True), inserts):
        lines.insert(index, insert)
    return "\n".join(lines)


# ---- generators: gen(size, rng, i) -> (input, answer_prefix, outputs); `size` is the haystack size ----

def _niah(size: int, rng: random.Random, i: int, cfg: dict, words: list[str] | None, seed: int):
    t = TEMPLATES["niah"]
    kind_v = cfg["type_needle_v"]
    taken: set[str] = set()
    keys = _distinct(cfg["type_needle_k"], max(cfg["num_needle_k"], cfg["num_needle_q"]), rng, taken)
    values = [[_draw(kind_v, rng) for _ in range(cfg["num_needle_v"])] for _ in keys]
    needles = [NEEDLE.format(type_needle_v=kind_v, key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    random.Random(seed).shuffle(needles)  # RULER shuffles with its fixed seed
    if cfg["type_haystack"] == "essay" and words is not None:
        context = _essay_with_inserts(words, size, needles, rng)
    elif cfg["type_haystack"] == "needle":  # distractor needles with other keys
        lines = [NEEDLE.format(type_needle_v=kind_v, key=k, value=_draw(kind_v, rng))
                 for k in _distinct(cfg["type_needle_k"], size, rng, taken)]
        context = _lines_with_inserts(lines, needles, rng)
    else:
        context = _lines_with_inserts([NOISE] * size, needles, rng)
    picks = rng.sample(range(len(keys)), cfg["num_needle_q"])
    queries = [keys[j] for j in picks]
    outputs = [v for j in picks for v in values[j]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix = t["template"], t["answer_prefix"]
    if cfg["num_needle_q"] * cfg["num_needle_v"] == 1:  # RULER's singular wording for a single answer
        template, prefix = [s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                            .replace("answers", "answer") for s in (template, prefix)]
        kind_v = kind_v[:-1]
    fill = dict(type_needle_v=kind_v, context=context, query=query)
    return template.format(**fill), prefix.format(**fill), outputs


def _vt_chains(rng: random.Random, num_chains: int, num_hops: int, is_icl: bool):
    """RULER's variable chains: VAR X1 = 12345, VAR X2 = VAR X1, ... (names distinct, never 'VAR')."""
    k = 3 if is_icl else 5
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=k))
        if name not in names and name != "VAR":  # 'VAR' would be clobbered by the few-shot renaming
            names.append(name)
    chains, groups = [], []
    for c in range(num_chains):
        v = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        value = "12345" if is_icl else str(rng.randint(10000, 99998))
        chains.append([f"VAR {v[0]} = {value}"] + [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(num_hops)])
        groups.append(v)
    return groups, chains


def _vt(size: int, rng: random.Random, i: int, cfg: dict, words: list[str] | None, icl: str | None):
    t = TEMPLATES["variable_tracking"]
    hops = cfg["num_hops"]
    groups, chains = _vt_chains(rng, cfg["num_chains"], hops, is_icl=icl is None)
    value = chains[0][0].split("=")[-1].strip()
    if cfg["type_haystack"] == "essay" and words is not None:
        flat = _interleave(chains, rng)
        context = _essay_with_inserts(words, size, [c.strip() + "." for c in flat], rng)
    else:
        lines = [NOISE] * size
        for chain in chains:  # keep each chain in order, at random positions
            for j, pos in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
                lines.insert(pos + j, chain[j])
        context = "\n".join(lines)
    context = context.replace(". \n", ".\n")
    fill = dict(context=context, query=value, num_v=hops + 1)
    text = t["template"].format(**fill)
    if icl is not None:  # RULER's one-shot example, renamed afresh for every sample
        targets = icl.strip().split()[-(hops + 1):]
        for name in targets:
            icl = icl.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        text = icl.replace("12345", str(rng.randint(10000, 99998))) + "\n" + text
    return text, t["answer_prefix"].format(**fill), groups[0]


def _interleave(chains: list[list[str]], rng: random.Random) -> list[str]:
    """RULER's shuffle_sublists_heap: merge the chains in random order, each chain's order kept."""
    pos = [0] * len(chains)
    out = []
    while any(p < len(c) for p, c in zip(pos, chains)):
        j = rng.choice([j for j, c in enumerate(chains) if pos[j] < len(c)])
        out.append(chains[j][pos[j]])
        pos[j] += 1
    return out


def _cwe(size: int, rng: random.Random, i: int, cfg: dict, length: int, seed: int):
    t = TEMPLATES["common_words_extraction"]
    num_cw = cfg["num_cw"]

    def example(num_words: int, cw_repeats: int, ucw_repeats: int) -> tuple[str, list[str]]:
        if num_words <= len(CWE_WORDS):
            words = rng.sample(CWE_WORDS, num_words)
        else:  # RULER switches to a larger English word list here
            words = _distinct("words", num_words, rng)
        common, uncommon = words[:num_cw], words[num_cw:]
        word_list = common * cw_repeats + uncommon * ucw_repeats
        random.Random(seed).shuffle(word_list)  # RULER shuffles with its fixed seed
        return " ".join(f"{j + 1}. {w}" for j, w in enumerate(word_list)), common

    if length < 4096:  # RULER: fewer repeats below 4K tokens
        shot, (context, outputs) = example(20, 3, 1), example(size, 6, 1)
    else:
        shot, (context, outputs) = example(40, 10, 3), example(size, cfg["freq_cw"], cfg["freq_ucw"])
    shot_text = (t["template"] + t["answer_prefix"]).format(context=shot[0], query="") + " " + \
        " ".join(f"{j + 1}. {w}" for j, w in enumerate(shot[1]))
    return shot_text + "\n" + t["template"].format(context=context, query=""), t["answer_prefix"], outputs


def _zeta(s: float, n: int = 1000) -> float:
    """Riemann zeta(s), s > 1, by Euler-Maclaurin (RULER uses scipy.special.zeta). _zeta(2) = pi^2/6."""
    return sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12


def _fwe(size: int, rng: random.Random, i: int, cfg: dict, vocab_size: int, seed: int):
    t = TEMPLATES["freq_words_extraction"]
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab = sorted(vocab)
    random.Random(seed).shuffle(vocab)  # RULER shuffles with its fixed seed
    vocab[0] = "..."  # the most frequent "word" is noise
    z = _zeta(cfg["alpha"])
    counts = [int(size * k ** -cfg["alpha"] / z) for k in range(1, len(vocab) + 1)]  # Zipf counts
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    random.Random(seed).shuffle(words)
    if counts[3] < 1 or counts[3] == counts[4]:
        raise ValueError(f"fwe: {size} words are too few for a well-defined top 3; use a longer length")
    return t["template"].format(context=" ".join(words), query=""), t["answer_prefix"], vocab[1:4]


def _read_qa(path: str, dataset: str) -> tuple[list[dict], list[str]]:
    """RULER's read_squad / read_hotpotqa: questions with the indices of their gold documents."""
    with open(path) as f:
        data = json.load(f)
    if dataset == "squad":
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        index = {c: j for j, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            more = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        qas.append(dict(query=qa["question"], outputs=[a["text"] for a in qa["answers"]],
                                        context=[index[p["context"]]],
                                        more_context=[j for j in more if j != index[p["context"]]]))
        return qas, docs
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    index = {c: j for j, c in enumerate(docs)}
    qas = [dict(query=d["question"], outputs=[d["answer"]],
                context=[index[f"{t}\n{''.join(p)}"] for t, p in d["context"]]) for d in data]
    return qas, docs


def _qa(size: int, rng: random.Random, i: int, qas: list[dict], docs: list[str], seed: int):
    t = TEMPLATES["qa"]
    qa = qas[i % len(qas)]  # RULER takes the questions in file order
    gold, more = qa["context"], qa.get("more_context", [])
    if size < len(docs):
        if size - len(gold) > len(more):
            rest = sorted(set(range(len(docs))) - set(gold) - set(more))
            picked = gold + more + rng.sample(rest, size - len(gold) - len(more))
        else:
            picked = gold + rng.sample(more, size - len(gold))
        chosen = [docs[j] for j in picked]
    else:
        chosen = [docs[j % len(docs)] for j in range(size)]
    random.Random(seed).shuffle(chosen)  # RULER shuffles with its fixed seed
    context = "\n\n".join(f"Document {j + 1}:\n{d}" for j, d in enumerate(chosen))
    return t["template"].format(context=context, query=qa["query"]), t["answer_prefix"], qa["outputs"]


# ---- sample generation ----

def _fit(render: Callable[[int], str], budget: int, count: Callable[[str], int], min_size: int, task: str) -> int:
    """Largest haystack size whose prompt fits `budget` tokens: RULER's bisection, bracketed by doubling
    (RULER brackets with 3x a probe's tokens-per-unit, which undershoots when the probe is small)."""
    fits = lambda size: count(render(size)) <= budget
    if not fits(min_size):
        raise ValueError(f"{task}: a {budget}-token prompt budget is too small: the smallest haystack "
                         f"({min_size}) already needs {count(render(min_size))} tokens; use a longer length")
    lo, hi = min_size, 2 * min_size  # invariant once bracketed: lo fits, hi does not
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def make_samples(task: str, tokenizer, length: int, n: int, seed: int = 0,
                 haystack: list[str] | str | Path | None = None, qa_file: str | None = None) -> list[dict]:
    """`n` samples of a RULER task whose prompts (input + answer_prefix) fit `length` tokens minus the
    task's tokens_to_generate, measured with `tokenizer`. Deterministic for a seed.

    haystack: the essay corpus for essay tasks (a list of texts or a text file); None: noise.
    qa_file: SQuAD (qa_1) or HotpotQA (qa_2) json in RULER's format; without it qa returns [] and warns.
    Each sample: task, index, input, answer_prefix, outputs, length, max_new_tokens. Raises ValueError for an
    unknown task or a length too short for the task.
    """
    cfg = _task_config(task)
    family = cfg["task"]
    max_new = TEMPLATES[family]["tokens_to_generate"]
    budget = length - max_new
    count = partial(count_tokens, tokenizer)
    words = _essay_words(haystack) if cfg.get("type_haystack") == "essay" else None
    if family == "niah":
        gen = partial(_niah, cfg=cfg, words=words, seed=seed)
        min_size = max(cfg["num_needle_k"], cfg["num_needle_q"]) * cfg["num_needle_v"]  # a line per needle
    elif family == "variable_tracking":
        min_size = cfg["num_hops"] + 1  # noise lines to host one chain
        shot = partial(_vt, cfg=cfg, words=words, icl=None)  # RULER's one-shot example, fit to <= 500 tokens
        render = lambda size: "".join(shot(size, random.Random(f"{task}/{seed}/shot"), 0)[:2])
        icl_size = _fit(render, min(500, budget // 2), count, min_size, task)
        inp, prefix, outs = shot(icl_size, random.Random(f"{task}/{seed}/shot"), 0)
        gen = partial(_vt, cfg=cfg, words=words, icl=inp + prefix + " " + " ".join(outs) + "\n")
    elif family == "common_words_extraction":
        gen, min_size = partial(_cwe, cfg=cfg, length=length, seed=seed), cfg["num_cw"] + 1
    elif family == "freq_words_extraction":
        gen = partial(_fwe, cfg=cfg, vocab_size=max(budget // 50, 5), seed=seed)  # RULER: budget // 50
        min_size = 64
    else:  # qa
        if qa_file is None:
            warnings.warn(f"{task} skipped: it needs RULER's {cfg['dataset']} json, pass qa_file=PATH")
            return []
        qas, docs = _read_qa(qa_file, cfg["dataset"])
        gen = partial(_qa, qas=qas, docs=docs, seed=seed)
        min_size = max(len(q["context"]) for q in qas[:max(n, 1)])
    render = lambda size: "".join(gen(size, random.Random(f"{task}/{seed}/probe"), 0)[:2])
    size = _fit(render, budget, count, min_size, task)

    samples = []
    for i in range(n):
        s = size
        while True:  # the probe fit; a sample with longer draws may not, so shrink it by 1% steps
            inp, prefix, outs = gen(s, random.Random(f"{task}/{seed}/{i}"), i)
            m = count(inp + prefix)
            if m <= budget:
                break
            s -= max(1, size // 100)
            if s < min_size:
                raise ValueError(f"{task}: sample {i} does not fit {budget} tokens; use a longer length")
        samples.append(dict(task=task, index=i, input=inp, answer_prefix=prefix, outputs=list(outs),
                            length=m, max_new_tokens=max_new))
    return samples


def build_prompt(sample: dict, tokenizer, chat: bool | None = None) -> str:
    """The text the model continues: for a chat model (chat=None: the tokenizer has a chat template) the
    input as one user turn, then the answer prefix; for a base model RULER's 'base' format,
    input + answer_prefix."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if chat is None else chat
    if not chat:
        return sample["input"] + sample["answer_prefix"]
    if not has_template:
        raise ValueError("build_prompt(chat=True) needs a tokenizer with a chat template; this one has none")
    return tokenizer.apply_chat_template([{"role": "user", "content": sample["input"]}], tokenize=False,
                                         add_generation_prompt=True) + sample["answer_prefix"]


def answer_text(sample: dict) -> str:
    """A reference continuation of the answer prefix, in the form RULER's own few-shot examples answer
    (vt, cwe); niah answers list the values. For training documents; RULER scores by substring match."""
    family, outs = _task_config(sample["task"])["task"], sample["outputs"]
    if family == "niah":
        return " " + ", ".join(outs) + "."
    if family == "common_words_extraction":
        return " " + " ".join(f"{j + 1}. {w}" for j, w in enumerate(outs))
    return " " + (outs[0] if family == "qa" else " ".join(outs))


# ---- metrics: RULER's scripts/eval/synthetic/constants.py and evaluate.py ----

def _check(preds: list[str], refs: list[list[str]]) -> None:
    if not preds or len(preds) != len(refs):
        raise ValueError(f"need as many predictions as references, at least one; got {len(preds)} and {len(refs)}")


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of the fraction of references found in the prediction (case-insensitive), in %."""
    _check(preds, refs)
    score = sum(sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """Mean over samples of 1 if any reference is found in the prediction (case-insensitive), in %."""
    _check(preds, refs)
    score = sum(max(r.lower() in p.lower() for r in ref) for p, ref in zip(preds, refs))
    return round(score / len(preds) * 100, 2)


METRICS: dict[str, Callable[[list[str], list[list[str]]], float]] = {
    "niah": string_match_all, "variable_tracking": string_match_all, "common_words_extraction": string_match_all,
    "freq_words_extraction": string_match_all, "qa": string_match_part}


def postprocess_pred(pred: str, stop: Sequence[str] = ()) -> str:
    """RULER's postprocessing: cut at stop words (its --stop_words, empty by default), strip, turn control
    characters into newlines, strip. RULER does not cut at the first newline; neither does this."""
    for s in stop:
        pred = pred.split(s)[0]
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def score(task: str, preds: list[str], refs: list[list[str]], stop: Sequence[str] = ()) -> float:
    """RULER's score for `task` in %: postprocessed predictions, then string_match_all (niah, vt, cwe, fwe)
    or string_match_part (qa)."""
    return METRICS[_task_config(task)["task"]]([postprocess_pred(p, stop) for p in preds], refs)


# ---- evaluation ----
# The hybrid against the teacher and against selector baselines with the same K and the same prepared
# candidates, on the tasks above, plus what the hybrid saves at inference (CUDA).
#   python eval_ruler.py --arch out/arch.json            # table for the teacher, the hybrid and every baseline

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


@dataclass
class EvalConfig:
    arch: str = dash.opt("out/arch.json", "architecture JSON written by dash.py")
    cache: str | None = dash.opt(None, "candidate weights (.safetensors; default: the architecture's candidate_cache)")
    tasks: str | None = dash.opt(None, "comma-separated RULER tasks (default: all synthetic tasks)")
    lengths: str | None = dash.opt(None, "comma-separated context lengths (default: 4096,8192,16384,32768; the "
                                         "search's sequence length for the small model)")
    samples: int = dash.opt(50, "samples per task and length (RULER's default is 500)")
    seed: int = dash.opt(1, "seed of the samples (the small model trained on seed 0's distribution, other draws)")
    baselines: str = dash.opt("all", "all, none, or a comma-separated subset of the selector names")
    random_seeds: int = dash.opt(3, "random placements to average")
    probes: int = dash.opt(16, "probe samples for the recall-importance and retrieval-score selectors")
    fill: str = dash.opt("best", "operator of the baselines' other layers: best (lowest alignment loss of the "
                                 "layer, from the preparation report) or an operator name")
    batch_size: int = dash.opt(8, "prompts generated together (left-padded)")
    haystack: str | None = dash.opt(None, "text file(s) for RULER's essay haystacks (default: noise, with a note)")
    squad: str | None = dash.opt(None, "RULER's SQuAD json for qa_1")
    hotpotqa: str | None = dash.opt(None, "RULER's HotpotQA json for qa_2")
    speed: bool = dash.opt(True, "on CUDA, measure prefill, decode, memory and cache of teacher and hybrid")
    out: str = dash.opt("out/ruler", "folder for results.md and results.json")
    device: str = dash.opt("auto", "cuda, cpu or auto")
    dtype: str = dash.opt("auto", "bfloat16, float32 or auto")
    kernels: str = dash.opt("auto", "fla (CUDA only), torch or auto")


# -- generation


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations with caches, batched with left padding (each prompt is a RULER prompt)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device, out = next(model.parameters()).device, []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**batch.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return out


def run_tasks(model, tokenizer, samples: dict, batch_size: int, desc: str) -> dict[str, float]:
    """Scores (%) per 'task@length' for one model, and their average."""
    scores = {}
    for key, ss in tqdm(samples.items(), desc=desc, leave=False):
        preds = generate(model, tokenizer, [build_prompt(s, tokenizer) for s in ss], ss[0]["max_new_tokens"],
                         batch_size)
        scores[key] = score(ss[0]["task"], preds, [s["outputs"] for s in ss])
    scores["avg"] = round(sum(scores.values()) / len(scores), 2)
    return scores

# -- selectors: which K layers keep full attention


def uniform(L: int, K: int) -> list[int]:
    """Evenly spaced from layer 0, as hybrid-distillation's 'uniform' (a step of ceil(L/K) where it fits)."""
    step = math.ceil(L / K)
    return [i * step for i in range(K)] if (K - 1) * step < L else [i * L // K for i in range(K)]


def top(scores: list[float], K: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda l: -scores[l])[:K])


def answer_positions(tokenizer, sample: dict):
    """Token ids of prompt + reference answer, the positions that predict the answer tokens, and the positions
    of the first reference answer inside the context (the needle)."""
    prompt = build_prompt(sample, tokenizer)
    full = prompt + answer_text(sample)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    ids = torch.tensor(enc.input_ids)[None]
    start = prompt.find(sample["outputs"][0])  # in the context: the question does not hold the value
    needle = [i for i, (a, b) in enumerate(enc.offset_mapping) if a < start + len(sample["outputs"][0]) and b > start]
    return ids, torch.arange(n_prompt - 1, ids.shape[1] - 1), torch.tensor(needle)


def recall_importance(model, tokenizer, probes: list[dict]) -> list[float]:
    """Associative-recall importance: how much the teacher's log-likelihood of the recalled values drops when one
    layer's attention output is zeroed (teacher forcing; a smooth form of the drop in recall accuracy)."""
    def nll(extra=None):
        total = 0.0
        for ids, pos, _ in map(lambda s: answer_positions(tokenizer, s), probes):
            with torch.no_grad():
                logp = model(input_ids=ids.to(model.device)).logits[0, pos].float().log_softmax(-1)
            total -= logp.gather(-1, ids[0, pos + 1, None].to(model.device)).sum().item()
        return total / len(probes)
    base, drops = nll(), []
    for attn in tqdm(dash.teacher_attention(model), desc="recall importance", leave=False):
        h = attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), None))
        drops.append(nll() - base)
        h.remove()
    return drops


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


def placements(model, tokenizer, arch: dict, ecfg: EvalConfig, report: dict | None, probe_len: int) -> dict:
    """Every baseline: name -> {layer: operator} for its full-attention (and, for Jet-Nemotron, window) layers."""
    L, K = len(model.model.layers), len(arch["full_layers"])
    out = {"uniform": uniform(L, K), "first-K": list(range(K)), "last-K": list(range(L - K, L))}
    for s in range(ecfg.random_seeds):
        out[f"random-{s}"] = sorted(random.Random(s).sample(range(L), K))
    if report:  # layer-wise distillation: the layers hardest to replace by a trained operator keep full attention
        trained = trained_operators(report)
        out["alignment-loss"] = top([min(v["after"] for n, v in layer.items() if n in trained)
                                     for layer in report["layers"]], K)
    probes = make_samples("niah_multikey_2", tokenizer, probe_len, ecfg.probes, seed=1000 + ecfg.seed)
    out["recall-importance"] = top(recall_importance(model, tokenizer, probes), K)
    out["retrieval-score"] = top(retrieval_scores(model, tokenizer, probes), K)
    out = {n: {l: "full" for l in layers} for n, layers in out.items()}
    if L == 36:  # published placements for Qwen2.5-3B-Instruct
        out["jet-nemotron"] = {**{l: "full" for l in JET_NEMOTRON["full"]}, **{l: "swa" for l in JET_NEMOTRON["swa"]}}
        for sel, by_k in HYBRID_DISTILLATION.items():
            if K in by_k:
                out[f"hd-{sel}"] = {l: "full" for l in by_k[K]}
    keep = ecfg.baselines.split(",") if ecfg.baselines not in ("all", "none") else None
    return {} if ecfg.baselines == "none" else {n: v for n, v in out.items()
                                                if keep is None or n in keep or n.split("-")[0] in keep}


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


def retrieval_check(model, tokenizer, arch: dict, weights: dict, cfg) -> dict:
    """dash.py's closing check: the hybrid against the teacher on RULER's needle tasks at the search length."""
    tasks = ["niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue"]
    with warnings.catch_warnings():  # the essay tasks take the noise haystack here, as said in the title
        warnings.simplefilter("ignore")
        samples = {f"{t}@{cfg.seq_len}": make_samples(t, tokenizer, cfg.seq_len, cfg.check_samples, seed=1)
                   for t in tasks}
    teacher = run_tasks(dash.restore_teacher(model), tokenizer, samples, 8, "teacher")
    hybrid = run_tasks(dash.make_hybrid(model, arch["layers"], weights, cfg), tokenizer, samples, 8, "hybrid")
    dash.restore_teacher(model)
    print(table({"teacher": teacher, "hybrid": hybrid},
                f"retrieval check: RULER needles at {cfg.seq_len} tokens (noise haystack), {cfg.check_samples} "
                f"samples per task"))
    return dict(teacher=teacher, hybrid=hybrid)


def number(v: float) -> str:
    """Scores with one decimal; small measurements (seconds, GiB) with three significant digits."""
    return f"{v:.1f}" if v == 0 or abs(v) >= 1 else f"{v:.3g}"


def table(rows: dict[str, dict], title: str = "") -> str:
    cols = list(next(iter(rows.values())))
    lines = [f"**{title}**", ""] if title else []
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(number(r[c]) if isinstance(r[c], float) else str(r[c])
                                                for c in cols) + " |")
    return "\n".join(lines)


def evaluate(ecfg: EvalConfig) -> dict:
    arch = json.loads(Path(ecfg.arch).read_text())
    cfg = dash.Config(**{k: v for k, v in arch["config"].items() if k in dash.Config.__dataclass_fields__})
    cfg.device, cfg.dtype, cfg.kernels = ecfg.device, ecfg.dtype, ecfg.kernels
    device, dtype = dash.devices(cfg)
    model, tokenizer = dash.load_model(arch["model"], device, dtype)
    small = Path(arch["model"]).resolve() == dash.SMALL_MODEL
    lengths = [int(x) for x in (ecfg.lengths or (str(cfg.seq_len) if small else "4096,8192,16384,32768")).split(",")]
    tasks = ecfg.tasks.split(",") if ecfg.tasks else DEFAULT_TASKS
    cache = ecfg.cache or arch["candidate_cache"]
    weights = dash.load_weights(cache)
    report_path = Path(cache).with_suffix(".json")
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    haystack = Path(ecfg.haystack).read_text() if ecfg.haystack else None
    qa = {"qa_1": ecfg.squad, "qa_2": ecfg.hotpotqa}
    samples = {}
    for length in lengths:
        for t in tasks:
            ss = make_samples(t, tokenizer, length, ecfg.samples, ecfg.seed, haystack, qa.get(t))
            if ss:
                samples[f"{t}@{length}"] = ss
    fill = fill_layers(arch, report, ecfg.fill)
    models = {"teacher": ["full"] * len(fill), "dash": arch["layers"],
              "dash (placement, fill)": ["full" if n == "full" else f for n, f in zip(arch["layers"], fill)]}
    for name, placed in placements(model, tokenizer, arch, ecfg, report, min(lengths)).items():
        models[name] = [placed.get(l, f) for l, f in enumerate(fill)]
    results = {}
    for name, layers in models.items():
        dash.make_hybrid(model, layers, weights, cfg)
        results[name] = run_tasks(model, tokenizer, samples, ecfg.batch_size, name)
        results[name]["layers"] = "".join(dash.CANDIDATES[n].code for n in layers)  # one letter a layer
        print(f"{name:>24}: avg {results[name]['avg']:.1f}")
    rand = [r["avg"] for n, r in results.items() if n.startswith("random-")]
    if rand:
        mean = sum(rand) / len(rand)
        print(f"random placements: mean {mean:.1f}, min {min(rand):.1f}, max {max(rand):.1f}")
    speeds = {}
    if ecfg.speed and device.startswith("cuda"):
        for name in ("teacher", "dash"):
            dash.make_hybrid(model, models[name], weights, cfg)
            for length in lengths:
                speeds[f"{name}@{length}"] = speed(model, length)
    dash.restore_teacher(model)
    out = Path(ecfg.out)
    out.mkdir(parents=True, exist_ok=True)
    md = table({n: {k: v for k, v in r.items()} for n, r in results.items()},
               f"RULER, {ecfg.samples} samples per task, {arch['model']}, K={arch['k']}")
    if speeds:
        md += "\n\n" + table(speeds, "inference: prefill latency, decode speed, peak memory, cache size")
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(dict(config=asdict(ecfg), arch=arch["layers"], results=results,
                                                       speed=speeds, lengths=lengths, tasks=tasks), indent=1))
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return results


def main(argv=None):
    try:
        evaluate(dash.parse_args(argv, EvalConfig, "RULER for a DASH hybrid, the teacher and selector baselines"))
    except (dash.DashError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"eval_ruler: {e}")


if __name__ == "__main__":
    main()
