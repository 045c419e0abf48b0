"""RULER (Hsieh et al. 2024) as published, generated locally: its 13 tasks, templates, haystacks, word pools,
metrics and reporting. It imports nothing of dash: the harness (eval_ruler.py) and dash's closing check use it.

A port of NVIDIA/RULER @ c3f5e3b:
- scripts/synthetic.yaml: the 13 task configs;
- scripts/data/synthetic/constants.py: the task templates, answer prefixes and tokens to generate;
- scripts/data/synthetic/{niah,variable_tracking,common_words_extraction,freq_words_extraction,qa}.py: the
  sample makers, their haystacks, needles, word pools and length search;
- scripts/data/template.py and prepare.py:101: the model template around the task template, counted in the
  length as niah.py:268 counts it (`template`: base, or the tokenizer's chat template);
- scripts/eval/synthetic/constants.py and evaluate.py: postprocessing, string_match_all/part;
- README.md's table: the score at a length is the mean over the tasks, 'Avg.' the mean over the lengths.

    tok = AutoTokenizer.from_pretrained("Qwen/Qwen2.5-3B-Instruct")
    samples = make_samples("niah_single_2", tok, length=4096, n=50, seed=0)   # haystack: the shipped prose
    scores = run_tasks(model, tok, {"niah_single_2@4096": samples})           # {task@len: %, avg@len, avg}

Haystacks (`haystack=`): RULER's essay tasks (niah_single_2/3, niah_multikey_1, niah_multivalue,
niah_multiquery) search Paul Graham's essays (RULER downloads them: scripts/data/synthetic/json/
download_paulgraham_essay.py). Pass that text, as a file or a folder of .txt files, for published comparability.
By default they search data/factbook_prose.txt.gz, 0.86 MB of public-domain English prose (CIA World Factbook,
see data/README.md), roughly 190k tokens before it repeats; "noise" gives the noise sentence.
Words: the wonderwords package's noun, adjective and verb lists, as RULER loads them.

Deviations from RULER, each small and deliberate:
- each sample has its own seed ("{task}/{seed}/{i}"), so a sample does not depend on the length search;
- a sample that comes out too long is regenerated 1% smaller (RULER steps 500 essay words or 25 noise
  sentences, which overshoots badly at short lengths), and drawn anew if it does not fit at the smallest size
  (long CWE words at short lengths); FWE bisects its word count like the other tasks;
- the needle keys of one sample are distinct (a repeated key would make the question ambiguous);
- needle keys are an adjective and a noun drawn independently: RULER's sorted set of all 6.2M pairs, without
  building it;
- sentences are split by a regex instead of nltk's punkt;
- the variable-tracking few-shot example gets at most half the prompt budget (RULER's 500 tokens leave no
  room for the question below ~1K tokens);
- CWE lists longer than the 8,166 wonderwords (past ~32k tokens) take distinct adjective-noun pairs; RULER
  takes words of its english_words.json, a file kept in Git LFS that no package ships;
- `length` counts the tokens of the prompt (template, input and answer prefix); RULER's max_seq_length also
  adds tokens_to_generate, which is subtracted from the budget here as there.
"""

import gzip
import hashlib
import json
import random
import re
import string
import uuid
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Sequence

import wonderwords.random_word
from tqdm.auto import tqdm

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
SYNTHETIC_TASKS: list[str] = [t for t, c in TASKS.items() if c["task"] != "qa"]  # qa needs the user's json files
DEFAULT_TASKS = SYNTHETIC_TASKS  # the name small_model/train.py uses
ESSAY_TASKS: list[str] = [t for t, c in TASKS.items() if c.get("type_haystack") == "essay"]

# ---- templates: RULER's scripts/data/synthetic/constants.py (the task template: input + answer_prefix) ----

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

# ---- words: wonderwords' lists, loaded as RULER loads them (niah.py:97, common_words_extraction.py:72) ----


def _wonderwords(name: str) -> list[str]:
    return sorted(set(wonderwords.random_word._get_words_from_text_file(name)))


WORDS: dict[str, list[str]] = {"adjectives": _wonderwords("adjectivelist.txt"), "nouns": _wonderwords("nounlist.txt"),
                               "verbs": _wonderwords("verblist.txt")}
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
    if kind == "words":  # one of RULER's adjective-noun keys, e.g. "quizzical-harbor"
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

PROSE = Path(__file__).resolve().with_name("data") / "factbook_prose.txt.gz"


@dataclass(frozen=True, eq=False)
class Haystack:
    """The text of the essay tasks. `words` is the corpus as RULER splits its essays (whitespace collapsed, split
    on spaces: niah.py:87); None means RULER's noise sentence. `sha256` is that of the joined text."""
    name: str
    sha256: str | None
    words: list[str] | None

    def describe(self) -> dict:
        return dict(name=self.name, sha256=self.sha256, words=len(self.words) if self.words else None)


def _is(path: Path, kind: str) -> bool:
    try:
        return getattr(path, kind)()
    except OSError:  # e.g. "File name too long": a text passed where a path belongs
        return False


def _read_text(f: Path) -> str:
    try:
        with (gzip.open(f, "rt", encoding="utf-8") if f.suffix == ".gz" else open(f, encoding="utf-8")) as fh:
            return fh.read()
    except (UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise ValueError(f"haystack {f}: not UTF-8 text ({e})")


def _texts(path: Path) -> list[str]:
    """A text file (.gz: gzipped) or a folder's .txt/.txt.gz files, in sorted order (RULER concatenates its
    essay files in sorted order: download_paulgraham_essay.py)."""
    if _is(path, "is_file"):
        return [_read_text(path)]
    if not _is(path, "is_dir"):
        raise ValueError(f"haystack {str(path)[:200]!r}: no such file or folder")
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.name.endswith((".txt", ".txt.gz")))
    if not files:
        raise ValueError(f"haystack folder {path} has no .txt or .txt.gz files")
    return [_read_text(f) for f in files]


def _haystack(name: str, texts: list[str]) -> Haystack:
    text = "\n".join(texts)
    words = re.sub(r"\s+", " ", text).strip().split(" ")
    if words == [""]:
        raise ValueError(f"haystack {name} has no words")
    return Haystack(name, hashlib.sha256(text.encode("utf-8")).hexdigest(), words)


@lru_cache(maxsize=4)
def _haystack_from_path(path: str) -> Haystack:
    name = str(Path(path).relative_to(PROSE.parents[1])) if Path(path) == PROSE else path
    return _haystack(name, _texts(Path(path)))


def load_haystack(source: "Haystack | str | Path | Sequence[str] | None" = None) -> Haystack:
    """The essay haystack: None: the shipped prose; "noise": RULER's noise sentence; a path: a text file or a
    folder of .txt files (Paul Graham's essays for published numbers); a list: the texts themselves."""
    if isinstance(source, Haystack):
        return source
    if source is None:
        source = PROSE
    if isinstance(source, str) and source == "noise":
        return Haystack("noise", None, None)
    if isinstance(source, (str, Path)):
        return _haystack_from_path(str(source))
    return _haystack(f"{len(source)} texts", list(source))


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
        else:  # RULER: words of its english_words.json (LFS, not shipped by any package); here adjective-noun keys
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


# ---- model templates: RULER's scripts/data/template.py, applied as prepare.py:101 does ----

def resolve_template(template: str, tokenizer) -> str:
    """'base' (RULER's default: the task text as it is), 'chat' (the tokenizer's chat template around it) or
    'auto' (chat when the tokenizer has a chat template)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template not in ("base", "chat", "auto"):
        raise ValueError(f"template {template!r}: choose base, chat or auto")
    if template == "chat" and not has_chat:
        raise ValueError("template 'chat' needs a tokenizer with a chat template; this one has none (use base)")
    return ("chat" if has_chat else "base") if template == "auto" else template


def wrap(input: str, answer_prefix: str, tokenizer, template: str) -> str:
    """The prompt the model continues: the model template around the input, then the answer prefix
    (prepare.py:101: model_template.format(task_template=...) + answer_prefix); for 'chat' the input is one
    user turn."""
    if template == "base":
        return input + answer_prefix
    if template != "chat":
        raise ValueError(f"template {template!r}: a sample's template is base or chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": input}], tokenize=False,
                                         add_generation_prompt=True) + answer_prefix


def build_prompt(sample: dict, tokenizer) -> str:
    """The prompt of a sample, in the template its length was measured with."""
    return wrap(sample["input"], sample["answer_prefix"], tokenizer, sample.get("template", "base"))


# ---- sample generation ----

def _fit(tokens: Callable[[int], int], budget: int, min_size: int, task: str) -> int:
    """Largest haystack size whose prompt fits `budget` tokens (`tokens(size)`: the prompt's tokens): RULER's
    bisection, bracketed by doubling (RULER brackets with 3x a probe's tokens-per-unit, which undershoots when
    the probe is small)."""
    fits = lambda size: tokens(size) <= budget
    if not fits(min_size):
        raise ValueError(f"{task}: a {budget}-token prompt budget is too small: the smallest haystack "
                         f"({min_size}) already needs {tokens(min_size)} tokens; use a longer length")
    lo, hi = min_size, 2 * min_size  # invariant once bracketed: lo fits, hi does not
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def make_samples(task: str, tokenizer, length: int, n: int, seed: int = 0,
                 haystack: "Haystack | str | Path | Sequence[str] | None" = None, qa_file: str | None = None,
                 template: str = "auto") -> list[dict]:
    """`n` samples of a RULER task whose prompts (template, input and answer_prefix) fit `length` tokens minus
    the task's tokens_to_generate, measured with `tokenizer`. Deterministic for a seed.

    haystack: the essay tasks' text (see load_haystack; default: the shipped prose).
    qa_file: SQuAD (qa_1) or HotpotQA (qa_2) json in RULER's format, required for those tasks.
    template: base, chat or auto (see resolve_template); its tokens count in the length.
    Each sample: task, index, input, answer_prefix, outputs, length, max_new_tokens, template, haystack. Raises
    ValueError for an unknown task, a missing qa file or a length too short for the task.
    """
    cfg = _task_config(task)
    family = cfg["task"]
    max_new = TEMPLATES[family]["tokens_to_generate"]
    budget = length - max_new
    kind = resolve_template(template, tokenizer)
    count = lambda text: count_tokens(tokenizer, text)
    hay = load_haystack(haystack) if task in ESSAY_TASKS else None
    words = hay.words if hay else None
    if family == "niah":
        gen = partial(_niah, cfg=cfg, words=words, seed=seed)
        min_size = max(cfg["num_needle_k"], cfg["num_needle_q"]) * cfg["num_needle_v"]  # a line per needle
    elif family == "variable_tracking":
        min_size = cfg["num_hops"] + 1  # noise lines to host one chain
        shot = partial(_vt, cfg=cfg, words=words, icl=None)  # RULER's one-shot example, fit to <= 500 tokens
        shot_tokens = lambda size: count("".join(shot(size, random.Random(f"{task}/{seed}/shot"), 0)[:2]))
        icl_size = _fit(shot_tokens, min(500, budget // 2), min_size, task)
        inp, prefix, outs = shot(icl_size, random.Random(f"{task}/{seed}/shot"), 0)
        gen = partial(_vt, cfg=cfg, words=words, icl=inp + prefix + " " + " ".join(outs) + "\n")
    elif family == "common_words_extraction":
        gen, min_size = partial(_cwe, cfg=cfg, length=length, seed=seed), cfg["num_cw"] + 1
    elif family == "freq_words_extraction":
        gen = partial(_fwe, cfg=cfg, vocab_size=max(budget // 50, 5), seed=seed)  # RULER: budget // 50
        min_size = 64
    else:  # qa
        if qa_file is None:
            raise ValueError(f"{task} needs RULER's {cfg['dataset']} json (qa_file=PATH; eval_ruler.py: "
                             f"--{cfg['dataset']} PATH)")
        qas, docs = _read_qa(qa_file, cfg["dataset"])
        gen = partial(_qa, qas=qas, docs=docs, seed=seed)
        min_size = max(len(q["context"]) for q in qas[:max(n, 1)])
    prompt_tokens = lambda inp, prefix: count(wrap(inp, prefix, tokenizer, kind))
    size = _fit(lambda size: prompt_tokens(*gen(size, random.Random(f"{task}/{seed}/probe"), 0)[:2]), budget,
                min_size, task)

    samples = []
    for i in range(n):
        for attempt in range(20):  # draws that do not fit even at the smallest size are drawn anew
            name = f"{task}/{seed}/{i}" + (f"/{attempt}" if attempt else "")
            s = size
            while s >= min_size:  # the probe fit; a sample with longer draws may not, so shrink it by 1% steps
                inp, prefix, outs = gen(s, random.Random(name), i)
                m = prompt_tokens(inp, prefix)
                if m <= budget:
                    break
                s -= max(1, size // 100)
            if m <= budget:
                break
        else:
            raise ValueError(f"{task}: sample {i} does not fit {budget} tokens in 20 draws; use a longer length")
        samples.append(dict(task=task, index=i, input=inp, answer_prefix=prefix, outputs=list(outs), length=m,
                            max_new_tokens=max_new, template=kind, haystack=hay.name if hay else None))
    return samples


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


# ---- running a model: greedy generation (RULER: scripts/config_models.sh, TEMPERATURE="0.0" # greedy) ----

def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of `prompts` by an HF causal LM, with its cache, batched with left padding.
    (HF's generate runs without gradients.)"""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def run_tasks(model, tokenizer, samples: dict[str, list[dict]], batch_size: int = 8, desc: str = "") -> dict:
    """RULER's scores (%) of one model: per 'task@length' key of `samples`, then RULER's averages."""
    scores = {}
    for key, ss in tqdm(samples.items(), desc=desc, leave=False):
        preds = generate(model, tokenizer, [build_prompt(s, tokenizer) for s in ss], ss[0]["max_new_tokens"],
                         batch_size)
        scores[key] = score(ss[0]["task"], preds, [s["outputs"] for s in ss])
    return {**scores, **averages(scores)}


# ---- reporting: RULER's README table ----

def averages(scores: dict[str, float]) -> dict[str, float]:
    """RULER's averages of 'task@length' scores: 'avg@L', the mean over the tasks at length L (a column of
    RULER's table), and 'avg', the mean of those over the lengths (its 'Avg.').

    >>> averages({"niah_single_1@4096": 100.0, "cwe@4096": 50.0, "niah_single_1@8192": 80.0})
    {'avg@4096': 75.0, 'avg@8192': 80.0, 'avg': 77.5}
    """
    by_length: dict[str, list[float]] = {}
    for key, value in scores.items():
        task, _, length = key.rpartition("@")
        if task not in TASKS or not length.isdigit():
            raise ValueError(f"averages: {key!r} is not 'task@length' with a RULER task")
        by_length.setdefault(length, []).append(value)
    if not by_length:
        raise ValueError("averages: no scores")
    out = {f"avg@{L}": round(sum(v) / len(v), 2) for L, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))}
    out["avg"] = round(sum(out.values()) / len(out), 2)
    return out


def coverage(tasks: Sequence[str]) -> str:
    """What the averages cover: 'all 13 RULER tasks', or 'n of 13 RULER tasks (without ...)'."""
    missing = [t for t in TASKS if t not in tasks]
    if not missing:
        return f"all {len(TASKS)} RULER tasks"
    return f"{len(TASKS) - len(missing)} of {len(TASKS)} RULER tasks (without {', '.join(missing)})"


def number(v: float) -> str:
    """Scores with one decimal; small measurements (seconds, GiB) with three significant digits."""
    return f"{v:.1f}" if v == 0 or abs(v) >= 1 else f"{v:.3g}"


def table(rows: dict[str, dict], title: str = "") -> str:
    """A markdown table: one row per model, one column per key of the first row."""
    cols = list(next(iter(rows.values())))
    lines = [f"**{title}**", ""] if title else []
    lines += ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(number(r[c]) if isinstance(r[c], float) else str(r[c])
                                                for c in cols) + " |")
    return "\n".join(lines)
