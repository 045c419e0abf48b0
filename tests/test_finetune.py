"""finetune.py: only the chosen weights train, the KL falls, the written architecture rebuilds the finetuned model
bit for bit, resume continues exactly, the top-k KL is the KL at k = vocabulary, and bad input gets one message."""
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import dash
import finetune
from conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["gdn", "full", "swa", "gla"]


@pytest.fixture(scope="module")
def tiny_arch(tiny_dir, text_file, tmp_path_factory) -> Path:
    """An architecture of the tiny model as dash.py writes it (the fields build_hybrid reads), its candidates
    prepared on the tiny model's text."""
    tmp = tmp_path_factory.mktemp("arch")
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(tmp / "cands.safetensors")), 4)
    model, tok = dash.load_model(str(tiny_dir))
    cache, _ = dash.load_or_prepare(model, ["full", "swa", "gla", "gdn"], cfg,
                                    dash.load_data(tok, cfg, parts=("held_out", "prep")))
    arch = dict(model=str(tiny_dir), candidates=["full", "swa", "gla", "gdn"], k=1, layers=LAYERS, full_layers=[1],
                config=asdict(cfg), candidate_cache=cache)
    (tmp / "arch.json").write_text(json.dumps(arch))
    return tmp / "arch.json"


def fcfg_of(arch: Path, out: Path, **kw) -> finetune.FinetuneConfig:
    base = dict(arch=str(arch), out=str(out), tokens=1024, lr=1e-2, device="cpu", kernels="torch", log_every=1000)
    return finetune.FinetuneConfig(**{**base, **kw})


def student_and_groups(tiny_arch, tmp_path, train: str, **kw):
    arch, fcfg, cfg, teacher, state, data = finetune.prepare(fcfg_of(tiny_arch, tmp_path, train=train, **kw))
    student = finetune.student_of(teacher, arch["layers"], state, cfg)
    groups = finetune.parameter_groups(student, arch["layers"], fcfg.train, fcfg.lr, fcfg.lr_other)
    return fcfg, cfg, teacher, student, groups, data


@pytest.mark.parametrize("train", finetune.TRAIN_SETS)
def test_only_the_chosen_parameters_change(tiny_arch, tmp_path, train):
    fcfg, cfg, teacher, student, groups, data = student_and_groups(tiny_arch, tmp_path, train)
    chosen = {n for g in groups for n, _ in g["params"]}
    expect = {"ops": lambda n: ".op." in n and n.split(".")[2] != "1",   # layer 1 is full attention: nothing new
              "attn": lambda n: "self_attn" in n and n.split(".")[2] != "1",
              "all": lambda n: "embed_tokens" not in n and "lm_head" not in n}[train]
    assert chosen == {n for n, _ in student.named_parameters() if expect(n)} and chosen
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    finetune.distil(student, teacher, data["finetune"][:2], groups, fcfg)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == chosen  # every chosen tensor moved, nothing else did
    assert all(p.grad is None for n, p in student.named_parameters() if n not in chosen)  # frozen: no gradient
    assert all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())  # the teacher stays


def test_kl_falls_on_a_tiny_model(tiny_arch, tmp_path):
    fcfg, cfg, teacher, student, groups, data = student_and_groups(tiny_arch, tmp_path, "attn", tokens=4096,
                                                                   lr=1e-3)  # 32 steps: 0.0109 -> 0.0072
    before = finetune.held_out_kl(student, teacher, data["held_out"], cfg.kl_chunk)
    result = finetune.distil(student, teacher, data["finetune"], groups, fcfg)
    after = finetune.held_out_kl(student, teacher, data["held_out"], cfg.kl_chunk)
    losses = [h["loss"] for h in result["history"]]
    assert after < 0.8 * before, (before, after)  # on held-out text, not the training batches
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_written_arch_rebuilds_the_finetuned_model_bit_for_bit(tiny_arch, tmp_path):
    arch, student = finetune.run(fcfg_of(tiny_arch, tmp_path / "ft", tokens=512))
    written = json.loads((tmp_path / "ft" / "arch.json").read_text())
    assert written == arch and written["layers"] == LAYERS and written["finetune"]["tokens"] == 512
    record = written["finetune"]
    assert record["train"] == finetune.FinetuneConfig.train and len(record["history"]) == 512 // (2 * 64)
    assert record["data"]["finetune"]["tokens"] == [1024, 1536]  # after held out (256), prep (256), search (512)
    assert set(record["trained"]) == {n for n, p in student.named_parameters() if p.requires_grad}
    from safetensors.torch import load_file
    assert set(load_file(record["weights"])) == set(record["trained"])  # the changed weights only
    teacher, _ = dash.load_model(arch["model"])
    teacher_before = {n: p.clone() for n, p in teacher.named_parameters()}
    rebuilt, _ = dash.build_hybrid(tmp_path / "ft" / "arch.json", model=teacher)
    assert rebuilt is not teacher and all(torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, student(ids).logits)
        unfinetuned = dash.build_hybrid(tiny_arch)[0](ids).logits
    assert not torch.equal(unfinetuned, student(ids).logits)
    moved = {**written, "finetune": {**record, "weights": str(tmp_path / "gone.safetensors")}}
    with pytest.raises(dash.DashError, match="gone.safetensors not found"):
        dash.build_hybrid(moved, model=teacher)
    with pytest.raises(dash.DashError, match="sha256 differs"):
        dash.build_hybrid({**written, "finetune": {**record, "sha256": "0" * 64}}, model=teacher)


def test_resume_continues_exactly(tiny_arch, tmp_path, monkeypatch):
    straight, _ = finetune.run(fcfg_of(tiny_arch, tmp_path / "a", checkpoint_every=2))
    real = finetune.lr_scale

    def interrupted(step, steps, warmup):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, steps, warmup)
    monkeypatch.setattr(finetune, "lr_scale", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(fcfg_of(tiny_arch, tmp_path / "b", checkpoint_every=2))
    monkeypatch.setattr(finetune, "lr_scale", real)
    assert (tmp_path / "b" / "finetune.ckpt.pt").exists()
    resumed, _ = finetune.run(fcfg_of(tiny_arch, tmp_path / "b", checkpoint_every=2, resume=True))
    from safetensors.torch import load_file
    a, b = load_file(straight["finetune"]["weights"]), load_file(resumed["finetune"]["weights"])
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [h["loss"] for h in straight["finetune"]["history"]] == [h["loss"] for h in resumed["finetune"]["history"]]


def test_topk_kl_at_full_vocabulary_is_the_kl_and_smaller_k_looks_at_the_head():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g) * 3
    kl, grad = dash.kl_terms(zs, zt, 5)
    kl_k, grad_k = finetune.topk_terms(50)(zs, zt, 5)
    torch.testing.assert_close(kl_k, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad, rtol=1e-4, atol=1e-7)
    # k = 5: a student with the teacher's logits on its 5 most likely tokens, and the tail's logits shifted so that
    # the head holds the teacher's mass, has no top-k loss, whatever the tail's shape; the full KL sees the tail
    top = zt.topk(5, -1).indices
    head = torch.zeros_like(zt, dtype=torch.bool).scatter_(-1, top, True)
    z = torch.where(head, zt, torch.randn(5, 50, generator=g))
    lp_s = zt.log_softmax(-1).masked_fill(~head, -torch.inf).logsumexp(-1)      # log p_S
    c = zt.masked_fill(~head, -torch.inf).logsumexp(-1) + torch.log1p(-lp_s.exp()) - lp_s \
        - z.masked_fill(head, -torch.inf).logsumexp(-1)                         # tail logits + c: q_S = p_S
    z = torch.where(head, z, z + c[:, None])
    loss, _ = finetune.topk_terms(5)(z, zt, 5)
    assert loss.abs() < 1e-4 and dash.kl_terms(z, zt, 5)[0] > 0.1


def test_long_weights_favour_the_tokens_that_need_the_whole_context():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g) * 3
    kl, grad = dash.kl_terms(zs, zt, 3)
    kl_w, grad_w = finetune.weighted_terms(torch.ones(3))(zs, zt, 3)    # weight 1 everywhere: the KL
    torch.testing.assert_close((kl_w, grad_w), (kl, grad))
    kl_w, grad_w = finetune.weighted_terms(torch.tensor([2.0, 0.0, 1.0]))(zs, zt, 3)
    per_token = [dash.kl_terms(zs[i:i + 1], zt[i:i + 1], 3) for i in range(3)]
    torch.testing.assert_close(kl_w, 2 * per_token[0][0] + per_token[2][0])
    torch.testing.assert_close(grad_w, torch.cat([2 * per_token[0][1], 0 * per_token[1][1], per_token[2][1]]))
    # the head is the identity (hidden states are logits), 8 tokens; ids 0 -> 3 -> 5 -> 1
    head, ids = torch.nn.Identity(), torch.tensor([[0, 3, 5, 1]])
    h_teacher, h_short = torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)  # the short model: uniform, p_short = 1/8
    h_teacher[0, 0, 3] = 20.0     # the teacher is sure of the next token (3) where the window is not: ratio 8
    h_teacher[0, 2, 4] = 20.0     # the teacher is sure of a wrong one: ratio ~0
    w = finetune.long_weights(h_teacher, h_short, ids, head, chunk=2, cap=4.0)  # raw: 4 (capped), 1, ~0, 1 (last)
    torch.testing.assert_close(w, torch.tensor([4.0, 1.0, 0.0, 1.0]) / 1.5, atol=1e-6, rtol=0)


def test_long_weighted_finetune_trains_and_records_its_loss(tiny_arch, tmp_path):
    runs = {g: finetune.run(fcfg_of(tiny_arch, tmp_path / f"lw{g}", tokens=1024, lr=1e-3, long_weight=g))
            for g in (0.0, 20.0)}
    plain, weighted = (r[0]["finetune"] for r in runs.values())
    assert (plain["loss"], weighted["loss"]) == ("kl", "KL, tokens weighted by min(p / p_short, 20.0) (LongCE)")
    assert weighted["held_out_kl"]["after"] < weighted["held_out_kl"]["before"]
    moved = [not torch.equal(p, q) for p, q in zip(runs[0.0][1].parameters(), runs[20.0][1].parameters())]
    assert any(moved)  # the weights changed what was learnt


def test_hidden_loss_is_each_layers_squared_error_over_the_teachers_scale():
    t = [torch.randn(2, 5, 8), 100 * torch.randn(2, 5, 8)]  # a layer 100 times larger counts alike
    assert finetune.hidden_loss(t, t).item() == 0
    torch.testing.assert_close(finetune.hidden_loss([2 * x for x in t], t), torch.tensor(1.0))  # error = teacher
    torch.testing.assert_close(finetune.hidden_loss([t[0], 0 * t[1]], t), torch.tensor(0.5))  # mean over layers


def test_hidden_weighted_finetune_trains_and_records_its_loss(tiny_arch, tmp_path):
    runs = {g: finetune.run(fcfg_of(tiny_arch, tmp_path / f"h{g}", tokens=2048, lr=1e-3, hidden_weight=g))
            for g in (0.0, 3.0)}
    plain, hidden = (r[0]["finetune"] for r in runs.values())
    assert (plain["loss"], hidden["loss"]) == ("kl", "kl + 3.0 x per-layer hidden-state loss")
    assert "hidden" not in plain["history"][0]
    curve = [h["hidden"] for h in hidden["history"]]
    assert len(curve) == 16 and sum(curve[-4:]) < sum(curve[:4]), curve  # the per-layer loss falls
    assert hidden["held_out_kl"]["after"] < hidden["held_out_kl"]["before"]
    assert any(not torch.equal(p, q) for p, q in zip(runs[0.0][1].parameters(), runs[3.0][1].parameters()))


def test_the_small_models_defaults_and_the_papers():
    small = finetune.resolve(finetune.FinetuneConfig(), dict(model=str(dash.SMALL_MODEL)))
    assert (small.tokens, small.batch_size, small.hidden_weight) == (327_680, 1, 3.0)
    paper = finetune.resolve(finetune.FinetuneConfig(), dict(model="Qwen/Qwen2.5-3B-Instruct"))
    assert (paper.tokens, paper.batch_size, paper.hidden_weight) == (20_000_000, None, 0.0)  # None: the search's
    with pytest.raises(dash.DashError, match="--hidden-weight -1.0 must be at least 0"):
        finetune.resolve(finetune.FinetuneConfig(hidden_weight=-1.0), dict(model="Qwen/Qwen2.5-3B-Instruct"))


def test_batch_size_splits_the_same_tokens_into_more_steps(tiny_arch, tmp_path):
    *_, default = finetune.prepare(fcfg_of(tiny_arch, tmp_path, tokens=1024, epochs=2))
    *_, ones = finetune.prepare(fcfg_of(tiny_arch, tmp_path, tokens=1024, epochs=2, batch_size=1))
    b = default["finetune"].shape[1]
    assert b > 1 and ones["finetune"].shape == (len(default["finetune"]) * b, 1, default["finetune"].shape[-1])
    assert torch.equal(ones["finetune"].flatten(), default["finetune"].flatten())  # same sequences, same order
    *_, threes = finetune.prepare(fcfg_of(tiny_arch, tmp_path, tokens=1024, epochs=2, batch_size=3))
    assert threes["finetune"].shape[:2] == (len(ones["finetune"]) // 3, 3)  # whole batches: the rest is left out
    for bad, expect in ((0, "--batch-size 0 must be at least 1"), (10 ** 4, "--batch-size 10000: the finetuning")):
        with pytest.raises(dash.DashError, match=expect):
            finetune.prepare(fcfg_of(tiny_arch, tmp_path, batch_size=bad))


def test_ga_s2_scores_every_layer_with_the_same_tokens(tiny_arch, tmp_path):
    arch, fcfg, cfg, teacher, state, data = finetune.prepare(fcfg_of(tiny_arch, tmp_path, tokens=256))
    result = finetune.ga_s2(teacher, ["gdn", "gla", "gdn", "gla"], state, cfg, data["finetune"], data["held_out"],
                            fcfg)
    assert len(result["kl"]) == 4 and all(k > 0 for k in result["kl"])
    assert result["tokens"] == 4 * 256 and result["tokens_per_layer"] == 256


def test_bad_input_gets_one_clear_message_from_the_cli(tiny_arch, other_tiny_dir, tmp_path):
    """Through the command line, as a user meets them (the four run side by side: each pays for its imports)."""
    arch = json.loads(tiny_arch.read_text())
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    (tmp_path / "moved.json").write_text(json.dumps({**arch, "candidate_cache": str(tmp_path / "gone.safetensors")}))
    cases = {"was prepared for something else": ["arch.json", "--model", str(other_tiny_dir)],  # another model's
             "gone.safetensors not found": ["moved.json"],                                      # no candidates
             "lower finetune.py's --tokens": ["arch.json", "--tokens", str(10 ** 8)],           # too little text
             "--long-weight -1.0: 0 (off) or a cap > 0": ["arch.json", "--long-weight", "-1"]}
    runs = {expect: subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), "--device", "cpu", "--arch",
                                      str(tmp_path / arch_name), "--out", str(tmp_path / "out"), *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for expect, (arch_name, *args) in cases.items()}
    for expect, run in runs.items():
        _, err = run.communicate(timeout=120)
        assert run.returncode != 0 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("finetune: ") and expect in err, err


def test_too_little_text_for_the_small_teacher_names_the_script_that_writes_more(tiny_arch, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune.dash, "is_small_model", lambda model: True)  # the tiny model stands in for it
    with pytest.raises(dash.DashError, match=r"small_model/more_text.py --out DIR") as e:
        finetune.prepare(fcfg_of(tiny_arch, tmp_path, tokens=10 ** 8, lr=1e-3, lr_other=7e-5))
    assert str(e.value).count("(") == str(e.value).count(")")


def test_eval_ruler_scores_the_finetuned_hybrid_and_ga_s2(tiny_arch, tmp_path, monkeypatch):
    import eval_ruler as er
    finetune.run(fcfg_of(tiny_arch, tmp_path / "ft", tokens=256))
    scored = []
    real = er.ruler.run_tasks

    def run_tasks(model, tokenizer, samples, batch_size, name):  # which model each row ran
        with torch.no_grad():
            scored.append((name, model(torch.arange(3, 40)[None]).logits))
        return real(model, tokenizer, samples, batch_size, name)
    monkeypatch.setattr(er.ruler, "run_tasks", run_tasks)
    er.main(["--arch", str(tmp_path / "ft" / "arch.json"), "--tasks", "niah_single_2", "--lengths", "512",
             "--samples", "1", "--baselines", "ga-s2", "--ga-tokens", "256", "--fill", "gdn", "--device", "cpu",
             "--kernels", "torch", "--out", str(tmp_path / "ruler")])
    rows = dict(scored)
    assert list(rows) == ["teacher", "dash", "dash (placement, fill)", "ga-s2"]
    rebuilt, _ = dash.build_hybrid(tmp_path / "ft" / "arch.json")
    with torch.no_grad():
        assert torch.equal(rows["dash"], rebuilt(torch.arange(3, 40)[None]).logits)  # the finetuned one
    assert not torch.equal(rows["dash"], rows["dash (placement, fill)"])            # the same layers, not finetuned
    saved = json.loads((tmp_path / "ruler" / "results.json").read_text())
    assert saved["selector_costs"]["ga-s2"]["tokens"] == 4 * 256 and saved["finetune"]["tokens"] == 256
