"""How much of RWKV-7's GPU gradient error is bf16 itself? The operator of tests/test_gpu.py (a Qwen2 attention at the
3B shape, weights moved off their init) in fp32 on the CPU, once as is and once with only its six kernel inputs
(q, w, k, v, a, b) rounded to bf16: the error that bf16 inputs cause whatever the kernel. Run by hand, not by pytest:
    OMP_NUM_THREADS=2 python tests/rwkv7_precision.py"""
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402
torch.set_num_threads(2)

def rms_err(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()

hidden, heads, kv, hd = 2048, 16, 2, 128
config = Qwen2Config(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
                     intermediate_size=4 * hidden, num_hidden_layers=1, rope_theta=1e6)
torch.manual_seed(0)
attn = Qwen2Attention(config, 0)
for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
    torch.nn.init.normal_(lin.weight, std=hidden ** -0.5)
rope_emb = Qwen2RotaryEmbedding(config)
real = dash.rwkv7
def rounded(q, w, k, v, a, b, **kw):
    r = lambda t: t.bfloat16().float()
    return real(r(q), r(w), r(k), r(v), r(a), r(b), **kw)

def run(T, kernel, seed_x=0):
    torch.manual_seed(1)
    op = dash.CANDIDATES["rwkv7"](attn, dash.Config(window=64, kernels="torch"))
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed_x)
    x = torch.randn(2, T, hidden, generator=g).requires_grad_()
    dash.rwkv7 = kernel
    rope = rope_emb(x, torch.arange(T)[None])
    y = op(dash.project(attn, x, rope))
    dy = torch.randn(y.shape, generator=g)
    (y * dy).sum().backward()
    dash.rwkv7 = real
    return y.detach(), x.grad, {n: p.grad for n, p in op.named_parameters()}

if __name__ == "__main__":
    for T in (63, 512, 2048):
        t = time.time()
        y0, dx0, g0 = run(T, real)
        y1, dx1, g1 = run(T, rounded)
        print(f"T={T}: out {rms_err(y1, y0):.2e} dx {rms_err(dx1, dx0):.2e} " +
              " ".join(f"{n} {rms_err(g1[n], g0[n]):.1e}" for n in g0), f"({time.time() - t:.0f} s)", flush=True)
