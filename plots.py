"""Figures of a DASH run, written as PNG beside the JSON they come from.

    python plots.py search out/arch.json                             # -> out/search.png
    python plots.py ruler results/ruler-small/results.json           # -> results/ruler-small/results.png
    python plots.py placements small_model/study-swa-k2.json --dash 4,6   # -> small_model/study-swa-k2.png
    python plots.py scaling results/scaling.json                     # -> results/scaling.png
    python plots.py finetune A/results.json B/results.json --out f.png  # needles against finetuning tokens

Every figure is a pure function of plain dicts and lists (the JSON the other scripts write), so this module
imports nothing of dash or eval_ruler and sits below both. matplotlib is optional: without it each function
prints one note per process and returns None, and the run that called it goes on.
"""
import argparse
import json
import math
import sys
from pathlib import Path

NOTE = "matplotlib is not installed: no figures (pip install matplotlib)"
_noted = False  # the note about a missing matplotlib is printed once per process, not once per figure
DPI = 100       # small PNGs that can be committed beside the JSON
HIGHLIGHT = {"teacher": "black", "dash": "tab:red"}  # the rows/lines a reader looks for first
POLISHED = "tab:orange"


def matplotlib_or_none():
    """pyplot on the Agg backend (files only, no display needed), or None with a one-time note."""
    global _noted
    try:
        import matplotlib
        if "matplotlib.pyplot" not in sys.modules:  # a session that chose its backend (a notebook) keeps it
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _noted:
            print(NOTE, file=sys.stderr)
            _noted = True
        return None
    return plt


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)  # pyplot keeps every figure alive until closed; a long run makes several
    return str(path)


def _color(name: str) -> str | None:
    """teacher black, dash and its variants red, the others matplotlib's cycle (None)."""
    return next((c for key, c in HIGHLIGHT.items() if name == key or name.startswith(key + " ")), None)

# ----------------------------------------------------------------------------- the search's trajectory


def search_figure(history: list[dict], names: list[str], chosen_layers: list[int], path,
                  polished_layers: list[int] | None = None) -> str | None:
    """p(full) per layer over the steps, every other operator's probabilities, and KL, E[full] and tau.

    history: one dict per step, as dash.search() records it:
        {"step": 0, "loss": 1.3, "kl": 1.2, "full": 4.0, "tau": 1.0, "probs": [[p_op for op in names], ...]}
    with "probs" (layers, operators) in the column order of `names`, which contains "full".
    chosen_layers: the exported full-attention layers (red marks); polished_layers: a later pick (orange).
    """
    plt = matplotlib_or_none()
    if plt is None:
        return None
    if not history or any("probs" not in r for r in history):
        raise ValueError("search_figure: needs a history with the operator probabilities of every step "
                         "('probs', layers x operators, in each record)")
    if "full" not in names:
        raise ValueError(f"search_figure: no 'full' among the operators {names}")
    steps = [r["step"] for r in history]
    L = len(history[0]["probs"])
    # image[i][l][t]: operator i's probability in layer l at record t; layers down, steps across
    image = [[[r["probs"][l][i] for r in history] for l in range(L)] for i in range(len(names))]
    full, others = names.index("full"), [i for i in range(len(names)) if i != names.index("full")]
    extent = (steps[0] - 0.5, steps[-1] + 0.5, L - 0.5, -0.5)  # layer 0 on top, as in the model

    h = max(1.8, 0.17 * L)  # inches for p(full): one visible row of pixels per layer, up to 36+ layers
    h_other = max(1.6, 0.6 * h)  # the other operators: the same picture in a smaller format
    fig = plt.figure(figsize=(11, h + h_other + 3.4), layout="constrained")  # constrained: no overlapping labels
    # a narrow second column holds the one colour bar of every heatmap
    grid = fig.add_gridspec(3, 2, height_ratios=[h, h_other, 2.4], width_ratios=[1, 0.015])
    ax_full = fig.add_subplot(grid[0, 0])
    panels = [(ax_full, full)] + [(fig.add_subplot(cell), i)
                                  for cell, i in zip(grid[1, 0].subgridspec(1, len(others)), others)]
    tick = math.ceil(L / 12)  # at most ~12 layer labels, so that they never overlap
    for ax, i in panels:
        im = ax.imshow(image[i], aspect="auto", extent=extent, cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_yticks(range(0, L, tick), [str(l) for l in range(0, L, tick)])
        ax.set(ylabel="layer", xlabel="step")
        if ax is not ax_full:
            ax.set_title(f"p({names[i]})", fontsize=10)
        # the exported layers, and the polished pick, marked inside the right edge, where the search ends
        # (x in axes units, y in layers); a white rim keeps them visible on any colour
        for layers, color, x, label in ((chosen_layers, HIGHLIGHT["dash"], 0.988, "exported full attention"),
                                        (polished_layers or [], POLISHED, 0.962, "polished pick")):
            ax.plot([x] * len(layers), layers, "<", color=color, mec="white", ms=8 if ax is ax_full else 6,
                    transform=ax.get_yaxis_transform(), label=f"{label}: layers {sorted(layers)}" if layers else None)
    for label in ax_full.get_yticklabels():  # the exported layers' own labels in red, where labelled
        if int(label.get_text()) in chosen_layers:
            label.set(color=HIGHLIGHT["dash"], fontweight="bold")
    ax_full.set_title("p(full) per layer over the steps", fontsize=10, loc="left")
    # the marks' legend on the title's line, to the right: it never covers the heatmap
    ax_full.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False,
                   borderaxespad=0.2)
    fig.colorbar(im, cax=fig.add_subplot(grid[:2, 1]), label="probability")

    bottom = grid[2, 0].subgridspec(1, 2, width_ratios=[1, 1.6])
    ax_kl, ax_e = fig.add_subplot(bottom[0]), fig.add_subplot(bottom[1])
    kls = [r["kl"] for r in history]
    ax_kl.plot(steps, kls, color="tab:blue")
    if min(kls) > 0 and max(kls) / min(kls) > 20:  # a KL that falls by orders of magnitude reads better in log
        ax_kl.set_yscale("log")
    ax_kl.set(xlabel="step", ylabel="KL(teacher || mixture)")
    ax_kl.set_title("KL over the steps", fontsize=10)
    ax_e.plot(steps, [r["full"] for r in history], color=HIGHLIGHT["dash"], label="E[full]")
    ax_e.axhline(len(chosen_layers), color=HIGHLIGHT["dash"], ls=":", lw=1, label=f"K = {len(chosen_layers)}")
    ax_e.set(xlabel="step", ylabel="E[full] (layers)", ylim=(0, L + 0.5))
    ax_tau = ax_e.twinx()  # tau lives on another scale (1 -> 0.1); its own axis, a grey line
    ax_tau.plot(steps, [r["tau"] for r in history], color="grey", ls="--", label="tau")
    ax_tau.set_ylabel("tau")
    ax_e.set_title("E[full] and tau over the steps", fontsize=10)
    lines = ax_e.get_legend_handles_labels(), ax_tau.get_legend_handles_labels()
    ax_e.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper right")
    return _save(fig, path)

# ----------------------------------------------------------------------------- RULER and speed


SPEED = [("cache_mib", "KV cache (MiB)"), ("prefill_s", "prefill (s)"), ("decode_tok_s", "decode (tokens/s)"),
         ("peak_gib", "peak memory (GiB)")]  # eval_ruler.speed()'s keys, in the order a reader asks


def ruler_figure(results: dict[str, dict], path, speed: dict | None = None, title: str = "") -> str | None:
    """Scores per task for every model, as an annotated heatmap (rows: models, columns: tasks then averages);
    with `speed`, one bar chart per measurement (cache, prefill, decode, peak memory) against length.

    results: eval_ruler's results.json "results": {model: {"task@length": score, "avg": score, "layers": "SSFF"}}
    (values that are not numbers, like "layers", are not scores). speed: its "speed": {"model@length": {...}}.
    """
    plt = matplotlib_or_none()
    if plt is None:
        return None
    models = list(results)
    if not models:
        raise ValueError("ruler_figure: no models in the results")
    keys = [k for k, v in results[models[0]].items() if isinstance(v, (int, float))]
    cols = [k for k in keys if not k.startswith("avg")] + [k for k in keys if k.startswith("avg")]
    lengths = {k.split("@")[1] for k in cols if "@" in k and not k.startswith("avg")}
    # one length: say it once in the title rather than in every column label
    labels = [k.split("@")[0] if len(lengths) == 1 else k for k in cols]
    scores = [[float(results[m].get(k, float("nan"))) for k in cols] for m in models]
    speed = speed or {}
    metrics = [(k, label) for k, label in SPEED if any(k in v for v in speed.values())]

    h = 0.32 * len(models) + 1.2
    # constrained layout leaves room for the rotated task names without hand-tuned spacing
    fig = plt.figure(figsize=(max(9.0, 0.62 * len(cols) + 4), h + (3.0 if metrics else 0)), layout="constrained")
    grid = fig.add_gridspec(2 if metrics else 1, max(1, len(metrics)), height_ratios=[h, 2.4] if metrics else [1])
    ax = fig.add_subplot(grid[0, :])
    ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    for r, row in enumerate(scores):
        for c, v in enumerate(row):
            if v == v:  # not NaN
                text = f"{v:.0f}" if v == round(v) else f"{v:.1f}"  # 72.5 stays 72.5, as in results.md
                ax.text(c, r, text, ha="center", va="center", fontsize=8, color="black" if v > 60 else "white")
    ax.axvline(len(cols) - sum(k.startswith("avg") for k in cols) - 0.5, color="white", lw=3)
    ax.set_xticks(range(len(cols)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=9)
    ax.tick_params(top=False, labeltop=False)
    for r, m in enumerate(models):
        color = _color(m)
        if color:  # the teacher and DASH: a framed row and a bold label
            ax.get_yticklabels()[r].set(color=color, fontweight="bold")
            ax.add_patch(plt.Rectangle((-0.5, r - 0.5), len(cols), 1, fill=False, ec=color, lw=2, clip_on=False))
        layers = results[m].get("layers")
        if isinstance(layers, str):  # the placement, beside its row, in the tables' letters
            ax.text(len(cols) - 0.3, r, layers, va="center", fontsize=8, family="monospace")
    if any(isinstance(results[m].get("layers"), str) for m in models):
        ax.text(len(cols) - 0.3, -0.6, "layers", va="bottom", fontsize=8)
    ax.set_title(title or "RULER: score per task" + (f" at {lengths.pop()} tokens" if len(lengths) == 1 else "")
                 + " (layers: F full attention, S window, G gla, D gdn)", fontsize=10)

    by_model: dict[str, dict[int, dict]] = {}
    for key, row in speed.items():
        name, length = key.rsplit("@", 1)
        by_model.setdefault(name, {})[int(length)] = row
    lens = sorted({n for rows in by_model.values() for n in rows})
    width = 0.8 / max(1, len(by_model))
    for j, (metric, label) in enumerate(metrics):
        sub = fig.add_subplot(grid[1, j])
        for i, (name, rows) in enumerate(by_model.items()):
            xs = [p + (i - (len(by_model) - 1) / 2) * width for p, n in enumerate(lens) if metric in rows.get(n, {})]
            ys = [rows[n][metric] for n in lens if metric in rows.get(n, {})]
            bars = sub.bar(xs, ys, width, label=name, color=_color(name) or f"C{i}")
            if len(lens) * len(by_model) <= 8:  # few bars: the values themselves, as in the table
                sub.bar_label(bars, [f"{y:.3g}" for y in ys], fontsize=7)
        sub.set_xticks(range(len(lens)), [str(n) for n in lens])
        sub.set(xlabel="length (tokens)", title=label)
        sub.title.set_fontsize(9)
        sub.margins(y=0.2)
    if metrics:
        fig.axes[1].legend(fontsize=8)
    return _save(fig, path)

# ----------------------------------------------------------------------------- the placement study


def placements_of(study: dict) -> dict[tuple[int, ...], float]:
    """{full-attention layers: score} of a small_model/study.py file, best first.

    study: {"summary": {"teacher": 100.0, "k": 2, "fill": "swa", ...},
            "results": {"teacher": {..., "avg": 100.0}, "all swa": {...}, "full [2, 6]": {..., "avg": 85.94}, ...}}
    Only the "full [...]" runs are placements; "avg" is each one's score.
    """
    found = {tuple(json.loads(name[len("full "):])): r["avg"]
             for name, r in study["results"].items() if name.startswith("full [")}
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def rank_of(pick, placed: dict[tuple[int, ...], float]) -> int:
    """1 + the number of placements that score strictly higher (ties share a rank)."""
    pick = tuple(sorted(pick))
    if pick not in placed:
        raise ValueError(f"placement {list(pick)} is not in the study (it has K={len(next(iter(placed)))}, "
                         f"e.g. {list(next(iter(placed)))})")
    return 1 + sum(v > placed[pick] for v in placed.values())


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def placement_figure(study: dict, path, dash_pick=None, polished_pick=None, title: str = "") -> str | None:
    """Every placement's score, best first, with DASH's pick (red) and the polished pick (orange) labelled."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    placed = placements_of(study)
    picks = [(p, c, who) for p, c, who in ((dash_pick, HIGHLIGHT["dash"], "DASH"),
                                           (polished_pick, POLISHED, "polished")) if p is not None]
    ranks = [rank_of(p, placed) for p, _, _ in picks]  # fails with the bad pick before drawing anything
    order, n = list(placed), len(placed)
    colors = ["lightgrey"] * n
    for (p, c, _) in picks:
        colors[order.index(tuple(sorted(p)))] = c
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * n + 2), 4.2))
    ax.bar(range(n), list(placed.values()), color=colors, width=0.8)
    s = study.get("summary", {})
    if "teacher" in s:
        ax.axhline(s["teacher"], color="black", ls="--", lw=1)
        ax.text(n - 0.5, s["teacher"], "teacher", ha="right", va="bottom", fontsize=8)
    if n <= 80:  # beyond that the labels would overlap; the rank axis still reads
        ax.set_xticks(range(n), [",".join(map(str, p)) for p in order], rotation=90, fontsize=7 if n > 30 else 8)
        ax.set_xlabel("full-attention layers, best placement first")
    else:
        ax.set_xlabel("placements, best first")
    xs = [order.index(tuple(sorted(p))) for p, _, _ in picks]
    for j, ((p, c, who), rank, x) in enumerate(zip(picks, ranks, xs)):
        same = j == 1 and xs[0] == xs[1]
        text = f"{who} {sorted(p)}: " + ("the same" if same else f"{placed[order[x]]:.1f}, {_ordinal(rank)} of {n}")
        # labels in the empty right half (scores fall from left to right), an arrow to the bar; the pick further
        # left gets the upper label, so that the arrows never cross
        slot = sorted(xs).index(x) if not same else 1
        ax.annotate(text, (x, placed[order[x]]), xytext=(0.45, 0.86 - 0.12 * slot), textcoords="axes fraction",
                    color=c, fontsize=9, fontweight="bold", arrowprops=dict(arrowstyle="->", color=c, lw=1.2))
    ax.set(ylabel="score (%)", ylim=(0, max(100.0, s.get("teacher", 0)) * 1.08), xlim=(-0.7, n - 0.3))
    ax.set_title(title or f"Every placement of K={s.get('k', '?')} full-attention layers, the others "
                 f"{s.get('fill', '?')} ({n} placements; {s.get('samples_per_task', '?')} samples x "
                 f"{len(s.get('tasks', [])) or '?'} needle tasks at {s.get('length', '?')} tokens)", fontsize=10)
    return _save(fig, path)

# ----------------------------------------------------------------------------- scaling


def scaling_figure(rows: list[dict], path, title: str = "") -> str | None:
    """Search tokens/s against the number of GPUs, with the ideal (linear from the smallest run) line.
    rows: [{"gpus": 1, "tokens_per_s": 16800.0}, {"gpus": 2, "tokens_per_s": 32000.0}, ...]"""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    rows = sorted(rows, key=lambda r: r["gpus"])
    gpus, tps = [r["gpus"] for r in rows], [r["tokens_per_s"] for r in rows]
    ideal = [tps[0] * g / gpus[0] for g in gpus]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(gpus, ideal, "--", color="grey", label="linear")
    ax.plot(gpus, tps, "o-", color=HIGHLIGHT["dash"], label="measured")
    for g, t, i in zip(gpus, tps, ideal):  # scaling efficiency beside each point
        ax.annotate(f"{t / i:.0%}", (g, t), xytext=(4, -12), textcoords="offset points", fontsize=8)
    ax.set_xticks(gpus)
    ax.set(xlabel="GPUs", ylabel="tokens/s", title=title or "Search throughput against GPUs",
           ylim=(0, max(ideal + tps) * 1.1))
    ax.legend()
    return _save(fig, path)

# ----------------------------------------------------------------------------- finetuning curves


def needles(row: dict) -> float:
    """The mean of a RULER row's niah tasks (every length it holds)."""
    scores = [v for k, v in row.items() if k.startswith("niah_")]
    if not scores:
        raise ValueError("the row has no niah task")
    return sum(scores) / len(scores)


def finetune_point(results: dict) -> dict:
    """One finetuned hybrid's RULER file (eval_ruler.py --arch <finetuned>/arch.json) as a point of the curve:
    its finetuning tokens, the recipe that makes its line (the loss; distinct text, or passes over the same), its
    needles and the teacher's."""
    ft, c = results["finetune"], results["finetune"]["config"]  # flags newer than a run are absent or None in it
    loss = (f"decoupled top-{c['top_k']} KL" if c.get("top_k") else
            f"LongCE-weighted KL (--long-weight {c['long_weight']:g})" if c.get("long_weight") else "KL")
    if c.get("hidden_weight"):
        loss += f" + per-layer loss (--hidden-weight {c['hidden_weight']:g})"
    text = f"passes over {ft['tokens'] // ft['epochs']:,} tokens" if ft["epochs"] > 1 else "distinct tokens"
    batch = c.get("batch_size")  # None: the search's batch, as every run before --batch-size
    if batch and batch != ft["data"]["batch_size"]:
        text += f", batch {batch}"
    return dict(tokens=ft["tokens"], line=f"{loss}, {text}", passes=ft["epochs"],
                needles=needles(results["results"]["dash"]), teacher=needles(results["results"]["teacher"]))


def finetune_figure(runs: list[dict], path, title: str = "") -> str | None:
    """Needles against finetuning tokens (log scale), one line per recipe, the teacher's needles and 70% of them.
    runs: eval_ruler's results.json of finetuned hybrids (each with its "finetune" record)."""
    plt = matplotlib_or_none()
    if plt is None:
        return None
    points = [finetune_point(r) for r in runs]
    lines: dict[str, list[dict]] = {}
    for pt in sorted(points, key=lambda q: q["tokens"]):
        lines.setdefault(pt["line"], []).append(pt)
    teacher = max(pt["teacher"] for pt in points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(teacher, color=HIGHLIGHT["teacher"], lw=1, label=f"teacher ({teacher:.1f})")
    ax.axhline(0.7 * teacher, color="grey", ls="--", lw=1, label="70% of the teacher's")
    for name, pts in lines.items():
        xs, ys = [q["tokens"] for q in pts], [q["needles"] for q in pts]
        ax.plot(xs, ys, "o-", label=name)
        for q in pts:
            note = f"{q['needles']:.1f}" + (f" ({q['passes']} passes)" if q["passes"] > 1 else "")
            ax.annotate(note, (q["tokens"], q["needles"]), xytext=(5, -12), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="finetuning tokens", ylabel="needles (mean of the niah tasks, %)", ylim=(0, 105),
           title=title or "RULER needles after finetuning, against the tokens")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below the axes: the points stay clear
    return _save(fig, path)

# ----------------------------------------------------------------------------- command line


def layer_list(text: str) -> list[int]:
    """'4,6' -> [4, 6]"""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 4,6, got {text!r}") from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    for what, help in (("search", "dash.py's arch.json (with its history)"), ("ruler", "eval_ruler's results.json"),
                       ("placements", "small_model/study-*.json"), ("scaling", "a JSON list of {gpus, tokens_per_s}"),
                       ("finetune", "eval_ruler's results.json of finetuned hybrids, one or more")):
        p = sub.add_parser(what, help=help)
        p.add_argument("json", help=help, nargs="+" if what == "finetune" else None)
        p.add_argument("--out", help="the PNG (default: beside the (first) JSON)")
        if what == "placements":
            p.add_argument("--dash", type=layer_list, help="DASH's full-attention layers, e.g. 4,6")
            p.add_argument("--polished", type=layer_list, help="the polished pick's layers")
        if what in ("placements", "ruler", "finetune", "scaling"):
            p.add_argument("--title", default="", help="instead of the default title")
    args = ap.parse_args(argv)
    sources = [Path(f) for f in (args.json if args.what == "finetune" else [args.json])]
    src = sources[0]
    try:
        datas = []
        for src in sources:  # `src` names the file at fault in an error below
            datas.append(json.loads(src.read_text()))
        data = datas[0]
        default = {"search": "search.png", "ruler": "results.png", "finetune": "finetune.png"}.get(
            args.what, sources[0].stem + ".png")
        out = args.out or str(sources[0].with_name(default))
        if args.what == "finetune":
            for src, d in zip(sources, datas):  # check each file before drawing
                finetune_point(d)
            made = finetune_figure(datas, out, args.title)
        elif args.what == "search":
            made = search_figure(data.get("history", []), data["candidates"], data["full_layers"], out,
                                 data.get("polished_full_layers"))
        elif args.what == "ruler":
            made = ruler_figure(data["results"], out, data.get("speed"), args.title)
        elif args.what == "placements":
            made = placement_figure(data, out, args.dash, args.polished, args.title)
        else:
            made = scaling_figure(data, out, args.title)
    except KeyError as e:  # a bad file or pick: one line, no traceback
        raise SystemExit(f"plots: {src} has no key {e} (is it a {args.what} file?)")
    except (OSError, ValueError) as e:
        raise SystemExit(f"plots: {src}: {e}")
    if made:
        print(f"wrote {made}")


if __name__ == "__main__":
    main()
