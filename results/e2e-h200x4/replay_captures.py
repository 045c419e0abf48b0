"""What dash.graph_covers would have saved in the recorded --cuda-graph searches: replays each arch.json's history
(the operators still in the search at every step) through graph_covers, and prices captures and pruned operators at
the run's own measured costs.
    python results/e2e-h200x4/replay_captures.py   (from the repository root)"""
import gzip, json, statistics, sys
sys.path.insert(0, ".")
import dash

for f in ["results/e2e-h200x4/arch-dash-4.json.gz", "results/e2e-h200/arch-dash-1.json.gz",
          "results/e2e-h200x2/arch-dash-2g.json.gz"]:
    a = json.load(gzip.open(f))
    h = a["history"]
    t = [r["time"] for r in h]
    alive = [[[p > 0 for p in row] for row in r["probs"]] for r in h]  # pruned: probability exactly 0
    n = [sum(map(sum, x)) for x in alive]
    events = [i for i in range(1, len(h)) if n[i] != n[i - 1]]  # each one a new graph in the recorded run

    def steady(lo, hi):  # the median step time of steps in [lo, hi) with no pruning event
        return statistics.median(t[j] - t[j - 1] for j in range(max(2, lo), min(len(h), hi)) if n[j] == n[j - 1])
    recapture = sum(t[i] - t[i - 1] - steady(i - 10, i + 10) for i in events)  # above the neighbours' pace
    per_op = (steady(2, 400) - steady(len(h) - 100, len(h))) / (n[0] - n[-1])  # a step's seconds per operator
    graph, captures, stale = alive[0], 1, 0.0
    for i in range(1, len(h)):
        if not dash.graph_covers(graph, alive[i], "exact"):
            graph, captures = alive[i], captures + 1
        stale += sum(g and not x for g_l, x_l in zip(graph, alive[i]) for g, x in zip(g_l, x_l)) * per_op
    print(f"{f}: recorded {len(events) + 1} captures, {recapture:.0f} s above the steady pace "
          f"({recapture / len(events):.2f} s each); with graph_covers {captures} captures, about "
          f"{(captures - 1) * recapture / len(events) + stale:.0f} s (captures {(captures - 1) * recapture / len(events):.0f} "
          f"+ pruned operators run at weight 0 {stale:.0f})")
