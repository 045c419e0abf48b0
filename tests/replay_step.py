"""Replay a search step that dash skipped because its KL gradient was not finite (dash.py saves
`--out/nonfinite-step-N.pt`, the first of each run of them): the same model, candidates, batch and probabilities,
eager, with a hook on every operator's output. Prints each layer's operators whose output or output gradient is not
finite, then (--anomaly) runs the step again under autograd's anomaly detection, which names the backward function
that first made a NaN. --all prints every operator's largest |output| and |output gradient|, the largest gradient
at each layer's residual input, and the smallest rms of a token's residual input in the teacher's and the
mixture's pass, each with its sequence and token: where a gradient grows layer by layer before it overflows, and at
which token. Run by hand where the search ran; not collected by pytest.

    python tests/replay_step.py out/nonfinite-step-311.pt --cache candidates/<model>-<fingerprint>.safetensors
    python tests/replay_step.py out/nonfinite-step-311.pt --cache ... --anomaly
    python tests/replay_step.py out/nonfinite-step-311.pt --cache ... --attention-ab --save attn-repro.pt
    python tests/replay_step.py out/nonfinite-step-311.pt --cache ... --all

--attention-ab: every windowed softmax attention call (swa; 'full' in a teacher's own window layers) is watched;
the first, from the top layer down, whose output gradient is finite but whose q/k/v gradient is not is run again
alone on the same q, k, v and output gradient with each kernel: fla as dispatched (TileLang on Hopper), fla's
Triton kernel (FLA_TILELANG=0, held over the backward too) and sdpa with a band mask in float32 (the reference).
--save writes those tensors, a repro of the kernel alone, which `python tests/replay_step.py --case attn-repro.pt`
runs again (on CUDA, no model or candidates needed).
"""
import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402


ORIGINAL = dash.windowed_attention  # before watch_attention() wraps it


def reference_attention(scaling: float, window: int):
    """Windowed softmax attention in float32 on dash's torch path (sdpa, band mask): fn(q, k, v) -> y, each
    (B, T, heads, D)."""
    no_mask = SimpleNamespace(mask=None, window=None)  # all windowed_attention reads of a LayerInput
    return lambda q, k, v: ORIGINAL(no_mask, q.float(), k.float(), v.float(), scaling, window, "torch")


def attention_variants(scaling: float, window: int):
    """The kernels that windowed softmax attention can run on, as (name, fn(q, k, v) -> y, environment): fla as
    dispatched (on Hopper with Triton >= 3.4 its TileLang backend), fla with that backend off, and the float32
    reference."""
    from fla.ops.attn import parallel_attn

    def fla(q, k, v):
        return parallel_attn(q, k, v, scale=scaling, window_size=window)
    return [("fla (as dispatched)", fla, {}), ("fla, Triton (FLA_TILELANG=0)", fla, {"FLA_TILELANG": "0"}),
            ("sdpa float32 (reference)", reference_attention(scaling, window), {})]


def compare(case: dict, variants) -> list[str]:
    """Run each variant's forward and backward, in its environment, on the case's q, k, v and output gradient dy.
    One line each: which of y, dq, dk, dv are not finite, or their relative errors against the variant named
    "(reference)"; on CUDA also the milliseconds of a forward and backward."""
    lines, ref = [], None
    for name, fn, *env in variants:
        def step():
            q, k, v = (case[n].detach().clone().requires_grad_() for n in "qkv")
            y = fn(q, k, v)
            return y, torch.autograd.grad(y, (q, k, v), case["dy"].to(y.dtype))
        # the environment held over the forward and the backward alike: fla picks the backend of each at its own
        # call (FLA_TILELANG), so a variable set around the forward alone would leave the backward on TileLang
        with mock.patch.dict(os.environ, env[0] if env else {}):
            y, grads = step()
            ms = ""
            if y.is_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    step()
                end.record()
                torch.cuda.synchronize()
                ms = f" ({start.elapsed_time(end) / 5:.2f} ms forward and backward)"
        outs = dict(y=y.detach().float(), dq=grads[0].float(), dk=grads[1].float(), dv=grads[2].float())
        bad = {n: int((~torch.isfinite(t)).sum()) for n, t in outs.items() if not torch.isfinite(t).all()}
        line = f"  {name:30s} " + (f"not finite: {bad}" if bad else "finite") + ms
        if not bad and "(reference)" in name:
            ref = outs
        lines.append((line, outs, bad))
    out = []
    for line, outs, bad in lines:
        if ref is not None and not bad:
            err = {n: float((outs[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)) for n in ref}
            line += "; relative error against the reference: " + ", ".join(f"{n} {e:.2e}" for n, e in err.items())
        out.append(line)
    return out


def watch_attention():
    """Wrap dash.windowed_attention to record, per call, q, k, v, the scaling and window, and (by tensor hooks) the
    gradients of its output and of q, k, v. Returns the list of records (forward order = layer order)."""
    calls, inner = [], dash.windowed_attention

    def watched(p, q, k, v, scaling, window, kernels):
        q, k, v = (t.view_as(t) for t in (q, k, v))  # views: their gradients are this call's alone (q_rope is shared)
        y = inner(p, q, k, v, scaling, window, kernels)
        rec = dict(q=q, k=k, v=v, scaling=scaling, window=min(window, p.window or window), grads={})
        for n, t in (("q", q), ("k", k), ("v", v), ("dy", y)):
            if t.requires_grad:
                t.register_hook(lambda g, n=n: rec["grads"].__setitem__(n, g.detach()))
        calls.append(rec)
        return y
    dash.windowed_attention = watched
    return calls


def first_failing(calls: list[dict]) -> dict | None:
    """The highest-layer call whose output gradient is finite and one of whose input gradients is not."""
    for i in reversed(range(len(calls))):
        g = calls[i]["grads"]
        if "dy" in g and torch.isfinite(g["dy"]).all() and any(
                n in g and not torch.isfinite(g[n]).all() for n in "qkv"):
            return dict(call=i, q=calls[i]["q"].detach(), k=calls[i]["k"].detach(), v=calls[i]["v"].detach(),
                        dy=g["dy"], scaling=calls[i]["scaling"], window=calls[i]["window"])
    return None


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("file", nargs="?", help="nonfinite-step-N.pt, written by the search")
    ap.add_argument("--cache", default=None, help="the run's candidate file (default: its --cache, if it gave one)")
    ap.add_argument("--anomaly", action="store_true", help="then replay under torch.autograd.detect_anomaly()")
    ap.add_argument("--attention-ab", action="store_true",
                    help="run the first windowed attention whose backward is not finite again with each kernel")
    ap.add_argument("--save", default=None, help="with --attention-ab: write that call's q, k, v, dy here")
    ap.add_argument("--all", action="store_true",
                    help="print every operator's and layer input's largest |output| and |gradient|, and where")
    ap.add_argument("--case", default=None, help="instead of a step: run the kernels on a file that --save wrote")
    args = ap.parse_args(argv)
    if args.case:
        case = {n: (t.cuda() if torch.is_tensor(t) else t) for n, t in torch.load(args.case).items()}
        print("\n".join(compare(case, attention_variants(case["scaling"], case["window"]))))
        return
    if args.file is None:
        ap.error("give a nonfinite-step-N.pt file, or --case")
    saved = torch.load(args.file, weights_only=False)
    cfg = dash.Config(**saved["config"])
    cfg.compile, cfg.cuda_graph = False, False  # eager: hooks and anomaly mode see every operator
    cache = args.cache or cfg.cache
    if cache is None:
        raise dash.DashError("give --cache: the run used its default candidate file (it printed its name)")
    device, dtype = dash.devices(cfg)
    model, _ = dash.load_model(cfg.model, device, dtype)
    names = dash.candidate_names(cfg.candidates)
    cheap = [n for n in names if n != "full"]
    state = dash.read_candidates(cache, dash.hybrid_expectation(model, cheap, cfg))
    ops = dash.make_ops(model, names, cfg)
    dash.load_candidates(ops, state, cache)
    dash.install(model, ops)
    alive = saved["alive"].to(device)
    w = dash.masked_softmax(saved["alpha"].to(device), alive, saved["tau"])
    ids = saved["ids"].to(device)

    seen = []  # (layer, operator, output or gradient, elements not finite, largest finite |value|, its (b, t))

    def record(l, name, what, t):
        t = t.detach()
        largest = torch.nan_to_num(t.float(), 0, 0, 0).abs().amax(tuple(range(2, t.dim())))  # (B, T)
        seen.append((l, name, what, int((~torch.isfinite(t)).sum()), float(largest.max()),
                     divmod(int(largest.argmax()), largest.shape[1])))

    residual = []  # --all: (layer, teacher or mixture, smallest rms of a token's residual input, its (b, t))

    def watch_residual(l):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.requires_grad:  # the mixture's gradient at the layer's residual input
                x.register_hook(lambda g: record(l, "input", "gradient", g))
            rms = x.detach().float().pow(2).mean(-1).sqrt()  # (B, T)
            residual.append((l, "mixture" if torch.is_grad_enabled() else "teacher", float(rms.min()),
                             divmod(int(rms.argmin()), rms.shape[1])))
        return hook
    if args.all:
        for l, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(watch_residual(l), with_kwargs=True)

    def watch(l, name):
        def hook(module, inputs, y):
            record(l, name, "output", y)
            if y.requires_grad:
                y.register_hook(lambda g: record(l, name, "gradient", g))
        return hook
    for l, layer_ops in enumerate(ops):
        for name, op in layer_ops.items():
            op.register_forward_hook(watch(l, name))
    calls = watch_attention() if args.attention_ab else []
    kl, dkl_dw = dash.kl_and_grad(model, ids, w, alive.tolist(), cfg)
    print(f"step {saved['step'] + 1}: KL {kl.item():.6g}; dKL/dw finite in layers "
          f"{torch.isfinite(dkl_dw).all(-1).nonzero().flatten().tolist()} of {len(ops)}")
    bad = [s for s in seen if s[3]]  # in the order met: forward, then the backward pass from the top layer down
    for l, name, what, n, largest, _ in bad[:8]:
        print(f"  layer {l:2d} {name:6s} {what:8s}: {n} elements not finite (largest finite |x| {largest:.3g})")
    if len(bad) > 8:
        print(f"  ... and {len(bad) - 8} more below")
    if args.all:
        for l, name, what, n, largest, (b, t) in seen:
            print(f"  all: layer {l:2d} {name:6s} {what:8s}: {n} not finite, largest finite |x| {largest:.3g} at "
                  f"sequence {b} token {t}")
        for l, which, rms, (b, t) in residual:
            print(f"  residual: layer {l:2d} input, {which}: smallest token rms {rms:.3g} at sequence {b} token {t}")
    if not bad:
        print("every operator's output and gradient is finite here: the step does not reproduce eagerly (the "
              "search may have run it compiled or as a CUDA graph, or on another device)")
    if args.attention_ab:
        case = first_failing(calls)
        if case is None:
            print(f"attention A/B: none of the {len(calls)} windowed attention calls made a non-finite q/k/v "
                  f"gradient from a finite output gradient")
        else:
            print(f"attention A/B: call {case['call']} of {len(calls)} (q {tuple(case['q'].shape)}, window "
                  f"{case['window']}): its output gradient is finite, its q/k/v gradient is not. The same inputs:")
            print("\n".join(compare(case, attention_variants(case["scaling"], case["window"]))))
            if args.save:
                torch.save({n: (t.cpu() if torch.is_tensor(t) else t) for n, t in case.items()}, args.save)
                print(f"wrote {args.save}")
    if args.anomaly:
        with torch.autograd.detect_anomaly(check_nan=True):
            dash.kl_and_grad(model, ids, w, alive.tolist(), cfg)
        print("anomaly mode: no backward function returned NaN")


if __name__ == "__main__":
    main()
