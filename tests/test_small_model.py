"""The small teacher that ships with the project: it loads with the Auto classes, it really retrieves, and the
default pipeline (prepare, search, export, retrieval check) and the RULER evaluation run on it, at reduced
budgets."""
import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dash
import eval_ruler
import ruler


def test_loads_with_the_auto_classes_and_retrieves_a_needle():
    model = AutoModelForCausalLM.from_pretrained(dash.SMALL_MODEL, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(dash.SMALL_MODEL)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 8
    samples = ruler.make_samples("niah_single_1", tok, 1024, 4, seed=7)
    preds = ruler.generate(model, tok, [ruler.build_prompt(s, tok) for s in samples], 16, 4)
    assert ruler.score("niah_single_1", preds, [s["outputs"] for s in samples]) == 100.0


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python dash.py` with its defaults, at a reduced token budget."""
    tmp = tmp_path_factory.mktemp("default")
    dash.main(["--tokens", "8192", "--prep-tokens", "8192", "--held-out", "1", "--polish", "1",
               "--cache", str(tmp / "c.safetensors"),
               "--out", str(tmp / "out"), "--check-samples", "1"])
    return tmp


def test_default_pipeline_exports_a_valid_architecture(default_run, capsys):
    arch = json.loads((default_run / "out" / "arch.json").read_text())
    assert arch["model"] == str(dash.SMALL_MODEL) and arch["k"] == 2 and arch["tokens"] == 8192
    assert len(arch["layers"]) == 8 and arch["layers"].count("full") == 2
    assert set(arch["layers"]) <= {"full", "swa", "gla", "gdn"}
    probs = torch.tensor(arch["probabilities"])
    assert probs.shape == (8, 4) and torch.allclose(probs.sum(-1), torch.ones(8), atol=1e-4)
    assert sorted(arch["relaxed"]["full_layers"]) == sorted(torch.topk(probs[:, 0], 2).indices.tolist())
    assert (default_run / "c.json").exists()  # the candidates were prepared, with their report


def test_ruler_evaluation_of_the_small_model(default_run):
    out = default_run / "ruler"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eval_ruler.main(["--arch", str(default_run / "out" / "arch.json"), "--tasks", "niah_single_1,vt",
                         "--samples", "2", "--baselines", "uniform,first,alignment", "--probes", "2",
                         "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    rows = res["results"]
    assert set(rows) == {"teacher", "dash", "dash (placement, fill)", "uniform", "first-K", "alignment-loss"}
    assert rows["teacher"]["niah_single_1@1024"] == 100.0 and rows["teacher"]["layers"] == "FFFFFFFF"
    assert all(0 <= r["avg"] <= 100 and r["layers"].count("F") == 2 for n, r in rows.items() if n != "teacher")
    assert "| teacher |" in (out / "results.md").read_text()
