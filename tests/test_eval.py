"""The harness, eval_ruler.py: selectors, published placements and the CLI (RULER itself: test_ruler_tasks.py)."""
import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import dash
import eval_ruler as er
import ruler
from conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_uniform_is_hybrid_distillations_uniform():
    for K, layers in er.HYBRID_DISTILLATION["uniform"].items():
        assert er.uniform(36, K) == layers
    assert er.uniform(8, 2) == [0, 4] and er.uniform(8, 5) == [0, 1, 3, 4, 6]


def test_published_placements_are_well_formed():
    for sel, by_k in er.HYBRID_DISTILLATION.items():
        assert set(by_k) == {5, 9, 12, 18}, sel
        for K, layers in by_k.items():
            assert len(set(layers)) == K and layers == sorted(layers) and 0 <= layers[0] and layers[-1] < 36
    for sel in ("kl_guided", "ar", "mse", "ppl", "ar_multihop"):  # rankings: each K is a prefix of the next
        ks = sorted(er.HYBRID_DISTILLATION[sel])
        assert all(set(er.HYBRID_DISTILLATION[sel][a]) < set(er.HYBRID_DISTILLATION[sel][b]) for a, b in zip(ks, ks[1:]))
    assert not set(er.JET_NEMOTRON["full"]) & set(er.JET_NEMOTRON["swa"])


def test_top_and_fill():
    assert er.top([0.1, 0.9, 0.5, 0.7], 2) == [1, 3]
    arch = {"candidates": ["full", "swa", "gdn"], "layers": ["gdn", "full", "gdn"]}
    report = {"layers": [{"swa": {"after": 0.2}, "gdn": {"after": 0.1}}, {"swa": {"after": 0.1}, "gdn": {"after": 0.5}},
                         {"swa": {"after": 0.3}, "gdn": {"after": 0.4}}]}
    assert er.fill_layers(arch, report, "best") == ["gdn", "swa", "swa"]
    assert er.fill_layers(arch, None, "best") == ["gdn"] * 3
    assert er.fill_layers(arch, report, "swa") == ["swa"] * 3


@pytest.fixture(scope="module")
def small():
    return dash.load_model(str(dash.SMALL_MODEL))


def test_needle_positions_point_at_the_needle(small):
    model, tok = small
    s = ruler.make_samples("niah_single_1", tok, 512, 1, seed=3)[0]
    ids, pos, needle = er.answer_positions(tok, s)
    assert tok.decode(ids[0, needle]).strip(" .") == s["outputs"][0]
    assert tok.decode(ids[0, pos + 1]).strip().startswith(s["outputs"][0])  # the positions that write the answer


def test_probe_selectors_score_every_layer(small):
    model, tok = small
    probes = ruler.make_samples("niah_multikey_2", tok, 512, 2, seed=4)
    drops = er.recall_importance(model, tok, probes)
    scores = er.retrieval_scores(model, tok, probes)
    assert len(drops) == len(scores) == 8
    assert all(0 <= s <= 1 for s in scores) and max(scores) > 0.2  # some head of the trained model finds the needle
    assert max(drops) > 1.0  # zeroing some layer's attention loses the recalled value
    assert all(type(l.self_attn).__name__ == "Qwen2Attention" for l in model.model.layers)  # hooks removed


# ---- the peers' training-free selectors ----

def test_ar_prompts_are_hybrid_distillations_sums(small):
    _, tok = small
    prompts = er.ar_prompts(tok, 3, seed=0)
    assert prompts == er.ar_prompts(tok, 3, seed=0) and prompts != er.ar_prompts(tok, 3, seed=1)
    for prompt, answer in prompts:
        pairs = dict(re.findall(r"^([a-zA-Z]{3,}): (\d)$", prompt, re.M))
        a, b, c = re.search(r"What is the value of (\w+) \+ (\w+) \+ (\w+)\?$", prompt).groups()
        assert prompt.startswith("Given the following key-value pairs:\n") and len(pairs) == er.AR_PAIRS
        assert answer == str(int(pairs[a]) + int(pairs[b]) + int(pairs[c]))


def test_ar_importance_is_the_accuracy_drop(tiny, monkeypatch):
    model, tok = tiny
    attn = dash.teacher_attention(model)
    prompts = [("p1", "7"), ("p2", "12")]

    def fake_generate(model, tokenizer, texts, max_new_tokens, batch_size):  # right unless layer 2 is zeroed
        assert max_new_tokens == 200
        return ["no" if attn[2]._forward_hooks else f"it is {a}" for _, a in prompts]
    monkeypatch.setattr(er.ruler, "generate", fake_generate)
    assert er.ar_importance(model, tok, prompts, 8) == [0.0, 0.0, 1.0, 0.0]
    assert not any(a._forward_hooks for a in attn)  # hooks removed


def test_nll_rise_of_a_sliding_window(small):
    model, tok = small
    probes = ruler.make_samples("niah_multikey_2", tok, 512, 1, seed=4)
    wide = dash.Config(window=4096, kernels="torch")  # covers the whole probe: the same as full attention
    assert max(abs(r) for r in er.nll_rise(model, tok, probes, {}, wide)) < 1e-3
    rises = er.nll_rise(model, tok, probes, {}, dash.Config(window=16, kernels="torch"))
    assert len(rises) == 8 and max(rises) > 1.0  # some layer must see past 16 tokens to recall the value
    assert all(type(l.self_attn).__name__ == "Qwen2Attention" for l in model.model.layers)  # teacher restored


def test_halo_combine_is_layer_analysis_combine():
    rt, cs = [0.9, 0.5, 0.9, 0.6], [0.8, 0.7, 0.6, 0.8]
    assert [round(x, 6) for x in er.halo_combine(rt, cs)] == [0.0, 4.0, 0.0, 50.0]  # 0.3 / 1e-10, capped at 50


def test_probe_selectors_run_only_when_asked(small, monkeypatch):
    model, tok = small
    for name in ("recall_importance", "retrieval_scores", "ar_importance", "nll_rise", "halo_scores"):
        monkeypatch.setattr(er, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran"))
    monkeypatch.setattr(er.ruler, "make_samples", lambda *a, **k: pytest.fail("probes were made"))
    arch = {"full_layers": [4, 6]}
    ecfg = er.EvalConfig(baselines="uniform,random,last-K", random_seeds=2)
    out = er.placements(model, tok, arch, ecfg, None, {}, None, ["swa"] * 8, 512)
    assert list(out) == ["uniform", "last-K", "random-0", "random-1"] and out["last-K"] == {6: "full", 7: "full"}
    assert er.placements(model, tok, arch, er.EvalConfig(baselines="none"), None, {}, None, ["swa"] * 8, 512) == {}
    want = er.wanted("first,hd-ar,random-1")  # a first word keeps its family
    assert [n for n in ["first-K", "hd-ar", "hd-mse", "random-0", "random-1", "last-K"] if want(n)] == \
        ["first-K", "hd-ar", "random-1"]
    with pytest.raises(ValueError, match="--baselines: unknown nope, hd-nope; allowed: all, none, uniform"):
        er.wanted("uniform,nope,hd-nope")


# ---- the CLI: haystacks, the default prose, results.json ----

@pytest.fixture(scope="module")
def arch_file(tiny_dir, text_file, tmp_path_factory) -> Path:
    """An architecture JSON for the tiny model: layer 1 full, the others swa (no weights to prepare)."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("arch")
    save_file({}, folder / "candidates.safetensors")
    arch = dict(model=str(tiny_dir), config=asdict(tiny_cfg(tiny_dir, text_file)), k=1, full_layers=[1],
                layers=["swa", "full", "swa", "swa"], candidates=["full", "swa"],
                candidate_cache=str(folder / "candidates.safetensors"))
    (folder / "arch.json").write_text(json.dumps(arch))
    return folder / "arch.json"


RUN = ["--tasks", "niah_single_2", "--lengths", "512", "--samples", "1", "--baselines", "none", "--device", "cpu",
       "--kernels", "torch"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "eval_ruler.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_haystack_file_and_folder(arch_file, tmp_path):
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "one.txt").write_text("How to think. Startups grow fast. " * 40)
    (essays / "two.txt").write_text("Why nerds are unpopular. Schools are odd. " * 40)
    for source, text in [(essays / "one.txt", (essays / "one.txt").read_text()),
                         (essays, (essays / "one.txt").read_text() + "\n" + (essays / "two.txt").read_text())]:
        out = tmp_path / source.name
        er.main(["--arch", str(arch_file), *RUN, "--haystack", str(source), "--out", str(out)])  # in-process: faster
        saved = json.loads((out / "results.json").read_text())
        assert saved["haystack"]["name"] == str(source)
        assert saved["haystack"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert saved["averaged_over"].startswith("1 of 13 RULER tasks")
        assert "1 of 13 RULER tasks" in (out / "results.md").read_text()
        assert set(saved["results"]["teacher"]) == {"niah_single_2@512", "avg@512", "avg", "layers"}


def test_cli_bad_inputs_one_line(arch_file, tmp_path):
    missing = tmp_path / "missing"
    run = cli("--arch", str(arch_file), *RUN, "--haystack", str(missing))
    assert run.returncode == 1 and run.stderr.strip() == f"eval_ruler: haystack '{missing}': no such file or folder"
    if importlib.util.find_spec("lm_eval") is None:  # in-process: the subprocess above shows the one-line exit
        with pytest.raises(SystemExit, match=r"^eval_ruler: --lm-eval needs lm-evaluation-harness, which is not "
                                             r"installed \(pip install lm-eval\)$"):
            er.main(["--arch", str(arch_file), *RUN, "--lm-eval", "hellaswag"])


def test_default_runs_on_prose_and_says_so(arch_file, tmp_path):
    er.main(["--arch", str(arch_file), *RUN, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    prose = hashlib.sha256(gzip.open(ROOT / "data" / "factbook_prose.txt.gz").read()).hexdigest()
    assert saved["haystack"]["name"] == "data/factbook_prose.txt.gz" and saved["haystack"]["sha256"] == prose
    assert saved["haystack"]["words"] > 100_000 and saved["config"]["haystack"] is None
    assert saved["template"] == "base"  # auto: the tiny tokenizer has no chat template
    assert "essay haystack: data/factbook_prose.txt.gz" in (tmp_path / "results.md").read_text()
