"""small_model/train.py: the CPU smoke mode trains, evaluates and saves a directory that loads back."""

import gzip
import importlib.util
import json
import random
import sys
import unicodedata
import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import ruler as er  # noqa: E402

spec = importlib.util.spec_from_file_location("small_model_train", ROOT / "small_model" / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("small_model")
    metrics = train.main(["--out", str(out), "--device", "cpu", "--tiny", "--steps", "3"])
    return out, metrics


def test_smoke_run_writes_everything(smoke):
    out, metrics = smoke
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                               "tokenizer.json", "tokenizer_config.json", "metrics.json",
                                               "search_data.jsonl.gz"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == metrics["steps"] == 3 and saved["tokens"] == 3 * 2 * 1024
    assert [c["step"] for c in saved["loss_curve"]] == [1, 2, 3] and len(saved["evals"]) == 3
    assert set(er.DEFAULT_TASKS) <= set(saved["final_eval"]) and "target_avg" in saved["final_eval"]
    assert saved["config"]["tiny"] and saved["data"]["heldout_files"] > 0
    lines = [json.loads(line) for line in gzip.open(out / "search_data.jsonl.gz", "rt")]
    assert all(set(d) == {"text"} and d["text"] for d in lines)
    assert saved["data"]["search_data_tokens"] >= 4000


def test_saved_dir_loads_back(smoke):
    out, _ = smoke
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.bfloat16
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (2, 64, 2, True)
    assert cfg.vocab_size == len(tok) == 2048 and tok.eos_token == "<|endoftext|>" and not tok.chat_template
    assert tok.padding_side == "left"  # batched generation
    # AutoTokenizer (as Qwen2Tokenizer) must encode exactly like the tokenizer the model was trained with,
    # unnormalized (decomposed u + diaeresis) text included
    raw = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    text = er.build_prompt(er.make_samples("niah_multikey_3", raw, 1024, 1)[0], raw) + " u\u0308nïcode\tTAB  "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == raw(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    logits = model(input_ids=torch.tensor([ids[:200]])).logits
    assert logits.shape == (1, 200, 2048) and torch.isfinite(logits).all()
    out_ids = model.generate(torch.tensor([ids[:50]]), max_new_tokens=3, do_sample=False)
    assert out_ids.shape == (1, 53)


def test_mixture_document_is_prompt_answer_eos(smoke):
    out, _ = smoke
    tok = AutoTokenizer.from_pretrained(out)
    cfg = train.parse_config(["--tiny", "--answer-weight", "7"])
    code = train.encode_stream(tok, ["def f(x):\n    return x + 1\n" * 400])
    mix = train.Mixture(cfg, tok, code, [er.NOISE * 40], seed=0)
    s = er.make_samples("niah_multivalue", tok, 1024, 1, seed=9, haystack=[er.NOISE * 40])[0]
    pending = {(t, essay): [s] * 8 for t in er.TASKS for essay in (False, True)}  # whatever task is drawn
    ids, w = mix.document(random.Random(0), pending)
    prompt = tok.encode(er.build_prompt(s, tok), add_special_tokens=False)
    answer = tok.encode(er.answer_text(s), add_special_tokens=False) + [tok.eos_token_id]
    assert ids == prompt + answer and w == [1.0] * len(prompt) + [7.0] * len(answer)
    assert all(o in tok.decode(answer) for o in s["outputs"])


def test_mixture_rows(smoke):
    out, _ = smoke
    tok = AutoTokenizer.from_pretrained(out)
    cfg = train.parse_config(["--tiny", "--synthetic-frac", "0.7", "--answer-weight", "7"])
    code = train.encode_stream(tok, ["def f(x):\n    return x + 1\n" * 400])
    rows = iter(train.Mixture(cfg, tok, code, [er.NOISE * 40], seed=0))
    kinds = []
    for _ in range(12):
        x, y, w, code_only = next(rows)
        assert x.shape == y.shape == w.shape == (1024,) and torch.equal(x[1:], y[:-1])
        kinds.append(code_only)
        if code_only:
            assert torch.all(w == 1)
            continue
        weighted = (w == 7).nonzero().flatten()  # the answer and its EOS: one span right after the prompt
        assert weighted.numel() > 1 and torch.equal(weighted, torch.arange(weighted[0], weighted[-1] + 1))
        assert y[weighted[-1]] == tok.eos_token_id
        prompt = tok.decode(torch.cat([x[:1], y[:weighted[0]]]))
        assert prompt.endswith(("is", "are", "are:", "are: ")), prompt[-40:]
    assert 0 < sum(kinds) < 12  # both kinds of row occur


def test_config_flags():
    cfg = train.parse_config(["--tiny", "--hidden", "32", "--no-compile"])
    assert (cfg.hidden, cfg.n_layer, cfg.compile, cfg.extra_code) == (32, 2, False, "")  # explicit flags win
    assert train.parse_config([]) == train.TrainConfig()
    with pytest.raises(SystemExit):
        train.parse_config(["--hiden", "32"])


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, warmup_steps=10, min_lr_frac=0.1)
    assert train.lr_at(0, 0.0, cfg) == pytest.approx(0.1) and train.lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    assert train.lr_at(50, 0.5, cfg) == pytest.approx(0.55) and train.lr_at(99, 1.0, cfg) == pytest.approx(0.1)


def test_python_texts_split_is_fixed_and_disjoint(tmp_path):
    for i in range(60):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.py").write_text("skipped = True\n")
    tr, ho = train.python_texts(tmp_path, heldout_every=5)
    assert (tr, ho) == train.python_texts(tmp_path, heldout_every=5)
    assert len(tr) + len(ho) == 60 and not set(tr) & set(ho)
    assert set(ho) == {f"x = {i}\n" for i in range(60) if zlib.crc32(f"m{i}.py".encode()) % 5 == 0}  # by name hash
    assert "skipped = True\n" not in tr + ho
    tr2, ho2 = train.python_texts(tmp_path, heldout_every=5, max_files=30)
    assert set(tr2) <= set(tr) and set(ho2) <= set(ho) and len(tr2) + len(ho2) == 30


def test_a_task_that_does_not_fit_is_drawn_again(smoke, monkeypatch):
    """About a third of cwe's wonderwords draws do not fit 1024 tokens of the shipped tokenizer: the document is drawn
    again with a new seed, and a task that never fits still ends with make_samples' error."""
    out, _ = smoke
    tok = AutoTokenizer.from_pretrained(out)
    cfg = train.parse_config(["--tiny"])
    mix = train.Mixture(cfg, tok, train.encode_stream(tok, ["x = 1\n" * 400]), [er.NOISE * 40], seed=0)
    real, seeds = er.make_samples, []

    def make_samples(task, *args, seed, **kw):
        seeds.append(seed)
        if len(seeds) < 3:
            raise ValueError(f"{task}: too small")
        return real("niah_single_1", *args, seed=seed, **kw)
    monkeypatch.setattr(train.er, "make_samples", make_samples)
    ids, _ = mix.document(random.Random(0), {})
    assert ids and len(set(seeds)) == 3
    monkeypatch.setattr(train.er, "make_samples", lambda task, *a, **k: (_ for _ in ()).throw(ValueError("never")))
    with pytest.raises(ValueError, match="never"):
        mix.document(random.Random(0), {})


def test_more_text_writes_new_documents_after_the_shipped_file(tmp_path, monkeypatch, capsys):
    """small_model/more_text.py: the shipped file first, unchanged, then documents of new seeds, each file on its own
    part of the code."""
    spec = importlib.util.spec_from_file_location("more_text", ROOT / "small_model" / "more_text.py")
    more = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(more)
    monkeypatch.setitem(sys.modules, "more_text", more)  # the worker processes find shard() by its module's name
    code = [f"def f{i}(x):\n    return x + {i}\n" * 100 for i in range(40)]  # haystacks need 2000 characters
    monkeypatch.setattr(more.train, "python_texts", lambda root, *a, **k: (code, code[:2]))
    record = more.main(["--out", str(tmp_path), "--tokens", "12000", "--workers", "2", "--extra-code-mb", "0"])
    assert (tmp_path / "0-search_data.jsonl.gz").read_bytes() == (ROOT / "small_model" / "search_data.jsonl.gz"
                                                                   ).read_bytes()
    assert record["new_tokens"] >= 12000 and record["seeds"] == [1, 2]
    shipped = {json.loads(line)["text"] for line in gzip.open(tmp_path / "0-search_data.jsonl.gz", "rt")}
    new = [[json.loads(line)["text"] for line in gzip.open(tmp_path / f, "rt")] for f in record["files"]]
    assert all(new) and not set(new[0]) & set(new[1]) and not (set(new[0]) | set(new[1])) & shipped
    assert any("needle" in t or "magic" in t for t in new[0])  # RULER-format documents, not code alone
    with pytest.raises(SystemExit):
        more.main(["--out", str(tmp_path), "--workers", "0"])
    assert capsys.readouterr().err.splitlines()[-1].endswith("--workers 0, --tokens 20000000: need 1 <= workers <= tokens")
