"""
Pictures of the tables sample.py and train.py print: the Coconut paper's Figures 5 and 7-9, the
superposition figures of Zhu, Hao et al. (2025), accuracy against thoughts, and a training run.

matplotlib is an optional extra (pip install matplotlib): it is imported inside the functions, and
without it every plot_* function returns MISSING instead of a path and nothing raises (sample.py asks
missing() first and stops before any work). Each function takes the rows analysis.py / train.py already
produce, writes one PNG (any extension savefig knows) and returns its path.

    python machinery/plots.py out/metrics.jsonl     # -> out/metrics.png: losses and accuracy per epoch
"""
import json
import math
import os
import sys

MISSING = "plots need matplotlib: pip install matplotlib"
DPI = 120
PANEL = (5.0, 3.8)  # inches per panel: the PNG is (n_cols * 5 * DPI) x (n_rows * 3.8 * DPI) pixels
MAX_COLS = 4        # plot_superposition wraps its 1 + n_layer panels after this many columns

# the same colour for the same idea in every figure
COLORS = dict(
    correct_path="tab:green", longer_path="yellowgreen", hallucination="tab:red", wrong_target="tab:orange",
    correct_label="tab:blue", incorrect_label="tab:gray", no_answer="lightgray",  # analysis.PATH_CATEGORIES
    not_reachable="tab:gray", reachable="tab:blue", frontier="tab:orange", optimal="tab:green",  # analysis.GROUPS
    other="tab:gray", correct="tab:green", incorrect="tab:red",
    gold="tab:green", start="tab:blue", other_root="tab:orange", unused="tab:gray",  # analysis.LAYER_GROUPS
    Coconut="tab:green", CoT="tab:blue", **{"No-CoT": "tab:gray"})                   # the demo's methods


def missing():
    """True when matplotlib cannot be imported: then every plot_* returns MISSING."""
    return _pyplot() is None


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
        ax.legend(**{"fontsize": "small", **kw})


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
    # from 0: 7.0 against 7.7 tokens is a tenth more, not a cliff; room above the line for the legend
    top = max([_f(r["tokens_per_q"]) for r in rows if _finite(r["tokens_per_q"])], default=1.0)
    a2.set(xlabel="continuous thoughts", ylabel="thoughts + written tokens", ylim=(0, 1.25 * top or 1.0),
           title="tokens per question (the paper's # tokens)")
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
    from machinery.analysis import PATH_CATEGORIES  # here, not at the top: analysis imports torch
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

def plot_superposition(tables, path, title="", split=None):
    """
    tables: dict(inner={i: {group: (mean, records)}}, attention=[per layer {i: {group: (mean, records)}}]),
    layers in order (attention[0] is the first layer, drawn as "layer 1")
    with group in analysis.GROUPS (not_reachable, reachable, frontier, optimal); a missing group is left
    out. Panels: the mean inner product of thought i with the nodes' embeddings by group, then per layer
    the attention mass on the question's edges by group while thought i is computed. A superposition
    reads optimal >= frontier > reachable > not reachable. split: on layered data, analysis.average_splits's
    rows, drawn first as plot_layer_split draws them (where thought i's mass goes inside its own layer).
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    from machinery.analysis import GROUPS  # here, not at the top: analysis imports torch
    attention = tables.get("attention") or []
    panels = [(tables.get("inner") or {}, "<thought i, node embedding>", "mean inner product")]
    # numbered from 1, as the paper's "layer 2" of its 2-layer model
    panels += [(a, f"layer {l + 1} of {len(attention)}: attention on edges", "mean attention mass")
               for l, a in enumerate(attention)]
    n = len(panels) + (split is not None)
    what = "Reasoning by superposition, thought i by node group"
    if split is not None:
        what = "The search in the thoughts: inside each thought's layer, then by node group (superposition)"
    fig, axes = _figure(plt, n, what, title, n_cols=min(n, MAX_COLS))
    if split is not None:
        _split_bars(axes[0], split, "thought")
        axes = axes[1:]
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


def stage_spans(metrics, max_latent_stage=None):
    """
    metrics sorted by epoch -> [(first epoch - 0.5, last epoch + 0.5, label)], one per run of epochs at one
    stage. Every stage past max_latent_stage trains the same thing (every step a thought, M x c of them):
    those epochs are one span, labelled "all" (with M unknown, each stage is its own span).
    """
    spans = []
    for m in metrics:
        s = m["stage"]
        label = "all" if max_latent_stage is not None and s > max_latent_stage else str(s)
        if spans and spans[-1][2] == label:
            spans[-1][1] = m["epoch"] + 0.5
        else:
            spans.append([m["epoch"] - 0.5, m["epoch"] + 0.5, label])
    return [tuple(s) for s in spans]


def plot_run(metrics, path, title="", max_latent_stage=None):
    """
    metrics: metrics.jsonl's rows, [dict(epoch (1-based), stage, train_loss, val_loss, val_acc (0..1,
    only on the epochs it was measured), ...)]. Left: the losses, right: validation accuracy, both per
    epoch, with a dashed line where the stage changes (the loss jumps there: new thoughts, new targets)
    and the stages named on a second axis above the panels, off the curves. max_latent_stage (the run's
    M): the stages past it are one, "all" (stage_spans).
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
    spans = stage_spans(metrics, max_latent_stage)
    for ax in (a1, a2):
        for x0, _, _ in spans[1:]:
            ax.axvline(x0, color="gray", ls="--", lw=0.8)
        if len(spans) > 1:  # the stages on a second x axis above the panel: never on a curve
            top = ax.secondary_xaxis("top")
            top.set_xticks([(x0 + x1) / 2 for x0, x1, _ in spans], [label for _, _, label in spans],
                           fontsize="x-small")
            top.tick_params(length=0)
            top.set_xlabel("stage" + (f" (all: past {max_latent_stage}, every step a thought)"
                                      if any(label == "all" for _, _, label in spans) else ""), fontsize="small")
        ax.grid(alpha=0.3)
        _legend(ax)
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# The CPU demo's three runs side by side (sample.py --out_dir out-demo --plot FILE)

def plot_methods(runs, path, title=""):
    """
    runs: {name: metrics.jsonl's rows} in the order to draw (the demo's "Coconut", "CoT", "No-CoT"). One
    panel: each run's validation accuracy per epoch on 0-100%. The demo trains each for the same optimizer
    steps an epoch, so the epochs line up.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    fig, (ax,) = _figure(plt, 1, "Validation accuracy per epoch", title, width=PANEL[0] * 1.4)
    epochs = []
    for name, metrics in runs.items():
        acc = sorted((m["epoch"], 100 * _f(m["val_acc"])) for m in metrics if m.get("val_acc") is not None)
        epochs += [e for e, _ in acc]
        ax.plot([e for e, _ in acc], [a for _, a in acc], "o-", color=COLORS.get(name), label=name)
    ax.set(xlabel="epoch", ylabel="validation questions answered correctly (%)", ylim=(0, 100))
    _integer_ticks(ax, epochs)
    ax.grid(alpha=0.3)
    _legend(ax, loc="lower right")
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# Search or a layer prior (sample.py --analyze on layered data): analysis.average_splits's rows

def _split_bars(ax, rows, what):
    from machinery.analysis import LAYER_GROUPS, LAYER_NAMES  # here, not at the top: analysis imports torch
    x = [r["position"] for r in rows]
    bottom = [0.0] * len(rows)
    for g in LAYER_GROUPS:
        share = [0.0 if math.isnan(_f(r[g])) else _f(r[g]) for r in rows]
        ax.bar(x, share, bottom=bottom, color=COLORS[g], label=LAYER_NAMES[g], width=0.7)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.plot(x, [_f(r["layer"]) for r in rows], "kD--", label="the layer's mass (of all)")
    ax.set(xlabel=f"{what} k (names the layer-k node)", ylabel="share of the layer's mass", ylim=(0, 1.3),
           title=f"inside {what} k's layer")
    _integer_ticks(ax, x)
    _legend(ax, loc="upper center", ncol=2, fontsize="x-small")


def plot_layer_split(rows, path, title="", what="thought"):
    """
    rows: analysis.average_splits's output, [dict(position=k, layer, gold, start, other_root, unused, ...)].
    One stacked bar per position: the share of the layer's mass on each group (they sum to 1), and the
    layer's own mass out of the whole softmax as a line. A search fills gold + start; a layer prior would
    spread over all four as the layer's nodes are.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    fig, (ax,) = _figure(plt, 1, f"Where each {what}'s softmax goes inside its layer", title, width=PANEL[0] * 1.2)
    _split_bars(ax, rows, what)
    return _save(plt, fig, path)


# -----------------------------------------------------------------------------
# One question's search on the world (sample.py --search I --plot FILE)

def plot_world(world, probs, labels, path, title="", max_cols=3):
    """
    world: dict(names (idx_to_symbol), width (nodes per layer), edges (the question's open roads, [a, b]),
    roles (per node: gold, start, other_root or unused, analysis.node_roles), gold_path, root, target,
    neg_target). probs: per position (thought k, or CoT's step k) each node's probability; labels: a title
    per position. The first panel is the question: the world's nodes as a grid, layers across and nodes
    down, its open roads coloured by branch; then one panel per position with each node's probability as
    the area of its disc (coloured by role): the start's branches light up; thoughts labelled with the frontier
    keep all three to the end, thoughts labelled with the gold node narrow to its path.
    """
    plt = _pyplot()
    if plt is None:
        return MISSING
    names, w = world["names"], world["width"]
    n_layers = len(names) // w
    xy = [(v // w, -(v % w)) for v in range(len(names))]  # layers across, nodes down
    layer_names = [names[l * w].rstrip("0123456789") or str(l) for l in range(n_layers)]  # reach: a, b, ...
    fig, axes = _figure(plt, 1 + len(probs), "The search, thought by thought", title,
                        n_cols=min(1 + len(probs), max_cols), width=PANEL[0] * 0.8)
    gold = set(world["gold_path"])
    for i, ax in enumerate(axes):
        first = i == 0
        for a, b in world["edges"]:  # the roads in their branch's colour, faint behind the discs
            role = world["roles"][b]
            ax.plot([xy[a][0], xy[b][0]], [xy[a][1], xy[b][1]], "-", lw=2.2 if role == "gold" and first else 1.0,
                    color=COLORS[role], alpha=1.0 if first else 0.25, zorder=1)
        ax.scatter([x for x, _ in xy], [y for _, y in xy], s=8, color="silver", zorder=2)
        if first:
            for v in (world["root"], world["target"], world["neg_target"]):
                ax.scatter(*xy[v], s=180, facecolor="none", edgecolor="black", lw=1.2,
                           marker="o" if v == world["root"] else "s", zorder=3)
            for v, (x, y) in enumerate(xy):
                ax.annotate(names[v], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=6, color="dimgray",
                            zorder=4, bbox=dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.8))
            ax.set_title("the question: start (circle), options (squares)", fontsize="small")
            for g, name in (("gold", "gold path"), ("start", "the start's other branches"),
                            ("other_root", "the other root's branches"), ("unused", "unused nodes")):
                ax.plot([], [], "o-", color=COLORS[g], label=name)
            # below the grid, in the layout: no node hidden under it
            _legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize="x-small")
        else:
            p = probs[i - 1]
            ax.scatter([x for x, _ in xy], [y for _, y in xy], s=[900 * max(float(q), 0.0) for q in p],
                       color=[COLORS[r] for r in world["roles"]], alpha=0.8, zorder=3,
                       edgecolor=["black" if v in gold else "none" for v in range(len(names))], lw=0.6)
            mass = [sum(p[l * w:(l + 1) * w]) for l in range(n_layers)]
            top = max(range(n_layers), key=lambda l: mass[l])
            ax.set_title(f"{labels[i - 1]}: {mass[top]:.2f} on layer {layer_names[top]}", fontsize="small")
        ax.set_xticks(range(n_layers), layer_names)
        ax.set_yticks([])
        ax.set_xlim(-0.6, n_layers - 0.4)
        ax.set_ylim(-w + 0.4, 0.6)
        if not first:
            ax.set_xlabel("layer (one disc a node: its area is the probability)", fontsize="small")
    return _save(plt, fig, path)


if __name__ == "__main__":
    # python machinery/plots.py out/metrics.jsonl [more.jsonl ...]: a .png next to each
    for p in sys.argv[1:]:
        print(plot_run(read_metrics(p), os.path.splitext(p)[0] + ".png", title=p))
