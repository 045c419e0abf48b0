"""How stable is the search, and does the polish reach the minimum-KL placement? On the shipped small teacher.

    python small_model/stability.py --seeds 1,2,3,4,5 --ks 2,3 --out results/stability-small

For each K and seed: `python dash.py --k K --seed S` (the default small-model search; only the search's data
order changes with the seed, the candidates are prepared once). Then every placement of K full-attention layers,
C(L, K) of them, is scored by the same exact held-out KL(teacher || hybrid) that the polish minimises (the other
layers on the search's own cheap pick), and the search's relaxed top-K and its polished placement are ranked
among them. Writes <out>/stability.json and prints the table the README shows.
"""
import argparse
import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--ks", default="2,3")
    ap.add_argument("--out", default="results/stability-small")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="dash.py --compile on CUDA (off here: the small model's "
                                                           "search is launch-bound, and each run would compile again)")
    ap.add_argument("--tokens", type=int, default=None, help="search tokens (default: dash.py's)")
    ap.add_argument("--prep-tokens", type=int, default=None, help="alignment tokens (default: dash.py's)")
    args = ap.parse_args()
    out = Path(args.out)
    runs = []
    for k in map(int, args.ks.split(",")):
        for seed in map(int, args.seeds.split(",")):
            t0 = time.time()
            arch = dash.run(dash.Config(k=k, seed=seed, check_samples=0, device=args.device, tokens=args.tokens,
                                        compile=args.compile,
                                        prep_tokens=args.prep_tokens,
                                        out=str(out / f"k{k}-seed{seed}"), log_every=10 ** 9))
            runs.append(dict(k=k, seed=seed, relaxed=arch["relaxed"]["full_layers"],
                             polished=arch["full_layers"], kl_relaxed=arch["polished"]["kl_relaxed"],
                             kl_polished=arch["polished"]["kl"], moves=len(arch["polished"]["moves"]),
                             wall_s=round(time.time() - t0, 1), arch=str(out / f"k{k}-seed{seed}" / "arch.json")))
    # every placement, by the polish's own measure, for each distinct (K, cheap fill)
    cfg = dash.Config(device=args.device, check_samples=0, tokens=args.tokens, prep_tokens=args.prep_tokens)
    device, dtype = dash.devices(cfg)
    model, tok = dash.load_model(str(dash.SMALL_MODEL), device, dtype)
    cfg = dash.resolve(cfg, len(model.model.layers))
    data = dash.load_data(tok, cfg, parts=("held_out",))
    exhaustive = {}
    for run in runs:
        arch = json.loads(Path(run["arch"]).read_text())
        fill = [dash.cheapest_other(torch.tensor(p), arch["candidates"]) for p in arch["probabilities"]]
        key = (run["k"], tuple(fill))
        if key not in exhaustive:
            if not getattr(model.model.layers[0].self_attn, "ops", None):
                state = dash.read_candidates(arch["candidate_cache"],
                                             dash.hybrid_expectation(model, arch["candidates"][1:], cfg))
                ops = dash.make_ops(model, arch["candidates"], cfg)
                dash.load_candidates(ops, state)
                dash.install(model, ops)
            L = len(fill)
            placements = list(itertools.combinations(range(L), run["k"]))
            kls = dash.placement_kl(model, [["full" if l in p else fill[l] for l in range(L)] for p in placements],
                                    arch["candidates"], data["held_out"], cfg, f"all placements, K={run['k']}")
            exhaustive[key] = sorted(zip(kls, map(list, placements)))
        ranked = [p for _, p in exhaustive[key]]
        run.update(fill=fill, rank_relaxed=ranked.index(run["relaxed"]) + 1,
                   rank_polished=ranked.index(run["polished"]) + 1, placements=len(ranked),
                   minimum=ranked[0], kl_minimum=exhaustive[key][0][0])
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps(dict(runs=runs, versions=dash.versions(), device=device,
                                                        exhaustive={f"k{k} {' '.join(f)}": v for (k, f), v
                                                                    in exhaustive.items()}), indent=1))
    rows = ["| K | seed | relaxed top-K | its KL rank | polished | its KL rank | moves | min-KL placement |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        rows.append(f"| {r['k']} | {r['seed']} | {r['relaxed']} | {r['rank_relaxed']} of {r['placements']} | "
                    f"{r['polished']} | {r['rank_polished']} of {r['placements']} | {r['moves']} | {r['minimum']} |")
    for k in sorted({r["k"] for r in runs}):
        wins = Counter(str(r["polished"]) for r in runs if r["k"] == k)
        rows.append(f"\nK = {k}: " + ", ".join(f"{p} in {n} of {sum(wins.values())} seeds" for p, n in
                                               wins.most_common()))
    print("\n".join(rows))
    (out / "stability.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
