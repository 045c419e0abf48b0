"""Does the placement of full attention matter in the shipped small model? The numbers of its model card.

    python small_model/study.py --cache candidates/small_model-<fingerprint>.safetensors --fill gdn

RULER's needle tasks at the trained length (1024), greedy, for: the teacher; every layer replaced by one prepared
cheap operator; and every placement of K full-attention layers, the other layers all `--fill`. Writes
small_model/study-<fill>-k<K>.json and prints a table sorted by score.
"""
import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dash  # noqa: E402
import plots  # noqa: E402
import ruler as er  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="prepared candidates of the small model (dash.py makes them)")
    ap.add_argument("--fill", default="gdn", help="operator of the layers without full attention")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--samples", type=int, default=10, help="per task")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (fp32 either way, pure-torch operators)")
    ap.add_argument("--out", default=str(Path(__file__).parent), help="folder for study-<fill>-k<K>.json/.png")
    ap.add_argument("--arch", default=None, help="a search's arch.json: its relaxed and polished picks are marked in "
                                                "the figure (study-<fill>-k<K>.png, when matplotlib is installed)")
    ap.add_argument("--shard", default=None, help="I/N: score every N-th run from the I-th (0-based) and write its part; "
                                                 "N processes side by side, then --merge")
    ap.add_argument("--merge", action="store_true", help="combine the parts in --out into the study")
    args = ap.parse_args()
    stem = Path(args.out, f"study-{args.fill}-k{args.k}")
    model, tok = dash.load_model(str(dash.SMALL_MODEL), args.device)
    cfg = dash.Config(window=dash.SMALL["window"], kernels="torch")
    names = ["swa", "gla", "gdn"]
    weights = dash.read_candidates(args.cache, dash.hybrid_expectation(model, names, cfg))
    L = len(model.model.layers)
    with warnings.catch_warnings():  # quiet: ruler says which haystack the essay tasks use (the shipped prose)
        warnings.simplefilter("ignore")
        samples = {f"{t}@{args.length}": er.make_samples(t, tok, args.length, args.samples, args.seed)
                   for t in er.NIAH_TASKS}
    runs = {"teacher": ["full"] * L, **{f"all {n}": [n] * L for n in ("swa", "gla", "gdn")}}
    for full in itertools.combinations(range(L), args.k):
        runs[f"full {list(full)}"] = ["full" if l in full else args.fill for l in range(L)]
    if args.merge:  # the parts' results, in the runs' order
        parts = [json.loads(p.read_text()) for p in sorted(stem.parent.glob(stem.name + ".part-*.json"))]
        found = {n: r for part in parts for n, r in part.items()}
        if set(found) != set(runs):
            raise SystemExit(f"--merge: the parts in {args.out} miss {sorted(set(runs) - set(found))}")
        results, runs = {n: found[n] for n in runs}, {}
    else:
        results = {}
    if args.shard:
        i, n = map(int, args.shard.split("/"))
        runs = dict(list(runs.items())[i::n])
    for name, layers in runs.items():
        dash.make_hybrid(model, layers, weights, cfg)
        results[name] = er.run_tasks(model, tok, samples, 8, name)
        print(f"{name:>22}: {results[name]['avg']:5.1f}", flush=True)
        if args.shard:  # after every run: a part cut short keeps what it scored
            stem.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{stem}.part-{args.shard.replace('/', '-of-')}.json").write_text(json.dumps(results))
    dash.restore_teacher(model)
    if args.shard:
        return
    placed = {n: r["avg"] for n, r in results.items() if n.startswith("full")}
    best, worst = max(placed.values()), min(placed.values())
    summary = dict(teacher=results["teacher"]["avg"], best=best, worst=worst, spread=best - worst,
                   best_placements=[n for n, v in placed.items() if v == best],
                   recovery=best / results["teacher"]["avg"], fill=args.fill, k=args.k,
                   samples_per_task=args.samples, tasks=er.NIAH_TASKS, length=args.length)
    out = stem.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(summary=summary, results=results), indent=1))
    arch = json.loads(Path(args.arch).read_text()) if args.arch else {}
    plots.placement_figure(dict(summary=summary, results=results), out.with_suffix(".png"),
                           dash_pick=arch.get("relaxed", {}).get("full_layers"),
                           polished_pick=arch.get("full_layers"), title=f"K = {args.k}, others {args.fill}")
    print(json.dumps(summary, indent=1))
    for name, v in sorted(placed.items(), key=lambda kv: -kv[1]):
        print(f"{name:>22}: {v:5.1f}")


if __name__ == "__main__":
    main()
