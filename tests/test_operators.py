"""The operators from the seed systems on the CPU: each fast form against its definition (outputs and gradients),
known answers and caches. GPU: tests/test_gpu.py (fla's RWKV-7 kernels)."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dash


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


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
    ins = [t.requires_grad_() for t in rwkv7_inputs(T=T)]
    ref = [t.detach().clone().requires_grad_() for t in ins]
    o, S = dash.rwkv7_chunked(*ins[:6], 0.3, ins[6])
    o_ref, S_ref = dash.rwkv7_recurrent(*ref[:6], 0.3, ref[6])
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    do, dS = torch.randn_like(o), torch.randn_like(S)
    ((o * do).sum() + (S * dS).sum()).backward()
    ((o_ref * do).sum() + (S_ref * dS).sum()).backward()
    for a, b in zip(ins, ref):
        assert rel(a.grad, b.grad) < 1e-4


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
