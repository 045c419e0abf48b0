"""RULER task generation and metrics (eval_ruler.py's task section), on CPU with a small BPE tokenizer."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval_ruler as er  # noqa: E402

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
    assert er.DEFAULT_TASKS == er.NIAH_TASKS + ["vt", "cwe", "fwe"]
    assert {t: er.TEMPLATES[c["task"]]["tokens_to_generate"] for t, c in er.TASKS.items()} == {
        **{t: 128 for t in er.NIAH_TASKS}, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32, "qa_2": 32}
    assert er.TASKS["niah_multikey_3"] == dict(task="niah", type_haystack="needle", type_needle_k="uuids",
                                               type_needle_v="uuids", num_needle_k=1, num_needle_v=1, num_needle_q=1)
    assert er.TASKS["cwe"] == dict(task="common_words_extraction", freq_cw=30, freq_ucw=3, num_cw=10)
    assert len(er.DEPTHS) == 40 and er.DEPTHS[:3] == [0, 3, 5] and er.DEPTHS[-1] == 100
    assert math.isclose(er._zeta(2.0), math.pi ** 2 / 6, rel_tol=1e-9)
    assert min(len(v) for v in er.WORDS.values()) > 150


def test_unknown_task_names_allowed(tok):
    with pytest.raises(ValueError, match=r"unknown RULER task 'niah_single_9'.*niah_single_1.*fwe"):
        er.make_samples("niah_single_9", tok, 1024, 1)
    with pytest.raises(ValueError, match="allowed"):
        er.score("nope", ["a"], [["a"]])


# ---- generation ----

@pytest.mark.parametrize("task", er.DEFAULT_TASKS)
def test_deterministic_seeded_and_answers_in_context(task, tok):
    a = er.make_samples(task, tok, 1024, 3, seed=0, haystack=CORPUS)
    assert a == er.make_samples(task, tok, 1024, 3, seed=0, haystack=CORPUS)
    b = er.make_samples(task, tok, 1024, 3, seed=1, haystack=CORPUS)
    assert [s["input"] for s in a] != [s["input"] for s in b]
    assert len({s["input"] for s in a}) == 3  # samples of one call differ too
    for s in a + b:
        assert s["outputs"] and all(o in context_of(s) for o in s["outputs"]), (task, s["outputs"])
        assert s["task"] == task and s["max_new_tokens"] == er.TEMPLATES[er.TASKS[task]["task"]]["tokens_to_generate"]


@pytest.mark.parametrize("length,tasks", [(512, er.NIAH_TASKS + ["fwe"]), (1024, er.DEFAULT_TASKS)])
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
    assert len(set(keys)) == 5000 and all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
    assert keys == er._distinct("words", 5000, random.Random(0))
    with pytest.raises(ValueError, match="unknown needle type 'dates'"):
        er._draw("dates", random.Random(0))


def test_essay_without_haystack_warns_and_uses_noise(tok, tmp_path):
    with pytest.warns(UserWarning, match="no essay haystack"):
        s = er.make_samples("niah_single_2", tok, 1024, 1)[0]
    assert er.NOISE in s["input"]
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS[0])
    assert "Zanzibar" in er.make_samples("niah_single_2", tok, 1024, 1, haystack=path)[0]["input"]
    with pytest.raises(ValueError, match="no file at"):
        er.make_samples("niah_single_2", tok, 1024, 1, haystack=str(tmp_path / "missing.txt"))


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
    listed = re.findall(r"\d+\. (\w+)", cwe["input"].split("\n")[-2])  # the question's list
    counts = {w: listed.count(w) for w in listed}
    assert all(counts[w] == 6 for w in cwe["outputs"]) and sorted(set(counts.values())) == [1, 6]
    fwe = er.make_samples("fwe", tok, 1024, 1, seed=0)[0]
    coded = fwe["input"].split("coded words. ")[1].split("\n")[0].split()
    top = sorted({w for w in coded if w != "..."}, key=coded.count, reverse=True)[:3]
    assert fwe["outputs"] == top and coded.count(top[0]) > coded.count(top[1]) > coded.count(top[2])


def test_answer_text_scores_full_marks(tok):
    for task in er.DEFAULT_TASKS:
        samples = er.make_samples(task, tok, 1024, 2, seed=5, haystack=CORPUS)
        preds = [er.answer_text(s) for s in samples]
        assert er.score(task, preds, [s["outputs"] for s in samples]) == 100.0, task


def test_qa_needs_file(tok):
    with pytest.warns(UserWarning, match="qa_1 skipped.*qa_file"):
        assert er.make_samples("qa_1", tok, 1024, 2) == []


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

def test_build_prompt_base_and_chat(tok, chat_tok):
    s = er.make_samples("niah_single_1", tok, 1024, 1, seed=0)[0]
    assert er.build_prompt(s, tok) == s["input"] + s["answer_prefix"]
    chat = er.build_prompt(s, chat_tok)
    assert chat == "<|im_start|>user\n" + s["input"] + "<|im_end|>\n<|im_start|>assistant\n" + s["answer_prefix"]
    assert er.build_prompt(s, chat_tok, chat=False) == s["input"] + s["answer_prefix"]
    with pytest.raises(ValueError, match="chat template"):
        er.build_prompt(s, tok, chat=True)


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
