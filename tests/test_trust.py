"""A search you can trust: exact gradients for what runs (pruning, fp32 weights, the straight-through gradient only
where the teacher runs), a seed that matters, a planted answer found, the discrete polish, resumable runs, caches
tied to the code that made them, and one clear message for each bad input on the command line."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dash
from conftest import make_model_dir, rel, tiny_cfg

NAMES = ["full", "swa", "gla", "gdn"]
ROOT = Path(dash.__file__).parent


def mixed(model, cfg, names=NAMES, noise=0.0):
    ops = dash.make_ops(model, names, cfg)
    torch.manual_seed(0)
    for layer in ops:  # non-trivial candidate parameters, as prepared ones are
        for op in layer.values():
            for p in op.parameters():
                p.data.add_(noise * torch.randn_like(p))
    dash.install(model, ops)
    return ops

# ----------------------------------------------------------------------------- exact gradients for what runs


def test_a_pruned_operator_leaves_the_search_for_good(tiny, tiny_dir, text_file, monkeypatch):
    """Below --skip-below an operator stops running, its probability is exactly 0 from then on, and its logit never
    moves again (Adam's momentum would move it: the step is undone there)."""
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, skip_below=0.05, lr=0.5), 4)
    mixed(model, cfg)
    batches = dash.load_data(tok, cfg, parts=("search",))["search"]
    alpha0 = torch.zeros(4, 4)
    alpha0[0, 2] = -30.0  # gla in layer 0: pruned at the first step
    seen = []
    real = dash.kl_and_grad
    monkeypatch.setattr(dash, "kl_and_grad", lambda m, ids, w, active, c, t: seen.append((w.detach().clone(), active))
                        or real(m, ids, w, active, c, t))
    result = dash.search(model, batches, NAMES, cfg, alpha0=alpha0)
    assert result["alpha"][0, 2] == -30.0 and not result["alive"][0, 2]
    assert all(not active[0][2] and w[0, 2] == 0 for w, active in seen)
    for l in range(4):
        for i in range(4):  # once out, out for good: never active again, probability 0
            states = [active[l][i] for _, active in seen]
            if False in states:
                first = states.index(False)
                assert not any(states[first:]) and all(w[l, i] == 0 for w, _ in seen[first:])
    assert torch.allclose(result["probs"].sum(-1), torch.ones(4))


def test_a_step_with_a_non_finite_gradient_is_skipped_and_recorded(tiny, tiny_dir, text_file, tmp_path,
                                                                   monkeypatch):
    """An overflow in some operator's kernel (seen on the GPU: a NaN gradient at one step of a 3B search) must not
    reach alpha: that step leaves alpha and Adam alone and is recorded, with what it takes to replay it; the search
    goes on."""
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, lr=0.5), 4)
    mixed(model, cfg)
    batches = dash.load_data(tok, cfg, parts=("search",))["search"]
    real, calls, updates = dash.kl_and_grad, [], []

    def poisoned(m, ids, w, active, c, t):
        kl, g = real(m, ids, w, active, c, t)
        calls.append(1)
        if len(calls) == 2:
            g = g.clone()
            g[2, 1] = float("nan")  # swa in layer 2
        return kl, g
    monkeypatch.setattr(dash, "kl_and_grad", poisoned)
    real_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: updates.append(1) or real_step(self, *a, **k))
    result = dash.search(model, batches, NAMES, cfg, checkpoint=tmp_path / "search.ckpt.pt", run_key="k")
    assert len(calls) == len(batches) >= 3 and len(updates) == len(batches) - 1
    assert result["skipped_steps"] == [1] and result["history"][1]["skipped"]
    assert torch.isfinite(result["alpha"]).all() and (result["alpha"] != 0).any()
    replay = torch.load(tmp_path / "nonfinite-step-2.pt")
    assert replay["step"] == 1 and replay["run_key"] == "k" and torch.equal(replay["ids"], batches[1])
    assert replay["alive"].shape == replay["alpha"].shape == (4, 4)
    assert replay["tau"] == dash.tau_at(1, len(batches), cfg)


def test_a_gradient_that_stays_non_finite_ends_the_search_with_one_clear_error(tiny, tiny_dir, text_file,
                                                                             monkeypatch):
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file), 4)
    mixed(model, cfg)
    batches = dash.load_data(tok, cfg, parts=("search",))["search"]
    real = dash.kl_and_grad
    monkeypatch.setattr(dash, "NONFINITE_LIMIT", 2)
    monkeypatch.setattr(dash, "kl_and_grad", lambda *a: (real(*a)[0], torch.full((4, 4), float("inf"))))
    with pytest.raises(dash.DashError, match=r"not finite for 2 steps in a row \(the last, step 2: layers \[0, 1, 2"):
        dash.search(model, batches, NAMES, cfg)


def test_a_sequence_that_starts_with_a_zero_embedding_is_noted_and_is_what_overflows(tiny):
    """The non-finite steps of the 3B-shaped searches were exactly the steps with a sequence that starts with the pad
    token, whose embedding row the random init leaves at zero (README, Scaling). At that position every layer's input
    stays zero, and RMSNorm's backward multiplies the gradient by up to 1/sqrt(eps) a layer."""
    model, tok = tiny
    pad, weight = tok.pad_token_id, model.get_input_embeddings().weight
    assert not weight[pad].any()  # transformers' init zeroes the padding row
    batches = torch.randint(pad + 1, len(tok), (3, 2, 16), generator=torch.Generator().manual_seed(0))
    assert dash.zero_start_note(model, batches) is None
    batches[1, 0, 0] = pad
    assert f"1 of 6 search sequences, in 1 of 3 steps, start with token {pad}," in dash.zero_start_note(model, batches)

    def gradient_at_the_start(ids):  # largest |dL/dx| at position 0 of layer 0's input
        x = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=x).logits[:, 1:].log_softmax(-1).mean().backward()
        return x.grad[:, 0].abs().max().item()
    ids = batches[1, :1]
    zero_start = gradient_at_the_start(ids)
    other_start = gradient_at_the_start(torch.cat([ids[:, 1:2], ids[:, 1:]], 1))
    assert zero_start > 1e3 * other_start, (zero_start, other_start)
    with torch.no_grad():
        weight[pad].normal_(0, 0.02)  # a trained row: nothing to note
    assert dash.zero_start_note(model, batches) is None


class NanGradient(torch.autograd.Function):
    """Identity forward; a NaN gradient backward (a kernel whose backward overflows), unless DASH_TEST_KERNEL=fixed
    when the backward runs: fla picks the backend of its forward and of its backward each at its own call."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g if os.environ.get("DASH_TEST_KERNEL") == "fixed" else torch.full_like(g, float("nan"))


def test_the_replay_names_the_windowed_attention_whose_backward_made_the_nan(tiny, tiny_dir, text_file, monkeypatch):
    """tests/replay_step.py --attention-ab: of the windowed attention calls of a step, the highest-layer one whose
    output gradient is finite and whose q/k/v gradient is not (on a 3B search: where an overflowing gradient first
    became NaN) is found, and its inputs run again with each kernel say which one is not finite."""
    import replay_step
    monkeypatch.delenv("DASH_TEST_KERNEL", raising=False)  # NanGradient's NaN
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file), 4)
    mixed(model, cfg)
    ids = dash.load_data(tok, cfg, parts=("search",))["search"][0]
    real, n = dash.windowed_attention, []

    def poisoned(p, q, k, v, scaling, window, kernels):  # layer 2's swa: a NaN gradient for its q alone
        n.append(1)
        return real(p, NanGradient.apply(q) if len(n) == 3 else q, k, v, scaling, window, kernels)
    monkeypatch.setattr(dash, "windowed_attention", poisoned)
    calls = replay_step.watch_attention()  # wraps the poisoned one: records its inputs before the poison
    w = torch.full((4, 4), 0.25)
    kl, dkl_dw = dash.kl_and_grad(model, ids, w, [[True] * 4] * 4, cfg)
    assert len(calls) == 4 and torch.isfinite(kl)
    assert torch.isfinite(dkl_dw[2:]).all() and not torch.isfinite(dkl_dw[:2]).any()  # it flows down the layers
    case = replay_step.first_failing(calls)
    assert case["call"] == 2 and case["window"] == cfg.window and torch.equal(case["q"], calls[2]["q"].detach())

    reference = replay_step.reference_attention(case["scaling"], case["window"])
    lines = replay_step.compare(case, [("nan kernel", lambda q, k, v: reference(NanGradient.apply(q), k, v)),
                                       ("sdpa float32 (reference)", reference)])
    assert "not finite: {'dq':" in lines[0] and "relative error" not in lines[0]
    assert lines[1].split()[-1] == "0.00e+00" and "finite; relative error against the reference: y 0.00e+00" in lines[1]
    # a variant's environment holds over its backward too, and is gone after it
    fixed = lambda q, k, v: reference(NanGradient.apply(q), k, v)  # noqa: E731
    lines = replay_step.compare(case, [("as is", fixed), ("fixed", fixed, {"DASH_TEST_KERNEL": "fixed"}),
                                       ("sdpa float32 (reference)", reference)])
    assert "not finite: {'dq':" in lines[0] and "finite; relative error" in lines[1]
    assert "DASH_TEST_KERNEL" not in os.environ


def test_skipped_probabilities_are_exact_zeros_and_the_rest_renormalise():
    alpha = torch.tensor([[0.0, 1.0, 2.0]])
    alive = torch.tensor([[True, False, True]])
    w = dash.masked_softmax(alpha.requires_grad_(), alive, 1.0)
    assert w[0, 1] == 0 and torch.allclose(w[0, [0, 2]], torch.tensor([0.0, 2.0]).softmax(0))
    w[0, 0].backward()
    assert alpha.grad[0, 1] == 0  # no made-up gradient for the pruned logit


def test_mixture_weights_and_their_gradient_stay_fp32_in_a_bf16_model(tiny_dir, monkeypatch):
    """A bf16 model against fp32: in both, the probabilities enter the weighted sum in fp32, and dKL/dw_i, the sum
    of dL/dy * y_i over a layer's outputs, is what float64 gives for the same tensors (to 1e-6), where rounding it
    to bf16 (as before) is off by up to 0.4%: the softmax's backward takes differences of these numbers."""
    seen = []
    backward = dash.WeightedSum.backward

    def recorded(ctx, g):
        grads = backward(ctx, g)
        seen.append((ctx.saved_tensors, g, grads[0]))
        return grads
    monkeypatch.setattr(dash.WeightedSum, "backward", staticmethod(recorded))
    for dtype in (torch.float32, torch.bfloat16):
        seen.clear()
        model, _ = dash.load_model(str(tiny_dir), dtype=dtype)
        cfg = dash.Config(window=8, kernels="torch", kl_chunk=64)
        mixed(model, cfg, noise=0.02)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
        w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)).softmax(-1)
        kl, dkl_dw = dash.kl_and_grad(model, ids, w, [[True] * 4] * 4, cfg)
        assert dkl_dw.dtype == torch.float32 and len(seen) == 4
        worst_bf16 = 0.0
        for (probs, *ys), g, dw in seen:
            assert probs.dtype == torch.float32 and ys[0].dtype == g.dtype == dtype
            exact = torch.stack([(g.double() * y.double()).sum() for y in ys])
            assert rel(dw, exact) < 1e-6, (dtype, rel(dw, exact))
            worst_bf16 = max(worst_bf16, rel(exact.bfloat16(), exact))
        assert worst_bf16 > 1e-4  # bf16 rounding would fail the tolerance above: the test can tell


def test_straight_through_runs_the_teacher_only_where_it_is_still_in_the_search(tiny, tiny_dir, text_file):
    """--grad teacher: where 'full' was pruned from a layer, it neither runs nor adds anything there; the layer's
    cheap operators then get their exact gradient."""
    model, _ = tiny
    ops = mixed(model, tiny_cfg(tiny_dir, text_file), noise=0.05)
    calls = []
    for l, layer in enumerate(ops):
        layer["full"].register_forward_hook(lambda m, a, o, l=l: calls.append(l))
    alpha = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    alive = torch.ones(4, 4, dtype=torch.bool)
    alive[1, 0] = False  # full attention left layer 1's search
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    outs = {}
    for grad in ("exact", "teacher"):
        calls.clear()
        a = alpha.clone().requires_grad_()
        dash.set_probs(model, dash.masked_softmax(a, alive, 1.0), alive.tolist(), grad)
        out = model.model(input_ids=ids, use_cache=False).last_hidden_state
        out.pow(2).mean().backward()
        outs[grad] = out.detach(), a.grad, sorted(calls)
    assert outs["teacher"][2] == [0, 2, 3]  # not in layer 1
    assert torch.allclose(outs["exact"][0], outs["teacher"][0], atol=1e-6)  # the same mixture
    assert torch.allclose(outs["exact"][1][3], outs["teacher"][1][3], rtol=1e-4, atol=1e-8)  # nothing above layer 3

# ----------------------------------------------------------------------------- a seed that matters


def test_the_seed_orders_the_data_and_decides_the_run(tiny, tiny_dir, text_file):
    model, tok = tiny
    mixed(model, tiny_cfg(tiny_dir, text_file), noise=0.05)
    alphas = {}
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, seed=seed), 4)
        data = dash.load_data(tok, cfg)
        alphas[run] = dash.search(model, data["search"], NAMES, cfg)["alpha"], data
    assert torch.equal(alphas["a"][0], alphas["b"][0])  # bit-identical on the CPU
    assert not torch.equal(alphas["a"][0], alphas["c"][0])
    a, c = alphas["a"][1], alphas["c"][1]
    assert torch.equal(a["prep"], c["prep"]) and torch.equal(a["held_out"], c["held_out"])  # only the search moves
    assert not torch.equal(a["search"], c["search"])
    assert a["record"]["search"]["digest"] == c["record"]["search"]["digest"]  # same tokens, another order

# ----------------------------------------------------------------------------- a planted answer


class Planted(dash.FullAttention):
    """The teacher's attention, but in the planted layers with its query projection scrambled (its rows swapped
    between the two key/value groups' heads): a candidate as good as the teacher everywhere except there."""
    planted = {1, 4}

    def forward(self, p):
        if p.attn.layer_idx in self.planted:
            p = dataclasses.replace(p, q_rope=p.q_rope[:, :, [2, 3, 0, 1]])  # RoPE acts per head: swap after it
        return super().forward(p)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, text_file):
    d = make_model_dir(tmp_path_factory.mktemp("six"), seed=3, layers=6)
    dash.CANDIDATES["planted"] = Planted
    model, tok = dash.load_model(str(d))
    cfg = dash.resolve(tiny_cfg(d, text_file, candidates="full,planted", k=2, tokens=2048, skip_below=1e-3), 6)
    data = dash.load_data(tok, cfg)
    dash.install(model, dash.make_ops(model, ["full", "planted"], cfg))
    yield model, cfg, data
    dash.CANDIDATES.pop("planted")


def test_the_search_finds_a_planted_answer(planted):
    """Candidates as good as the teacher in every layer but two: with K = 2 the search keeps full attention in
    exactly those two."""
    model, cfg, data = planted
    result = dash.search(model, data["search"], ["full", "planted"], cfg)
    assert dash.choose_layers(result["probs"], ["full", "planted"], k=2).count("full") == 2
    assert [l for l, n in enumerate(dash.choose_layers(result["probs"], ["full", "planted"], k=2))
            if n == "full"] == sorted(Planted.planted)


def test_the_polish_moves_a_wrong_placement_to_the_minimum_kl(planted):
    model, cfg, data = planted
    names = ["full", "planted"]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.8, 0.2], [0.1, 0.9], [0.3, 0.7], [0.1, 0.9]])
    layers = dash.choose_layers(probs, names, k=2)  # full in 0 and 2: both wrong
    out = dash.polish(model, probs, names, layers, data["held_out"], cfg)
    assert out["full_layers"] == sorted(Planted.planted) and len(out["moves"]) == 2
    assert out["kl"] < out["kl_relaxed"] and out["placements_scored"] == 1 + 3 * 8
    every = [[("full" if l in pair else "planted") for l in range(6)] for pair in
             [(a, b) for a in range(6) for b in range(a + 1, 6)]]
    kls = dash.placement_kl(model, every, names, data["held_out"], cfg)
    assert min(kls) == pytest.approx(out["kl"])  # the minimum of all 15 placements

# ----------------------------------------------------------------------------- resumable runs, caches tied to code


def cli(args, cwd=ROOT, script="dash.py", **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, script] + args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def tiny_args(tiny_dir, text_file, tmp_path, **extra):
    args = dict(model=tiny_dir, data=text_file, tokens=512, seq_len=64, batch_size=2, k=1, window=8,
                prep_tokens=256, cache=tmp_path / "c.safetensors", device="cpu", kernels="torch",
                check_samples=0, log_every=1000)
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_a_killed_search_resumes_to_the_same_result(tiny_dir, text_file, tmp_path):
    """Killed (SIGKILL) after a checkpoint, `--resume` ends bit-identical to a run that was never interrupted (all
    three runs as subprocesses, one thread each: the same floating-point order)."""
    base = tiny_args(tiny_dir, text_file, tmp_path, tokens=128 * 24, checkpoint_every=2, polish=0)
    # side by side, one core each, each preparing the same candidates into its own file; the second is killed at
    # its first checkpoint
    whole = cli(base + ["--out", str(tmp_path / "whole"), "--cache", str(tmp_path / "whole.safetensors")])
    out = tmp_path / "killed"
    proc = cli(base + ["--out", str(out)])
    deadline = time.time() + 120
    while not (out / "search.ckpt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "arch.json").exists()  # really killed mid-search
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    resumed = cli(base + ["--out", str(out), "--resume"])
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resuming the search from" in stdout, stderr
    a, b = (json.loads((d / "arch.json").read_text()) for d in (tmp_path / "whole", out))
    assert a["alpha"] == b["alpha"] and a["layers"] == b["layers"]  # bit-identical alpha
    assert [h["kl"] for h in a["history"]] == [h["kl"] for h in b["history"]]
    assert not (out / "search.ckpt.pt").exists()
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        dash.main(base + ["--out", str(out), "--resume"])


def test_weights_prepared_by_other_code_are_refused(tiny_dir, text_file, tmp_path):
    """The issue's reproduction: in a copy of the checkout with GLA's gate floor changed from -5 to -4,
    `dash.py --no-prepare --cache <file prepared before the edit>` must refuse the stale weights."""
    args = tiny_args(tiny_dir, text_file, tmp_path, polish=0)
    dash.main(args + ["--out", str(tmp_path / "before")])  # prepares with the real code
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".gpu", ".whl", "candidates", "out", "results",
                                                             "small_model", "tests", "__pycache__"))
    source = (ROOT / "dash.py").read_text()
    assert "    floor = -5.0\n" in source
    (copy / "dash.py").write_text(source.replace("    floor = -5.0\n", "    floor = -4.0\n"))
    proc = cli(args + ["--no-prepare", "--out", str(tmp_path / "after")], cwd=copy)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "prepared for something else: operators.gla.source" in err, err
    assert "Traceback" not in err

# ----------------------------------------------------------------------------- bad inputs on the command line


def test_bad_inputs_on_the_command_line_get_one_clear_line(tiny_dir, text_file, tmp_path):
    """One line, no traceback: through a subprocess, as a user runs it, for each script; in-process for the rest."""
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "arch.json").write_text(json.dumps({"model": str(tiny_dir), "layers": ["full"] * 4}))
    # in-process, the same exit (SystemExit with the message, which Python prints as its one line)
    with pytest.raises(SystemExit, match=r"--skip-below 0.3 must be below 1/4"):
        dash.main(tiny_args(tiny_dir, text_file, tmp_path, skip_below=0.3))
    with pytest.raises(SystemExit, match=r"junk.safetensors is not a readable candidate file"):
        dash.main(tiny_args(tiny_dir, text_file, tmp_path, cache=tmp_path / "junk.safetensors"))
    cases = [
        ("dash.py", tiny_args(tiny_dir, text_file, tmp_path, data="/nonexistent"),
         "dash: --data /nonexistent: no such file or folder"),
        ("prepare_candidates.py", ["--model", str(tiny_dir), "--data", "/nonexistent"],
         "prepare_candidates: --data /nonexistent: no such file or folder"),
        ("eval_ruler.py", ["--arch", str(tmp_path / "arch.json")],
         "is not an architecture written by dash.py: it has no candidates, config, candidate_cache"),
    ]
    procs = [(cli(args, script=script), want) for script, args, want in cases]
    for proc, want in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and want in err and "Traceback" not in err, (want, err)
        assert len(err.strip().splitlines()) == 1 or err.strip().splitlines()[-1].count(want), err


def test_a_threshold_nobody_passes_and_a_budget_under_one_step_say_so(tiny_dir, text_file, tmp_path, capsys):
    args = tiny_args(tiny_dir, text_file, tmp_path, polish=0, out=tmp_path / "o")
    with pytest.raises(SystemExit, match="--threshold 0.99: no layer has p\\(full\\) above it"):
        dash.main(args + ["--threshold", "0.99"])
    dash.main(tiny_args(tiny_dir, text_file, tmp_path, polish=0, out=tmp_path / "o", tokens=100))
    assert "--tokens 100 is less than one step of 2x64 tokens; the search runs one step (128 tokens)" in \
        capsys.readouterr().out


def test_the_replay_runs_a_saved_step_and_prints_where_each_gradient_peaks(tiny, tiny_dir, text_file, tmp_path,
                                                                           capsys):
    """tests/replay_step.py FILE --cache C --all, end to end on the CPU: the step a search saved, replayed, with each
    operator's and each layer input's largest gradient and where it is, and the smallest residual of both passes."""
    import replay_step
    from conftest import prepared_state
    cache = tmp_path / "cands.safetensors"
    prepared_state(tiny_dir, text_file, cache)
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(cache)), 4)
    ids = dash.load_data(tok, cfg, parts=("search",))["search"][0]
    alive = torch.ones(4, 4, dtype=torch.bool)
    alive[2:, 2:] = False  # layers 2 and 3 down to full and swa
    torch.save(dict(run_key="k", config=dataclasses.asdict(cfg), step=4, ids=ids, tau=0.5, alpha=torch.zeros(4, 4),
                    alive=alive), tmp_path / "nonfinite-step-5.pt")
    capsys.readouterr()
    replay_step.main([str(tmp_path / "nonfinite-step-5.pt"), "--all"])
    out = capsys.readouterr().out
    assert out.startswith("step 5: KL ") and "dKL/dw finite in layers [0, 1, 2, 3] of 4" in out
    assert "every operator's output and gradient is finite here" in out
    B, T = ids.shape
    for l in range(4):
        for which in ("teacher", "mixture"):
            assert f"residual: layer {l:2d} input, {which}: smallest token rms " in out
        # layer 0's input is the frozen embeddings: no gradient reaches it, nor its operators' outputs
        assert (f"all: layer {l:2d} input  gradient: 0 not finite" in out) == (l > 0)
        assert (f"all: layer {l:2d} gla    gradient" in out) == (l == 1)
        assert (f"all: layer {l:2d} swa    gradient" in out) == (l > 0)
    located = [line.split(" at sequence ")[1].split(" token ") for line in out.splitlines() if " at sequence " in line]
    # residual inputs of both passes; input gradients; the teacher's outputs; the mixture's outputs and gradients
    assert len(located) == 4 * 2 + 3 + 4 + (4 + 4 + 2 + 2) + (4 + 2 + 2)
    assert all(0 <= int(b) < B and 0 <= int(t) < T for b, t in located)
