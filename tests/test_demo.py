"""The CPU demo (train.py --demo): its data (data/reach), a scaled-down demo end to end with the interface of
out-demo/summary.json, and an interrupted demo that --demo --resume finishes to the same table and weights."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import data.reach.prepare as reach_prepare
from machinery import demo
from conftest import CPU_ONLY
from machinery.interrupt import SIGNAL_HOOK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds, not minutes: a 1-layer, 32-wide model, 2 epochs of 8 steps for each of the three methods.
SMALL = ["--demo", "--epochs", "2", "--stage_epochs", "1", "--max_latent_stage", "1", "--n_layer", "1", "--n_embd", "32",
         "--batch_size", "8", "--threads", "1", "--log_every", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    assert reach_prepare.main(["--out_dir", str(d / "reach"), "--n_train", "64", "--n_valid", "12",
                                "--n_test", "20"]) == 0
    return d


def run_cli(args, env=None, timeout=300):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **CPU_ONLY, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def reach(children, start):
    seen, todo = {start}, [start]
    while todo:
        for c in children[todo.pop()]:
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def check_reach(records, depth, width, children_per_node=4):
    for r in records:
        names, n = r["idx_to_symbol"], len(r["idx_to_symbol"])
        assert n == (depth + 1) * width
        children = [[] for _ in range(n)]
        for a, b in r["edges"]:
            assert b // width == a // width + 1  # roads only go one layer down
            children[a].append(b)
        t, neg, root = r["target"], r["neg_target"], r["root"]
        assert root < width and t // width == depth and neg // width == depth
        assert t in reach(children, root) and neg not in reach(children, root)  # the answer is the reachable one
        assert any(neg in reach(children, s) for s in range(width) if s != root)  # the other has open roads too
        path = [root] + [names.index(x) for s in r["steps"] for x in s.split()]
        assert path[-1] == t and all(b in children[a] for a, b in zip(path, path[1:]))  # the steps walk open roads
        edges, rest = r["question"].split(" [Q] ")
        assert sorted(e.split(">") for e in edges.split()) == sorted([names[a], names[b]] for a, b in r["edges"])
        assert sorted(rest.split()) == sorted([names[t], names[neg], "[R]", names[root]]) and r["answer"] == names[t]
    # the world is one: every question's roads are among the same possible ones
    assert len({tuple(e) for r in records for e in r["edges"]}) <= depth * width * children_per_node
    return children


def test_reach_questions(data_dir):
    # the demo's questions: two first-layer nodes with three chains each that never meet, every chain reaching
    # the last layer; the start is either of the two, and one of its chains ends in the target
    records = json.load(open(data_dir / "reach" / "train.json"))
    check_reach(records, depth=4, width=8)
    starts = []
    for r in records:
        children = [[] for _ in r["idx_to_symbol"]]
        for a, b in r["edges"]:
            children[a].append(b)
        roots = [v for v in range(8) if children[v]]
        assert len(roots) == 2 and r["root"] in roots and len(r["edges"]) == 2 * 3 * 4
        chains = [reach(children, c) for v in roots for c in children[v]]
        assert len(chains) == 6 and all(len(c) == 4 for c in chains)  # one node a layer: chains
        assert all(not (x & y) for i, x in enumerate(chains) for y in chains[i + 1:])  # they never meet
        assert sum(r["target"] in c for c in chains) == 1
        assert len(children[r["root"]]) == 3
        starts.append(roots.index(r["root"]))
    # the start is sometimes the lower-numbered root, sometimes the other (which root grew first is not in the
    # records: the chain shapes above, the same for both, are what keeps the trees alike)
    assert 0 < sum(starts) < len(starts)


def test_reach_random_roads_and_steps_of_two_hops(tmp_path):
    assert reach_prepare.main(["--out_dir", str(tmp_path), "--branches", "0", "--depth", "4", "--width", "6",
                                "--hops_per_step", "2", "--n_train", "40", "--n_valid", "5", "--n_test", "5"]) == 0
    records = json.load(open(tmp_path / "train.json"))
    check_reach(records, depth=4, width=6)
    assert all(len(r["steps"]) == 2 and all(len(s.split()) == 2 for s in r["steps"]) for r in records)


def test_reach_chain_written_backward(tmp_path, capsys):
    # the control for CoT: the steps climb from the first option up its one parent at a time to a first-layer
    # node; the answer is that option when the climb ends at the start, the other one when it does not
    assert reach_prepare.main(["--out_dir", str(tmp_path / "b"), "--chain", "backward", "--n_train", "60",
                                "--n_valid", "5", "--n_test", "5"]) == 0
    forward = json.load(open(tmp_path / "b" / "train.json"))
    ends = set()
    for r in forward:
        names = r["idx_to_symbol"]
        first = r["question"].split(" [Q] ")[1].split()[0]
        up = [first] + [s for s in r["steps"]]
        assert len(up) == 5 and all(f"{a}>{b}" in r["question"].split() for b, a in zip(up, up[1:]))
        assert names.index(up[-1]) < 8  # a first-layer node: the climb is whole
        ends.add(up[-1] == names[r["root"]])
        assert (r["answer"] == first) == (up[-1] == names[r["root"]])
    assert ends == {True, False}  # both cases occur
    # the same questions as the forward data of the same seed: only the steps differ
    assert reach_prepare.main(["--out_dir", str(tmp_path / "f"), "--n_train", "60", "--n_valid", "5",
                                "--n_test", "5"]) == 0
    plain = json.load(open(tmp_path / "f" / "train.json"))
    assert [dict(r, steps=None) for r in plain] == [dict(r, steps=None) for r in forward]
    with pytest.raises(SystemExit) as e:
        reach_prepare.main(["--out_dir", str(tmp_path / "x"), "--chain", "backward", "--branches", "0"])
    assert e.value.code == 2 and "--chain backward" in capsys.readouterr().err


def test_reach_bad_options(data_dir, capsys):
    prep = reach_prepare
    with pytest.raises(SystemExit) as e:
        prep.main(["--out_dir", str(data_dir / "x"), "--open", "1.5"])
    assert e.value.code == 2 and "--open" in capsys.readouterr().err


def summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def test_the_demo_scaled_down_and_resumed(data_dir, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = SMALL + ["--data_dir", str(data_dir), "--save_every", "4", "--seed", "1"]
    r = run_cli(common + ["--out_dir", a])
    assert r.returncode == 0, r.stderr[-3000:]
    s = summary(a)
    # the interface an independent check reads
    assert set(s) == {"coconut", "cot", "nocot"}
    for m in s.values():
        for x in (m, m["last"]):  # best.pt (the paper's choice), then ckpt.pt
            assert 0.0 <= x["accuracy"] <= 1.0 and x["n"] == 20 and x["tokens_per_question"] > 0
            assert x["accuracy"] == x["correct"] / x["n"] and 1 <= x["epoch"] <= 2
        assert m["last"]["epoch"] == 2
    for mode in s:  # best.pt: the first epoch of the highest validation accuracy
        rows = [json.loads(line) for line in open(os.path.join(a, mode, "metrics.jsonl"))]
        accs = [row["val_acc"] for row in rows]
        assert s[mode]["epoch"] == rows[accs.index(max(accs))]["epoch"]
    assert s["coconut"]["tokens_per_question"] >= 1  # its one continuous thought counts
    assert "held-out test questions" in r.stdout and "No-CoT" in r.stdout and "CoT" in r.stdout

    # killed in the middle of the Coconut run (saved at step 4), then --demo --resume finishes everything
    r = run_cli(common + ["--out_dir", b], env={SIGNAL_HOOK: "6:KILL"})
    assert r.returncode == -9, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(b, "cot")) and not os.path.exists(os.path.join(b, "summary.json"))
    # the demo's own flags come back from b/demo.json: the bare command finishes it with --seed 1 and its sizes
    r = run_cli(["--demo", "--out_dir", b, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert summary(a) == summary(b)
    for mode in ("coconut", "cot", "nocot"):
        wa = torch.load(os.path.join(a, mode, "ckpt.pt"), weights_only=True)["model"]
        wb = torch.load(os.path.join(b, mode, "ckpt.pt"), weights_only=True)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), mode
    tail = lambda out: out[out.index("validation accuracy by epoch"):].split("\n", 1)[1]  # the tables, not the time
    assert tail(r.stdout) == tail(run_cli(common + ["--out_dir", b, "--resume"]).stdout)  # finished: nothing to redo
    # a finished demo is not started over by accident, a folder without one is not resumed, a flag is kept
    for argv, said in (([], f"{b} already holds a finished demo ({b}/demo.json): print its tables again with"), (["--overwrite", "--seed", "2", "--resume"], "differs from the demo's 1"),
                       (["--resume", "--out_dir", str(tmp_path / "none")], "holds no demo to finish")):
        r = run_cli(["--demo", "--out_dir", b] + argv)
        assert r.returncode == 1 and said in r.stderr, r.stderr[-3000:]
    # another world is another folder; a flag the demo left at its default is kept too (in-process: resumed_args)
    import train
    for argv, said in ((["--seed", "3"], "--seed 3 differs from the demo's 1"),
                       (["--seed", "3"], "--demo --seed 3 --out_dir out-demo-3"),
                       (["--lr", "0.01"], "--lr 0.01 differs from the demo's 0.001")):
        with pytest.raises(ValueError, match=re.escape(said)):
            demo.resumed_args(train.parse_args(["--demo", "--out_dir", b, "--resume"] + argv))


def test_a_stopped_demo_says_how_to_continue(data_dir, tmp_path):
    # Ctrl-C in the Coconut run: the message gives the whole command, and that command finishes the demo
    out = str(tmp_path / "c")
    r = run_cli(SMALL + ["--data_dir", str(data_dir), "--out_dir", out], env={SIGNAL_HOOK: "3:INT"})
    assert r.returncode == 130, r.stderr[-3000:]
    said = re.search(r"continue with `(python train.py [^`]*)`", r.stdout + r.stderr)
    assert said and "--demo" in said.group(1) and said.group(1).endswith("--resume"), r.stdout + r.stderr
    # started again without --resume: the unfinished demo is named, with the command that finishes it
    import train
    with pytest.raises(ValueError, match=re.escape(f"{out} already holds a demo")) as again:
        demo.save_flags(train.parse_args(SMALL + ["--data_dir", str(data_dir), "--out_dir", out]))
    assert "finish it with" in str(again.value) and "finished" not in str(again.value)
    r = run_cli(shlex.split(said.group(1))[2:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(summary(out)) == {"coconut", "cot", "nocot"}


def test_the_demo_makes_its_own_data(tmp_path, monkeypatch):
    # without --data_dir the demo makes its data afresh in out_dir (a data/reach of an older prepare.py would
    # change the table), keeps it when it resumes, and with --data_dir uses what is there
    import train
    made = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, check: made.append(cmd[cmd.index("--out_dir") + 1]))
    out = str(tmp_path / "out")
    own = os.path.join(out, "data", "reach")
    for argv, expected in ((["--demo", "--out_dir", out], [own]),
                           (["--demo", "--out_dir", out, "--resume"], [own])):  # nothing there yet: made
        made.clear()
        args = train.parse_args(argv)
        demo.make_data(args)
        assert made == expected and args.data_dir == os.path.join(out, "data")
    os.makedirs(own)
    open(os.path.join(own, "test.json"), "w").close()
    for argv, expected in ((["--demo", "--out_dir", out], [own]),               # afresh, even though it is there
                           (["--demo", "--out_dir", out, "--resume"], []),        # the same data as the run's
                           (["--demo", "--out_dir", out, "--data_dir", str(tmp_path / "out" / "data")], [])):
        made.clear()
        demo.make_data(train.parse_args(argv))
        assert made == expected, argv
    # --seed k makes world k: prepare.py is handed the same seed as the models
    seeds = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, check: seeds.append(cmd[cmd.index("--seed") + 1]))
    demo.make_data(train.parse_args(["--demo", "--out_dir", out, "--seed", "2"]))
    assert seeds == ["2"]


def test_the_demos_coconut_labels_its_thoughts_with_the_frontier(data_dir):
    # the demo's preset labels thought k with the frontier, the nodes k roads from the start (one on each of
    # its three branches, the gold one among them), scored against an even spread; no label names the path.
    # --thought_labels 1 (the gold-labelled control) names the gold step's node; 0 (the paper) nothing
    import train
    from machinery.records import load_split, rings_from_root, tokenize
    from machinery.tokenizer import symbol_tokenizer
    args = train.parse_args(["--demo", "--data_dir", str(data_dir)])
    assert (args.mode, args.thought_labels, args.set_loss, args.markers) == ("coconut", "frontier", "spread", 0)
    records = load_split(str(data_dir), "reach", "train")
    tok = symbol_tokenizer(records)
    tokenized = [tokenize(r, tok) for r in records]
    examples, _, stage, _ = train.epoch_examples(records, tokenized, tok, 3, args, 128)
    assert stage == 3
    for e, t, r in zip(examples, tokenized, records):
        col = e["input_ids"].index(tok.latent_id)
        assert e["input_ids"][col:col + 3] == [tok.latent_id] * 3
        assert e["labels"][col:col + 3] == [-100] * 3  # no single node is a thought's label
        sets = [e["label_sets"][col + k] for k in range(3)]
        for k, ids in enumerate(sets):
            assert len(ids) == 3 and t.steps[k][0] in ids  # the start's three branches, gold among them
            ring = rings_from_root(r)[k + 1]  # the record's own nodes k + 1 roads from the start
            assert ids == sorted(tok.encode(r["idx_to_symbol"][v])[0] for v in ring)
    args = train.parse_args(["--demo", "--data_dir", str(data_dir), "--thought_labels", "1"])  # the typed flag wins
    assert (args.mode, args.thought_labels) == ("coconut", 1)
    examples, _, _, _ = train.epoch_examples(records, tokenized, tok, 3, args, 128)
    e, t = examples[0], tokenized[0]
    col = e["input_ids"].index(tok.latent_id)
    assert "label_sets" not in e and e["labels"][col:col + 3] == [s[0] for s in t.steps[:3]]
    args.thought_labels = 0
    examples, _, _, _ = train.epoch_examples(records, tokenized, tok, 3, args, 128)
    col = examples[0]["input_ids"].index(tok.latent_id)
    assert "label_sets" not in examples[0] and examples[0]["labels"][col:col + 3] == [-100] * 3
