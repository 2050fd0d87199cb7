"""plots.py: every figure is written as a PNG of the expected size that is not blank, from hand-built rows
and from analysis.py's own outputs, nan included; without matplotlib every function returns MISSING."""
import json
import math
import os
import runpy
import struct
import subprocess
import sys

import pytest

import machinery.analysis as A
from machinery import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float("nan")

# A small ProsQA-like graph. Tom (0) the root, Ann (1) the other seed; dorpus (5) the target.
#   Tom -> alpus, bempus | alpus -> cimpus | bempus -> fumpus | cimpus -> dorpus | Ann -> erpus
#   depth: Tom 0 | alpus bempus 1 | cimpus fumpus 2 | dorpus 3;  heights: alpus 2, bempus 1, cimpus 1, ...
NAMES = ["Tom", "Ann", "alpus", "bempus", "cimpus", "dorpus", "erpus", "fumpus"]
GRAPH = dict(idx_to_symbol=NAMES, edges=[[0, 2], [0, 3], [2, 4], [3, 7], [4, 5], [1, 6]], root=0, target=5,
             neg_target=6, answer="Tom is a dorpus.")


def png_size(path):
    """(width, height) from the IHDR chunk, which a PNG must start with right after its 8-byte signature."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path, n_cols, n_rows=1, width=plots.PANEL[0]):
    assert os.path.isfile(path)
    w, h = png_size(path)
    assert abs(w - width * n_cols * plots.DPI) <= 2 and abs(h - plots.PANEL[1] * n_rows * plots.DPI) <= 2, (w, h)
    import matplotlib.image
    img = matplotlib.image.imread(path)  # (h, w, 3 or 4) floats in 0..1
    assert img.shape[:2] == (h, w)
    colours = {tuple(p) for p in img[::4, ::4].reshape(-1, img.shape[2]).tolist()}
    assert len(colours) > 20 and img.std() > 0.02  # lines, text and bars, not a white page


@pytest.fixture
def mpl():
    pytest.importorskip("matplotlib")


# The hand-made reach record of test_analysis: 3 layers of 4 nodes, the start a1's branches a1>b0>c2 (gold) and
# a1>b3>c0, the other root a2's a2>b1>c3
from tests.test_analysis import REACH  # noqa: E402


# -----------------------------------------------------------------------------
# With matplotlib

def test_plot_eval(mpl, tmp_path):
    rows = [dict(thoughts=2.0, acc=0.9, tokens_per_q=10.5), dict(thoughts=0.0, acc=0.5, tokens_per_q=8.0),
            dict(thoughts=1.0, acc=NAN, tokens_per_q=9.0), dict(thoughts=3.0, acc=0.95, tokens_per_q=NAN)]
    out = str(tmp_path / "sub" / "eval.png")  # a folder that does not exist yet
    assert plots.plot_eval(rows, out, title="tiny") == out
    check_png(out, 2)
    frac = [dict(thoughts=1.5, acc=0.7, tokens_per_q=7.25), dict(thoughts=2.75, acc=0.8, tokens_per_q=9.0)]
    check_png(plots.plot_eval(frac, str(tmp_path / "frac.png")), 2)


def test_plot_search_from_summarize(mpl, tmp_path):
    # raw node probabilities per thought: thought 1 splits over alpus/bempus, 2 leans to cimpus, 3 on dorpus
    raw = {1: [0, 0, .5, .3, .1, 0, 0, .1], 2: [0, 0, .1, 0, .6, 0, .1, .2], 3: [0, 0, 0, 0, .1, .8, .1, 0],
           4: [.2] * 8}  # no node at depth 4: thought_stats gives None, summarize gives nan
    stats = {i: [A.thought_stats(r, GRAPH, i), A.thought_stats(r[::-1], GRAPH, i)] for i, r in raw.items()}
    by_thought, by_height = A.summarize(stats)
    assert math.isnan(by_thought[-1]["frontier"]) and any(math.isnan(r["incorrect"]) for r in by_thought)
    out = str(tmp_path / "search.png")
    assert plots.plot_search(by_thought, by_height, out) == out
    check_png(out, 3)


def test_plot_search_by_hand_with_nans(mpl, tmp_path):
    keys = ("frontier", "other", "top1", "top2", "top3", "correct", "incorrect")
    by_thought = [dict(thought=1, **dict(zip(keys, (.8, .2, .5, .7, .8, .4, .1)))),
                  dict(thought=2, **{k: NAN for k in keys})]
    by_height = [dict(height=0, correct=.6, incorrect=NAN, n_correct=3, n_incorrect=0),
                 dict(height=2, correct=.3, incorrect=.2, n_correct=5, n_incorrect=4)]
    check_png(plots.plot_search(by_thought, by_height, str(tmp_path / "s.png"), title="hand"), 3)
    check_png(plots.plot_search([], [], str(tmp_path / "empty.png")), 3)  # nothing measured: still a figure


def test_plot_paths_from_path_table(mpl, tmp_path):
    labels = {0: ["correct_path"] * 5 + ["hallucination"] * 3 + ["wrong_target"] * 2,
              1: ["correct_path"] * 6 + ["longer_path"] * 2 + ["correct_label", "incorrect_label"],
              2: ["correct_label"] * 8 + ["incorrect_label"] * 2,
              3: []}  # no outputs: nan shares and accuracy
    correct = {k: [c in ("correct_path", "longer_path", "correct_label") for c in v] for k, v in labels.items()}
    rows = A.path_table(labels, correct)
    assert math.isnan(rows[-1]["acc"])
    out = str(tmp_path / "paths.png")
    assert plots.plot_paths(rows, out, title="k sweep") == out
    check_png(out, 1, width=plots.PANEL[0] * 1.6)


def test_plot_superposition(mpl, tmp_path):
    # analysis.average_groups's format; layer 1 has no optimal entry at thought 3 and layer 0 none at all
    inner = A.average_groups([{1: dict(not_reachable=.1, reachable=.5, frontier=1.2, optimal=1.5),
                               2: dict(not_reachable=.0, reachable=.6, frontier=1.0, optimal=1.8),
                               3: dict(not_reachable=-.1, reachable=.4)}] * 2)
    attn = [{1: dict(reachable=(.2, 3), frontier=(.2, 3)), 2: dict(reachable=(.1, 3), frontier=(.3, 3))},
            {1: dict(not_reachable=(.01, 3), reachable=(.3, 3), frontier=(.3, 3), optimal=(.5, 2)),
             3: dict(not_reachable=(NAN, 0), frontier=(.4, 3))}]
    out = str(tmp_path / "sup.png")
    assert plots.plot_superposition(dict(inner=inner, attention=attn), out) == out
    check_png(out, 3)
    # more layers than MAX_COLS: 1 + 4 panels wrap into a second row (GPT-2's 12 layers: 4 rows)
    many = dict(inner=inner, attention=attn * 2)
    check_png(plots.plot_superposition(many, str(tmp_path / "many.png"), title="4 layers"),
              plots.MAX_COLS, n_rows=math.ceil(5 / plots.MAX_COLS))


def test_plot_layer_split_and_methods(mpl, tmp_path):
    s = A.layer_split([0.0, 0.0, 0.0, 0.0, 0.3, 0.05, 0.05, 0.4, 0.0, 0.0, 0.5, 0.0], REACH, 1, 4)
    rows = A.average_splits({1: [s], 2: [A.layer_split([0.0] * 10 + [0.9, 0.1], REACH, 2, 4)], 3: []})  # 3: nan
    out = str(tmp_path / "split.png")
    assert plots.plot_layer_split(rows, out, title="tiny", what="step") == out
    check_png(out, 1, width=plots.PANEL[0] * 1.2)
    run = lambda accs: [dict(epoch=e + 1, stage=e, val_acc=a) for e, a in enumerate(accs)]
    runs = {"Coconut": run([0.5, 0.7, 0.9]), "CoT": run([0.5, 0.6, None]), "No-CoT": run([0.5, 0.5, 0.5])}
    out = str(tmp_path / "demo.png")
    assert plots.plot_methods(runs, out, title="out-demo") == out
    check_png(out, 1, width=plots.PANEL[0] * 1.4)


def test_plot_world(mpl, tmp_path, monkeypatch):
    world = dict(names=REACH["idx_to_symbol"], width=4, edges=REACH["edges"], roles=A.node_roles(REACH, 4),
                 gold_path=A.gold_path(REACH), root=1, target=10, neg_target=11)
    probs = [[0.0] * 4 + [0.45, 0.0, 0.0, 0.45] + [0.0] * 4, [0.0] * 8 + [0.1, 0.0, 0.8, 0.0]]
    out = str(tmp_path / "world.png")
    assert plots.plot_world(world, probs, ["thought 1", "thought 2"], out, title="hand-made") == out
    check_png(out, 3, width=plots.PANEL[0] * 0.8)  # the question, then one panel per thought
    axes = drawn(monkeypatch, plots.plot_world, world, probs, ["thought 1", "thought 2"])
    assert [ax.get_title() for ax in axes] == ["the question: start (circle), options (squares)",
                                               "thought 1: 0.90 on layer b", "thought 2: 0.90 on layer c"]
    discs = axes[2].collections[-1]  # thought 2's discs: area = 900 x the node's probability
    assert list(discs.get_sizes()) == pytest.approx([900 * q for q in probs[1]])
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["a", "b", "c"]


def test_plot_run(mpl, tmp_path):
    metrics = []
    for e in range(1, 10):
        m = dict(epoch=e, stage=(e - 1) // 3, step=10 * e, train_loss=2.0 / e + (e - 1) // 3, val_loss=2.2 / e)
        if e % 3 == 0:
            m["val_acc"] = 0.3 + 0.2 * (e // 3)
        metrics.append(m)
    metrics[4]["val_loss"] = NAN
    out = str(tmp_path / "run.png")
    assert plots.plot_run(metrics[::-1], out) == out  # any order
    check_png(out, 2)
    check_png(plots.plot_run(metrics[:1], str(tmp_path / "one.png")), 2)  # one epoch, no accuracy yet
    check_png(plots.plot_run([], str(tmp_path / "none.png")), 2)  # an empty metrics.jsonl


def drawn(monkeypatch, fn, *data, **kw):
    """The figure fn would save, kept open for its data: its axes (secondary axes are children of theirs)."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figs.append(fig) or path)
    fn(*data, "unused.png", **kw)
    return [ax for ax in figs[0].axes if ax.get_label() != "secondary"]


def test_plot_run_data(mpl, monkeypatch):
    # a flat 15% over 34 epochs (a model that answers "### 0" to everything): drawn flat on 0-100%
    metrics = [dict(epoch=e, stage=min((e - 1) // 5, 6), step=e, train_loss=3.0 / e, val_loss=3.5 / e, val_acc=0.15)
               for e in range(1, 35)]
    del metrics[3]["val_acc"]  # an epoch without an accuracy: left out of the accuracy line, not drawn as 0
    loss, acc = drawn(monkeypatch, plots.plot_run, metrics[::-1])
    assert loss.get_title() == "training and validation loss"
    assert acc.get_title() == "validation questions answered correctly (%)"
    assert acc.get_ylim() == (0.0, 100.0) and acc.get_ylabel() == "accuracy (%)"
    curves = lambda ax: [l for l in ax.get_lines() if not l.get_label().startswith("_")]  # not the stage lines
    (line,) = curves(acc)
    assert list(line.get_xdata()) == [e for e in range(1, 35) if e != 4] and set(line.get_ydata()) == {15.0}
    train_line, val_line = curves(loss)
    assert list(train_line.get_xdata()) == list(range(1, 35))
    assert list(val_line.get_ydata()) == pytest.approx([3.5 / e for e in range(1, 35)])
    assert len(acc.texts) == 0  # nothing written over the curves: the stages are named on an axis above
    assert stage_labels(acc) == [str(k) for k in range(7)]  # each stage once, M unknown
    # with the run's M: every stage past it trains the same thoughts, one span called "all" (issue 23, item 11)
    _, acc = drawn(monkeypatch, plots.plot_run, metrics, max_latent_stage=4)
    assert stage_labels(acc) == ["0", "1", "2", "3", "4", "all"] and "past 4" in top_axis(acc).get_xlabel()
    assert plots.stage_spans(metrics, 4)[-1] == (25.5, 34.5, "all")  # epochs 26-34: stages 5 and 6
    assert len([l for l in acc.get_lines() if l.get_label().startswith("_")]) == 5  # a dashed line per change
    # and the accuracy against thoughts: 0-100% too, the tokens from 0 (7.0 against 7.7 is no cliff), titles whole
    rows = [dict(thoughts=k, acc=0.5 + 0.001 * k, tokens_per_q=7 + 0.1 * k) for k in range(4)]
    a1, a2 = drawn(monkeypatch, plots.plot_eval, rows)
    assert a1.get_ylim() == (0.0, 100.0) and a1.get_title() == "questions answered correctly (%)"
    assert list(a1.get_lines()[0].get_ydata()) == pytest.approx([50.0, 50.1, 50.2, 50.3])
    assert "tokens per question" in a2.get_title() and a2.get_ylim()[0] == 0
    fig = a1.figure
    fig.canvas.draw()
    width = fig.bbox.width
    for ax in (a1, a2):
        box = ax.title.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= width, ax.get_title()  # inside the figure: not cut off


def top_axis(ax):
    (top,) = [c for c in ax.child_axes]  # the secondary x axis that names the stages
    return top


def stage_labels(ax):
    return [t.get_text() for t in top_axis(ax).get_xticklabels()]


def test_cli_plots_metrics_jsonl(mpl, tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [dict(epoch=1, stage=0, train_loss=1.0, val_loss=1.1, val_acc=0.5),
            dict(epoch=2, stage=1, train_loss=0.8, val_loss=0.9, val_acc=0.7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line is skipped
    assert plots.read_metrics(str(path)) == rows
    monkeypatch.setattr(sys, "argv", ["machinery/plots.py", str(path)])
    runpy.run_path(os.path.join(ROOT, "machinery", "plots.py"), run_name="__main__")  # in-process: no second matplotlib import
    assert capsys.readouterr().out.strip() == str(tmp_path / "metrics.png")
    check_png(str(tmp_path / "metrics.png"), 2)


# -----------------------------------------------------------------------------
# Without matplotlib

CALLS = [
    lambda p: plots.plot_eval([dict(thoughts=1.0, acc=0.5, tokens_per_q=3.0)], p),
    lambda p: plots.plot_search([dict(thought=1, frontier=.5, other=.5, top1=.3, top2=.4, top3=.5, correct=.2,
                                      incorrect=.1)], [dict(height=0, correct=.2, incorrect=.1, n_correct=1,
                                                            n_incorrect=1)], p),
    lambda p: plots.plot_paths(A.path_table({0: ["correct_path"]}, {0: [True]}), p),
    lambda p: plots.plot_superposition(dict(inner={1: dict(frontier=(1.0, 1))}, attention=[]), p),
    lambda p: plots.plot_run([dict(epoch=1, stage=0, train_loss=1.0, val_loss=1.0)], p),
    lambda p: plots.plot_methods({"CoT": [dict(epoch=1, stage=0, val_acc=0.5)]}, p),
    lambda p: plots.plot_layer_split(A.average_splits({1: [A.layer_split([0.1] * 12, REACH, 1, 4)]}), p),
    lambda p: plots.plot_world(dict(names=REACH["idx_to_symbol"], width=4, edges=REACH["edges"],
                                    roles=A.node_roles(REACH, 4), gold_path=[1, 4, 10], root=1, target=10,
                                    neg_target=11), [[0.1] * 12], ["thought 1"], p),
]


def test_without_matplotlib_every_function_returns_missing(monkeypatch, tmp_path):
    # None in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed
    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)
    for i, call in enumerate(CALLS):
        assert call(str(tmp_path / f"{i}.png")) == plots.MISSING
    assert os.listdir(tmp_path) == [] and plots.missing()


def test_plots_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; from machinery import plots; print('torch' in sys.modules); "
            "print(plots.plot_run([dict(epoch=1, stage=0, train_loss=1.0, val_loss=1.0)], 'never.png'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    # plots itself needs neither torch nor analysis at import: a laptop can plot a metrics.jsonl
    assert r.stdout.split("\n")[:2] == ["False", plots.MISSING]
    assert not os.path.exists(os.path.join(ROOT, "never.png"))
