"""RWKV-7's norm epsilon against the rounding of its kernel's inputs: the operator of tests/rwkv7_precision.py
(tests/test_gpu.py's, fp32 on the CPU) with its own epsilon (head_dim * 1e-5) and with 1e-6, at T = 63 and 2048,
its input gradient dx and its parameters' gradients under two perturbations that the bf16 GPU path makes: all six
kernel inputs rounded to bf16, and q * scale rounded to bf16. Also the share of dx's change in its 5 worst tokens.
Run by hand, not by pytest (about a minute on 2 cores):
    OMP_NUM_THREADS=2 python tests/rwkv7_eps.py"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dash  # noqa: E402
from rwkv7_precision import real, rms_err, rounded, run  # noqa: E402

if __name__ == "__main__":
    own = dash.RWKV7.__init__
    def with_eps(eps):
        def init(self, *args, **kw):
            own(self, *args, **kw)
            self.norm_eps = eps
        return init
    perturbations = {
        "six inputs in bf16": rounded,
        "q * scale in bf16": lambda q, *rest, **kw: real((q * q.shape[-1] ** -0.5).bfloat16().float()
                                                         * q.shape[-1] ** 0.5, *rest, **kw),
    }
    for label, init in (("head_dim * 1e-5 (RWKV-7's, dash's)", own), ("1e-6", with_eps(1e-6))):
        dash.RWKV7.__init__ = init
        for T in (63, 2048):
            y0, dx0, g0 = run(T, real)
            for name, kernel in perturbations.items():
                y1, dx1, g1 = run(T, kernel)
                err = (dx1 - dx0).pow(2).sum(-1).flatten()
                worst = max(g0, key=lambda n: rms_err(g1[n], g0[n]))
                print(f"eps {label}, T={T}, {name}: dx {rms_err(dx1, dx0):.1e} ({err.topk(5).values.sum() / err.sum():.0%}"
                      f" in 5 tokens), worst parameter {worst} {rms_err(g1[worst], g0[worst]):.1e}", flush=True)
    dash.RWKV7.__init__ = own
