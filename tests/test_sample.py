"""sample.py: batched answers equal one-at-a-time answers, the search analysis on a hand-built graph,
--show_thoughts against softmax(lm_head(thought)), --eval against train.py's validation, bad input."""
import ast
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from machinery import analysis
import data.tiny.prepare as tiny_prepare
import sample
import train
from conftest import CPU_ONLY
from machinery.checkpoint import load_checkpoint
from coconut import Coconut
from curriculum import is_correct, prompt
from machinery.evaluate import evaluate, generate_batched
from gpt import GPT, GPTConfig
from machinery.records import tokenize
from machinery.tokenizer import compact_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-built ProsQA graph: Alex -> {a, b, c}; a -> d -> f (the target); b -> e (the other option).
#   depth (from Alex):  a b c: 1   d e: 2   f: 3
#   height (to a leaf): c e f: 0   b d: 1   a: 2   (Alex: 1, through c)
#   reach the target:   Alex a d f
GRAPH = dict(question="Every apus is a dpus. Alex is a apus. Alex is a bpus. Alex is a cpus. Every bpus is a epus. "
                      "Every dpus is a fpus. Is Alex a fpus or epus?",
             steps=["Alex is a apus.", "Every apus is a dpus.", "Every dpus is a fpus."],
             answer="Alex is a fpus.",
             idx_to_symbol=["Alex", "apus", "bpus", "cpus", "dpus", "epus", "fpus"],
             edges=[[0, 1], [0, 2], [0, 3], [1, 4], [2, 5], [4, 6]], root=0, target=6, neg_target=5)


def test_graph_functions():
    assert analysis.depths(GRAPH) == [0, 1, 1, 1, 2, 2, 3]
    assert analysis.heights(GRAPH) == [1, 2, 1, 0, 1, 0, 0]
    assert analysis.leads_to_target(GRAPH) == {0, 1, 4, 6}
    assert [analysis.frontier(GRAPH, i) for i in range(5)] == [{0}, {1, 2, 3}, {4, 5}, {6}, set()]


def test_analysis_by_hand():
    # raw node probabilities of three thoughts (what a thought gives each node; the rest is elsewhere)
    raw = {1: [0.0, 0.3, 0.2, 0.1, 0.05, 0.05, 0.0],  # 0.7 on nodes: a 3/7, b 2/7, c 1/7, d e 1/14
           2: [0.0, 0.1, 0.0, 0.0, 0.6, 0.2, 0.1],    # 1.0 on nodes
           3: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],    # nothing on nodes: all values 0
           4: [0.1] * 7}                              # no node at depth 4: skipped
    stats = {i: [analysis.thought_stats(r, GRAPH, i)] for i, r in raw.items()}
    assert stats[4] == [None]
    s1 = stats[1][0]
    assert s1["node_mass"] == pytest.approx(0.7)
    assert s1["frontier"] == pytest.approx(6 / 7)
    assert s1["top"] == pytest.approx([3 / 7, 5 / 7, 6 / 7])
    assert sorted((h, good, round(v, 9)) for h, good, v in s1["nodes"]) == [
        (0, False, round(1 / 7, 9)), (1, False, round(2 / 7, 9)), (2, True, round(3 / 7, 9))]

    by_thought, by_height = analysis.summarize(stats)
    assert [r["thought"] for r in by_thought] == [1, 2, 3, 4]
    t1, t2, t3, t4 = by_thought
    assert t1["records"] == 1 and t4["records"] == 0 and math.isnan(t4["frontier"])
    assert (t1["frontier"], t1["other"], t1["correct"], t1["incorrect"]) == pytest.approx((6 / 7, 1 / 7, 3 / 7, 3 / 14))
    assert (t2["frontier"], t2["top1"], t2["top2"], t2["top3"]) == pytest.approx((0.8, 0.6, 0.8, 0.8))
    assert (t2["correct"], t2["incorrect"]) == pytest.approx((0.6, 0.2))
    assert (t3["node_mass"], t3["frontier"], t3["correct"]) == (0.0, 0.0, 0.0) and math.isnan(t3["incorrect"])
    # by height, frontier nodes of thoughts 1-3 pooled: correct a(h2) 3/7, d(h1) 0.6, f(h0) 0;
    # incorrect b(h1) 2/7, c(h0) 1/7, e(h0) 0.2
    rows = {r["height"]: r for r in by_height}
    assert sorted(rows) == [0, 1, 2]
    assert (rows[0]["correct"], rows[0]["n_correct"]) == (0.0, 1)
    assert (rows[0]["incorrect"], rows[0]["n_incorrect"]) == (pytest.approx((1 / 7 + 0.2) / 2), 2)
    assert (rows[1]["correct"], rows[1]["incorrect"]) == pytest.approx((0.6, 2 / 7))
    assert rows[2]["correct"] == pytest.approx(3 / 7) and rows[2]["n_incorrect"] == 0


def test_thought_probe_on_a_stub_model():
    # lm_head = identity, so a thought log(p) decodes to exactly p: the thoughts are known.
    tok = compact_tokenizer([GRAPH])
    V = tok.vocab_size
    head = torch.nn.Linear(V, V, bias=False)
    head.weight.data = torch.eye(V)
    stub = SimpleNamespace(gpt=SimpleNamespace(lm_head=head))
    ids = analysis.node_first_tokens(GRAPH, tok)
    assert len(set(ids)) == 7 and all(len(tok.encode(" " + n)) == 1 for n in GRAPH["idx_to_symbol"])
    p = torch.full((2, V), 0.0)
    p[0, ids] = torch.tensor([0.0, 0.3, 0.2, 0.1, 0.05, 0.05, 0.0])
    p[1, ids] = torch.tensor([0.0, 0.1, 0.0, 0.0, 0.6, 0.2, 0.1])
    p[0, 0] = 0.3  # the rest of thought 1 on a token that is no node
    raw = analysis.node_probs_thought(stub, torch.log(p.clamp(min=1e-12)), GRAPH, tok)
    assert raw == [pytest.approx(r, abs=1e-6) for r in p[:, ids].tolist()]
    s = analysis.thought_stats(raw[0], GRAPH, 1)
    assert s["node_mass"] == pytest.approx(0.7) and s["frontier"] == pytest.approx(6 / 7)


# -----------------------------------------------------------------------------
# A tiny random model

def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=256, vocab_size=tok.vocab_size))
    with torch.no_grad():  # larger weights: varied answers and decisive argmaxes (float noise flips none)
        for p in gpt.parameters():
            if p.dim() == 2:
                p.mul_(5)
    return Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval()


def test_batched_answers_equal_one_at_a_time():
    records = [dict(question=" ".join(["Every apus is a bpus."] * k) + " Is Alex a bpus?", steps=[], answer="")
               for k in (1, 5, 2, 9, 3)]
    tok = compact_tokenizer(records + [GRAPH])
    model = tiny_model(tok)
    cfg = dict(mode="coconut", c_thought=1, max_latent_stage=6)
    # mixed question lengths and numbers of thoughts: collate left-pads to align the first latents
    prompts = [prompt(tokenize(r, tok), cfg, 7, tok, n) for r, n in zip(records, (3, 0, 6, 1, 3))]
    assert len({len(p) for p in prompts}) == 5
    outs, thoughts = generate_batched(model, prompts, max_new_tokens=12, batch_size=5)
    for i, p in enumerate(prompts):
        o, t = generate_batched(model, [p], max_new_tokens=12, batch_size=1)
        assert o[0] == outs[i]
        assert t[0].shape == thoughts[i].shape == (p.count(tok.latent_id), 32)
        assert torch.allclose(t[0], thoughts[i], atol=1e-4)
    assert len({tuple(o) for o in outs}) > 1  # the answers are not all the same
    # evaluate.evaluate (what --eval and train.py's validation use) sorts by length and pads: same answers
    answers = ["x"] * len(prompts)
    many = evaluate(model, tok, prompts, answers, 12, batch_size=5)["outputs"]
    ones = evaluate(model, tok, prompts, answers, 12, batch_size=1)["outputs"]
    assert [o["text"] for o in many] == [o["text"] for o in ones] == [tok.decode(o) for o in outs]


def test_prompt_shapes():
    tok = compact_tokenizer([GRAPH])
    t = tokenize(GRAPH, tok)
    q, S, E, L = t.question, tok.start_id, tok.end_id, tok.latent_id
    coconut = dict(mode="coconut", c_thought=2, max_latent_stage=3, pad_latent_to_max=True)
    assert prompt(t, coconut, 4, tok) == q + [S] + [L] * 6 + [E]   # the last stage: M*c
    assert prompt(t, coconut, 1, tok) == q + [S] + [L] * 2 + [E]   # a checkpoint saved at stage 1
    assert prompt(t, coconut, 4, tok, 0) == q + [S, E]
    assert prompt(t, coconut, 4, tok, 9) == q + [S] + [L] * 9 + [E]
    assert prompt(t, dict(mode="cot"), 0, tok) == q
    assert prompt(t, dict(mode="pause", c_thought=1, max_latent_stage=6), 0, tok, 2) == q + [L, L]
    with pytest.raises(ValueError, match="no continuous thoughts"):
        prompt(t, dict(mode="nocot"), 0, tok, 1)
    assert is_correct(q, tok.encode("Alex is a fpus.\n### Alex is a fpus.") + [tok.eos_id], "Alex is a fpus.", tok)
    assert not is_correct(q, tok.encode("### Alex is a epus."), "Alex is a fpus.", tok)


# -----------------------------------------------------------------------------
# The command line

def cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT, **CPU_ONLY)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    return r


def one_error_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert all(w in lines[-1] for w in words), r.stderr
    return lines[-1]


def in_process(capsys, *args):
    """sample.main in this process, as cli() runs it in another: (exit code, stdout, stderr); one subprocess per
    case would cost the suite seconds. test_bad_input keeps one real process for what only a process shows."""
    try:
        code = sample.main(list(args))
    except SystemExit as e:  # argparse's errors
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["sample.py", *args], code, out.out, out.err)


def test_bad_input(tmp_path, capsys, monkeypatch):
    one_error_line(in_process(capsys, "--question", "Is Alex a fpus?", "--latent", "-1"), 2, "negative")
    one_error_line(in_process(capsys, "--question", "   "), 2, "empty")
    # no source and no model: the first look says how to make a model
    monkeypatch.chdir(tmp_path)
    one_error_line(in_process(capsys), 1, "no trained model yet", "python train.py --demo")
    monkeypatch.chdir(ROOT)
    one_error_line(in_process(capsys, "--out_dir", str(tmp_path), "--question", "Is Alex a fpus?"), 1, "no model",
                   "best.pt")
    one_error_line(in_process(capsys, "--ckpt", str(tmp_path / "nope.pt"), "--question", "Is Alex a fpus?"), 1,
                   "nope.pt")
    # a corrupt checkpoint, in a real process: one line on stderr, no traceback, exit code 1
    (tmp_path / "best.pt").write_bytes(b"this is not a checkpoint")
    assert len(one_error_line(cli("--out_dir", str(tmp_path), "--question", "Is Alex a fpus?"), 1,
                              "best.pt").splitlines()) == 1


def test_language_probe_scores_whole_names():
    # The paper's probe: p(" " + name | question, k thoughts, "Every"), token by token, one row at a time.
    names = GRAPH["idx_to_symbol"][:3] + ["cp us"] + GRAPH["idx_to_symbol"][4:]  # "cp us": two tokens
    graph = dict(GRAPH, question=GRAPH["question"].replace("cpus", "cp us"), idx_to_symbol=names)
    tok = compact_tokenizer([graph])
    model = tiny_model(tok, seed=1)
    cfg = dict(mode="coconut", c_thought=1, max_latent_stage=6)
    t = tokenize(graph, tok)
    got = analysis.node_probs_language(model, t, graph, cfg, tok, n=3, batch_size=5)
    assert len(got) == 3 and all(len(g) == 7 for g in got)
    for k in (1, 3):
        head = prompt(t, cfg, None, tok, k) + tok.encode("Every")
        for v in (0, 3):
            name = tok.encode(" " + names[v])
            ids = torch.tensor([head + name])
            with torch.no_grad():
                _, logits = model(ids, torch.ones_like(ids), ids, torch.arange(ids.size(1))[None], with_logits=True)
            p = torch.softmax(logits[0], -1)
            want = math.prod(p[len(head) - 1 + j, name[j]].item() for j in range(len(name)))
            assert got[k - 1][v] == pytest.approx(want, rel=1e-4)
    assert len(tok.encode(" cp us")) == 2


# -----------------------------------------------------------------------------
# A tiny trained checkpoint: train.py for a few seconds on a 2-hop tiny data set (stages 0, 1, 2)

TINY = ["--dataset", "tiny", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--block_size", "128", "--batch_size", "8", "--grad_accum", "1", "--lr", "1e-2", "--stage_epochs", "1",
        "--max_latent_stage", "2", "--epochs", "3", "--max_new_tokens", "16", "--threads", "1", "--log_every", "100"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    assert tiny_prepare.main(["--out_dir", str(d / "data" / "tiny"), "--n_train", "400", "--n_valid", "16", "--n_test", "2",
                         "--steps", "2", "--width", "4", "--n_persons", "2"]) == 0
    assert train.main(TINY + ["--data_dir", str(d / "data"), "--out_dir", str(d / "run")]) == 0
    return d / "run"


def metrics(run_dir):
    return {m["epoch"]: m for m in map(json.loads, open(run_dir / "metrics.jsonl"))}


def eval_rows(out):
    """--eval's table: {thoughts: (correct, total, tokens per question)}."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)(?: \(default\))?\s+[\d.]+%\s+(\d+)/(\d+)\s+([\d.]+)", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)), float(m.group(4)))
    return rows


def test_eval_equals_training_validation(run_dir, capsys):
    ms = metrics(run_dir)
    for ckpt_name, latents in (("best.pt", []), ("ckpt.pt", ["--latent", "2", "0"])):
        epoch = load_checkpoint(str(run_dir / ckpt_name))[2]["epoch"] + 1
        m = ms[epoch]
        assert sample.main(["--ckpt", str(run_dir / ckpt_name), "--eval", "--batch_size", "5"] + latents) == 0
        rows = eval_rows(capsys.readouterr().out)
        # the default is the checkpoint's stage: its validation prompts, m["stage"] thoughts each
        assert rows[f"{m['mean_thoughts']:g}"] == (m["val_correct"], m["val_total"],
                                                   pytest.approx(m["mean_thoughts"] + m["mean_new_tokens"], abs=0.05))
        if latents:
            assert sorted(rows) == ["0", "2"] and m["stage"] == 2
    assert any(m["val_correct"] > 0 for m in ms.values())  # not a trivial 0 == 0
    # --out_dir finds best.pt; answers printed with the official rule agree with --eval
    assert sample.main(["--out_dir", str(run_dir), "--split", "valid"]) == 0
    out = capsys.readouterr().out
    best = ms[load_checkpoint(str(run_dir / "best.pt"))[2]["epoch"] + 1]
    assert f"accuracy {best['val_correct']}/{best['val_total']} " in out
    assert out.count("(correct)") == best["val_correct"]


def test_show_thoughts_are_softmax_of_lm_head(run_dir, capsys):
    path = str(run_dir / "ckpt.pt")
    assert sample.main(["--ckpt", path, "--split", "valid", "--n", "3", "--show_thoughts", "--top_k", "4",
                        "--latent", "3"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  thought ")]
    assert len(lines) == 3 * 3
    model, tok, ckpt = load_checkpoint(path)
    records = json.load(open(run_dir.parent / "data" / "tiny" / "valid.json"))[:3]
    got = iter(lines)
    for r in records:  # one question at a time, the thoughts straight from Coconut.generate
        q = tokenize(r, tok).question + [tok.start_id] + [tok.latent_id] * 3 + [tok.end_id]
        _, (thoughts,) = model.generate(torch.tensor([q]), torch.ones(1, len(q)), 1, return_thoughts=True)
        for j, t in enumerate(thoughts):
            p = torch.softmax(model.gpt.lm_head(t), -1)
            want_p, want_ids = p.topk(4)
            line = next(got)
            assert line.startswith(f"  thought {j + 1}: ")
            pairs = re.findall(r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*") (\d\.\d{4})""", line)
            assert [ast.literal_eval(s) for s, _ in pairs] == [tok.decode([i], skip_special=False) for i in want_ids.tolist()]
            assert [float(x) for _, x in pairs] == pytest.approx(want_p.tolist(), abs=1e-4)


@pytest.mark.parametrize("probe", ["thought", "language"])
def test_analyze_runs_on_a_trained_model(run_dir, capsys, probe):
    assert sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--analyze", "--probe", probe, "--n", "8"]) == 0
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines() if re.match(r"\s+[12]\s+8\s", l)]
    assert [r[0] for r in rows] == ["1", "2"]  # 2 thoughts; every 2-hop record has nodes 1 and 2 hops away
    for r in rows:
        assert float(r[3]) + float(r[4]) == pytest.approx(1.0, abs=2e-3)  # frontier + other
        assert float(r[5]) <= float(r[6]) <= float(r[7]) <= float(r[3]) + 1e-3  # top1 <= top2 <= top3 <= frontier
    assert "by height" in out


def test_plots_from_the_command_line(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # CI installs it; without it the tables print and one line says so
    for argv, name in ((["--eval", "--latent", "0", "2"], "eval.png"), (["--paths", "--latent", "0", "1", "2"], "paths.png"),
                       (["--analyze", "--n", "4"], "search.png"), ([], "run.png")):
        png = tmp_path / name
        assert sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--plot", str(png)] + argv) == 0
        assert f"wrote {png}" in capsys.readouterr().out
        head = png.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 300


def test_paths_defines_its_columns_in_the_readmes_words(run_dir, capsys):
    # issue 29: each column of --paths is defined where it prints, in the words the README uses for them
    assert sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--paths", "--latent", "0", "2", "--n", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("  k "))
    columns = [lines[head][i:i + 16].strip() for i in range(4, len(lines[head]), 16)]
    assert columns[:2] == ["correct path", "longer path"] and columns[-1] == "accuracy" and len(columns) == 8
    legend = {l[2:18].strip(): l[19:] for l in lines[:head] if l.startswith("  ")}
    assert set(legend) == set(columns), (legend, columns)
    said = " ".join(legend.values())
    for words in ("the target's chain", "a valid chain to another node", "a road that is not open"):
        assert words in said
    assert legend["correct path"].startswith("the target's chain") and "another node" in legend["wrong target"]
    assert "not open" in legend["hallucination"]
    rows = [l.split() for l in lines[head + 1:]]
    assert [r[0] for r in rows] == ["0", "2"]
    assert all(sum(float(x.rstrip("%")) for x in r[1:8]) == pytest.approx(100, abs=0.5) for r in rows)


def test_plot_alone_draws_the_whole_run(run_dir, tmp_path, monkeypatch, capsys):
    # best.pt holds the history up to its best epoch; the plot takes metrics.jsonl beside it: every epoch
    d = tmp_path / "run"
    d.mkdir()
    ck = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ck["metrics"] = ck["metrics"][:1]  # as if the best epoch were the first
    torch.save(ck, d / "best.pt")
    rows = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = []
    monkeypatch.setattr(sample.plots, "plot_run", lambda metrics, path, title="", max_latent_stage=None:
                        got.append(metrics) or ms.append(max_latent_stage) or path)
    ms = []
    assert sample.main(["--out_dir", str(d), "--plot", str(tmp_path / "run.png")]) == 0
    assert got == [rows] and len(rows) == 3 and ms == [2]  # the run's M: its stages past 2 are "all"
    assert f"the run's 3 epoch(s) from {d / 'metrics.jsonl'}" in capsys.readouterr().out
    (d / "metrics.jsonl").unlink()  # without it: the checkpoint's own list, and the line says so
    assert sample.main(["--out_dir", str(d), "--plot", str(tmp_path / "run.png")]) == 0
    assert got[1] == rows[:1] and "no metrics.jsonl beside it" in capsys.readouterr().out
    (d / "metrics.jsonl").write_text("{not json\n")
    assert sample.main(["--out_dir", str(d), "--plot", str(tmp_path / "run.png")]) == 1
    assert "not one JSON object per line" in capsys.readouterr().err


def test_small_truths(run_dir, tmp_path, capsys):
    # a run with ckpt.pt but no best.pt yet answers with that ckpt.pt, and says so (issue 29)
    d = tmp_path / "early"
    d.mkdir()
    (d / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    assert sample.main(["--out_dir", str(d), "--split", "valid", "--n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{d / 'ckpt.pt'}: coconut on tiny, epoch 3, ")
    assert out[1] == (f"no {d / 'best.pt'} yet (the run has not measured a validation accuracy): answering with its "
                      f"last save, {d / 'ckpt.pt'}")
    # --file: questions with answers and no steps
    valid = json.load(open(run_dir.parent / "data" / "tiny" / "valid.json"))[:3]
    f = tmp_path / "mine.json"
    f.write_text(json.dumps([dict(question=r["question"], answer=r["answer"]) for r in valid]))
    assert sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--file", str(f)]) == 0
    assert "3 question(s)" in capsys.readouterr().out
    # --analyze on a checkpoint of stage 0 (a short run's best.pt): the run's final number of thoughts, said
    ck = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ck["stage"] = 0
    torch.save(ck, tmp_path / "stage0.pt")
    assert sample.main(["--ckpt", str(tmp_path / "stage0.pt"), "--analyze", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "note: stage 0 feeds no continuous thoughts; analyzing with the run's final stage's 2 (--latent N" in out
    assert re.search(r"^\s+2\s+4\s", out, re.M)  # a row for thought 2, over the 4 records
    assert sample.main(["--ckpt", str(tmp_path / "stage0.pt"), "--analyze", "--n", "4", "--latent", "0"]) == 1
    assert "no continuous thoughts to analyze" in capsys.readouterr().err  # asked for 0: still an error


def test_a_stopped_run_answers_with_its_own_ckpt(run_dir, tmp_path, monkeypatch, capsys):
    # issue 29: `python sample.py --latent 2` after a stopped ProsQA run with ckpt.pt and no best.pt: that run's
    # ckpt.pt answers, not the demo's best.pt (here a model of other weights), and the second line says so
    (tmp_path / "out-prosqa-coconut").mkdir()
    (tmp_path / "out-prosqa-coconut" / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    (tmp_path / "out-demo" / "coconut").mkdir(parents=True)
    (tmp_path / "out-demo" / "coconut" / "best.pt").write_bytes((run_dir / "best.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert sample.main(["--latent", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("out-prosqa-coconut/ckpt.pt: coconut on tiny, epoch 3, stage 2, 2 thoughts ("), out[0]
    assert out[1].startswith("no out-prosqa-coconut/best.pt yet (the run has not measured a validation accuracy): "
                             "answering with its last save, out-prosqa-coconut/ckpt.pt; the default model: "
                             "out-prosqa-coconut, the run of train.py --dataset prosqa"), out[1]


def test_a_best_pt_of_stage_0_says_where_the_thoughts_are(run_dir, tmp_path, capsys):
    # issue 29: a short run's best.pt saved at stage 0 answers without thoughts: a note says why, and names the
    # run's last save, which has them, with its stage (from metrics.jsonl)
    d = tmp_path / "short"
    d.mkdir()
    ck = torch.load(run_dir / "ckpt.pt", weights_only=True)
    ck["stage"], ck["epoch"] = 0, 0
    torch.save(ck, d / "best.pt")
    (d / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    (d / "metrics.jsonl").write_bytes((run_dir / "metrics.jsonl").read_bytes())
    assert sample.main(["--out_dir", str(d), "--split", "valid", "--n", "2", "--show_thoughts"]) == 0
    out = capsys.readouterr().out
    assert (f"note: {d / 'best.pt'} was saved at stage 0 (epoch 1, before the curriculum's first thought): its "
            f"answers have no continuous thoughts; the run's last save (stage 2) has them: "
            f"`python sample.py --ckpt {d / 'ckpt.pt'}`") in out, out
    assert out.count("  (no continuous thoughts: stage 0 feeds none)") == 2
    assert sample.main(["--ckpt", str(d / "ckpt.pt"), "--split", "valid", "--n", "2", "--show_thoughts"]) == 0
    out = capsys.readouterr().out
    assert "note:" not in out and out.count("  thought 2: ") == 2


def test_questions_typed_in(run_dir, capsys):
    # issue 29: --question shows the thoughts and the whole question, and warns in one line when a question has
    # fewer or more tokens than every validation question of the model's data set
    valid = json.load(open(run_dir.parent / "data" / "tiny" / "valid.json"))
    like = valid[0]["question"]
    first, rest = like.split(". ", 1)
    long = f"{first}. {rest.rsplit('. ', 1)[0]}. {rest}"  # the question with its facts said twice
    short = f"{first}. {rest.rsplit('. ', 1)[1]}"  # one fact and the question
    assert len(long) > 120
    assert sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--question", like]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and out.count("  thought 1: ") == 1 and out.count("  thought 2: ") == 1
    assert sample.main(["--ckpt", str(run_dir / "ckpt.pt"), "--question", long, "--question", short]) == 0
    out = capsys.readouterr().out
    model, tok, _ = load_checkpoint(str(run_dir / "ckpt.pt"))
    lengths = [len(tokenize(r, tok).question) for r in valid]
    n_long, n_short = (len(tokenize(dict(question=q, steps=[], answer=""), tok).question) for q in (long, short))
    assert n_long > max(lengths) and n_short < min(lengths)
    warnings = [l for l in out.splitlines() if l.startswith("warning")]
    have = f"{min(lengths)} tokens" if min(lengths) == max(lengths) else f"{min(lengths)}-{max(lengths)}"
    assert warnings == [f"warning: question 1 has {n_long} tokens, question 2 has {n_short} tokens, where the tiny "
                        f"data's validation questions have {have}: this model was trained on "
                        f"questions of that shape, and answers others untested"], out
    assert f"[1] Q: {long}\n" in out and out.count("  thought 2: ") == 2


def test_the_first_look_uses_the_default_run(run_dir, tmp_path):
    # `python sample.py --latent 2` with no source: the default run's checkpoint (here the demo's folder),
    # the first 3 validation questions of its data set, their answers and decoded thoughts
    (tmp_path / "out-demo" / "coconut").mkdir(parents=True)
    (tmp_path / "out-demo" / "coconut" / "best.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    r = cli("--latent", "2", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Q: ") == 3 and r.stdout.count("  thought 1: ") == 3 and r.stdout.count("  thought 2: ") == 3
    assert "out-demo/coconut/best.pt" in r.stdout and "accuracy " in r.stdout
