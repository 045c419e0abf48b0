"""ruler.py, RULER's port: task generation, haystacks, templates, metrics and averages, on CPU with a small BPE
tokenizer (no model)."""

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ruler as er  # noqa: E402  (er: the name these tests had when RULER lived in eval_ruler)

QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CORPUS = ["Tulips bloom in spring. Zanzibar merchants trade cloves! Do owls sleep by day? " * 3,
          "Glaciers carve valleys slowly. The archive keeps every letter."]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def bare() -> Tokenizer:
    """A byte-level BPE like Qwen2's (digits split one by one), trained in well under a second."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [t["template"] + t["answer_prefix"] for t in er.TEMPLATES.values()] * 20 + [er.NOISE] * 20
    texts += [" ".join(v) for v in er.WORDS.values()] * 5 + CORPUS
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return tok


@pytest.fixture(scope="module")
def tok(bare) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def chat_tok(bare) -> PreTrainedTokenizerFast:
    t = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|endoftext|>")
    t.chat_template = CHAT_TEMPLATE
    return t


def context_of(sample: dict) -> str:
    return sample["input"]  # the answer prefix is kept apart, so any answer found here came from the context


# ---- configs ----

def test_configs_match_ruler():
    assert er.NIAH_TASKS == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                             "niah_multikey_2", "niah_multikey_3", "niah_multivalue", "niah_multiquery"]
    assert er.SYNTHETIC_TASKS == er.NIAH_TASKS + ["vt", "cwe", "fwe"] and len(er.TASKS) == 13
    assert er.ESSAY_TASKS == ["niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"]
    assert {t: er.TEMPLATES[c["task"]]["tokens_to_generate"] for t, c in er.TASKS.items()} == {
        **{t: 128 for t in er.NIAH_TASKS}, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
    assert er.TASKS["niah_multikey_3"] == dict(task="niah", type_haystack="needle", type_needle_k="uuids",
                                               type_needle_v="uuids", num_needle_k=1, num_needle_v=1, num_needle_q=1)
    assert er.TASKS["cwe"] == dict(task="common_words_extraction", freq_cw=30, freq_ucw=3, num_cw=10)
    assert len(er.DEPTHS) == 40 and er.DEPTHS[:3] == [0, 3, 5] and er.DEPTHS[-1] == 100
    assert math.isclose(er._zeta(2.0), math.pi ** 2 / 6, rel_tol=1e-9)
    # wonderwords' lists, as RULER loads them (8,166 distinct words in wonderwords 3.0.1, 6.2M key pairs)
    assert len(er.CWE_WORDS) > 8000 and len(er.WORDS["adjectives"]) * len(er.WORDS["nouns"]) > 6_000_000
    assert {"quizzical", "aardvark"} <= set(er.CWE_WORDS)


def test_unknown_task_names_allowed(tok):
    with pytest.raises(ValueError, match=r"unknown RULER task 'niah_single_9'.*niah_single_1.*fwe"):
        er.make_samples("niah_single_9", tok, 1024, 1)
    with pytest.raises(ValueError, match="allowed"):
        er.score("nope", ["a"], [["a"]])


# ---- generation ----

@pytest.mark.parametrize("task", er.SYNTHETIC_TASKS)
def test_deterministic_seeded_and_answers_in_context(task, tok):
    a = er.make_samples(task, tok, 1024, 3, seed=0, haystack=CORPUS)
    assert a == er.make_samples(task, tok, 1024, 3, seed=0, haystack=CORPUS)
    b = er.make_samples(task, tok, 1024, 3, seed=1, haystack=CORPUS)
    assert [s["input"] for s in a] != [s["input"] for s in b]
    assert len({s["input"] for s in a}) == 3  # samples of one call differ too
    for s in a + b:
        assert s["outputs"] and all(o in context_of(s) for o in s["outputs"]), (task, s["outputs"])
        assert s["task"] == task and s["max_new_tokens"] == er.TEMPLATES[er.TASKS[task]["task"]]["tokens_to_generate"]


@pytest.mark.parametrize("length,tasks", [(512, er.NIAH_TASKS + ["fwe"]), (1024, er.SYNTHETIC_TASKS)])
def test_length_fits_budget(length, tasks, tok):
    for task in tasks:
        for s in er.make_samples(task, tok, length, 4, seed=3, haystack=CORPUS):
            budget = length - s["max_new_tokens"]
            assert s["length"] == er.count_tokens(tok, s["input"] + s["answer_prefix"])
            # within one haystack unit (a uuid needle line is the largest, < 100 tokens) or 10%
            assert budget - max(0.1 * budget, 100) <= s["length"] <= budget, (task, length, s["length"])


def test_length_too_short_is_clear(tok):
    with pytest.raises(ValueError, match="niah_single_1: a 22-token prompt budget is too small"):
        er.make_samples("niah_single_1", tok, 150, 1)


def test_count_tokens_accepts_bare_tokenizer(bare, tok):
    text = "One of the special magic numbers for calm-lake is: 1234567."
    assert er.count_tokens(bare, text) == er.count_tokens(tok, text) == len(tok(text)["input_ids"])


def test_niah_wording_and_needles(tok):
    s = er.make_samples("niah_single_1", tok, 1024, 1, seed=0)[0]
    assert s["input"].startswith("A special magic number is hidden within the following text.")
    key = re.search(r"for (\S+) is: (\d{7})\.", s["input"]).group(1)
    assert s["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    assert s["input"].endswith(f"What is the special magic number for {key} mentioned in the provided text?")
    assert s["input"].count(er.NOISE) > 20 and re.fullmatch(r"\d{7}", s["outputs"][0])

    mv = er.make_samples("niah_multivalue", tok, 1024, 1, seed=0, haystack=CORPUS)[0]
    assert mv["input"].startswith("Some special magic numbers are hidden") and len(mv["outputs"]) == 4
    assert "Zanzibar" in mv["input"] and er.NOISE not in mv["input"]  # the essay haystack is the corpus
    mq = er.make_samples("niah_multiquery", tok, 1024, 1, seed=0, haystack=CORPUS)[0]
    assert len(mq["outputs"]) == 4 and mq["answer_prefix"].count(", and ") == 1
    mk = er.make_samples("niah_multikey_1", tok, 1024, 1, seed=0, haystack=CORPUS)[0]
    assert mk["input"].count("One of the special magic number") == 4 and len(mk["outputs"]) == 1
    mk2 = er.make_samples("niah_multikey_2", tok, 1024, 1, seed=0)[0]
    keys = re.findall(r"numbers for (\S+) is:", mk2["input"])
    assert len(keys) > 20 and len(set(keys)) == len(keys)  # distractor needles, every key distinct
    mk3 = er.make_samples("niah_multikey_3", tok, 1024, 1, seed=0)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", mk3["outputs"][0])


def test_draws_distinct_and_seeded():
    import random
    keys = er._distinct("words", 5000, random.Random(0))  # ~85 repeats expected if drawn with replacement
    adjs, nouns = set(er.WORDS["adjectives"]), set(er.WORDS["nouns"])
    pair = lambda k: any(k[:j] in adjs and k[j + 1:] in nouns for j, c in enumerate(k) if c == "-")
    assert len(set(keys)) == 5000 and all(map(pair, keys))  # RULER's adjective-noun keys, e.g. "tangible-lender"
    assert keys == er._distinct("words", 5000, random.Random(0))
    with pytest.raises(ValueError, match="unknown needle type 'dates'"):
        er._draw("dates", random.Random(0))


def test_haystacks_default_prose_noise_file_folder(tok, tmp_path):
    s = er.make_samples("niah_single_2", tok, 1024, 1)[0]  # default: the shipped public-domain prose
    assert s["haystack"] == "data/factbook_prose.txt.gz" and er.NOISE not in s["input"]
    assert "Algerians fought through much of the 1950s" in s["input"]  # the corpus' first paragraph
    prose = er.load_haystack()
    assert len(prose.words) > 100_000 and prose.sha256 == er.load_haystack(er.PROSE).sha256
    noise = er.make_samples("niah_single_2", tok, 1024, 1, haystack="noise")[0]
    assert noise["haystack"] == "noise" and noise["input"].count(er.NOISE) > 10
    assert er.make_samples("niah_single_1", tok, 1024, 1)[0]["haystack"] is None  # a noise task: no essay
    (tmp_path / "b.txt").write_text(CORPUS[1])
    (tmp_path / "a.txt").write_text(CORPUS[0])
    (tmp_path / "notes.md").write_text("Ignored: not a .txt file.")
    one = er.load_haystack(tmp_path / "a.txt")
    both = er.load_haystack(tmp_path)
    assert one.name == str(tmp_path / "a.txt") and "Zanzibar" in one.words and "Glaciers" not in one.words
    assert both.words[:3] == ["Tulips", "bloom", "in"] and "Glaciers" in both.words and "Ignored:" not in both.words
    assert both.sha256 == hashlib.sha256((CORPUS[0] + "\n" + CORPUS[1]).encode()).hexdigest()  # sorted, joined
    assert "Zanzibar" in er.make_samples("niah_single_2", tok, 1024, 1, haystack=str(tmp_path))[0]["input"]


def test_haystack_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        er.load_haystack(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="no such file or folder"):  # a text where a path belongs: no OSError
        er.load_haystack(CORPUS[0] * 20)
    with pytest.raises(ValueError, match="has no .txt or .txt.gz files"):
        er.load_haystack(tmp_path)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="has no words"):
        er.load_haystack(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        er.load_haystack(tmp_path / "latin1.txt")


def test_vt_cwe_fwe_formats(tok):
    vt = er.make_samples("vt", tok, 1024, 1, seed=0)[0]
    assert vt["input"].count("Memorize and track the chain(s)") == 2  # RULER's one-shot example first
    value = re.search(r"assigned the value (\d{5}) in the text above\.$", vt["input"]).group(1)
    assert f"VAR {vt['outputs'][0]} = {value}" in vt["input"] and len(vt["outputs"]) == 5
    for a, b in zip(vt["outputs"], vt["outputs"][1:]):
        assert f"VAR {b} = VAR {a} " in vt["input"]
    assert vt["answer_prefix"].endswith(f"5 variables are assigned the value {value}, they are: ")

    cwe = er.make_samples("cwe", tok, 1024, 1, seed=0)[0]
    shot, question = cwe["input"].split("\n", 3)[2:4]  # one-shot example: its list, question and answer
    assert shot.startswith("Question: What are the 10 most common words") and "are: 1. " in shot
    assert question.startswith("Below is a numbered list of words.")
    listed = re.findall(r"\d+\. (.+?)(?= \d+\. |$)", cwe["input"].split("\n")[-2])  # wonderwords: "cross-stitch"
    counts = {w: listed.count(w) for w in listed}
    assert all(counts[w] == 6 for w in cwe["outputs"]) and sorted(set(counts.values())) == [1, 6]
    fwe = er.make_samples("fwe", tok, 1024, 1, seed=0)[0]
    coded = fwe["input"].split("coded words. ")[1].split("\n")[0].split()
    top = sorted({w for w in coded if w != "..."}, key=coded.count, reverse=True)[:3]
    assert fwe["outputs"] == top and coded.count(top[0]) > coded.count(top[1]) > coded.count(top[2])


def test_answer_text_scores_full_marks(tok):
    for task in er.SYNTHETIC_TASKS:
        samples = er.make_samples(task, tok, 1024, 2, seed=5, haystack=CORPUS)
        preds = [er.answer_text(s) for s in samples]
        assert er.score(task, preds, [s["outputs"] for s in samples]) == 100.0, task


def test_qa_needs_file(tok):
    with pytest.raises(ValueError, match="qa_1 needs RULER's squad json.*--squad"):
        er.make_samples("qa_1", tok, 1024, 2)


def test_qa_squad_and_hotpotqa(tok, tmp_path):
    paras = [{"context": f"Paragraph {j} says the capital of land {j} is city {j}.",
              "qas": [{"question": f"What is the capital of land {j}?", "is_impossible": False,
                       "answers": [{"text": f"city {j}"}]}]} for j in range(40)]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": paras[:20]}, {"paragraphs": paras[20:]}]}))
    samples = er.make_samples("qa_1", tok, 1024, 3, seed=0, qa_file=str(squad))
    for s in samples:
        assert s["answer_prefix"] == " Answer:" and s["max_new_tokens"] == 32
        j = int(re.search(r"capital of land (\d+)\?$", s["input"]).group(1))
        assert s["outputs"] == [f"city {j}"] and paras[j]["context"] in s["input"]
    assert "Document 1:\n" in samples[0]["input"] and samples[0]["input"].count("Document ") > 5
    hotpot = tmp_path / "hotpot.json"
    hotpot.write_text(json.dumps([{"question": f"Who built tower {j}?", "answer": f"Mason {j}",
                                   "context": [[f"Tower {j}", [f"Mason {j} built tower {j}.", " It is tall."]],
                                               [f"Town {j}", ["A town."]]]} for j in range(30)]))
    s = er.make_samples("qa_2", tok, 1024, 1, seed=0, qa_file=str(hotpot))[0]
    assert s["outputs"] == ["Mason 0"] and "Tower 0\nMason 0 built tower 0. It is tall." in s["input"]


# ---- prompts ----

def test_templates_base_chat_auto(tok, chat_tok):
    s = er.make_samples("niah_single_1", tok, 1024, 1, seed=0)[0]
    assert s["template"] == "base" and er.build_prompt(s, tok) == s["input"] + s["answer_prefix"]
    c = er.make_samples("niah_single_1", chat_tok, 1024, 1, seed=0)[0]  # auto: the tokenizer has a template
    assert c["template"] == "chat"
    assert er.build_prompt(c, chat_tok) == ("<|im_start|>user\n" + c["input"] + "<|im_end|>\n<|im_start|>assistant\n"
                                            + c["answer_prefix"])
    assert er.make_samples("niah_single_1", chat_tok, 1024, 1, seed=0, template="base")[0] == s
    with pytest.raises(ValueError, match="template 'chat' needs a tokenizer with a chat template"):
        er.make_samples("niah_single_1", tok, 1024, 1, template="chat")
    with pytest.raises(ValueError, match="template 'instruct': choose base, chat or auto"):
        er.make_samples("niah_single_1", tok, 1024, 1, template="instruct")


@pytest.mark.parametrize("task", ["niah_single_2", "vt", "cwe"])
def test_template_tokens_count_in_the_length(task, tok, chat_tok):
    base = er.make_samples(task, chat_tok, 1024, 2, seed=0, template="base")
    chat = er.make_samples(task, chat_tok, 1024, 2, seed=0, template="chat")
    wrapper = er.count_tokens(chat_tok, er.wrap("", "", chat_tok, "chat"))
    assert wrapper >= 10  # <|im_start|>user ... <|im_start|>assistant
    for b, c in zip(base, chat):
        assert c["length"] == er.count_tokens(chat_tok, er.build_prompt(c, chat_tok)) <= 1024 - c["max_new_tokens"]
        # the template's tokens came out of the haystack: the chat input is shorter by about the wrapper
        assert er.count_tokens(chat_tok, c["input"]) < er.count_tokens(chat_tok, b["input"]) - wrapper // 2


# ---- metrics: RULER's formulas ----

def test_string_match_all_and_part():
    preds = ["The numbers are 123 and 456.", "nothing here", "only 777"]
    refs = [["123", "456"], ["789"], ["777", "888"]]
    assert er.string_match_all(preds, refs) == round((1 + 0 + 0.5) / 3 * 100, 2) == 50.0
    assert er.string_match_part(preds, refs) == round((1 + 0 + 1) / 3 * 100, 2) == 66.67
    assert er.string_match_all(["HeLLo World"], [["hello", "WORLD"]]) == 100.0  # case-insensitive
    assert er.string_match_all(["a", "b", "c"], [["a"], ["x"], ["y"]]) == 33.33  # rounded to 2 places
    with pytest.raises(ValueError, match="as many predictions as references"):
        er.string_match_all(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        er.string_match_part([], [])


def test_postprocess_and_score_pick_ruler_metric():
    assert er.postprocess_pred("  1234567\x00\tnext \n") == "1234567\n\nnext"
    assert er.postprocess_pred(" 42\nmore text") == "42\nmore text"  # RULER keeps text after a newline
    assert er.postprocess_pred("a STOP b", stop=["STOP"]) == "a"
    refs = [["paris", "london"]]
    assert er.score("qa_1", ["Paris"], refs) == 100.0  # string_match_part
    assert er.score("niah_multivalue", ["Paris"], refs) == 50.0  # string_match_all
    assert er.score("vt", [" \x00AB\x01CD"], [["ab", "cd"]]) == 100.0


# ---- reporting: RULER's averages ----

def test_averages_per_length_then_over_lengths():
    scores = {"niah_single_1@4096": 100.0, "vt@4096": 50.0, "cwe@4096": 30.0,
              "niah_single_1@16384": 90.0, "vt@16384": 10.0, "cwe@16384": 20.0, "niah_single_1@8192": 70.0}
    assert er.averages(scores) == {"avg@4096": 60.0, "avg@8192": 70.0, "avg@16384": 40.0, "avg": 56.67}
    # not the plain mean over task@length entries (52.86): every length weighs the same
    assert round(sum(scores.values()) / len(scores), 2) == 52.86
    with pytest.raises(ValueError, match="'avg' is not 'task@length'"):
        er.averages({"avg": 1.0})


def test_coverage_says_how_many_of_13():
    assert er.coverage(er.SYNTHETIC_TASKS) == "11 of 13 RULER tasks (without qa_1, qa_2)"
    assert er.coverage(list(er.TASKS)) == "all 13 RULER tasks"
