"""The scaling figure's rows, from the end-to-end searches' arch JSONs: all-active steps 2-450 with --cuda-graph.
    python results/figures/scaling-h200.py   (from the repository root; writes results/figures/scaling-h200.json)"""
import gzip, json
rows = []
for f in ["results/e2e-h200/arch-dash-1.json.gz", "results/e2e-h200x2/arch-dash-2g.json.gz",
          "results/e2e-h200x4/arch-dash-4.json.gz"]:
    a = json.load(gzip.open(f)); t = {r["step"]: r["time"] for r in a["history"]}
    tokens = a["config"]["batch_size"] * a["config"]["seq_len"]
    rows.append(dict(gpus=a["distributed"]["world_size"], tokens_per_s=round((450 - 2) * tokens / (t[450] - t[2])),
                     source=f, steps="2-450, every operator active, --cuda-graph"))
json.dump(rows, open("results/figures/scaling-h200.json", "w"), indent=1)
print(rows)
