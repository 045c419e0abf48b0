"""The operators from the seed systems, RWKV-7 and NAtS, and the operator protocol, on the CPU: each fast form against
its definition (outputs and gradients), known answers, caches, and preparation, search and export end to end.
GPU: tests/test_gpu.py (fla's RWKV-7 kernels, NAtS' masked sdpa on CUDA)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dash
from conftest import check_chunked_is_the_recurrence, rel


def layer_input(model, layer=1, B=2, T=40, seed=0, cache=None):
    attn = model.model.layers[layer].self_attn
    x = torch.randn(B, T, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    return attn, x, model.model.rotary_emb(x, torch.arange(T)[None])


def step(attn, x, rope, a, b, cache=None):
    """The LayerInput of tokens a..b-1, as one step of generation sees them."""
    return dash.project(attn, x[:, a:b], tuple(t[:, a:b] for t in rope), cache=cache)


class Cache:  # what an operator asks of HF's cache: its layer's slot
    def __init__(self):
        self.layers = []

# ----------------------------------------------------------------------------- the protocol


def test_every_operator_declares_what_the_rest_of_dash_needs(tiny):
    model, _ = tiny
    attn = model.model.layers[0].self_attn
    cfg = dash.Config(window=8, kernels="torch")
    codes = [cls.code for cls in dash.CANDIDATES.values()]
    assert all(len(c) == 1 for c in codes) and len(set(codes)) == len(codes)  # one letter a layer in tables
    ops = {n: cls(attn, cfg) for n, cls in dash.CANDIDATES.items()}
    for n, op in ops.items():
        assert isinstance(op, dash.Operator) and issubclass(op.slot, dash.Slot), n
        assert 0 < op.cost(32768) <= op.cost(1024) <= 1, n
        json.dumps(op.settings())  # goes into the cache's fingerprint
    assert ops[dash.FULL].cost(32768) == 1 and ops["swa"].cost(32768) == 8 / 16384
    assert ops["nats"].settings() == dict(window=8, sparsity=dash.NAtS.sparsity)
    assert [n for n, op in ops.items() if dash.trainable(op)] == ["gla", "gdn", "rwkv7", "nats"]

# ----------------------------------------------------------------------------- RWKV-7


def rwkv7_inputs(B=2, T=63, H=3, K=8, V=5, seed=0):
    """RWKV-7's arguments as the operator makes them: a = -kk, b = kk * eta, w within its bound."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    w = dash.RWKV7_MIN_LOG_DECAY * torch.rand(B, T, H, K, generator=g)
    kk = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    eta = torch.rand(B, T, H, K, generator=g)
    return q, w, k, v, -kk, kk * eta, torch.randn(B, H, K, V, generator=g)


@pytest.mark.parametrize("T", [1, 15, 63, 130])
def test_rwkv7_chunked_is_the_recurrence(T):
    check_chunked_is_the_recurrence(dash.rwkv7_chunked, dash.rwkv7_recurrent, rwkv7_inputs(T=T))


def fla_naive(path: str):
    """One of fla's literal references (they import torch and einops only), loaded without fla's package, whose
    import takes seconds."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("fla is not installed")
    file = Path(spec.origin).parent / path
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("fla_naive", file))
    module.__spec__.loader.exec_module(module)
    return module


def test_rwkv7_recurrence_is_flas_reference():
    """fla's dplr_recurrence (what fla.ops.rwkv7 computes): same state orientation, same a and b, same result."""
    naive = fla_naive("ops/generalized_delta_rule/dplr/naive.py").dplr_recurrence
    q, w, k, v, a, b, s0 = rwkv7_inputs()
    o, S = dash.rwkv7_recurrent(q, w, k, v, a, b, q.shape[-1] ** -0.5, s0)  # fla's reference scales by K^-0.5
    tr = lambda t: t.transpose(1, 2)  # noqa: E731  (B, H, T, K) there
    o_fla, S_fla = naive(tr(q), tr(k), tr(v), tr(a), tr(b), tr(w), initial_state=s0)
    assert rel(o, tr(o_fla)) < 1e-5 and rel(S, S_fla) < 1e-5


def test_rwkv7_replaces_what_it_wrote():
    """A known answer: no decay and eta = 1; writing v1 then v2 at the same key, the memory holds v2 alone (the
    delta rule replaces), where a plain linear memory (GLA) would return v1 + v2."""
    e1 = torch.eye(4)[0].expand(1, 2, 1, 4)                  # (B, T, H, K): the same unit key twice
    v = torch.randn(1, 2, 1, 3)
    o, S = dash.rwkv7_recurrent(e1, torch.zeros(1, 2, 1, 4), e1, v, -e1, e1, 1.0)
    assert torch.allclose(o[0, 1, 0], v[0, 1, 0], atol=1e-6) and torch.allclose(S[0, 0, 0], v[0, 1, 0], atol=1e-6)
    o_gla, _ = dash.gla_recurrent(e1, e1, v, torch.zeros(1, 2, 1, 4), 1.0)
    assert torch.allclose(o_gla[0, 1, 0], v[0, 0, 0] + v[0, 1, 0], atol=1e-6)


def test_rwkv7_starts_within_its_decay_bound_and_continues_its_state(tiny, monkeypatch):
    """The decay the operator computes stays in [-e^-0.5, 0) (fla's kernel relies on it); a prefill and then one token
    at a time, through the cache's state, give what the whole sequence gives."""
    model, _ = tiny
    attn, x, rope = layer_input(model)
    op = dash.RWKV7(attn, dash.Config(kernels="torch"))
    decays, chunked = [], dash.rwkv7_chunked
    monkeypatch.setattr(dash, "rwkv7_chunked", lambda *args, **kw: decays.append(args[1]) or chunked(*args, **kw))
    with torch.no_grad():
        whole = op(dash.project(attn, x, rope))
        cache = Cache()
        parts = [op(step(attn, x, rope, 0, 25, cache))]
        parts += [op(step(attn, x, rope, t, t + 1, cache)) for t in range(25, 40)]
    assert dash.RWKV7_MIN_LOG_DECAY <= decays[0].min() and decays[0].max() < 0
    assert rel(torch.cat(parts, 1), whole) < 1e-5


# ----------------------------------------------------------------------------- NAtS


def test_nats_mask_follows_the_rules():
    """Types G L W L G L, window 2, written out by hand: a global token stays; a local one until the next global
    token (which still sees it); a window token for 2 steps."""
    G, L, W = dash.GLOBAL, dash.LOCAL, dash.WINDOW
    types = F.one_hot(torch.tensor([G, L, W, L, G, L]), 3).float()[None, None]   # (1, 1, 6, 3)
    g = types[..., G]
    pos = torch.arange(6)
    m = dash.nats_mask(types, g.cumsum(-1), pos, g.cumsum(-1) - g, pos, window=2)[0, 0]
    assert m.tolist() == [[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 1, 0, 0],
                          [1, 1, 0, 1, 1, 0],
                          [1, 0, 0, 0, 1, 1]]


def nats(attn, window=6, scorer=None, seed=0):
    op = dash.NAtS(attn, dash.Config(window=window, kernels="torch"))
    if scorer == "random":
        with torch.no_grad():
            op.scorer.weight.copy_(torch.randn(op.scorer.weight.shape, generator=torch.Generator().manual_seed(seed)))
    elif scorer is not None:  # one type for every token
        with torch.no_grad():
            op.scorer.bias.copy_(F.one_hot(torch.tensor(scorer), 3).float().repeat(op.kv_heads))
    return op.requires_grad_(False)  # as the search and the hybrids run it: hard types, sdpa


def test_nats_at_its_extremes_is_full_attention_and_a_window(tiny):
    """The zero scorer (its start) makes every token global: the teacher's attention. Every token a window token
    but the first (global: the attention sink) is a window plus that one token."""
    model, _ = tiny
    attn, x, rope = layer_input(model)
    p = dash.project(attn, x, rope)
    assert torch.allclose(nats(attn)(p), dash.FullAttention(attn, dash.Config(kernels="torch"))(p), atol=1e-6)
    dist = torch.arange(40)[:, None] - torch.arange(40)
    keep = (dist >= 0) & ((dist < 6) | (torch.arange(40) == 0))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (p.q_rope, p.k_rope, p.v)), attn_mask=keep,
                                         scale=attn.scaling, enable_gqa=True).transpose(1, 2)
    assert torch.allclose(nats(attn, scorer=dash.WINDOW)(p), ref, atol=1e-6)


def test_nats_learning_path_is_the_hard_path_and_its_gradient_reaches_the_scorer(tiny):
    """Preparation's path (straight-through types, the explicit mask) gives the hard path's output; its sparsity term
    is the share of kept pairs, and a gradient step on it alone keeps fewer."""
    model, _ = tiny
    attn, x, rope = layer_input(model)
    p = dash.project(attn, x, rope)
    op = nats(attn, scorer="random")
    with torch.no_grad():
        hard = op(p)
    op.requires_grad_(True)
    assert torch.allclose(op(p), hard, atol=1e-6)
    m, _, _, types = op.mask(p)
    assert op.extra_loss().item() == pytest.approx(dash.NAtS.sparsity * dash.NAtS.share(m, types).item())
    assert op.extra_loss() is None  # read once: the term of the forward pass just run
    op = nats(attn).requires_grad_(True)  # the start: every token global, every pair kept
    op(p)
    op.extra_loss().backward()
    with torch.no_grad():
        for t in op.parameters():
            t -= 10 * t.grad
        op(p)
        m, _, _, types = op.mask(p)
    assert op.scorer.weight.grad.abs().sum() > 0 and dash.NAtS.share(m, types) < 0.9


def test_nats_cache_keeps_fewer_tokens_and_equals_recomputation(tiny):
    model, _ = tiny
    attn, x, rope = layer_input(model, B=1)
    op = nats(attn, scorer="random")
    with torch.no_grad():
        whole = op(dash.project(attn, x, rope))
        cache = Cache()
        parts = [op(step(attn, x, rope, 0, 20, cache))]
        parts += [op(step(attn, x, rope, t, t + 1, cache)) for t in range(20, 40)]
    slot = cache.layers[1]
    assert isinstance(slot, dash.NAtSSlot) and slot.get_seq_length() == 40
    assert slot.keys.shape[-2] < 30 and slot.keys.shape[-2] == len(slot.pos)   # what no later query sees has gone
    assert rel(torch.cat(parts, 1), whole) < 1e-5


def test_nats_cost_is_its_measured_share_of_kept_pairs(tiny):
    model, _ = tiny
    attn, x, rope = layer_input(model)
    op = nats(attn, scorer="random")
    assert op.cost(1024) == 1.0  # nothing measured: as full attention
    p = dash.project(attn, x, rope)
    op.observe(p)
    op.observe(p)  # a mean over the batches shown
    m, _, _, types = op.mask(p)
    kept, glob = dash.NAtS.share(m, types).item(), types[..., dash.GLOBAL].mean().item()
    assert op.kept.item() == pytest.approx(kept) and op.global_share.item() == pytest.approx(glob)
    assert op.cost(40) == pytest.approx(kept) and op.cost(10 ** 9) == pytest.approx(glob, abs=1e-6) and glob < kept < 1

# ----------------------------------------------------------------------------- preparation, search, export


def test_new_operators_are_prepared_searched_and_exported(tiny_dir, text_file, tmp_path):
    """Both candidate lists the issue names search and export: the six operators, and full with the new two. The
    preparation report says what trained and NAtS' measured cost, which reaches the search with the weights."""
    for names in (["full", "swa", "gla", "gdn", "rwkv7", "nats"], ["full", "rwkv7", "nats"]):
        out, cache = tmp_path / "-".join(names), tmp_path / f"{len(names)}.safetensors"
        dash.main(["--model", str(tiny_dir), "--data", str(text_file), "--candidates", ",".join(names), "--tokens",
                   "256", "--seq-len", "64", "--batch-size", "2", "--k", "1", "--window", "8", "--prep-tokens", "1024",
                   "--cache", str(cache), "--out", str(out), "--check-samples", "0", "--device", "cpu",
                   "--cost", "0.1"])
        arch = json.loads((out / "arch.json").read_text())
        assert arch["candidates"] == names and set(arch["layers"]) <= set(names) and arch["layers"].count("full") == 1
        report = json.loads(cache.with_suffix(".json").read_text())
        assert report["trained"] == [n for n in names[1:] if n in ("gla", "gdn", "rwkv7", "nats")]
        from safetensors.torch import load_file
        weights = load_file(str(cache))
        mean = lambda key: sum(layer["rwkv7"][key] for layer in report["layers"])  # noqa: E731
        assert mean("after") < mean("before")
        for l, layer in enumerate(report["layers"]):
            assert layer["nats"]["cost"] == pytest.approx(weights[f"layers.{l}.nats.kept"].item(), abs=1e-5)
        layer0 = report["layers"][0]
        cfg = dash.Config(**{k: v for k, v in arch["config"].items() if k in dash.Config.__dataclass_fields__})
        arch["layers"] = ["nats", "full", "rwkv7", "nats"]  # both new operators in one hybrid, checked by build
        model, tok = dash.build_hybrid(arch, cfg=cfg)
        assert [type(l.self_attn.op).__name__ for l in model.model.layers] == ["NAtS", "FullAttention", "RWKV7", "NAtS"]
        assert model.model.layers[0].self_attn.op.kept.item() == pytest.approx(layer0["nats"]["cost"], abs=1e-5)
