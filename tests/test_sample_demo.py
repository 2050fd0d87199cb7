"""sample.py on the scaled-down demo's outputs (out-demo/coconut, cot, nocot): every sample.py command the README
and docs/ give for the demo, and what a new user meets next (issue 23): the help, the messages, the default
checkpoint and its warning, the within-layer split and the picture of one question's search (issue 22)."""
import contextlib
import io
import json
import os
import re
import shlex

import pytest
import torch

from machinery import analysis
import data.reach.prepare as reach_prepare
from machinery import options
from machinery import plots
import sample
import train
from machinery.checkpoint import load_checkpoint
from curriculum import MODES
from tests.test_demo import SMALL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A folder laid out as after `python train.py --demo`: out-demo/{coconut,cot,nocot}, its data beside."""
    d = tmp_path_factory.mktemp("demo")
    assert reach_prepare.main(["--out_dir", str(d / "data" / "reach"), "--n_train", "64", "--n_valid", "12",
                               "--n_test", "20"]) == 0
    assert train.main(SMALL + ["--data_dir", str(d / "data"), "--out_dir", str(d / "out-demo")]) == 0
    return d


def run(demo, monkeypatch, capsys, *argv):
    """sample.py's main in the folder that holds out-demo (as a user runs it): (exit code, stdout, stderr)."""
    monkeypatch.chdir(demo)
    code = sample.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def documented_commands():
    """Every `python sample.py ...` of README.md, docs/*.md and sample.py's help that reads the demo's outputs
    (out-demo). Not docs/old-demo.md: its transcripts read the first demo's out-demo, which today's --demo no
    longer writes."""
    found = []
    docs = [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs"))) if f.endswith(".md")]
    for name in ["README.md", "sample.py"] + [d for d in docs if d != os.path.join("docs", "old-demo.md")]:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read() if name != "sample.py" else sample.__doc__
        for m in re.finditer(r"python sample\.py[^`\n]*", text):
            cmd = re.split(r"\s+#\s", m.group(0))[0].strip()  # a code block's comment
            if "out-demo" in cmd and cmd not in [c for _, c in found]:
                found.append((name, cmd))
    return found


def test_every_documented_demo_command_runs(demo, monkeypatch, capsys):
    cmds = documented_commands()
    assert any("--search" in c for _, c in cmds) and any("--analyze" in c for _, c in cmds), cmds
    for name, cmd in cmds:
        code, out, err = run(demo, monkeypatch, capsys, *shlex.split(cmd)[2:])
        assert code == 0, (name, cmd, err)
        for png in re.findall(r"--plot (\S+)", cmd):  # the picture it promises, written
            assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n", (name, cmd)


# -----------------------------------------------------------------------------
# Issue 23, item by item

def test_demo_help_describes_todays_demo():  # 1
    help_text = " ".join(options.build_parser(train.__doc__).format_help().split())
    demo = help_text[help_text.index("--demo "):]
    assert "data/tiny" not in demo and "then No-CoT" not in demo
    assert all(w in demo for w in ("reach", "Coconut, CoT and No-CoT", "<out_dir>/data", "summary.json"))


def test_docs_name_every_mode():  # 2
    read = lambda p: open(os.path.join(ROOT, p), encoding="utf-8").read()
    readme_modes = re.search(r"the other rows: (--mode [^\n]*)", read("README.md")).group(1)
    code_md = read(os.path.join("docs", "code.md"))
    for mode in MODES:  # coconut is the default: README's first command
        assert mode == "coconut" or mode in readme_modes or f"--mode {mode}" in read("README.md"), mode
        assert f"`{mode}`" in code_md, mode
    assert "not implemented" not in read(os.path.join("docs", "reproduce.md"))


@pytest.mark.parametrize("method", ["cot", "nocot"])
def test_paths_without_latent_on_cot_and_nocot(demo, monkeypatch, capsys, method):  # 3
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", f"out-demo/{method}", "--paths", "--split", "test")
    assert code == 0, err
    assert [l.split()[0] for l in out.splitlines() if re.match(r"\s+\d+\s+[\d.]+%", l)] == ["0"]  # one row, k = 0


def test_ckpt_given_a_folder(demo, monkeypatch, capsys):  # 4, 12
    code, _, err = run(demo, monkeypatch, capsys, "--ckpt", "out-demo/coconut")
    assert code == 1 and "--ckpt wants a checkpoint file" in err and "--ckpt out-demo/coconut/best.pt" in err
    code, _, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut/best.pt")
    assert code == 1 and "--out_dir wants a run's folder" in err and "--ckpt out-demo/coconut/best.pt" in err
    for flag in ("--ckpt", "--out_dir"):
        code, _, err = run(demo, monkeypatch, capsys, flag, "out-demo")
        assert code == 1 and len(err.strip().splitlines()) == 1
        assert all(f"--out_dir out-demo/{m}" in err for m in ("coconut", "cot", "nocot")), err


def test_the_default_checkpoint_and_too_many_thoughts(demo, monkeypatch, capsys):  # 5
    stage = load_checkpoint(str(demo / "out-demo" / "coconut" / "best.pt"))[2]["stage"]
    trained = min(stage, 1)  # the scaled-down demo: max_latent_stage 1, c_thought 1
    code, out, _ = run(demo, monkeypatch, capsys, "--latent", "6")
    assert code == 0
    assert "the CPU demo's Coconut, since there is no out-prosqa-coconut/best.pt" in out
    assert f"warning: --latent 6: this model was trained with at most {trained} continuous thoughts" in out
    code, out, _ = run(demo, monkeypatch, capsys, "--latent", str(trained))
    assert code == 0 and "warning" not in out


def test_a_question_in_the_wrong_language(demo, monkeypatch, capsys):  # 7
    code, _, err = run(demo, monkeypatch, capsys, "--question", "Every wumpus is a yumpus. Is Alex a yumpus?")
    first = json.load(open(demo / "data" / "reach" / "valid.json"))[0]["question"]
    assert code == 1 and "symbol 'Every' is not in the vocabulary" in err and repr(first) in err
    # the help says which examples need which model: the wumpus question is the paper's ProsQA runs'
    help_text = help_of_sample()
    demo_part, paper_part = help_text.split("The paper's runs")
    assert "The CPU demo's models" in demo_part and "wumpus" in paper_part and "wumpus" not in demo_part


def help_of_sample():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    return buf.getvalue()


def test_another_data_set_is_looked_for_in_data(demo, monkeypatch, capsys):  # 8
    code, _, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--dataset", "prosqa")
    # from the folder that holds out-demo: data/prosqa of the current folder, and the command that makes it there
    assert code == 1 and "data/prosqa/valid.json not found" in err
    assert "python data/prosqa/prepare.py --out_dir data/prosqa`" in err
    code, _, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--data_dir", "elsewhere",
                       "--dataset", "prosqa")
    assert "make it with `python data/prosqa/prepare.py --out_dir elsewhere/prosqa`" in err


def test_analyze_says_what_it_prints(demo, monkeypatch, capsys):  # 9
    code, out, _ = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--analyze", "--latent", "1")
    assert code == 0 and "step " not in out
    assert re.search(r"^\s+records\s+12$", out, re.M)  # the 12 validation records, under each table
    assert out.count("thought 1") >= 3  # the inner products and each layer's attention: thought i, as the first
    code, _, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--analyze", "--probe", "language")
    assert code == 1 and "--probe language" in err and "one symbol each" in err
    help_text = " ".join(help_of_sample().split())
    assert "symbolic prosqa_graph: inner" not in help_text and "prosqa_graph, the demo's reach" in help_text


def test_plot_without_matplotlib(demo, monkeypatch, capsys):  # 10
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    for argv in (["--out_dir", "out-demo/coconut"], ["--out_dir", "out-demo/coconut", "--split", "test", "--eval"]):
        code, out, err = run(demo, monkeypatch, capsys, *argv, "--plot", "x.png")
        assert code == 1 and "pip install matplotlib" in err and out == "" and not os.path.exists("x.png")


def test_eval_columns_line_up(demo, monkeypatch, capsys):  # 13
    code, out, _ = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--split", "test", "--eval",
                       "--latent", "1")
    code2, out2, _ = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--split", "test", "--eval")
    assert code == code2 == 0
    header = next(l for l in out.splitlines() if "accuracy" in l)
    rows = [l for l in (out + out2).splitlines() if "%" in l]
    assert len(rows) == 2 and "(default)" in rows[1]
    # every row's label ends under "thoughts" and its accuracy under "accuracy"
    assert {r.index(" ", r.index(r.split()[0])) if "(default)" not in r else r.index(")") + 1 for r in rows} \
        == {header.index("thoughts") + len("thoughts")}, [header] + rows
    assert {r.index("%") for r in rows} == {header.index("accuracy") + len("accuracy") - 1}, [header] + rows


# -----------------------------------------------------------------------------
# Issue 22: the within-layer split and the picture of one question's search

def split_rows(out):
    return {int(l.split()[0]): [float(x) for x in l.split()[2:]] for l in out.splitlines()
            if re.match(r"\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", l)}


def test_the_layer_split_of_coconut_and_cot(demo, monkeypatch, capsys):
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--split", "test", "--analyze",
                         "--latent", "1")
    assert code == 0, err
    assert "renormalised over the layer" in out and "mass on that layer's nodes" in out
    # the demo's Coconut was trained on the frontier, and the header says so, not the gold node
    assert "trained on the frontier" in out and "trained to name" not in out
    coconut = split_rows(out)
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/cot", "--split", "test", "--analyze")
    assert code == 0, err
    cot = split_rows(out)
    assert sorted(coconut) == [1] and sorted(cot) == [1, 2, 3, 4]  # 1 thought; CoT writes all 4 steps
    for row in list(coconut.values()) + list(cot.values()):
        assert 0 < row[0] <= 1 and sum(row[1:]) == pytest.approx(1.0, abs=3e-3)  # the layer's mass; shares sum to 1
    # the printed numbers are analysis.layer_split's, averaged: recompute CoT's step 1 by hand, one record at a time
    model, tok, _ = load_checkpoint(str(demo / "out-demo" / "cot" / "best.pt"))
    records = json.load(open(demo / "data" / "reach" / "test.json"))
    want = []
    for r in records:
        ids = torch.tensor([tok.encode(r["question"])])
        with torch.no_grad():
            logits = model.gpt(ids)[0][0, -1]  # the question's last token predicts step 1
        p = torch.softmax(logits.float(), -1)[analysis.node_token_ids(r, tok)]
        want.append(analysis.layer_split(p.tolist(), r, 1, 8))
    mean = lambda k: sum(s[k] for s in want) / len(want)
    assert cot[1] == pytest.approx([mean(k) for k in ("layer", "gold", "start", "other_root", "unused")], abs=6e-4)


def test_the_picture_of_one_question(demo, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/cot", "--split", "test", "--search", "3",
                         "--plot", "cot.png")
    assert code == 0, err
    rec = json.load(open(demo / "data" / "reach" / "test.json"))[3]
    assert f"question 3 of test: {rec['question']}" in out and "wrote cot.png" in out
    assert len(re.findall(r"^  step \d \(teacher-forced\): ", out, re.M)) == len(rec["steps"]) == 4
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--split", "test", "--search", "99")
    assert code == 1 and "questions are 0..19" in err
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/nocot", "--split", "test", "--search", "0")
    assert code == 1 and "nocot" in err
    with pytest.raises(SystemExit):  # question 0 is an analysis too: it needs records with answers
        sample.parse_args(["--search", "0", "--question", "a1>b0 [Q] b0 b1 [R] a1"])
    assert "--search needs records with answers" in capsys.readouterr().err


def test_the_three_methods_in_one_figure(demo, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    got = []
    monkeypatch.setattr(plots, "plot_methods", lambda runs, path, title="": got.append(runs) or path)
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo", "--plot", "demo.png")
    assert code == 0, err
    (runs,) = got
    assert list(runs) == ["Coconut", "CoT", "No-CoT"]
    for name, d in zip(runs, ("coconut", "cot", "nocot")):
        assert runs[name] == [json.loads(l) for l in open(demo / "out-demo" / d / "metrics.jsonl")]


def test_losses_say_how_a_set_label_is_scored(demo, monkeypatch, capsys):
    # the demo's Coconut: its thoughts' accuracy is "the argmax is in the set", and an even spread's floor is named
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/coconut", "--split", "test", "--losses")
    assert code == 0, err
    assert "stage 0" in out and "argmax is in the set" not in out  # this best.pt is stage 0's: no thought to label
    code, out, err = run(demo, monkeypatch, capsys, "--ckpt", "out-demo/coconut/ckpt.pt", "--split", "test",
                         "--losses")
    assert code == 0, err
    assert "accurate when its argmax is in the set" in out and "at least ln n nats" in out, out
    rows = {l.split()[0] + (" " + l.split()[1] if l.split()[0] == "thought" else ""): l.split()
            for l in out.splitlines() if re.match(r"\s*(thought \d|answer)\s", l)}
    assert "thought 1" in rows and "answer" in rows, out
    code, out, err = run(demo, monkeypatch, capsys, "--out_dir", "out-demo/cot", "--split", "test", "--losses")
    assert code == 0, err
    assert "argmax is in the set" not in out  # CoT has no set labels
