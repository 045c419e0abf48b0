"""plots.py: every figure is a real PNG made from plain dicts; a missing matplotlib is a note, not an error."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
# the figures need matplotlib, an optional dependency (CI installs it: .ci/run); without it these tests skip and
# the tests of its absence still run
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
STUDY_K2 = ROOT / "small_model" / "study-swa-k2.json"
RULER = ROOT / "results" / "ruler-small-h100" / "results.json"
FINETUNED = [ROOT / "results" / d / "results.json" for d in (   # finetuned hybrids' RULER files
    "finetune-small-h200/ruler-default", "finetune-small-h200/ruler-rep16", "finetune-small-h200/ruler-fresh5m",
    "finetune-small-h200-longce/ruler-fresh5m-lw20")]
HIDDEN = [ROOT / "results" / "finetune-small-h200-14" / d / "results.json" for d in (  # per-layer loss, batch 1
    "ruler-default", "ruler-d-lw20", "ruler-fresh5m-lw20-h3")]


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG, f"{path} is not a PNG: starts with {data[:8]!r}"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


def tiny_history(layers=3, names=("full", "swa"), steps=5):
    """A search in which layer 1 keeps full attention and the others give way, as dash.search() records it."""
    history = []
    for t in range(steps):
        tau = 1.0 * 0.5 ** t
        probs = []
        for l in range(layers):
            p = 0.5 + (0.1 * t if l == 1 else -0.1 * t)
            probs.append([p] + [(1 - p) / (len(names) - 1)] * (len(names) - 1))
        history.append(dict(step=t, loss=1.0 / (t + 1) + 0.1, kl=1.0 / (t + 1), tau=tau,
                            full=sum(row[0] for row in probs), probs=probs))
    return list(names), history


@needs_matplotlib
@pytest.mark.parametrize("ops", [("full", "swa"), ("swa", "full", "gla", "gdn")])
def test_search_figure_writes_png(tmp_path, ops):
    names, history = tiny_history(names=ops)
    full = names.index("full")
    for r in history:  # put p(full) in its own column when "full" is not the first operator
        for row in r["probs"]:
            row[0], row[full] = row[full], row[0]
    out = plots.search_figure(history, names, [1], tmp_path / "sub" / "search.png", polished_layers=[1])
    assert out == str(tmp_path / "sub" / "search.png")
    assert_png(out)


@needs_matplotlib
def test_search_figure_needs_probs(tmp_path):
    names, history = tiny_history()
    del history[2]["probs"]
    with pytest.raises(ValueError, match="probs"):
        plots.search_figure(history, names, [1], tmp_path / "search.png")
    assert not (tmp_path / "search.png").exists()


@needs_matplotlib
def test_ruler_figure_with_and_without_speed(tmp_path):
    data = json.loads(RULER.read_text())
    assert data["speed"], "the H100 results carry a speed table"
    assert_png(plots.ruler_figure(data["results"], tmp_path / "plain.png"))
    assert_png(plots.ruler_figure(data["results"], tmp_path / "speed.png", data["speed"]))
    # several lengths, per-length averages and a model without a speed row
    results = {m: {"a@1024": 50.0, "a@2048": 40.0, "avg@1024": 50.0, "avg": 45.0, "layers": "SF"}
               for m in ("teacher", "dash", "uniform")}
    speed = {f"{m}@{n}": dict(cache_mib=n / 512, decode_tok_s=30.0) for m in ("teacher", "dash") for n in (1024, 2048)}
    assert_png(plots.ruler_figure(results, tmp_path / "lengths.png", speed))
    assert (tmp_path / "speed.png").stat().st_size > (tmp_path / "plain.png").stat().st_size


def test_placements_of_the_study_known_answers():
    """The README's table: DASH's layers 4, 6 are 2nd of 28 at 84.1; the best is 2, 6 at 85.9."""
    placed = plots.placements_of(json.loads(STUDY_K2.read_text()))
    assert len(placed) == math.comb(8, 2)
    assert next(iter(placed.items())) == ((2, 6), 85.94)
    assert list(placed.values()) == sorted(placed.values(), reverse=True)
    assert plots.rank_of([6, 4], placed) == 2
    assert plots.rank_of([2, 6], placed) == 1
    worst = min(placed.values())  # ties share a rank: every placement at the bottom score has the same one
    assert {plots.rank_of(p, placed) for p, v in placed.items() if v == worst} == {
        1 + sum(v > worst for v in placed.values())}
    with pytest.raises(ValueError, match="not in the study"):
        plots.rank_of([4, 9], placed)
    assert [plots._ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 56)] == \
        ["1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "56th"]


@needs_matplotlib
def test_placement_figure(tmp_path):
    study = json.loads(STUDY_K2.read_text())
    assert_png(plots.placement_figure(study, tmp_path / "p.png", dash_pick=[4, 6], polished_pick=[2, 6]))
    assert_png(plots.placement_figure(study, tmp_path / "same.png", dash_pick=[4, 6], polished_pick=[6, 4]))
    assert_png(plots.placement_figure(study, tmp_path / "bare.png"))
    with pytest.raises(ValueError, match="not in the study"):
        plots.placement_figure(study, tmp_path / "bad.png", dash_pick=[4, 6, 7])
    assert not (tmp_path / "bad.png").exists()


@needs_matplotlib
def test_scaling_figure(tmp_path):
    rows = [{"gpus": 2, "tokens_per_s": 31000.0}, {"gpus": 1, "tokens_per_s": 16800.0},
            {"gpus": 4, "tokens_per_s": 58000.0}]
    assert_png(plots.scaling_figure(rows, tmp_path / "scaling.png"))


def test_finetune_points_name_their_recipe_and_count_the_needles():
    default, rep16, fresh, longce = (plots.finetune_point(json.loads(f.read_text())) for f in FINETUNED)
    assert (default["tokens"], default["line"], default["passes"]) == (163_840, "KL, distinct tokens", 1)
    assert (rep16["tokens"], rep16["line"], rep16["passes"]) == (5_242_880, "KL, passes over 327,680 tokens", 16)
    assert fresh["line"] == default["line"] and fresh["tokens"] == 5_242_880
    assert longce["line"] == "LongCE-weighted KL (--long-weight 20), distinct tokens"
    assert round(default["needles"], 1) == 25.9 and round(longce["needles"], 1) == 73.8  # the README's table
    small, lw20, fresh = (plots.finetune_point(json.loads(f.read_text())) for f in HIDDEN)
    assert small["line"] == "KL + per-layer loss (--hidden-weight 3), distinct tokens, batch 1"
    assert lw20["line"] == ("LongCE-weighted KL (--long-weight 20) + per-layer loss (--hidden-weight 3), distinct "
                            "tokens, batch 1")
    assert fresh["line"] == "LongCE-weighted KL (--long-weight 20) + per-layer loss (--hidden-weight 3), distinct tokens"
    assert (round(small["needles"], 1), round(fresh["needles"], 1)) == (38.9, 77.8)  # the README's table
    assert plots.needles({"niah_a@1024": 50.0, "niah_b@1024": 100.0, "vt@1024": 0.0, "avg": 50.0}) == 75.0
    with pytest.raises(ValueError, match="no niah task"):
        plots.needles({"vt@1024": 1.0})


@needs_matplotlib
def test_finetune_figure(tmp_path):
    assert_png(plots.finetune_figure([json.loads(f.read_text()) for f in FINETUNED], tmp_path / "f.png"))


def test_without_matplotlib_every_figure_is_none_and_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(plots, "_noted", False)
    names, history = tiny_history()
    study = json.loads(STUDY_K2.read_text())
    made = [plots.search_figure(history, names, [1], tmp_path / "s.png"),
            plots.ruler_figure({"teacher": {"a@1": 1.0, "avg": 1.0}}, tmp_path / "r.png", {}),
            plots.placement_figure(study, tmp_path / "p.png", dash_pick=[4, 6]),
            plots.scaling_figure([{"gpus": 1, "tokens_per_s": 1.0}], tmp_path / "g.png"),
            plots.finetune_figure([json.loads(FINETUNED[0].read_text())], tmp_path / "f.png"),
            plots.matplotlib_or_none()]
    assert made == [None] * 6
    assert list(tmp_path.iterdir()) == []
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count(plots.NOTE) == 1


def run_cli(*args, pre="pass"):
    """python plots.py ARGS in a fresh interpreter; `pre` runs first (e.g. to hide matplotlib)."""
    code = f"import runpy, sys; {pre}; sys.argv = ['plots.py', *{list(args)!r}]; " \
           f"runpy.run_path({str(ROOT / 'plots.py')!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


@needs_matplotlib
def test_cli(tmp_path):
    out = tmp_path / "k2.png"
    p = run_cli("placements", str(STUDY_K2), "--dash", "4,6", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert f"wrote {out}" in p.stdout
    assert_png(out)
    names, history = tiny_history()  # arch.json as dash.py will write it: the export plus the history
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(dict(candidates=names, full_layers=[1], layers=["swa", "full", "swa"],
                                    history=history)))
    p = run_cli("search", str(arch))
    assert p.returncode == 0, p.stderr
    assert_png(tmp_path / "search.png")
    p = run_cli("finetune", *map(str, FINETUNED), "--out", str(tmp_path / "finetune.png"))
    assert p.returncode == 0, p.stderr
    assert_png(tmp_path / "finetune.png")
    rows = tmp_path / "scaling.json"
    rows.write_text(json.dumps([{"gpus": 1, "tokens_per_s": 17827}, {"gpus": 2, "tokens_per_s": 34579}]))
    p = run_cli("scaling", str(rows), "--title", "two H200s")
    assert p.returncode == 0, p.stderr
    assert_png(tmp_path / "scaling.png")


@needs_matplotlib
@pytest.mark.parametrize("args, message", [
    (("placements", str(STUDY_K2), "--dash", "4,9"), "not in the study"),
    (("placements", "no/such.json"), "No such file"),
    (("search", str(STUDY_K2)), "has no key 'candidates'"),
    (("finetune", str(FINETUNED[0]), str(RULER)), f"{RULER} has no key 'finetune'"),   # a hybrid not finetuned
    (("placements", str(STUDY_K2), "--dash", "four"), "expected layers like 4,6"),
])
def test_cli_bad_inputs_one_line_no_traceback(args, message):
    p = run_cli(*args)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_cli_without_matplotlib_succeeds_with_the_note(tmp_path):
    out = tmp_path / "k2.png"
    p = run_cli("placements", str(STUDY_K2), "--dash", "4,6", "--out", str(out), pre="sys.modules['matplotlib'] = None")
    assert p.returncode == 0, p.stderr
    assert p.stderr.count(plots.NOTE) == 1
    assert not out.exists()
