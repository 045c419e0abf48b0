"""torchrun on the CPU: 2 gloo processes against 1, on the tiny random Qwen2 model (tests/conftest.py).

One 2-process run of dash.py (preparation, search, polish, export) is compared with a 1-process run on the same
global batches; a wrapper script under torchrun records which rank writes which file under the test's folder, and
can make one rank fail. torchrun runs as `python -m torch.distributed.run --standalone` (a free port, so that
parallel test runs do not meet)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dash

HERE = Path(__file__).resolve().parents[1]

# Run under torchrun in place of dash.py / prepare_candidates.py: log every file that this rank opens for writing
# under ROOT to ROOT/writes-<rank>.txt, optionally make rank FAIL_RANK fail in its second search step, then run
# the script's main() with the remaining arguments. FAIL_IN names another dash function to fail in (its FAIL_AT-th
# call, default 2).
RUNNER = r'''
import builtins, io, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["DASH_HOME"])
root, rank = Path(os.environ["ROOT"]).resolve(), os.environ["RANK"]

def log(path):
    path = Path(path).resolve()
    if root in path.parents and not path.name.startswith("writes-"):
        with _open(root / f"writes-{rank}.txt", "a") as f:
            f.write(f"{path.relative_to(root)}\n")

_open, _io_open, _replace = builtins.open, io.open, os.replace
def logged_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
        log(file)
    return _open(file, mode, *args, **kwargs)
builtins.open = io.open = logged_open
os.replace = lambda src, dst, *a, **k: (log(dst), _replace(src, dst, *a, **k))[1]
import safetensors.torch
_save_file = safetensors.torch.save_file
safetensors.torch.save_file = lambda tensors, path, *a, **k: (log(path), _save_file(tensors, path, *a, **k))[1]

import dash
if os.environ.get("FAIL_RANK") == rank:
    name, at, calls = os.environ.get("FAIL_IN", "kl_and_grad"), int(os.environ.get("FAIL_AT", "2")), []
    original = getattr(dash, name)
    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise {error}("injected failure in the second step" if at == 2 else f"injected failure in call {at}")
        return original(*args, **kwargs)
    setattr(dash, name, failing)
script = sys.argv.pop(1)
if script == "prepare_candidates":
    import prepare_candidates
    prepare_candidates.main(sys.argv[1:])
else:
    dash.main(sys.argv[1:])
'''


def tiny_args(tiny_dir, text_file, out, cache, *more) -> list[str]:
    """A whole dash.py run in seconds: 4 preparation and 4 search steps of 4 x 64 tokens, a polish move."""
    return ["--model", str(tiny_dir), "--data", str(text_file), "--k", "1", "--seq-len", "64", "--batch-size", "4",
            "--tokens", "1024", "--prep-tokens", "1024", "--lr", "0.1", "--window", "8", "--kernels", "torch",
            "--device", "cpu", "--skip-below", "0", "--check-samples", "0", "--polish", "1", "--log-every", "1000",
            "--checkpoint-every", "2", "--out", str(out), "--cache", str(cache), *more]


def torchrun(root: Path, script: str, args: list[str], n: int = 2, fail_rank: int | None = None,
             error: str = "RuntimeError", timeout: int = 240, fail_in: str = "kl_and_grad",
             fail_at: int = 2) -> subprocess.CompletedProcess:
    runner = root / "runner.py"
    runner.write_text(RUNNER.replace("{error}", "dash.DashError" if error == "DashError" else error))
    env = dict(os.environ, ROOT=str(root), DASH_HOME=str(HERE), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fail_rank is not None:
        env.update(FAIL_RANK=str(fail_rank), FAIL_IN=fail_in, FAIL_AT=str(fail_at))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           str(runner), script, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=root)


def writes(root: Path, rank: int) -> set[str]:
    path = root / f"writes-{rank}.txt"
    return set(path.read_text().split()) if path.exists() else set()


@pytest.fixture(scope="module")
def one_and_two(tiny_dir, text_file, tmp_path_factory):
    """The same run in 1 process (here) and in 2 (torchrun): their folders, and the 2-process run's output."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    dash.main(tiny_args(tiny_dir, text_file, one / "out", one / "cands.safetensors"))
    run = torchrun(two, "dash", tiny_args(tiny_dir, text_file, two / "out", two / "cands.safetensors"))
    assert run.returncode == 0, run.stderr[-3000:]
    return one, two, run


def test_two_processes_search_as_one(one_and_two):
    one, two, _ = one_and_two
    a1, a2 = (json.loads((d / "out" / "arch.json").read_text()) for d in (one, two))
    alpha1, alpha2 = torch.tensor(a1["alpha"]), torch.tensor(a2["alpha"])
    assert alpha1.abs().max() > 0.05  # the search moved alpha: an equality of untouched zeros would say nothing
    assert (alpha1 - alpha2).abs().max() < 1e-4
    # a KL of 5e-3 is a small difference of log-probabilities near 6: fp32 sums in another order move it by ~1e-6
    assert [h["kl"] for h in a1["history"]] == pytest.approx([h["kl"] for h in a2["history"]], abs=1e-5)
    assert a1["layers"] == a2["layers"] and a1["polished"]["kl"] == pytest.approx(a2["polished"]["kl"], abs=1e-5)
    assert a1["distributed"] == dict(world_size=1, per_rank_batch=4, fsdp=False, backend=None)
    assert a2["distributed"] == dict(world_size=2, per_rank_batch=2, fsdp=False, backend="gloo")
    assert a1["data"] == a2["data"] and a1["tokens"] == a2["tokens"]  # the same global batches


def test_two_processes_prepare_as_one(one_and_two):
    from safetensors.torch import load_file
    one, two, _ = one_and_two
    c1, c2 = (load_file(str(d / "cands.safetensors")) for d in (one, two))
    assert c1.keys() == c2.keys()
    moved = [k for k in c1 if k.endswith("q_map") and (c1[k] - torch.eye(c1[k].shape[-1])).abs().max() > 1e-3]
    assert moved  # the alignment trained the candidates
    # layer-split alignment: each rank aligns its layers on the whole batch, as one process does (bit-identical on the
    # 2-core machine; the teacher's pass on half the batch may round differently on other CPUs)
    for k in c1:
        assert torch.allclose(c1[k], c2[k], rtol=1e-5, atol=1e-6), k
    r1, r2 = (json.loads((d / "cands.json").read_text()) for d in (one, two))
    assert r1["curve"] == pytest.approx(r2["curve"], rel=1e-5)
    assert (r1["world_size"], r1["per_rank_batch"], r2["world_size"], r2["per_rank_batch"]) == (1, 4, 2, 2)
    assert (r1["layer_split"], r2["layer_split"]) == (False, True)


def test_only_rank_0_writes_and_logs(one_and_two):
    _, two, run = one_and_two
    wrote = writes(two, 0)
    assert {"out/arch.json", "cands.safetensors", "cands.json", "out/search.ckpt.pt"} <= wrote, wrote
    assert writes(two, 1) == set()
    assert run.stdout.count("full attention in layers") == 1  # rank 1's log is not printed
    assert not (two / "out" / "search.ckpt.pt").exists()       # and the checkpoints are cleaned up


def test_two_processes_prepare_candidates_with_fsdp_as_one(one_and_two, tiny_dir, text_file, tmp_path):
    """prepare_candidates.py under torchrun, the teacher sharded (--fsdp), writes the same candidates as dash.py
    did in one process."""
    from safetensors.torch import load_file
    one, _, _ = one_and_two
    run = torchrun(tmp_path, "prepare_candidates", ["--model", str(tiny_dir), "--data", str(text_file),
                   "--candidates", "swa,gla,gdn", "--seq-len", "64", "--batch-size", "4", "--tokens", "1024",
                   "--window", "8", "--kernels", "torch", "--device", "cpu", "--cache", str(tmp_path / "c.safetensors"),
                   "--fsdp"])
    assert run.returncode == 0, run.stderr[-3000:]
    c1, c2 = load_file(str(one / "cands.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    assert c1.keys() == c2.keys() and all(torch.allclose(c1[k], c2[k], rtol=1e-4, atol=1e-5) for k in c1)
    assert writes(tmp_path, 1) == set() and "c.safetensors" in writes(tmp_path, 0)


def test_an_interrupted_layer_split_alignment_resumes_in_one_process(one_and_two, tiny_dir, text_file, tmp_path):
    """The layer-split alignment's checkpoint holds every layer (sync_layers): 2 processes stop in their third
    step (rank 1 fails after the checkpoint of step 2), and 1 process resumes from it to the candidates that one
    process made without a stop."""
    from safetensors.torch import load_file
    import prepare_candidates
    one, _, _ = one_and_two
    args = ["--model", str(tiny_dir), "--data", str(text_file), "--candidates", "swa,gla,gdn", "--seq-len", "64",
            "--batch-size", "4", "--tokens", "1024", "--window", "8", "--kernels", "torch", "--device", "cpu",
            "--checkpoint-every", "2", "--cache", str(tmp_path / "c.safetensors")]
    run = torchrun(tmp_path, "prepare_candidates", args, fail_rank=1, fail_in="gather_layers", fail_at=3,
                   error="DashError")
    assert run.returncode != 0 and "prepare_candidates: rank 1 of 2: injected failure in call 3" in run.stderr
    assert torch.load(tmp_path / "c.partial.pt")["step"] == 2 and not (tmp_path / "c.safetensors").exists()
    prepare_candidates.main(args)
    c1, c2 = load_file(str(one / "cands.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    assert c1.keys() == c2.keys() and all(torch.allclose(c1[k], c2[k], rtol=1e-5, atol=1e-6) for k in c1)


def test_a_failure_on_one_rank_ends_the_run(one_and_two, tiny_dir, text_file, tmp_path):
    """Rank 1 fails in its second search step while rank 0 waits for it in the all-reduce: the run ends at once
    (no hang until a timeout), not zero, saying which rank failed and why, and writes no architecture. (An
    exception of another kind takes the same way out: a traceback instead of dash's line.)"""
    one, _, _ = one_and_two
    run = torchrun(tmp_path, "dash", tiny_args(tiny_dir, text_file, tmp_path / "out", one / "cands.safetensors")
                   + ["--no-prepare"], fail_rank=1, error="DashError", timeout=120)
    assert run.returncode != 0
    assert "dash: rank 1 of 2: injected failure in the second step" in run.stderr
    assert "rank: 1" in run.stderr  # torchrun's summary: the first failure was rank 1's
    assert not (tmp_path / "out" / "arch.json").exists()


def test_a_batch_that_does_not_split_is_refused(tiny_dir, text_file, tmp_path, monkeypatch):
    """The message of every rank of a torchrun launch of 2 (the launch itself costs seconds: the failure test
    shows that an error under torchrun reaches the terminal)."""
    monkeypatch.setattr(dash, "world", lambda: 2)
    for more, match in ((["--batch-size", "3"], "--batch-size 3 does not split over 2 processes"),
                        (["--batch-size", "4", "--micro-batch", "4"], "--micro-batch 4 must divide --batch-size 4 "
                                                                      "over 2 processes, 2 each")):
        with pytest.raises(SystemExit) as e:
            dash.main(tiny_args(tiny_dir, text_file, tmp_path / "out", tmp_path / "c.safetensors") + more)
        assert match in str(e.value)
    assert not (tmp_path / "c.safetensors").exists()


def test_fsdp_needs_torchrun(tiny_dir, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dash.main(tiny_args(tiny_dir, text_file, tmp_path / "out", tmp_path / "c.safetensors") + ["--fsdp"])
    assert "--fsdp shards the teacher over the processes of a torchrun launch" in str(e.value)


def test_fsdp_search_as_one(one_and_two, tiny_dir, text_file, tmp_path):
    """--fsdp: the teacher sharded over 2 processes (FSDP2 on gloo), the search and the polish as in one process
    (with the candidates that one process prepared; preparation with --fsdp: the test above)."""
    one, _, _ = one_and_two
    run = torchrun(tmp_path, "dash", tiny_args(tiny_dir, text_file, tmp_path / "out", one / "cands.safetensors")
                   + ["--fsdp", "--no-prepare"])
    assert run.returncode == 0, run.stderr[-3000:]
    a1, a2 = (json.loads((d / "out" / "arch.json").read_text()) for d in (one, tmp_path))
    assert a2["distributed"]["fsdp"] and a2["distributed"]["world_size"] == 2
    assert (torch.tensor(a1["alpha"]) - torch.tensor(a2["alpha"])).abs().max() < 1e-4
    assert a1["layers"] == a2["layers"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_gpus_search_as_one(tiny_dir, text_file, tmp_path, fsdp):
    """The same on CUDA with NCCL (cuda:LOCAL_RANK): the tiny run on 2 GPUs equals 1 GPU, fp32 and torch kernels
    (bf16 would differ by its rounding), with and without --fsdp."""
    cuda = ["--device", "cuda", "--dtype", "float32", "--no-compile"]
    runs = {}
    for n in (1, 2):
        d = tmp_path / f"n{n}"
        d.mkdir()
        more = cuda + (["--fsdp"] if fsdp and n == 2 else [])
        run = torchrun(d, "dash", tiny_args(tiny_dir, text_file, d / "out", d / "c.safetensors") + more, n=n)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[n] = json.loads((d / "out" / "arch.json").read_text())
    assert runs[2]["distributed"] == dict(world_size=2, per_rank_batch=2, fsdp=fsdp, backend="nccl")
    assert (torch.tensor(runs[1]["alpha"]) - torch.tensor(runs[2]["alpha"])).abs().max() < 1e-4
    assert runs[1]["layers"] == runs[2]["layers"]
