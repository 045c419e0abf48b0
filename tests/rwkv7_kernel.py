"""fla's chunk_rwkv7 alone against the fp32 chunked torch form (dash.rwkv7_chunked): the RMS error of its output and
of each input's gradient at T = 63, 512 and 2048 (B 2, H 16, D 128), for the variant dash runs (bf16, chunks of 64
under lower_bound), then chunks of 16 and fp32; fwd+bwd time at T = 2048. Also the error that rounding the inputs
to bf16 alone causes. Run by hand on a CUDA GPU with fla; not collected by pytest.

    python tests/rwkv7_kernel.py --decays random     # decays of -0.01 to -0.5 per token (2026-11-27's H200 run)
    python tests/rwkv7_kernel.py --decays operator   # as the RWKV7 operator starts: down to -0.0015 per token
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402

B, H, D = 2, 16, 128


def rms(a, b):
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def inputs(T: int, decays: str, seed: int = 0) -> list[torch.Tensor]:
    """q, w, k, v, a = -kk, b = kk * eta, each (B, T, H, D). random: w = MIN sigmoid(2 r - 2), mostly -0.01 to -0.5.
    operator: the RWKV7 operator's starting decays, its bias linspace(-6, 0.5) over each head's channels (w from
    -0.0015, a memory of ~670 tokens, to -0.38), give or take."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda: torch.randn(B, T, H, D, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(), r(), r()
    logits = r() * 2 - 2 if decays == "random" else torch.linspace(-6, 0.5, D, device="cuda") + 0.1 * r()
    w = dash.RWKV7_MIN_LOG_DECAY * torch.sigmoid(logits)
    kk, eta = F.normalize(r(), dim=-1), torch.sigmoid(r())
    return [q, w, k, v, -kk, kk * eta]


def grads(fn, xs, dtype, dy):
    xs = [x.to(dtype).detach().requires_grad_() for x in xs]
    o = fn(*xs)
    (o.float() * dy).sum().backward()
    return o.float(), [x.grad.float() for x in xs]


def timed(fn, xs, dtype, dy, n=5):
    xs = [x.to(dtype).detach().requires_grad_() for x in xs]
    for i in range(n + 2):
        if i == 2:
            torch.cuda.synchronize()
            t = time.perf_counter()
        (fn(*xs).float() * dy).sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decays", choices=["random", "operator"], default="operator")
    args = ap.parse_args()
    from fla.ops.rwkv7 import chunk_rwkv7
    variants = {"bf16 C64 (dash's)": (torch.bfloat16, dict(lower_bound=dash.RWKV7_MIN_LOG_DECAY)),
                "bf16 C16": (torch.bfloat16, dict()),
                "fp32 C64": (torch.float32, dict(lower_bound=dash.RWKV7_MIN_LOG_DECAY))}
    scale = D ** -0.5
    reference = lambda *a: dash.rwkv7_chunked(*a, scale)[0]  # noqa: E731
    cases, refs = {T: (inputs(T, args.decays), torch.randn(B, T, H, D, device="cuda")) for T in (63, 512, 2048)}, {}
    for T, (xs, dy) in cases.items():
        refs[T] = grads(reference, xs, torch.float32, dy)
        o, gs = grads(reference, [x.bfloat16().float() for x in xs], torch.float32, dy)
        print(f"T={T} torch chunked fp32 on bf16-rounded inputs: out {rms(o, refs[T][0]):.1e} grads q,w,k,v,a,b",
              " ".join(f"{rms(a, b):.1e}" for a, b in zip(gs, refs[T][1])), flush=True)
    for name, (dtype, kw) in variants.items():  # the variant in use first (its first call autotunes, minutes)
        kernel = lambda *a: chunk_rwkv7(*a, scale=scale, **kw)[0]  # noqa: E731
        for T, (xs, dy) in cases.items():
            try:
                t0 = time.time()
                o, gs = grads(kernel, xs, dtype, dy)
                first = time.time() - t0
                ms = timed(kernel, xs, dtype, dy) if T == 2048 else float("nan")
                print(f"T={T} {name:17s} out {rms(o, refs[T][0]):.1e} grads q,w,k,v,a,b",
                      " ".join(f"{rms(a, b):.1e}" for a, b in zip(gs, refs[T][1])),
                      f"| first call {first:.0f} s, fwd+bwd {ms:.2f} ms", flush=True)
            except Exception as e:  # a variant fla refuses: say so and go on
                print(f"T={T} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
    main()
