"""The search core on tiny random Qwen2 models, CPU: operators, mixed layer, objective, search, export, CLI."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import dash
import prepare_candidates
from conftest import check_chunked_is_the_recurrence, plain_kl_and_grad, rel, tiny_cfg

NAMES = ["full", "swa", "gla", "gdn"]


# ----------------------------------------------------------------------------- operators

def linear_inputs(B=2, T=63, H=3, K=8, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, V, generator=g)
    return q, k, v, torch.randn(B, H, K, V, generator=g), g


@pytest.mark.parametrize("T", [1, 15, 63, 130])
def test_gla_chunked_is_the_recurrence(T):
    q, k, v, s0, gen = linear_inputs(T=T)
    g = (F.logsigmoid(torch.randn(q.shape, generator=gen) * 4) / 2).clamp_min(dash.GLA.floor)
    check_chunked_is_the_recurrence(dash.gla_chunked, dash.gla_recurrent, (q, k, v, g, s0))


@pytest.mark.parametrize("T", [1, 15, 63, 130])
def test_gdn_chunked_is_the_recurrence(T):
    q, k, v, s0, gen = linear_inputs(T=T)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = F.logsigmoid(torch.randn(q.shape[:3], generator=gen) * 2)
    beta = torch.rand(q.shape[:3], generator=gen)
    check_chunked_is_the_recurrence(dash.gdn_chunked, dash.gdn_recurrent, (q, k, v, g, beta, s0))


def test_the_delta_rule_recalls_what_it_wrote():
    """A known answer: with no decay and beta = 1, writing v at an orthonormal key and reading it back returns v."""
    K = V = 4
    k = torch.eye(K)[None, :, None, :]                      # (1, 4, 1, 4): four orthonormal keys
    v = torch.randn(1, K, 1, V)
    o, S = dash.gdn_recurrent(k, k, v, torch.zeros(1, K, 1), torch.ones(1, K, 1), 1.0)
    assert torch.allclose(o, v, atol=1e-6)
    assert torch.allclose(S[0, 0], v[0, :, 0], atol=1e-6)   # the memory holds v_i at row i


def test_sliding_window_sees_only_the_window(tiny):
    """The window operator equals full attention when the window covers the sequence, and differs otherwise;
    with window 1 each token only sees itself, so the output is its own value."""
    model, _ = tiny
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 20, model.config.hidden_size)
    rope = model.model.rotary_emb(x, torch.arange(20)[None])
    p = dash.project(attn, x, rope)
    full = dash.FullAttention(attn, dash.Config(kernels="torch"))(p)
    wide = dash.SlidingWindowAttention(attn, dash.Config(window=20, kernels="torch"))(p)
    narrow = dash.SlidingWindowAttention(attn, dash.Config(window=4, kernels="torch"))(p)
    one = dash.SlidingWindowAttention(attn, dash.Config(window=1, kernels="torch"))(p)
    assert torch.allclose(wide, full, atol=1e-5)
    assert torch.allclose(narrow[:, :4], full[:, :4], atol=1e-5) and not torch.allclose(narrow, full, atol=1e-3)
    assert torch.allclose(one, p.v.repeat_interleave(attn.num_key_value_groups, 2), atol=1e-6)


def test_registry_and_unknown_operator():
    assert dash.candidate_names("full, gla") == ["full", "gla"]
    with pytest.raises(dash.DashError, match="unknown operator 'mamba'.*full, swa, gla, gdn"):
        dash.candidate_names("full,mamba")
    with pytest.raises(dash.DashError, match="need 'full'"):
        dash.candidate_names("gla,gdn")

# ----------------------------------------------------------------------------- mixed layer


def mixed(model, cfg, names=NAMES):
    ops = dash.make_ops(model, names, cfg)
    dash.install(model, ops)
    return ops


def one_hot(L, n, i):
    logits = torch.full((L, n), -torch.inf)
    logits[:, i] = 0
    return logits.softmax(-1)  # exactly 0 and 1


def test_one_hot_full_is_the_teacher(tiny, text_file, tiny_dir):
    model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    teacher = model(ids, use_cache=False).logits
    mixed(model, tiny_cfg(tiny_dir, text_file))
    dash.set_probs(model, one_hot(4, 4, 0))
    assert torch.equal(model(ids, use_cache=False).logits, teacher)
    dash.set_probs(model, None)  # teacher mode
    assert torch.equal(model(ids, use_cache=False).logits, teacher)


def test_one_hot_candidate_is_that_candidate_and_uniform_is_the_mean(tiny, text_file, tiny_dir):
    model, _ = tiny
    ops = mixed(model, tiny_cfg(tiny_dir, text_file))
    layer = model.model.layers[1].self_attn
    x = torch.randn(2, 30, model.config.hidden_size)
    rope = model.model.rotary_emb(x, torch.arange(30)[None])
    p = dash.project(layer.attn, x, rope)
    outs = {n: layer.attn.o_proj(op(p).flatten(2)) for n, op in ops[1].items()}
    for i, n in enumerate(NAMES):
        dash.set_probs(model, one_hot(4, 4, i))
        assert torch.equal(layer(x, rope)[0], outs[n]), n
    dash.set_probs(model, torch.full((4, 4), 0.25))
    assert torch.allclose(layer(x, rope)[0], torch.stack(list(outs.values())).mean(0), atol=1e-5)
    assert len({round(o.abs().sum().item(), 3) for o in outs.values()}) == 4  # the operators really differ


def test_only_the_logits_get_gradients_and_weights_stay_bit_identical(tiny, text_file, tiny_dir, monkeypatch):
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file), 4)
    ops = mixed(model, cfg)
    for layer in ops:  # make the candidates' weights non-trivial, as prepared ones are
        for op in layer.values():
            for p in op.parameters():
                p.data.add_(0.01 * torch.randn_like(p))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizers = []
    real_adam = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, **kw: optimizers.append(real_adam(params, **kw)) or optimizers[-1])
    batches = dash.load_data(tok, cfg, parts=("search",))["search"][:3]
    result = dash.search(model, batches, NAMES, cfg)
    (opt,) = optimizers
    (group,) = opt.param_groups
    assert len(group["params"]) == 1 and group["params"][0].shape == (4, 4)  # the optimizer holds alpha alone
    assert not torch.equal(result["alpha"], torch.zeros(4, 4))               # ... and alpha moved
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_reaches_alpha_through_every_layer(tiny, text_file, tiny_dir):
    model, _ = tiny
    mixed(model, tiny_cfg(tiny_dir, text_file))
    alpha = torch.zeros(4, 4, requires_grad=True)
    dash.set_probs(model, alpha.softmax(-1))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    model.model(input_ids=ids, use_cache=False).last_hidden_state.pow(2).mean().backward()
    assert (alpha.grad.abs().sum(-1) > 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_a_step_is_the_plain_kl_and_its_gradient(tiny, text_file, tiny_dir):
    """kl_and_grad(): the search's own decoder pass (final_hidden) and the chunked KL give what HF's forward and a
    plain full-vocabulary KL give: the same KL(teacher || mixture), the same gradient w.r.t. the weights; so does
    the batch in micro-batches of one sequence."""
    model, _ = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, kl_chunk=16), 4)
    mixed(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).softmax(-1)
    kl, dkl_dw = dash.kl_and_grad(model, ids, w, [[True] * 4] * 4, cfg)
    cfg.micro_batch = 1
    kl_micro, dkl_dw_micro = dash.kl_and_grad(model, ids, w, [[True] * 4] * 4, cfg)
    kl_ref, dkl_dw_ref = plain_kl_and_grad(model, ids, w)
    assert torch.allclose(kl, kl_ref, rtol=1e-4), (kl, kl_ref)
    assert torch.allclose(dkl_dw, dkl_dw_ref, rtol=1e-3, atol=1e-8), (dkl_dw - dkl_dw_ref).abs().max()
    assert (dkl_dw.abs() > 0).all()
    assert torch.allclose(kl_micro, kl_ref, rtol=1e-4), (kl_micro, kl_ref)
    assert torch.allclose(dkl_dw_micro, dkl_dw_ref, rtol=1e-3, atol=1e-8), (dkl_dw_micro - dkl_dw_ref).abs().max()
    with pytest.raises(dash.DashError, match="cannot use a cache"):  # the operators would share one cache slot
        model(ids, use_cache=True)

# ----------------------------------------------------------------------------- objective


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_kl_equals_unchunked(compiled):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hs, ht = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 9, 16)
    terms = torch.compile(dash.kl_terms, dynamic=False) if compiled else dash.kl_terms  # as search() with --compile
    kl = dash.chunked_kl(hs, ht, head, chunk=4, terms=terms)
    log_q, log_p = F.log_softmax(head(hs), -1), F.log_softmax(head(ht), -1)
    ref = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    assert torch.allclose(kl, ref, atol=1e-6)
    g, = torch.autograd.grad(kl, hs)
    g_ref, = torch.autograd.grad(ref, hs)
    assert torch.allclose(g, g_ref, atol=1e-6)
    assert dash.chunked_kl(ht, ht, head, 4, terms).abs() < 1e-6


@pytest.mark.parametrize("k", [1, 3])
def test_budget_term_moves_expected_full_layers_to_k(k):
    cfg = dash.Config(k=k, entropy=0.0)
    alpha = torch.zeros(4, 3, requires_grad=True)  # uniform: E[full] = 4/3
    opt = torch.optim.Adam([alpha], lr=0.05)
    for _ in range(200):
        w = alpha.softmax(-1)
        loss = sum(dash.regularizers(w, ["full", "swa", "gla"], cfg, torch.ones(3), 1.0).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(alpha.softmax(-1)[:, 0].sum().item() - k) < 0.05


def test_other_regularizers_push_the_right_way():
    cfg = dash.Config(k=2, budget=0.0, cost=1.0, entropy=1.0, continuity=1.0)
    w = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    terms = dash.regularizers(w, ["full", "swa"], cfg, torch.tensor([1.0, 0.1]), progress=1.0)
    assert terms["entropy"].item() == pytest.approx(2 / 3)          # two of three layers undecided
    assert terms["continuity"].item() == pytest.approx(0.25)        # one jump of 0.5 over two pairs
    assert terms["cost"].item() == pytest.approx((0.55 + 0.55 + 1.0) / 3)


def test_temperature_anneals_from_start_to_end():
    cfg = dash.Config(tau_start=1.0, tau_end=0.1)
    assert dash.tau_at(0, 11, cfg) == 1.0 and dash.tau_at(10, 11, cfg) == pytest.approx(0.1)
    assert dash.tau_at(5, 11, cfg) == pytest.approx(0.1 ** 0.5)

# ----------------------------------------------------------------------------- export


def test_export_keeps_the_k_most_wanted_layers():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.5, 0.1, 0.4]])
    assert dash.choose_layers(probs, ["full", "swa", "gla"], k=2) == ["gla", "full", "swa", "full"]
    assert dash.choose_layers(probs, ["full", "swa", "gla"], k=1) == ["gla", "full", "swa", "gla"]
    assert dash.choose_layers(probs, ["full", "swa", "gla"], threshold=0.25) == ["gla", "full", "full", "full"]


def test_cli_end_to_end_writes_an_architecture_that_builds_a_working_hybrid(tiny_dir, text_file, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cands.safetensors"
    dash.main(["--model", str(tiny_dir), "--data", str(text_file), "--tokens", "512", "--seq-len", "64",
               "--batch-size", "2", "--k", "1", "--window", "8", "--prep-tokens", "256", "--cache", str(cache),
               "--out", str(out), "--check-samples", "0", "--device", "cpu"])
    arch = json.loads((out / "arch.json").read_text())
    assert arch["candidates"] == NAMES and arch["k"] == 1 and arch["tokens"] == 512
    assert arch["relaxed"]["full_layers"] and arch["polished"]["kl"] <= arch["polished"]["kl_relaxed"]
    assert arch["data"]["search"]["tokens"] == [512, 1024] and len(arch["history"]) == 4
    assert len(arch["layers"]) == 4 and arch["layers"].count("full") == 1
    assert all(n in NAMES for n in arch["layers"]) and len(arch["probabilities"]) == 4
    assert arch["config"]["seed"] == 0 and arch["wall_time_s"] >= 0 and arch["candidate_cache"] == str(cache)
    assert list(arch["phase_s"]) == ["load", "data", "candidates", "search", "polish"]  # no check: 0 samples
    assert arch["phase_s"]["search"] >= arch["wall_time_s"] - 0.1 and arch["graph_captures"] is None
    p_full = torch.tensor(arch["probabilities"])[:, 0]
    assert arch["relaxed"]["full_layers"] == [int(p_full.argmax())]
    model, tok = dash.build_hybrid(out / "arch.json")
    assert [type(l.self_attn.op).__name__ for l in model.model.layers].count("FullAttention") == 1
    ids = tok("def main(argv):", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)
    assert json.loads(json.dumps(arch)) == arch  # round-trips
    arch["layers"][arch["layers"].index("full") - 1] = "gdn"
    arch["candidate_cache"] = str(tmp_path / "moved.safetensors")  # weights moved away: one clear message
    with pytest.raises(dash.DashError, match="moved.safetensors not found"):
        dash.build_hybrid(arch)
    del arch["config"]
    with pytest.raises(dash.DashError, match="not an architecture written by dash.py: it has no config"):
        dash.build_hybrid(arch)


# ----------------------------------------------------------------------------- candidates cache


def test_prepare_lowers_the_alignment_loss_and_the_cache_round_trips(tiny, tiny_dir, text_file, tmp_path):
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(tmp_path / "c.safetensors"), prep_tokens=1024), 4)
    data = dash.load_data(tok, cfg)
    path, state = dash.load_or_prepare(model, NAMES, cfg, data)
    report = json.loads((tmp_path / "c.json").read_text())
    for layer in report["layers"]:
        for n in ("gla", "gdn"):
            assert layer[n]["after"] < layer[n]["before"], (n, layer)
        assert layer["swa"]["after"] == layer["swa"]["before"]  # nothing to train
    # held out, preparation and search read disjoint tokens, and the report says which
    ranges = data["record"]
    assert ranges["held_out"]["tokens"] == [0, 256] and ranges["prep"]["tokens"] == [256, 1280]
    assert ranges["search"]["tokens"] == [1280, 1792] and report["data"]["prep"] == ranges["prep"]
    # loaded back, the operators give bit-identical outputs
    ops_a, ops_b = dash.make_ops(model, NAMES, cfg), dash.make_ops(model, NAMES, cfg)
    dash.load_candidates(ops_a, state)
    _, again = dash.load_or_prepare(model, NAMES, cfg, data)  # found, not prepared again
    dash.load_candidates(ops_b, again)
    attn = model.model.layers[2].self_attn
    x = torch.randn(1, 20, 64)
    p = dash.project(attn, x, model.model.rotary_emb(x, torch.arange(20)[None]))
    for n in ("gla", "gdn"):
        assert torch.equal(ops_a[2][n](p), ops_b[2][n](p))
    assert report["wall_time_s"] > 0 and 0 <= report["held_out_s"] <= report["wall_time_s"]


def test_cache_made_for_something_else_is_refused(tiny_dir, other_tiny_dir, text_file, tmp_path):
    cache = tmp_path / "c.safetensors"
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(cache)), 4)
    model, tok = dash.load_model(str(tiny_dir))
    data = dash.load_data(tok, cfg)
    dash.load_or_prepare(model, NAMES, cfg, data)
    other, tok = dash.load_model(str(other_tiny_dir))
    cfg_other = dash.resolve(tiny_cfg(other_tiny_dir, text_file, cache=str(cache)), 4)
    with pytest.raises(dash.DashError, match="prepared for something else: weights"):
        dash.load_or_prepare(other, NAMES, cfg_other, data)
    cfg_window = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(cache), window=16), 4)
    with pytest.raises(dash.DashError, match="operators.swa.window"):
        dash.load_or_prepare(model, NAMES, cfg_window, data)
    cfg_data = dash.resolve(tiny_cfg(tiny_dir, text_file, cache=str(cache), prep_tokens=384), 4)
    with pytest.raises(dash.DashError, match="data.tokens"):
        dash.load_or_prepare(model, NAMES, cfg_data, dash.load_data(tok, cfg_data))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file at all
    with pytest.raises(dash.DashError, match="junk.safetensors is not a readable candidate file"):
        dash.read_candidates(tmp_path / "junk.safetensors", {})


def test_rerun_skips_and_interrupted_run_resumes(tiny, tiny_dir, text_file, tmp_path, monkeypatch, capsys):
    model, tok = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, prep_tokens=1024, checkpoint_every=3, held_out=1), 4)
    names = ["swa", "gla", "gdn"]
    data = dash.load_data(tok, cfg, parts=("held_out", "prep"))
    fp = dash.fingerprint(model, names, cfg, data)
    path = tmp_path / "c.safetensors"
    full = dash.align(model, names, cfg, data, path, fp)  # 8 steps straight through
    reference = dash.read_candidates(path, fp)
    path.unlink()
    # interrupt the same run after step 4 (a checkpoint was written at 3), then run it again
    real_capture, calls = dash.capture, []

    def dying_capture(m, ids):
        calls.append(1)
        if len(calls) == 1 + 1 + 4 + 1:  # calibration, eval before, steps 0..3, then the fifth step
            raise KeyboardInterrupt
        return real_capture(m, ids)
    monkeypatch.setattr(dash, "capture", dying_capture)
    with pytest.raises(KeyboardInterrupt):
        dash.align(model, names, cfg, data, path, fp)
    assert path.with_suffix(".partial.pt").exists() and not path.exists()
    monkeypatch.setattr(dash, "capture", real_capture)
    resumed = dash.align(model, names, cfg, data, path, fp)
    assert "resuming from" in capsys.readouterr().out
    assert len(resumed["curve"]) == 8 - 3
    state = dash.read_candidates(path, fp)
    assert all(torch.allclose(state[k], reference[k], atol=1e-6) for k in reference)
    assert full["curve"][3:] == pytest.approx(resumed["curve"], abs=1e-5)
    # and the CLI finds the finished file, checks it, and does nothing
    prepare_candidates.main(["--model", str(tiny_dir), "--tokens", "1024", "--seq-len", "64", "--batch-size", "2",
                             "--data", str(text_file), "--window", "8", "--kernels", "torch",
                             "--checkpoint-every", "3", "--held-out", "1", "--cache", str(path)])
    assert "nothing to do" in capsys.readouterr().out

# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_get_one_clear_message(tiny_dir, text_file, tmp_path, capsys):
    def fails(args, match):
        with pytest.raises(SystemExit) as e:
            dash.main(["--model", str(tiny_dir), "--data", str(text_file), "--device", "cpu", "--out",
                       str(tmp_path), "--check-samples", "0"] + args)
        assert e.value.code.startswith("dash: ") and match in e.value.code, e.value.code

    fails(["--candidates", "full,mamba"], "unknown operator 'mamba'")
    fails(["--k", "4"], "--k 4 is out of range: the model has 4 layers")
    fails(["--k", "0"], "out of range")
    fails(["--batch-size", "4", "--micro-batch", "3"], "--micro-batch 3 must divide --batch-size 4")
    fails(["--kernels", "fla"], "fla's Triton kernels need a CUDA GPU")
    fails(["--cuda-graph"], "--cuda-graph: CUDA graphs need a CUDA GPU")
    fails(["--cuda-graph", "--fsdp"], "--cuda-graph with --fsdp")
    fails(["--no-prepare", "--cache", str(tmp_path / "none.safetensors"), "--tokens", "512", "--prep-tokens", "256",
           "--seq-len", "64", "--batch-size", "2"], "no candidate weights at")
    fails(["--data", str(tmp_path / "nope.txt")], "no such file")
    notlm = tmp_path / "vit"
    from transformers import ViTConfig
    ViTConfig().save_pretrained(notlm)
    fails(["--model", str(notlm)], "is not a causal language model")
    fails(["--model", str(tmp_path / "missing")], "could not load")
    granite = tmp_path / "granite"  # Llama-style attention, but its forward scales the embeddings
    from transformers import AutoTokenizer, GraniteConfig, GraniteForCausalLM
    GraniteForCausalLM(GraniteConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     embedding_multiplier=12.0)).save_pretrained(granite)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(granite)
    fails(["--model", str(granite)], "is not embeddings, layers, norm")


def test_offline_hub_data_says_what_to_pass(monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at call time: no network wait
    with pytest.raises(dash.DashError, match="Offline, pass local text with --data"):
        next(dash.read_texts("hub:allenai/c4/en/c4-train.00000-of-01024.json.gz"))


def test_data_reads_txt_jsonl_and_gz(tmp_path, tiny):
    import gzip
    _, tok = tiny
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "jsonl line " * 50}) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped " * 50}) + "\n")
    docs = list(dash.read_texts(str(tmp_path)))
    assert [d.split()[0] for d in docs] == ["hello", "jsonl", "gzipped"]
    cfg = dash.Config(data=str(tmp_path), seq_len=16, batch_size=2, held_out=1, prep_tokens=32, tokens=64)
    data = dash.load_data(tok, cfg)
    assert data["held_out"].shape == (1, 2, 16) and data["prep"].shape == (1, 2, 16) and data["search"].shape == (2, 2, 16)
    with pytest.raises(dash.DashError, match="lower --tokens or --prep-tokens"):
        dash.load_data(tok, dash.Config(data=str(tmp_path), seq_len=16, batch_size=2, held_out=1, prep_tokens=32,
                                        tokens=32_000))


@pytest.mark.parametrize("need", [100, 5_000, None])  # None: past the first list of documents (1M characters)
def test_the_token_stream_is_each_document_tokenized_alone_then_eos(tiny, need):
    """token_stream tokenizes lists of documents in one call each (text_batches): the same tokens as one document
    at a time, each followed by EOS, cut at the need."""
    _, tok = tiny
    spec = str(dash.SMALL_MODEL / "search_data.jsonl.gz")
    docs = [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for text in dash.read_texts(spec)]
    first = list(dash.text_batches(dash.read_texts(spec), 10**9))[0]  # the first list when the need is large
    need = need or sum(map(len, docs[:len(first)])) + 1000
    ref = [t for d in docs for t in d][:need]
    assert len(ref) == need and torch.equal(dash.token_stream(tok, spec, need), torch.tensor(ref))
    batches = list(dash.text_batches(dash.read_texts(spec), need))
    assert [d for b in batches for d in b] == list(dash.read_texts(spec))  # every document once, in order
    assert all(sum(map(len, b[:-1])) < min(1_000_000, 2 * need) for b in batches)  # a list closes at its limit
    assert len(first) < len(docs) and sum(map(len, first)) >= 1_000_000


def test_teacher_gradient_mode_same_values_exact_last_layer_and_no_op_graph(tiny, text_file, tiny_dir):
    """--grad teacher: the same forward values; the last layer's logit gradient is exact (nothing lies above it);
    earlier layers' differ (they see the teacher's Jacobian instead of the mixture's)."""
    model, _ = tiny
    ops = mixed(model, tiny_cfg(tiny_dir, text_file))
    for layer in ops:
        for op in layer.values():
            for p in op.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    grads, outs = {}, {}
    for grad in ("exact", "teacher"):
        alpha = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        dash.set_probs(model, alpha.softmax(-1), grad=grad)
        outs[grad] = model.model(input_ids=ids, use_cache=False).last_hidden_state
        outs[grad].pow(2).mean().backward()
        grads[grad] = alpha.grad
    assert torch.allclose(outs["exact"], outs["teacher"], atol=1e-6)
    assert torch.allclose(grads["exact"][-1], grads["teacher"][-1], rtol=1e-4, atol=1e-8)
    assert not torch.allclose(grads["exact"][0], grads["teacher"][0], rtol=1e-3)
    assert all(p.grad is None for p in model.parameters())


def test_the_readme_operator_example_works(tiny, tiny_dir, text_file, tmp_path):
    """README's 'Adding an operator' code, run as written: the new operator is prepared, searched and exported."""
    readme = (dash.HERE / "README.md").read_text()
    code = readme.split("## Adding an operator")[1].split("```python")[1].split("```")[0]
    exec(compile(code, "README.md", "exec"), {})
    try:
        model, tok = tiny
        cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, candidates="full,elu", cache=str(tmp_path / "c.safetensors")), 4)
        data = dash.load_data(tok, cfg)
        _, state = dash.load_or_prepare(model, ["full", "elu"], cfg, data)
        assert any(k.startswith("layers.0.elu.") for k in state)
        ops = dash.make_ops(model, ["full", "elu"], cfg)
        dash.load_candidates(ops, state)
        dash.install(model, ops)
        result = dash.search(model, data["search"][:2], ["full", "elu"], cfg)
        assert dash.choose_layers(result["probs"], ["full", "elu"], k=1).count("elu") == 3
    finally:
        dash.CANDIDATES.pop("elu", None)


def test_compiled_layers_give_the_same_mixture_and_gradient(tiny, text_file, tiny_dir):
    """--compile compiles whole decoder layers (the operators' kernels run between graphs): same teacher, same
    mixture, same logit gradients as eager, for both gradients, with each layer's own set of operators left as
    pruning leaves them (one layer down to full attention alone); then undone. torch 2.11's compiled
    autograd.Function gave a zero gradient here."""
    model, _ = tiny
    mixed(model, tiny_cfg(tiny_dir, text_file))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    alpha = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    alpha[0, 1:] = -30  # layer 0: full attention alone
    alpha[1, 2] = -30   # layer 1: gla skipped
    alpha[3, 0] = -30   # layer 3: full attention skipped; layer 2 keeps all four
    results = []
    for compiled in (False, True):
        dash.compile_layers(model, on=compiled)
        assert all((l._compiled_call_impl is not None) == compiled for l in model.model.layers)
        with torch.no_grad():
            dash.set_probs(model, None)
            res = [model.model(input_ids=ids, use_cache=False).last_hidden_state]
        for grad in ("exact", "teacher"):
            a = alpha.clone().requires_grad_()
            w = a.softmax(-1)
            dash.set_probs(model, w, (w > 1e-3).tolist(), grad=grad)
            out = model.model(input_ids=ids, use_cache=False).last_hidden_state
            out.pow(2).mean().backward()
            res += [out.detach(), a.grad]
        results.append(res)
    dash.compile_layers(model, on=False)
    assert all(l._compiled_call_impl is None for l in model.model.layers)
    for eager, compiled in zip(*results):  # relative to the norm: the gradients are ~1e-5, below any fixed atol
        assert (eager - compiled).norm() <= 1e-3 * eager.norm(), (eager - compiled).abs().max()
    assert not torch.allclose(results[0][2], results[0][4])  # the two gradients differ: both paths were checked
    choice = (alpha > -30) & ((alpha > -30).sum(-1, keepdim=True) > 1)  # layer 0's lone operator: dL/dalpha = 0
    assert (results[0][2][choice].abs() > 1e-9).all()  # every operator with a choice left has a gradient to compare


def test_a_step_that_still_runs_pruned_operators_at_weight_zero_is_the_pruned_step(tiny, text_file, tiny_dir):
    """--cuda-graph keeps replaying a graph captured before some operators were pruned (graph_covers): those run at
    weight exactly 0. The KL and the remaining operators' dKL/dw are then the step that runs only what is left."""
    model, _ = tiny
    cfg = dash.resolve(tiny_cfg(tiny_dir, text_file, kl_chunk=16), 4)
    mixed(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    alive = torch.ones(4, 4, dtype=torch.bool)
    alive[0, 1] = alive[2, 0] = alive[3, 2] = alive[3, 3] = False
    w = dash.masked_softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), alive, 1.0)
    kl, g = dash.kl_and_grad(model, ids, w, alive.tolist(), cfg)
    kl_all, g_all = dash.kl_and_grad(model, ids, w, [[True] * 4] * 4, cfg)
    assert torch.allclose(kl_all, kl, rtol=1e-6), (kl_all, kl)
    assert torch.allclose(g_all[alive], g[alive], rtol=1e-5, atol=1e-9), (g_all - g)[alive].abs().max()
    assert (g[~alive] == 0).all() and (g_all[~alive] != 0).all()  # graphed() zeroes these: they did not run


@pytest.mark.parametrize("graph, active, grad, covers", [
    (None, [[True, True]] * 4, "exact", False),                                   # nothing captured yet
    ([[True, True]] * 4, [[True, True]] * 4, "exact", True),                      # the same operators
    ([[True, True]] * 4, [[True, True]] * 4, "teacher", True),
    ([[True, True]] * 4, [[True, False]] + [[True, True]] * 3, "exact", True),    # 1 of 8 pruned: under the slack
    ([[True, True]] * 4, [[True, False]] * 2 + [[True, True]] * 2, "exact", False),  # 2 of 8: a new capture
    ([[True, True]] * 4, [[True, False]] + [[True, True]] * 3, "teacher", False),  # the backward depends on it
    ([[True, False]] + [[True, True]] * 3, [[True, True]] * 4, "exact", False),   # an operator the graph lacks
])
def test_a_cuda_graph_runs_on_after_pruning_while_little_of_it_is_pruned(graph, active, grad, covers):
    assert dash.GRAPH_SLACK == 0.25
    assert dash.graph_covers(graph, active, grad) is covers


def test_the_small_teacher_is_known_by_its_config_in_a_copy(tmp_path, tiny_dir):
    """A copy of the project (an export, a second checkout) gets the small model's defaults too."""
    import shutil
    shutil.copytree(dash.SMALL_MODEL, tmp_path / "small_model", ignore=shutil.ignore_patterns("*.safetensors", "*.gz"))
    assert dash.is_small_model(str(dash.SMALL_MODEL)) and dash.is_small_model(str(tmp_path / "small_model"))
    assert not dash.is_small_model(str(tiny_dir)) and not dash.is_small_model("Qwen/Qwen2.5-3B-Instruct")
    cfg = dash.resolve(dash.Config(model=str(tmp_path / "small_model")), 8)
    assert cfg.seq_len == dash.SMALL["seq_len"] and cfg.window == dash.SMALL["window"]


def test_recompute_mlp_keeps_less_and_gives_the_same_gradient(tiny, text_file, tiny_dir):
    """--recompute-mlp: the MLPs keep only their inputs for the backward pass (fewer saved numbers), the KL and its
    gradient w.r.t. the probabilities are the same, the teacher gets no gradients and keeps its parameter names;
    then undone."""
    model, _ = tiny
    names_before = [n for n, _ in dash.teacher_parameters(model)]
    cfg = tiny_cfg(tiny_dir, text_file)
    mixed(model, cfg)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)).softmax(-1)
    active = [[True] * 4] * 4
    results = []
    for on in (False, True, False):
        dash.recompute_mlp(model, on=on)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            kl, grad = dash.kl_and_grad(model, ids, w, active, cfg)
        results.append((kl, grad, sum(saved)))
    (kl0, g0, n0), (kl1, g1, n1), (kl2, g2, n2) = results
    assert torch.allclose(kl0, kl1, rtol=1e-6) and torch.allclose(g0, g1, rtol=1e-5, atol=1e-9)
    # per layer, at least the gate and up projections (2 x 24 tokens x 128 intermediate each, 2 rows) are not kept
    assert n1 <= n0 - 4 * 2 * 2 * 24 * 128
    assert n2 == n0 and torch.equal(g2, g0)  # off again: as before
    assert all(p.grad is None for p in model.parameters())
    assert [n for n, _ in dash.teacher_parameters(model)] == names_before


@pytest.mark.parametrize("script", ["dash", "prepare_candidates", "finetune", "eval_ruler"])
def test_every_cli_prints_its_help(script, capsys):
    """argparse %-formats help text: a bare '%' in a flag's help ('5% warm-up') made --help a traceback."""
    import importlib
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main(["--help"])
    assert stop.value.code == 0
    assert "--" in capsys.readouterr().out


@pytest.mark.parametrize("gpu, cap, expect", [("NVIDIA H100 80GB HBM3", (9, 0), "NVIDIA_H100_80GB_HBM3"),
                                              ("NVIDIA H200", (9, 0), "NVIDIA_H100_80GB_HBM3"),
                                              ("NVIDIA A100-SXM4-80GB", (8, 0), None)])
def test_shipped_fla_configs_serve_every_gpu_of_their_architecture(gpu, cap, expect, monkeypatch):
    # a copy without FLA_*: what use_fla_configs sets must not leak into the tests after this one
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("FLA_")})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: cap)
    dash.use_fla_configs()
    assert os.environ.get("FLA_CONFIG_DIR") == (expect and str(dash.HERE / "fla_configs" / expect))
    assert os.environ.get("FLA_CACHE_MODE") == (expect and "fuzzy")
