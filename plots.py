"""
Pictures of the tables sample.py and train.py print: the Coconut paper's Figures 5 and 7-9, the
superposition figures of Zhu, Hao et al. (2025), accuracy against thoughts, and a training run.

matplotlib is an optional extra (pip install matplotlib): it is imported inside the functions, and
without it every plot_* function returns MISSING instead of a path, so the tables still print and
nothing raises. Each function takes the rows analysis.py / train.py already produce, writes one PNG
(any extension savefig knows) and returns its path.

    python plots.py out/metrics.jsonl     # -> out/metrics.png: losses and accuracy per epoch
"""
import json
import math
import os
import sys

MISSING = "plots need matplotlib: pip install matplotlib (the tables above still print)"
DPI = 120
PANEL = (5.0, 3.8)  # inches per panel: the PNG is (n_cols * 5 * DPI) x (n_rows * 3.8 * DPI) pixels
MAX_COLS = 4        # plot_superposition wraps its 1 + n_layer panels after this many columns

# the same colour for the same idea in every figure
COLORS = dict(
    correct_path="tab:green", longer_path="yellowgreen", hallucination="tab:red", wrong_target="tab:orange",
    correct_label="tab:blue", incorrect_label="tab:gray",                        # analysis.PATH_CATEGORIES
    not_reachable="tab:gray", reachable="tab:blue", frontier="tab:orange", optimal="tab:green",  # analysis.GROUPS
    other="tab:gray", correct="tab:green", incorrect="tab:red")


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), or None when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # a server or CI has no display; we only ever write files
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _figure(plt, n_panels, what, title, n_cols=None, width=PANEL[0], **kw):
    """
    A constrained-layout figure of PANEL-sized panels (width: of one); axes come back as a flat list.
    The title says what the figure is, then the caller's title (a run, a data set) after a colon.
    """
    n_cols = n_cols or n_panels
    n_rows = math.ceil(n_panels / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, PANEL[1] * n_rows),
                             layout="constrained", squeeze=False, **kw)
    axes = list(axes.flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)  # the unused corner of the last row
    fig.suptitle(f"{what}: {title}" if title else what)
    return fig, axes[:n_panels]


def _save(plt, fig, path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays figsize * DPI
    plt.close(fig)  # pyplot keeps every open figure alive otherwise: a loop of plots would leak
    return path


def _legend(ax, **kw):
    if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
        ax.legend(fontsize="small", **kw)


def _f(x):
    """A number for matplotlib: None (a missing entry) becomes nan, which it leaves out of lines."""
    return float("nan") if x is None else float(x)


def _finite(x):
    return x is not None and math.isfinite(x)


def _integer_ticks(ax, xs):
    """Thoughts, heights and k are whole numbers: tick exactly those, not 0.5 steps in between."""
    xs = sorted(set(xs))
    if xs and len(xs) <= 20 and all(_finite(x) and x == int(x) for x in xs):
        ax.set_xticks(xs)


# -----------------------------------------------------------------------------
# Accuracy and cost against the number of continuous thoughts (sample.py --eval --latent 0 1 2 ...)

def plot_eval(rows, path, title=""):
    """
    rows: [dict(thoughts=mean continuous thoughts per question, acc=0..1, tokens_per_q=thoughts +
    generated tokens per question)], one per setting, any order. From evaluate.evaluate's r:
    dict(thoughts=r["mean_thoughts"], acc=r["acc"], tokens_per_q=r["mean_thoughts"] + r["mean_new_tokens"]).
    Left: accuracy, right: tokens per question.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    rows = sorted(rows, key=lambda r: _f(r["thoughts"]))
    x = [_f(r["thoughts"]) for r in rows]
    fig, (a1, a2) = _figure(plt, 2, "Accuracy and tokens per question against continuous thoughts", title)
    a1.plot(x, [100 * _f(r["acc"]) for r in rows], "o-", color="tab:blue", label="accuracy")
    # accuracy always on 0-100%: a flat line must look flat, not like noise on a 1%-high axis
    a1.set(xlabel="continuous thoughts", ylabel="accuracy (%)", title="questions answered correctly (%)",
           ylim=(0, 100))
    a2.plot(x, [_f(r["tokens_per_q"]) for r in rows], "s-", color="tab:orange", label="thoughts + generated tokens")
    a2.set(xlabel="continuous thoughts", ylabel="tokens per question",
           title="tokens per question: thoughts + written (the paper's # tokens)")
    for ax in (a1, a2):
        _integer_ticks(ax, x)  # a mean over records with fewer thoughts can be fractional: then auto ticks
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# The latent search (Coconut paper, Section 5.3, Figures 7-9): analysis.summarize's two outputs

def plot_search(by_thought, by_height, path, title=""):
    """
    by_thought: analysis.summarize's first output, [dict(thought, frontier, other, top1, top2, top3,
    correct, incorrect, ...)]; by_height: its second, [dict(height, correct, incorrect, n_correct,
    n_incorrect)]. Values may be nan (no such node). Three panels: the mass on the frontier vs the other
    nodes per thought; the cumulative value of the top-1/2/3 frontier nodes per thought (a thought that
    keeps several candidates has top-1 well below top-3); the mean value of frontier nodes that lead to
    the target ("correct") vs not, by height (low nodes, close to a leaf, are told apart better).
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    fig, (a1, a2, a3) = _figure(plt, 3, "The latent search on ProsQA (Coconut Figures 7-9)", title)
    by_thought = sorted(by_thought, key=lambda r: r["thought"])
    t = [r["thought"] for r in by_thought]
    front, other = [_f(r["frontier"]) for r in by_thought], [_f(r["other"]) for r in by_thought]
    # stacked: the two parts of a thought's (node-normalised) distribution sum to 1
    a1.bar(t, front, color=COLORS["frontier"], label="frontier nodes")
    a1.bar(t, other, bottom=[0.0 if math.isnan(v) else v for v in front], color=COLORS["other"], label="other nodes")
    a1.set(xlabel="thought i", ylabel="mean probability mass", title="frontier vs other nodes", ylim=(0, 1.25))
    for k, style in zip((1, 2, 3), (":", "--", "-")):
        a2.plot(t, [_f(r[f"top{k}"]) for r in by_thought], "o" + style, label=f"top-{k} frontier nodes")
    a2.set(xlabel="thought i", ylabel="cumulative value", title="top-k frontier values", ylim=(0, 1.05))
    by_height = sorted(by_height, key=lambda r: r["height"])
    h = [r["height"] for r in by_height]
    for key in ("correct", "incorrect"):
        ys = [_f(r[key]) for r in by_height]
        label = dict(correct="correct (leads to the target)", incorrect="incorrect")[key]
        a3.plot(h, ys, "o-", color=COLORS[key], label=label)
        for x, y, r in zip(h, ys, by_height):
            if _finite(y):  # how many nodes each mean is over: a mean of 3 nodes says little
                a3.annotate(f"n={r['n_' + key]}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    a3.set(xlabel="height (shortest distance to a leaf)", ylabel="mean value", title="frontier node value by height")
    a3.margins(x=0.12)  # room for the n= labels at both ends
    for ax, xs in ((a1, t), (a2, t), (a3, h)):
        _integer_ticks(ax, xs)
        ax.grid(alpha=0.3)
    _legend(a1, loc="upper center", ncol=2)  # above the bars, which reach 1
    _legend(a2)
    _legend(a3)
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# Reasoning paths (Coconut paper, Section 5.2, Figure 5): analysis.path_table's rows

def plot_paths(rows, path, title=""):
    """
    rows: analysis.path_table's output, [dict(k, n, acc, correct_path=share, longer_path=share, ...)]
    with one share per analysis.PATH_CATEGORIES (they sum to 1; nan when n is 0). One stacked bar per
    k (continuous thoughts before the switch to language), with the answer accuracy marked on it.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    from analysis import PATH_CATEGORIES  # here, not at the top: analysis imports torch
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    fig, (ax,) = _figure(plt, 1, "Reasoning paths after k continuous thoughts (Coconut Figure 5)", title,
                         width=PANEL[0] * 1.6)  # room for the legend on the right
    bottom = [0.0] * len(rows)
    for c in PATH_CATEGORIES:
        share = [_f(r.get(c)) for r in rows]
        share = [0.0 if math.isnan(s) else s for s in share]  # n = 0: an empty bar
        ax.bar(ks, share, bottom=bottom, color=COLORS.get(c), label=c.replace("_", " "), width=0.7)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.plot(ks, [_f(r["acc"]) for r in rows], "D-", color="black", label="answer accuracy")
    ax.set_xticks(ks, [f"{k}\n(n={r['n']})" for k, r in zip(ks, rows)])
    ax.set(xlabel="k (continuous thoughts, then language)", ylabel="share of outputs", ylim=(0, 1.05))
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# Superposition (Zhu, Hao et al. 2025, Section 5): analysis.superposition_tables's output

def plot_superposition(tables, path, title=""):
    """
    tables: dict(inner={i: {group: (mean, records)}}, attention=[per layer {i: {group: (mean, records)}}]),
    layers in order (attention[0] is the first layer, drawn as "layer 1")
    with group in analysis.GROUPS (not_reachable, reachable, frontier, optimal); a missing group is left
    out. Panels: the mean inner product of thought i with the nodes' embeddings by group, then per layer
    the attention mass on the question's edges by group while thought i is computed. A superposition
    reads optimal >= frontier > reachable > not reachable.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    from analysis import GROUPS  # here, not at the top: analysis imports torch
    attention = tables.get("attention") or []
    panels = [(tables.get("inner") or {}, "<thought i, node embedding>", "mean inner product")]
    # numbered from 1, as the paper's "layer 2" of its 2-layer model
    panels += [(a, f"layer {l + 1} of {len(attention)}: attention on edges", "mean attention mass")
               for l, a in enumerate(attention)]
    fig, axes = _figure(plt, len(panels), "Reasoning by superposition, thought i by node group", title,
                        n_cols=min(len(panels), MAX_COLS))
    # every panel on the same thoughts: one a table lacks is a gap in its lines, not a silent bridge
    steps = sorted({i for table, _, _ in panels for i in table})
    for ax, (table, name, ylabel) in zip(axes, panels):
        for g in GROUPS:
            ys = [_f(table[i][g][0]) if g in table.get(i, {}) else float("nan") for i in steps]
            if any(_finite(y) for y in ys):
                ax.plot(steps, ys, "o-", color=COLORS[g], label=g.replace("_", " "))
        ax.set(xlabel="thought i", ylabel=ylabel, title=name)
        _integer_ticks(ax, steps)
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# A training run: train.py's metrics.jsonl

def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(metrics, path, title=""):
    """
    metrics: metrics.jsonl's rows, [dict(epoch (1-based), stage, train_loss, val_loss, val_acc (0..1,
    only on the epochs it was measured), ...)]. Left: the losses, right: validation accuracy, both per
    epoch, with a dashed line where the stage changes (the loss jumps there: new thoughts, new targets).
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    metrics = sorted(metrics, key=lambda m: m["epoch"])
    ep = [m["epoch"] for m in metrics]
    # one epoch axis for both panels: the accuracy lines up with the loss, even before any is measured
    fig, (a1, a2) = _figure(plt, 2, "Loss and validation accuracy per epoch", title, sharex=True)
    # small markers: a run of one epoch (or one between two nans) is still visible
    a1.plot(ep, [_f(m.get("train_loss")) for m in metrics], ".-", color="tab:blue", label="train loss")
    a1.plot(ep, [_f(m.get("val_loss")) for m in metrics], ".-", color="tab:orange", label="validation loss")
    a1.set(xlabel="epoch", ylabel="loss (at the epoch's stage)", title="training and validation loss")
    acc = [m for m in metrics if m.get("val_acc") is not None]
    a2.plot([m["epoch"] for m in acc], [100 * _f(m["val_acc"]) for m in acc], "o-", color="tab:green",
            label="validation accuracy")
    # always 0-100%: a flat 15% drawn on an axis from 14.2% to 15.8% would look like variation
    a2.set(xlabel="epoch", ylabel="accuracy (%)", title="validation questions answered correctly (%)", ylim=(0, 100))
    from matplotlib.ticker import MaxNLocator
    a1.xaxis.set_major_locator(MaxNLocator(integer=True))  # shared with a2: whole epochs only
    if ep:  # whole epochs, half an epoch of room either side: one epoch alone is still a column
        a1.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
    # where each stage starts: the left edge, then halfway between its first epoch and the one before
    starts = [(min(ep) - 0.5 if i == 0 else (metrics[i - 1]["epoch"] + m["epoch"]) / 2, m["stage"])
              for i, m in enumerate(metrics) if i == 0 or m["stage"] != metrics[i - 1]["stage"]]
    for ax in (a1, a2):
        for i, (x, stage) in enumerate(starts):
            if i:
                ax.axvline(x, color="gray", ls="--", lw=0.8)
            # upright along the line, inside the axes whatever the y range; out of the layout and
            # clipped, so that a label near the right edge cannot squeeze the panels
            ax.text(x, 0.98, f" stage {stage}", transform=ax.get_xaxis_transform(), rotation=90, ha="left",
                    va="top", fontsize="x-small", color="dimgray", clip_on=True, in_layout=False)
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(plt, fig, path)


if __name__ == "__main__":
    # python plots.py out/metrics.jsonl [more.jsonl ...]: a .png next to each
    for p in sys.argv[1:]:
        print(plot_run(read_metrics(p), os.path.splitext(p)[0] + ".png", title=p))
