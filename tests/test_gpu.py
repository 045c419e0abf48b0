"""GPU tests (skipped without CUDA; run on the H100 with fla): every operator's fla path against its pure-torch
reference, outputs and input gradients with explicit tolerances; a search step, a preparation step and
generation on a Qwen2.5-3B-shaped model with random weights (same speed and memory as the real one).
    pytest -m gpu tests/test_gpu.py"""
import math

import pytest
import torch

import dash

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
if torch.cuda.is_available():
    dash.use_fla_configs()  # as dash.py does: the shipped autotune configs, read when fla is first imported

# bf16 kernels against fp32 references: fla's own tests accept a few 1e-3 of RMS error (../shared/gpu/check.py
# measured 3.5e-3 to 5e-3 on an H100); gradients through a chunked recurrence gather a bit more.
TOL = {"out": 2e-2, "grad": 3e-2}


def rms_err(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def qwen_attention(hidden=2048, heads=16, kv=2, head_dim=128):
    """One Qwen2 attention module at the 3B model's head size, with trained-looking (non-tiny) weights."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
    config = Qwen2Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         intermediate_size=4 * hidden, num_hidden_layers=1, rope_theta=1e6)
    torch.manual_seed(0)
    attn = Qwen2Attention(config, 0).cuda()
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        torch.nn.init.normal_(lin.weight, std=hidden ** -0.5)
    return attn, Qwen2RotaryEmbedding(config).cuda()


def run_op(name, attn, rope_emb, x, kernels, dtype, frozen=False):
    """One operator's output on x, with its weights moved off their init (the same on every call). frozen: as the
    search and the hybrids run it (NAtS then takes hard types and sdpa). Casts attn to dtype: fp32 calls first."""
    torch.manual_seed(1)  # the same operator weights on both paths
    op = dash.CANDIDATES[name](attn, dash.Config(window=64, kernels=kernels)).cuda()
    with torch.no_grad():  # away from the identity init, as prepared candidates are
        for p in op.parameters():
            p.add_(0.02 * torch.randn_like(p))
    op.requires_grad_(not frozen)
    attn = attn.to(dtype)
    x = x.to(dtype).detach().requires_grad_()
    rope = rope_emb(x, torch.arange(x.shape[1], device="cuda")[None])
    p = dash.project(attn, x, rope)
    y = op(p)
    return y, x, op


@pytest.mark.parametrize("name", ["gla", "gdn", "swa", "rwkv7"])
@pytest.mark.parametrize("T", [63, 2048])  # odd, and the search length (shapes shared with the benchmark: autotuned once)
def test_fla_path_matches_the_reference(name, T):
    attn, rope = qwen_attention()
    x = torch.randn(2, T, attn.config.hidden_size, device="cuda")
    y_ref, x_ref, op_ref = run_op(name, attn, rope, x, "torch", torch.float32)
    y, x_fast, op = run_op(name, attn, rope, x, "fla", torch.bfloat16)
    assert torch.isfinite(y).all()
    assert rms_err(y, y_ref) < TOL["out"], (name, T, rms_err(y, y_ref))
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    (y.float() * dy).sum().backward()
    err = (x_fast.grad - x_ref.grad).pow(2).sum(-1).flatten()  # per token: where the error sits
    assert rms_err(x_fast.grad, x_ref.grad) < TOL["grad"], (name, T, "dx", rms_err(x_fast.grad, x_ref.grad),
                                                            "share in the 5 worst tokens", (err.topk(5).values.sum()
                                                            / err.sum()).item(), err.topk(5).indices.tolist())
    for (n, p), (_, p_ref) in zip(op.named_parameters(), op_ref.named_parameters()):
        assert rms_err(p.grad, p_ref.grad) < TOL["grad"], (name, T, n, rms_err(p.grad, p_ref.grad))


@pytest.mark.parametrize("name", ["gla", "gdn", "rwkv7"])
@pytest.mark.parametrize("T", [63, 2048])
def test_fla_kernel_matches_the_reference_on_the_operators_inputs(name, T, monkeypatch):
    """The kernel alone, on the very bf16 inputs the operator hands it (captured), against the torch form on the same
    values in fp32: outputs and the gradient of every input. In the test above the two paths also differ by the
    rounding of the kernel's inputs, and where an output nearly cancels (a first token: o_0 = (q_0 . k_0) v_0) the
    per-head norm after it magnifies that rounding whatever the kernel does (tests/rwkv7_conditioning.py). Here
    nothing but the kernel's own arithmetic separates them."""
    attn, rope = qwen_attention()
    x = torch.randn(2, T, attn.config.hidden_size, device="cuda")
    captured = []
    def capture(self, p, kernel, *args):  # LinearAttention.run: record the kernel and its inputs instead
        captured.append((kernel, args))
        return args[0]
    monkeypatch.setattr(dash.LinearAttention, "run", capture)
    run_op(name, attn, rope, x, "fla", torch.bfloat16, frozen=True)
    kernel, args = captured[0]
    fast = [a.detach().requires_grad_() for a in args]
    ref = [a.detach().float().requires_grad_() for a in args]
    o, _ = kernel(*fast, kernels="fla")
    o_ref, _ = kernel(*ref, kernels="torch")
    assert torch.isfinite(o).all()
    assert rms_err(o, o_ref) < TOL["out"], (name, T, rms_err(o, o_ref))
    do = torch.randn_like(o_ref)
    (o.float() * do).sum().backward()
    (o_ref * do).sum().backward()
    for i, (a, a_ref) in enumerate(zip(fast, ref)):
        assert torch.isfinite(a.grad).all(), (name, T, i)
        assert rms_err(a.grad, a_ref.grad) < TOL["grad"], (name, T, "input", i, rms_err(a.grad, a_ref.grad))


@pytest.mark.parametrize("name", ["gla", "gdn", "rwkv7"])
def test_fla_decoding_kernel_continues_the_state(name):
    """Prefill with the chunk kernel, then one token with the recurrent kernel == the whole sequence at once."""
    attn, rope = qwen_attention()
    op = dash.CANDIDATES[name](attn, dash.Config(kernels="fla")).cuda()
    attn = attn.bfloat16()
    x = torch.randn(1, 257, attn.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    r = rope(x, torch.arange(257, device="cuda")[None])
    whole = op(dash.project(attn, x, r))[:, -1]

    class Cache:  # the one thing a linear operator asks of HF's cache
        layers = [dash.StateSlot()]
    cache = Cache()
    op(dash.project(attn, x[:, :-1], tuple(t[:, :-1] for t in r), cache=cache))
    last = op(dash.project(attn, x[:, -1:], tuple(t[:, -1:] for t in r), cache=cache))[:, 0]
    assert rms_err(last, whole) < TOL["out"]


@pytest.mark.parametrize("T", [63, 2048])
def test_nats_on_cuda_matches_its_fp32_paths(T):
    """NAtS has no fla kernel: on CUDA the search and the hybrids run sdpa with its boolean mask in bf16, and
    preparation the explicit mask (masked_attention). Each against its fp32 run: outputs and input gradients, and
    the scorer's straight-through gradient. x is representable in bf16, so that both runs choose the same types."""
    attn, rope = qwen_attention()
    x = torch.randn(2, T, attn.config.hidden_size, device="cuda").bfloat16().float()
    runs = {(dtype, frozen): run_op("nats", attn, rope, x, "torch", dtype, frozen)
            for dtype in (torch.float32, torch.bfloat16) for frozen in (True, False)}  # fp32 first: run_op casts attn
    dy = torch.randn_like(runs[torch.float32, True][0])
    for frozen in (True, False):
        (y_ref, x_ref, op_ref), (y, x_fast, op) = runs[torch.float32, frozen], runs[torch.bfloat16, frozen]
        assert torch.isfinite(y).all()
        assert rms_err(y, y_ref) < TOL["out"], (T, frozen, rms_err(y, y_ref))
        (y_ref * dy).sum().backward()
        (y.float() * dy).sum().backward()
        assert rms_err(x_fast.grad, x_ref.grad) < TOL["grad"], (T, frozen, rms_err(x_fast.grad, x_ref.grad))
    assert rms_err(op.scorer.weight.grad, op_ref.scorer.weight.grad) < TOL["grad"]
    assert rms_err(runs[torch.float32, False][0], runs[torch.float32, True][0]) < 1e-5  # explicit mask == sdpa


def qwen3b(layers=36):
    """Qwen2.5-3B-Instruct's shape with random weights, bf16 on the GPU."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=True, rms_norm_eps=1e-6)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def model3b():
    model = qwen3b()
    yield model
    del model
    torch.cuda.empty_cache()


def random_data(batches: torch.Tensor, cfg) -> dict:
    """Random token batches as dash.load_data() returns text: held out (the first batch), preparation, search."""
    parts = dict(held_out=batches[:1], prep=batches[1:3], search=batches[1:3])
    ranges = dict(held_out=(0, 1), prep=(1, 3), search=(1, 3))  # in batches: random data, nothing to keep apart
    return dict(parts, record=dash.data_record(parts, cfg, ranges))


def test_search_and_preparation_steps_fit_on_the_3b_shape(model3b, tmp_path):
    cfg = dash.resolve(dash.Config(model="qwen3b-shaped", k=5, tokens=4 * 2048 * 2, lr=0.01, window=512,
                                   kernels="fla", skip_below=0.0, check_samples=0, data="random", polish=1), 36)
    names = dash.candidate_names(cfg.candidates)
    batches = torch.randint(0, 151936, (3, 4, 2048))
    data = random_data(batches, cfg)
    torch.cuda.reset_peak_memory_stats()
    fp = dash.fingerprint(model3b, ["swa", "gla", "gdn"], cfg, data)
    report = dash.align(model3b, ["swa", "gla", "gdn"], cfg, data, tmp_path / "c.safetensors", fp)
    assert all(math.isfinite(l[n]["after"]) for l in report["layers"] for n in ("swa", "gla", "gdn"))
    ops = dash.make_ops(model3b, names, cfg)
    dash.load_candidates(ops, dash.read_candidates(tmp_path / "c.safetensors", fp))
    dash.install(model3b, ops)
    result = dash.search(model3b, batches[:2], names, cfg)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"peak {peak:.1f} GiB")
    assert peak < 78 and all(torch.isfinite(torch.tensor([h["kl"] for h in result["history"]])))
    cfg.grad = "teacher"  # the straight-through variant takes a step too
    assert math.isfinite(dash.search(model3b, batches[2:], names, cfg)["history"][0]["kl"])
    cfg.grad = "exact"
    relaxed = dash.choose_layers(result["probs"], names, cfg.k)
    polished = dash.polish(model3b, result["probs"], names, relaxed, data["held_out"], cfg)
    arch = dash.export(result, names, cfg, str(tmp_path / "c.safetensors"), data, polished)
    dash.restore_teacher(model3b)
    hybrid, _ = dash.build_hybrid(arch, model=model3b, cfg=cfg)
    ids = torch.randint(0, 151936, (2, 600), device="cuda")
    out = hybrid.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 608)
    dash.restore_teacher(model3b)


def test_compiled_layers_match_eager_on_the_fla_path():
    """--compile on CUDA (the default there): fla's kernels run between compiled graphs; the KL and its gradient
    w.r.t. the operator weights match the eager search step, for both gradients, with each layer's own set of
    operators left as pruning leaves them (one layer down to full attention alone). The compiled steps go through
    in micro-batches of one sequence, twice (the first call compiles)."""
    model = qwen3b(layers=4)
    names = ["full", "swa", "gla", "gdn"]
    cfg = dash.Config(window=512, kernels="fla")
    dash.install(model, dash.make_ops(model, names, cfg))
    ids = torch.randint(0, 151936, (2, 2048), device="cuda")
    alpha = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    alpha[0, 1:] = -30  # layer 0: full attention alone
    alpha[1, 1] = -30   # layer 1: swa skipped
    alpha[3, 0] = -30   # layer 3: full attention skipped; layer 2 keeps all four
    w = alpha.softmax(-1).cuda()
    active = (w > 1e-3).tolist()
    results = []
    for compiled in (False, True):
        dash.compile_layers(model, on=compiled)
        cfg.micro_batch = 1 if compiled else None
        for grad in ("exact", "teacher"):
            cfg.grad = grad
            terms = torch.compile(dash.kl_terms, dynamic=False) if compiled else dash.kl_terms
            for _ in range(2 if compiled else 1):
                kl, g = dash.kl_and_grad(model, ids, w, active, cfg, terms)  # as search() runs it
                assert torch.isfinite(kl) and torch.isfinite(g).all(), (compiled, grad, g)
            results.append((kl, g))
    dash.compile_layers(model, on=False)
    dash.restore_teacher(model)
    for (kl, g), (kl_c, g_c) in zip(results[:2], results[2:]):
        assert rms_err(kl_c, kl) < TOL["out"] and rms_err(g_c, g) < TOL["grad"], (rms_err(kl_c, kl), rms_err(g_c, g))
    assert rms_err(results[0][1], results[1][1]) > 1e-3  # exact and teacher gradients differ: both were checked


@pytest.mark.parametrize("names,compiled,micro,recompute", [
    (["full", "swa", "gla", "gdn"], True, None, False),  # the default search
    (["full", "swa", "nats"], False, 1, True),           # eager, NAtS' masks, micro-batches, --recompute-mlp
])
def test_cuda_graph_step_matches_the_launched_step(names, compiled, micro, recompute):
    """--cuda-graph: the step captured once and replayed gives the KL and dKL/dw of the step launched kernel by
    kernel, on new tokens and probabilities (replay); after one operator is pruned (the same graph, running it at
    weight 0: graph_covers); and after more are (a new capture)."""
    model = qwen3b(layers=2)
    cfg = dash.Config(window=512, kernels="fla", micro_batch=micro)
    dash.install(model, dash.make_ops(model, names, cfg))
    dash.compile_layers(model, on=compiled)
    dash.recompute_mlp(model, on=recompute)
    terms = torch.compile(dash.kl_terms, dynamic=False) if compiled else dash.kl_terms
    step = dash.graphed(dash.kl_and_grad)
    gen = torch.Generator().manual_seed(0)
    # the first capture, a replay, swa leaves layer 0 (the same graph), swa leaves layer 1 too (a second capture)
    for pruned, captures in ((0, 1), (0, 1), (1, 1), (2, 2)):
        ids = torch.randint(0, 151936, (2, 2048), generator=gen).cuda()
        alpha = torch.randn(2, len(names), generator=gen)
        alpha[:pruned, 1] = -30
        alive = alpha > -30
        w = dash.masked_softmax(alpha, alive, 1.0).cuda()  # exactly 0 where pruned, as search() gives it
        active = alive.tolist()
        kl, g = dash.kl_and_grad(model, ids, w, active, cfg, terms)
        kl_g, g_g = step(model, ids, w, active, cfg, terms)
        assert step.captures == captures
        assert rms_err(kl_g, kl) < 1e-2 and rms_err(g_g, g) < TOL["grad"], (pruned, rms_err(kl_g, kl),
                                                                          rms_err(g_g, g))
        assert (g_g[~alive.cuda()] == 0).all()
    dash.recompute_mlp(model, on=False)
    dash.compile_layers(model, on=False)
    dash.restore_teacher(model)


def test_rwkv7_and_nats_prepare_search_and_generate_on_the_3b_shape(tmp_path):
    """The new operators through the whole pipeline at the 3B model's width (4 layers, bf16, fla): preparation with
    NAtS' explicit mask and sparsity term, a search step, export, and a hybrid with both that passes the check of
    cached generation against recomputation."""
    model = qwen3b(layers=4)
    names = ["full", "rwkv7", "nats"]
    cfg = dash.resolve(dash.Config(model="qwen3b-shaped", candidates=",".join(names), k=1, tokens=4 * 2048 * 2,
                                   lr=0.01, window=512, kernels="fla", skip_below=0.0, check_samples=0, cost=0.1,
                                   data="random", polish=1), 4)
    batches = torch.randint(0, 151936, (3, 4, 2048))
    data = random_data(batches, cfg)
    fp = dash.fingerprint(model, names[1:], cfg, data)
    torch.cuda.reset_peak_memory_stats()
    report = dash.align(model, names[1:], cfg, data, tmp_path / "c.safetensors", fp)
    assert all(math.isfinite(l[n]["after"]) and 0 < l[n]["cost"] <= 1 for l in report["layers"] for n in names[1:])
    ops = dash.make_ops(model, names, cfg)
    dash.load_candidates(ops, dash.read_candidates(tmp_path / "c.safetensors", fp))
    dash.install(model, ops)
    result = dash.search(model, batches[:2], names, cfg)
    print(f"peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    assert all(math.isfinite(h["kl"]) for h in result["history"])
    arch = dash.export(result, names, cfg, str(tmp_path / "c.safetensors"), data, None)
    arch["layers"] = ["rwkv7", "full", "nats", "rwkv7"]
    dash.restore_teacher(model)
    hybrid, _ = dash.build_hybrid(arch, model=model, cfg=cfg)  # checks cached generation (bf16 tolerance)
    ids = torch.randint(0, 151936, (2, 600), device="cuda")
    out = hybrid.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out.shape == (2, 608)


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3"])
def test_qk_norm_families_on_fla_match_the_reference(family):
    """The q/k-norm families (issue 18) on fla's kernels: a 2-layer model of each at the 3B model's head size (Gemma 3
    with a local and a global layer, a 512-token window), the mixture of full, swa, gla and gdn in bf16 with fla
    against the same weights in fp32 with the pure-torch operators: the final hidden states and dKL/dw."""
    import copy

    import transformers
    common = dict(vocab_size=1024, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2,
                  num_attention_heads=16, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    cls, extra = {"qwen3": ("Qwen3Config", {}), "olmo2": ("Olmo2Config", {}),
                  "gemma3": ("Gemma3TextConfig", dict(sliding_window=512, query_pre_attn_scalar=128,
                                                      layer_types=["sliding_attention", "full_attention"]))}[family]
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**common, **extra))
    ref = ref.eval().requires_grad_(False)
    for layer in ref.model.layers:  # trained-looking attention logits
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(lin.weight, std=2048 ** -0.5)
    fast = copy.deepcopy(ref).bfloat16()
    names = ["full", "swa", "gla", "gdn"]
    ops_ref = dash.make_ops(ref, names, dash.Config(window=64, kernels="torch"))
    with torch.no_grad():  # away from the identity init, as prepared candidates are
        for layer_ops in ops_ref:
            for op in layer_ops.values():
                for p in op.parameters():
                    p.add_(0.02 * torch.randn_like(p))
    ops_fast = dash.make_ops(fast, names, dash.Config(window=64, kernels="fla"))
    dash.load_candidates(ops_fast, dash.candidate_state(ops_ref))
    dash.install(ref, ops_ref), dash.install(fast, ops_fast)
    ids = torch.randint(0, 1024, (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    w = torch.full((2, 4), 0.25, device="cuda")
    outs = []
    for model in (ref, fast):
        dash.set_probs(model, w, [[True] * 4] * 2)
        with torch.no_grad():
            outs.append(dash.final_hidden(model, ids))
    assert rms_err(outs[1], outs[0]) < TOL["out"], (family, rms_err(outs[1], outs[0]))
    cfg = dash.Config(kl_chunk=1024)
    _, g_ref = dash.kl_and_grad(ref, ids, w, [[True] * 4] * 2, cfg)
    _, g_fast = dash.kl_and_grad(fast, ids, w, [[True] * 4] * 2, cfg)
    assert rms_err(g_fast, g_ref) < TOL["grad"], (family, g_fast, g_ref)
