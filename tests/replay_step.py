"""Replay a search step that dash skipped because its KL gradient was not finite (dash.py saves
`--out/nonfinite-step-N.pt`, the first of each run of them): the same model, candidates, batch and probabilities,
eager, with a hook on every operator's output. Prints each layer's operators whose output or output gradient is not
finite, then (--anomaly) runs the step again under autograd's anomaly detection, which names the backward function
that first made a NaN. Run by hand where the search ran; not collected by pytest.

    python tests/replay_step.py out/nonfinite-step-311.pt --cache candidates/<model>-<fingerprint>.safetensors
    python tests/replay_step.py out/nonfinite-step-311.pt --cache ... --anomaly
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("file", help="nonfinite-step-N.pt, written by the search")
    ap.add_argument("--cache", default=None, help="the run's candidate file (default: its --cache, if it gave one)")
    ap.add_argument("--anomaly", action="store_true", help="then replay under torch.autograd.detect_anomaly()")
    args = ap.parse_args(argv)
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

    seen = []  # (layer, operator, output or gradient, elements not finite, largest finite |value|)

    def record(l, name, what, t):
        t = t.detach()
        seen.append((l, name, what, int((~torch.isfinite(t)).sum()), float(torch.nan_to_num(t, 0, 0, 0).abs().max())))

    def watch(l, name):
        def hook(module, inputs, y):
            record(l, name, "output", y)
            if y.requires_grad:
                y.register_hook(lambda g: record(l, name, "gradient", g))
        return hook
    for l, layer_ops in enumerate(ops):
        for name, op in layer_ops.items():
            op.register_forward_hook(watch(l, name))
    kl, dkl_dw = dash.kl_and_grad(model, ids, w, alive.tolist(), cfg)
    print(f"step {saved['step'] + 1}: KL {kl.item():.6g}; dKL/dw finite in layers "
          f"{torch.isfinite(dkl_dw).all(-1).nonzero().flatten().tolist()} of {len(ops)}")
    bad = [s for s in seen if s[3]]  # in the order met: forward, then the backward pass from the top layer down
    for l, name, what, n, largest in bad[:8]:
        print(f"  layer {l:2d} {name:6s} {what:8s}: {n} elements not finite (largest finite |x| {largest:.3g})")
    if len(bad) > 8:
        print(f"  ... and {len(bad) - 8} more below")
    if not bad:
        print("every operator's output and gradient is finite here: the step does not reproduce eagerly (the "
              "search may have run it compiled or as a CUDA graph, or on another device)")
    if args.anomaly:
        with torch.autograd.detect_anomaly(check_nan=True):
            dash.kl_and_grad(model, ids, w, alive.tolist(), cfg)
        print("anomaly mode: no backward function returned NaN")


if __name__ == "__main__":
    main()
