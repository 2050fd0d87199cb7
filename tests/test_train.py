"""train.py: a tiny run end to end, SIGKILL/Ctrl-C + --resume = an uninterrupted run bit for bit, 2 DDP
processes = 1 process, the official answer rule, starting from OpenAI-layout safetensors (the vocabulary
grows by 3) and from a CoT checkpoint, and the error paths (one line each)."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import data.tiny.prepare as tiny_prepare
import train
from conftest import CPU_ONLY
from machinery import interrupt, progress
from machinery.checkpoint import init_model, load_checkpoint
from curriculum import make_question
from machinery.evaluate import evaluate
from machinery.interrupt import SIGNAL_HOOK
from machinery.records import load_split, tokenize
from machinery.tokenizer import compact_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A model and a data set small enough for seconds per run: 2-step records, 24 train / 6 valid.
TINY = ["--dataset", "tiny", "--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
        "--block_size", "128", "--batch_size", "2", "--grad_accum", "2", "--lr", "1e-2", "--stage_epochs", "1",
        "--max_latent_stage", "2", "--epochs", "3", "--max_new_tokens", "24", "--threads", "1", "--log_every", "0"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    assert tiny_prepare.main(["--out_dir", str(d / "tiny"), "--n_train", "24", "--n_valid", "6", "--n_test", "2",
                                "--steps", "2", "--width", "4"]) == 0
    return d


def run_cli(args, env=None, timeout=120):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **CPU_ONLY, **(env or {}))
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(r, code, *words):
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), last
    return last


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------

def test_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(out), "--epochs", "4",
                              "--stage_epochs", "2", "--eval_batch_size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "stage 0 | epoch 1/4 | step 1/6" in printed and "epoch 4 (stage 1)" in printed
    # progress: the ETA of the epoch and of the whole run; validation's generation says how far it is
    eta = re.findall(r"epoch (\d)/4 \| step (\d)/6 .* ETA epoch (\d+):(\d\d):(\d\d), run (\d+):(\d\d):(\d\d)", printed)
    assert len(eta) == 24  # --log_every 0: every step
    secs = lambda h, m, s: 3600 * int(h) + 60 * int(m) + int(s)
    assert all(secs(*e[5:8]) >= secs(*e[2:5]) for e in eta)  # the run's ETA includes the epoch's
    assert "validation: 4/6 questions" in printed
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4] and [m["stage"] for m in metrics] == [0, 0, 1, 1]
    assert metrics[3]["train_loss"] < 0.6 * metrics[0]["train_loss"]  # it learns
    assert all(m["val_total"] == 6 for m in metrics)

    model, tok, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert not model.training and ckpt["epoch"] == 3 and ckpt["stage"] == 1 and ckpt["step"] == 24
    assert ckpt["config"]["mode"] == "coconut" and ckpt["config"]["lr"] == 1e-2
    best, _, best_ckpt = load_checkpoint(str(out / "best.pt"))
    assert best_ckpt["best_acc"] == max(m["val_acc"] for m in metrics)
    # generate from the loaded model: the same answers as the run's last validation
    records = json.load(open(data_dir / "tiny" / "valid.json"))
    prompts = [make_question(tokenize(r, tok), 1, "coconut", 1, 2, True, tok) for r in records]
    assert all(p.count(tok.latent_id) == 1 for p in prompts)
    r = evaluate(model, tok, prompts, [x["answer"] for x in records], 24, batch_size=4)
    assert r["correct"] == metrics[-1]["val_correct"] and r["mean_thoughts"] == 1.0
    assert r["mean_new_tokens"] == pytest.approx(metrics[-1]["mean_new_tokens"])


def test_a_slow_cpu_run_says_so_after_its_first_step(data_dir, tmp_path, monkeypatch, capsys):
    # the note follows the run's estimated time on this device, not its size: here any run is "slow"
    monkeypatch.setattr(progress, "SLOW_RUN_HOURS", 0)
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "run"), "--epochs", "2",
                              "--log_every", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = next(i for i, l in enumerate(lines) if l.startswith("stage 0 | epoch 1/2 | step 1/6 "))
    assert lines[first + 1].startswith("note: at this speed the run takes about ")
    assert "on this CPU: this is a GPU recipe" in lines[first + 1] and "`python train.py --demo`" in lines[first + 1]
    assert sum("GPU recipe" in l for l in lines) == 1  # once per run
    assert progress.slow_run_note(10 * 3600, torch.device("cuda")) is None
    monkeypatch.setattr(progress, "SLOW_RUN_HOURS", 2)
    assert progress.slow_run_note(3600, torch.device("cpu")) is None
    assert "600:02:27" in progress.slow_run_note(600 * 3600 + 147, torch.device("cpu"))


def test_a_small_data_set_of_yours_from_scratch(tmp_path, capsys):
    # 50 records of 2 steps from scratch: a batch that gives at least 16 steps per epoch, the demo's lr, no accumulation,
    # validation's limit from the longest target; the first lines say how many steps and warn about stage 3-6
    recs = [dict(question=f"What is {a} plus {b} plus {a}?", steps=[f"{a} plus {b} is {a + b}.",
                                                                    f"{a + b} plus {a} is {2 * a + b}."],
                 answer=str(2 * a + b)) for a in range(10) for b in range(6)]
    (tmp_path / "sums").mkdir()
    (tmp_path / "sums" / "train.json").write_text(json.dumps(recs[:50]))
    (tmp_path / "sums" / "valid.json").write_text(json.dumps(recs[50:]))
    mine = ["--dataset", "sums", "--data_dir", str(tmp_path), "--init_from", "scratch"]
    args = train.parse_args(mine)
    assert (args.batch_size, args.grad_accum, args.lr, args.max_new_tokens) == (None, 1, 1e-3, None)  # from the data
    assert (args.stage_epochs, args.epochs, args.max_latent_stage) == (5, 50, 6)  # the generic curriculum
    assert train.main(mine + ["--out_dir", str(tmp_path / "run"), "--epochs", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "50 train / 10 valid records" in out and "3 x 1 sequences per step" in out
    assert "17 optimizer steps per epoch, 17 in the whole run (1 epoch)" in out
    assert "note: 17 optimizer steps may be too few for a model from scratch" in out
    assert ("note: --max_latent_stage 6 is past the records' longest chain (2 steps): stages 3-6 replace no more "
            "steps but still add thoughts, up to 6 per question; --max_latent_stage 2 matches the data") in out
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    _, tok, _ = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    longest = max(sum(map(len, t.steps)) + len(t.answer) for t in (tokenize(r, tok) for r in recs))
    assert ck["config"]["batch_size"] == 3 and ck["config"]["max_new_tokens"] == longest * 5 // 4 + 4 < 128
    assert ck["metrics"][0]["mean_new_tokens"] <= ck["config"]["max_new_tokens"]
    # the paper's presets keep their defaults; a data set of yours from GPT-2 keeps the paper's optimizer
    for name, want in (("prosqa", (32, 4, 1e-4, 128)), ("prontoqa", (32, 4, 1e-4, 128)), ("gsm8k", (32, 4, 1e-4, 64)),
                       ("prosqa_graph", (256, 1, 1e-4, 16)), ("tiny", (64, 1, 1e-3, 48)),
                       ("sums", (32, 4, 1e-4, None))):
        a = train.parse_args(["--dataset", name])
        assert (a.batch_size, a.grad_accum, a.lr, a.max_new_tokens) == want, name
    a = train.parse_args(mine + ["--batch_size", "8", "--lr", "3e-4"])  # typed values win
    assert (a.batch_size, a.grad_accum, a.lr) == (8, 1, 3e-4)


def test_answer_rule():
    # the official rule reads the question and the new tokens as one text; commas do not count
    tok = compact_tokenizer([{"question": "Is Alex a fpus or epus? 1,000", "steps": [], "answer": "### Alex is a fpus."}])
    q = tok.encode("Is Alex a fpus? #")

    class Stub(torch.nn.Module):  # "generates" the given token lists, in order (Coconut.generate's interface)
        feedback = True
        eos_id, latent_id = tok.eos_id, tok.latent_id

        def __init__(self, outs):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.outs = outs

        def generate(self, ids, mask, max_new_tokens, return_thoughts=False):
            outs = self.outs[:len(ids)]
            return (outs, [torch.zeros(0, 4) for _ in outs]) if return_thoughts else outs

    outs = [tok.encode("### Alex is a fpus."), tok.encode(" Alex is a fpus."), tok.encode("## 1000")]
    model = Stub(outs)
    r = evaluate(model, tok, [q, q, q], ["Alex is a fpus.", " Alex is a fpus.", "1,000"], 8, batch_size=3)
    assert [o["correct"] for o in r["outputs"]] == [True, True, True]
    assert [o["prediction"] for o in r["outputs"]] == ["Alex is a fpus.", "Alex is a fpus.", "1000"]
    r = evaluate(model, tok, [q[:-1], q[:-1]], ["Alex is a fpus.", "Alex is a fpus."], 8, batch_size=2)
    assert [o["correct"] for o in r["outputs"]] == [True, False]  # no '#' at all: the whole text is the prediction
    assert r["acc"] == 0.5 and r["total"] == 2 and r["mean_new_tokens"] == pytest.approx((len(outs[0]) + len(outs[1])) / 2)


def test_sigkill_and_resume_is_bit_identical(data_dir, tmp_path):
    # dropout on: the resumed run must also restore the random state that drives it
    common = TINY + ["--data_dir", str(data_dir), "--save_every", "4", "--dropout", "0.1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_cli(common + ["--out_dir", a])
    assert r.returncode == 0, r.stderr
    # killed mid-epoch (step 5: saved at 4), resumed, killed again right after the epoch's last step and save
    # (step 12: before its validation), resumed, interrupted by Ctrl-C (step 14), resumed to the end
    r = run_cli(common + ["--out_dir", b], env={SIGNAL_HOOK: "5:KILL,12:KILL,14:INT"})
    assert r.returncode == -9, r.stderr
    assert torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"] == 4
    r = run_cli(["--out_dir", b, "--resume"], env={SIGNAL_HOOK: "12:KILL,14:INT"})
    assert r.returncode == -9, r.stderr
    r = run_cli(["--out_dir", b, "--resume"], env={SIGNAL_HOOK: "14:INT"})
    assert r.returncode == 130 and "saved" in r.stdout, (r.stdout, r.stderr)
    assert torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"] == 15  # the step after the signal
    r = run_cli(["--out_dir", b, "--resume"])
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(os.path.join(a, "ckpt.pt")), weights(os.path.join(b, "ckpt.pt")))
    assert_same_weights(weights(os.path.join(a, "best.pt")), weights(os.path.join(b, "best.pt")))
    ma, mb = (open(os.path.join(d, "metrics.jsonl")).read().splitlines() for d in (a, b))
    strip = lambda ms: [{k: v for k, v in json.loads(m).items() if "second" not in k} for m in ms]
    assert strip(ma) == strip(mb)  # the same losses and accuracies, one line per epoch


def stop_line(capsys):
    return capsys.readouterr().out.strip().splitlines()[-1]


def run_printed_command(line):
    """The command a stop message gives (between backquotes), run as a user would paste it."""
    argv = shlex.split(re.findall(r"`([^`]+)`", line)[-1])
    assert argv[:2] == ["python", "train.py"], line
    return train.main(argv[2:])


def test_every_stop_gives_the_whole_command(data_dir, tmp_path, monkeypatch, capsys):
    # in this process: the test signals reach train.py's own handlers, as a Ctrl-C in a terminal would
    common = TINY + ["--data_dir", str(data_dir), "--epochs", "2"]
    b = str(tmp_path / "b c")  # a space in the folder: the command quotes it
    # Ctrl-C at the epoch's last step: it validates, saves and stops after the epoch
    monkeypatch.setenv(SIGNAL_HOOK, "6:INT")
    assert train.main(common + ["--out_dir", b]) == 130
    last = stop_line(capsys)
    assert last == f"train.py: stopped after epoch 1; saved {b}/ckpt.pt: continue with " \
                   f"`python train.py --out_dir '{b}' --resume`", last
    monkeypatch.delenv(SIGNAL_HOOK)
    assert run_printed_command(last) == 0
    assert [json.loads(x)["epoch"] for x in open(os.path.join(b, "metrics.jsonl"))] == [1, 2]
    # a second Ctrl-C stops at once, between saves (--save_every 2: the last save was step 2)
    b2 = str(tmp_path / "b2")
    monkeypatch.setattr(interrupt, "REPEAT_SECONDS", 0)  # the second Ctrl-C comes later than the first's echo
    monkeypatch.setenv(SIGNAL_HOOK, "3:INT,3:INT")
    assert train.main(common + ["--out_dir", b2, "--save_every", "2"]) == 130
    last = stop_line(capsys)
    assert last == f"train.py: interrupted at once; the last checkpoint, {b2}/ckpt.pt (step 2), is intact: " \
                   f"continue with `python train.py --out_dir {b2} --resume`", last
    assert torch.load(os.path.join(b2, "ckpt.pt"), weights_only=True)["step"] == 2
    monkeypatch.delenv(SIGNAL_HOOK)
    assert run_printed_command(last) == 0
    assert "epoch 1, 2 steps into it; step 2" in capsys.readouterr().out
    # before any save: the same command again
    monkeypatch.setenv(SIGNAL_HOOK, "1:INT,1:INT")
    assert train.main(common + ["--out_dir", str(tmp_path / "c")]) == 130
    assert "no checkpoint was saved yet: start again with `python train.py --dataset tiny" in stop_line(capsys)
    # the stopped-and-continued runs end where one that ran through does (exact resume)
    monkeypatch.delenv(SIGNAL_HOOK)
    assert train.main(common + ["--out_dir", str(tmp_path / "a")]) == 0
    for d in (b, b2):
        assert_same_weights(weights(str(tmp_path / "a" / "ckpt.pt")), weights(os.path.join(d, "ckpt.pt")))


def test_icot_passes_its_counts_and_resumes_bit_identically(data_dir, tmp_path):
    # iCoT: the count of removed chain tokens grows every 2 steps (round(6 steps per epoch / 4)), the optimizer
    # is reset when it grows, and a run killed mid-epoch resumes to the same weights
    common = TINY + ["--data_dir", str(data_dir), "--mode", "icot", "--remove_per_epoch", "4", "--save_every", "4"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_cli(common + ["--out_dir", a])
    assert r.returncode == 0, r.stderr
    metrics = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [m["stage"] for m in metrics] == [2, 5, 8]  # the count at each epoch's last step (global 5, 11, 17)
    assert [m["val_total"] for m in metrics] == [6, 6, 6]
    r = run_cli(common + ["--out_dir", b], env={SIGNAL_HOOK: "9:KILL"})
    assert r.returncode == -9
    r = run_cli(["--out_dir", b, "--resume"])
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(os.path.join(a, "ckpt.pt")), weights(os.path.join(b, "ckpt.pt")))
    ck = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    assert ck["config"]["mode"] == "icot" and ck["model_args"]["vocab_size"] == ck["tokenizer"]["words"].__len__() + 260


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    common = TINY + ["--data_dir", str(data_dir), "--epochs", "2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = run_cli(common + ["--out_dir", one])
    assert r.returncode == 0, r.stderr
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **CPU_ONLY)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        os.path.join(ROOT, "train.py"), *common, "--out_dir", two, "--device", "cpu"], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    m1, m2 = ([json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))] for d in (one, two))
    for x, y in zip(m1, m2):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
        assert x["val_correct"] == y["val_correct"] and x["val_total"] == y["val_total"] == 6
    w1, w2 = weights(os.path.join(one, "ckpt.pt")), weights(os.path.join(two, "ckpt.pt"))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


# -----------------------------------------------------------------------------
# Bad input: one line, no traceback

def test_bad_options(data_dir, tmp_path, capsys):
    for argv, words in ((["--dataset", "../nope"], "folder name"), (["--no_such_option"], "unrecognized"),
                        (["--mode", "magic"], "invalid choice"), (["--epochs", "0"], "--epochs")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_stages_past_the_last_are_named_the_last(data_dir, tmp_path, capsys):
    # issue 29: with max_latent_stage 1, epochs 2 and 3 train stages 1 and 2, alike (every step replaced by one
    # thought); they print as the last stage with its number of thoughts, while metrics.jsonl and the
    # checkpoints keep the numbers stage_for_epoch gave (the interface)
    import sample
    out = tmp_path / "run"
    argv = [a if a != "2" or TINY[i - 1] != "--max_latent_stage" else "1" for i, a in enumerate(TINY)]
    assert train.main(argv + ["--data_dir", str(data_dir), "--out_dir", str(out), "--eval_batch_size", "6"]) == 0
    printed = capsys.readouterr().out
    assert [json.loads(l)["stage"] for l in open(out / "metrics.jsonl")] == [0, 1, 2]
    assert torch.load(out / "ckpt.pt", weights_only=True)["stage"] == 2
    assert "stage 2" not in printed, [l for l in printed.splitlines() if "stage 2" in l]
    assert "the last stage, 1 thought | epoch 3/3 | step 1/6" in printed and "epoch 3 (the last stage, 1 thought): " in printed
    table = printed[printed.rindex("stage  epochs"):].splitlines()
    assert [row.split()[0] for row in table[1:3]] == ["0", "1"] and table[3].split()[:3] == ["last,", "1", "thought"]
    assert len(table) == 4 or not table[4].split()[0].isdigit()  # stage 2 is no row of its own
    assert sample.main(["--ckpt", str(out / "ckpt.pt"), "--split", "valid", "--n", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("coconut on tiny, epoch 3, the last stage, 1 thought (c_thought 1, max_latent_stage 1)"), first


def test_a_typo_is_one_line(capsys, monkeypatch):
    # issue 29: a mistyped flag or choice gets one line naming the closest flag or the valid choices, in every
    # script's parser, not 25 lines of usage first; --help stays whole
    import sample
    import data.reach.prepare as reach_prepare
    from machinery import bench
    cases = [(lambda a: train.parse_args(a), ["--datset", "mine"],
              "train.py: error: unrecognized argument --datset; did you mean --dataset?"),
             (lambda a: train.parse_args(a), ["--mode", "cocnut"],
              "train.py: error: argument --mode: invalid choice 'cocnut'; did you mean coconut? (choose from coconut, cot, "),
             (lambda a: sample.parse_args(a), ["--thread", "1", "--shwo_thoughts"],
              "sample.py: error: unrecognized argument --shwo_thoughts; did you mean --show_thoughts?"),
             (lambda a: sample.parse_args(a), ["--split", "vaild"],
              "sample.py: error: argument --split: invalid choice 'vaild'; did you mean valid? (choose from train, valid, test)"),
             (lambda a: reach_prepare.main(a), ["--n_trian", "5"],
              "data/reach/prepare.py: error: unrecognized argument --n_trian; did you mean --n_train?"),
             (lambda a: monkeypatch.setattr("sys.argv", ["bench.py"] + a) or bench.main(), ["--demo_stpe"],
              "machinery/bench.py: error: unrecognized argument --demo_stpe; did you mean --demo_step?")]
    for parse, argv, line in cases:
        with pytest.raises(SystemExit) as e:
            parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(line), (argv, err)
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: train.py") and "--max_latent_stage" in out
    assert len(out.splitlines()) > 100


def test_missing_and_malformed_data(tmp_path, capsys):
    base = TINY + ["--out_dir", str(tmp_path / "out")]
    assert train.main(base + ["--data_dir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python data/tiny/prepare.py" in err and "train.json" in err
    (tmp_path / "bad" / "tiny").mkdir(parents=True)
    (tmp_path / "bad" / "tiny" / "train.json").write_text('[{"question": "q", "steps": [')
    (tmp_path / "bad" / "tiny" / "valid.json").write_text("[]")
    assert train.main(base + ["--data_dir", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.json" in err and "not valid JSON" in err


def test_corrupt_checkpoints(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(out), "--epochs", "1"]) == 0
    good = (out / "ckpt.pt").read_bytes()
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    cases = {"truncated.pt": good[:len(good) // 2], "text.pt": b"not a checkpoint at all"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    import datetime
    torch.save({"when": datetime.date(2024, 1, 1)}, tmp_path / "pickled.pt")  # an object a safe load refuses
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    ck["model"].pop("transformer.wpe.weight")
    torch.save(ck, tmp_path / "wrong_keys.pt")
    for name, words in (("truncated.pt", "not a readable checkpoint"), ("text.pt", "not a readable checkpoint"),
                        ("foreign.pt", "not a checkpoint of train.py"), ("wrong_keys.pt", "do not fit"),
                        ("pickled.pt", "objects other than tensors")):
        with pytest.raises(ValueError) as e:
            load_checkpoint(str(tmp_path / name))
        assert words in str(e.value) and name in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert "weights_only" not in str(e.value)  # never advise loading a file that could run code
    # --resume from a damaged checkpoint, or a changed setting: one line
    (out / "ckpt.pt").write_bytes(good[:1000])
    assert train.main(["--out_dir", str(out), "--resume"]) == 1
    assert "not a readable checkpoint" in capsys.readouterr().err
    (out / "ckpt.pt").write_bytes(good)
    assert train.main(["--out_dir", str(out), "--resume", "--lr", "0.5"]) == 1
    assert "--lr 0.5 differs" in capsys.readouterr().err
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(out)]) == 1  # would overwrite a run
    assert f"continue it with `python train.py --out_dir {out} --resume`" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    out = str(tmp_path / "nan")
    # lr 1e30: the first step is finite, the second one's loss is not
    r = run_cli(TINY + ["--data_dir", str(data_dir), "--out_dir", out, "--lr", "1e30", "--save_every", "1"])
    last = one_error_line(r, 1, "loss is nan", "step 2", "step 1) is the last good checkpoint")
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["step"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert last.startswith("train.py: error:")


# -----------------------------------------------------------------------------
# Starting points: OpenAI-layout safetensors (GPT-2's vocabulary grows by 3), and a checkpoint of ours

def write_hf_gpt2(folder, n_layer=1, n_head=2, n_embd=32, n_positions=128):
    """A tiny GPT-2 in Hugging Face's layout: model.safetensors (Conv1D weights stored (in, out)) + config.json."""
    torch.manual_seed(0)
    from gpt import GPT, GPTConfig
    sd = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=n_positions, vocab_size=50257)).state_dict()
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    tensors = {k[len("transformer."):]: (v.t() if k.endswith(conv) else v).contiguous()
               for k, v in sd.items() if k != "lm_head.weight"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=50257), f)
    return sd


def test_init_from_another_architecture_is_one_line(data_dir, tmp_path, capsys):
    # a Llama folder as transformers saves it, and GPT-2 configs with a size missing, misspelled or wrong
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                                       architectures=["LlamaForCausalLM"])))
    (llama / "model-00001-of-00002.safetensors").write_bytes(b"")  # sharded weights: the config speaks first
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"])))
    # a Llama config that lacks sizes, and an architecture that neither gpt.py nor llama.py implements
    cases = {"llama": ["a Llama config without", "num_attention_heads"], "qwen": ["model_type 'qwen2'"]}
    for name, cfg, words in (("missing", dict(n_layer=1, n_head=2), ["n_embd missing"]),
                             ("misspelled", dict(n_layers=1, n_head=2, n_embd=32), ["n_layer missing"]),
                             ("wrong", dict(n_layer="1", n_head=2, n_embd=32, model_type="gpt2"), ["n_layer"]),
                             ("notjson", None, ["not valid JSON"]), ("list", [1, 2], ["expected a JSON object"])):
        folder = str(tmp_path / name)
        write_hf_gpt2(folder)
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write("{n_layer: 1" if cfg is None else json.dumps(cfg))
        cases[name] = words
    for name, words in cases.items():
        assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"),
                                  "--init_from", str(tmp_path / name)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("train.py: error:"), err
        assert all(w in err for w in words) and "config.json" in err, err
        if name in ("missing", "misspelled", "wrong"):
            assert "only GPT-2" in err


def test_offline_gpt2_run_leaves_nothing_and_points_to_the_demo(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # refused at once, like a machine without network
    monkeypatch.setenv("COCONUT_CACHE", str(tmp_path / "cache"))
    assert train.main(["--dataset", "tiny", "--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"),
                       "--stage_epochs", "5", "--threads", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--init_from gpt2: download of" in err, err
    assert err.endswith("on a CPU, the demo needs no download: `python train.py --demo`"), err
    assert not (tmp_path / "cache").exists()


@pytest.mark.gpt2_bpe
def test_init_from_safetensors_and_from_a_checkpoint(data_dir, tmp_path):
    folder = str(tmp_path / "hf")
    sd = write_hf_gpt2(folder)
    args = train.parse_args(TINY + ["--init_from", folder])
    assert args.dropout is None  # resolved by init_model: 0.1 from released weights
    gpt, tok = init_model(args, [])
    assert gpt.config.vocab_size == 50260 and gpt.config.dropout == 0.1 and tok.latent_id == 50259
    assert tok.encode("<<") == [16791]
    for i in (50257, 50258, 50259):  # the new rows start as copies of "<<", in the tied output layer too
        assert torch.equal(gpt.transformer.wte.weight[i], sd["transformer.wte.weight"][16791])
        assert torch.equal(gpt.lm_head.weight[i], sd["transformer.wte.weight"][16791])
    assert torch.equal(gpt.transformer.h[0].attn.c_attn.weight, sd["transformer.h.0.attn.c_attn.weight"])
    gpt, _ = init_model(train.parse_args(TINY + ["--init_from", folder, "--mode", "cot"]), [])
    assert gpt.config.vocab_size == 50257  # cot, nocot and no_thought add no tokens (official run.py)

    # a CoT run from those weights, then Coconut from its checkpoint, skipping stage 0 (GSM8k's recipe)
    cot, coco = str(tmp_path / "cot"), str(tmp_path / "coco")
    assert train.main(TINY + ["--data_dir", str(data_dir), "--init_from", folder, "--mode", "cot", "--epochs", "1",
                              "--out_dir", cot]) == 0
    _, tok, ck = load_checkpoint(os.path.join(cot, "best.pt"))
    assert ck["model_args"]["vocab_size"] == 50257 and ck["tokenizer"] == {"kind": "gpt2"}
    assert train.main(TINY + ["--data_dir", str(data_dir), "--init_from", os.path.join(cot, "best.pt"),
                              "--start_epoch", "1", "--out_dir", coco]) == 0
    metrics = [json.loads(line) for line in open(os.path.join(coco, "metrics.jsonl"))]
    assert [(m["epoch"], m["stage"]) for m in metrics] == [(2, 1), (3, 2)]
    model, _, ck = load_checkpoint(os.path.join(coco, "ckpt.pt"))
    assert ck["model_args"]["vocab_size"] == 50260 and model.feedback and ck["config"]["dropout"] == 0.1


def test_a_users_own_data_set_in_symbols(tmp_path):
    # any folder name works; records written in symbols get one token per symbol from scratch
    import random
    rng = random.Random(0)
    recs = []
    for _ in range(40):
        a, b, c = rng.sample("pqrstuvwxyz", 3)
        recs.append(dict(question=f"{a} > {b} , {b} > {c} ?", steps=[f"{a} {b}", f"{b} {c}"], answer=c))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.json").write_text(json.dumps(recs[:32]))
    (tmp_path / "mine" / "valid.json").write_text(json.dumps(recs[32:]))
    args = TINY[2:] + ["--dataset", "mine", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "run"),
                       "--epochs", "2", "--max_latent_stage", "1"]
    assert train.main(args) == 0
    model, tok, ck = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert tok.spec["kind"] == "symbols" and tok.vocab_size == 11 + 3 + 1 + 4  # 11 letters, > , ? ###, specials
    assert tok.encode("p > q ,") == [tok.spec["symbols"].index(s) for s in ("p", ">", "q", ",")]
    assert [m["stage"] for m in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))] == [0, 1]
    # the generic defaults, not a known data set's
    assert (ck["config"]["c_thought"], ck["config"]["tokenizer"], ck["config"]["uniform_prob"]) == (1, "auto", 0.0)


# -----------------------------------------------------------------------------
# The micro-batch that fits (machinery/memory.py), with the memory the estimate sees capped by TRAIN_MEMORY_GB

def test_the_largest_micro_batch_that_fits_keeps_the_step(data_dir, tmp_path, monkeypatch, capsys):
    from machinery import memory
    # tiny's preset: 64 x 1 per step, not typed; the cap lets 8 sequences fit, not 16
    i = TINY.index("--batch_size")
    assert TINY[i:i + 4] == ["--batch_size", "2", "--grad_accum", "2"]
    flags = TINY[:i] + TINY[i + 4:] + ["--data_dir", str(data_dir), "--epochs", "2"]
    args = train.parse_args(flags)
    assert (args.batch_size, args.grad_accum) == (64, 1)
    model, tok = train.make_model(args, None, load_split(str(data_dir), "tiny", "train"), torch.device("cpu"))
    tokenized = [tokenize(r, tok) for r in load_split(str(data_dir), "tiny", "train")]
    columns, scored, rest = memory.longest_sequence(tokenized, args, 128)
    need = lambda m: memory.step_bytes(model, args, m, columns, scored, rest, torch.device("cpu"))
    assert need(16) > need(8) > need(1) > need(0) > 16 * sum(p.numel() for p in model.parameters())
    cap = (need(8) + need(16)) / 2 / memory.HEADROOM / 2**30
    monkeypatch.setenv(memory.LIMIT_ENV, f"{cap:.6f}")
    out = str(tmp_path / "fit")
    assert train.main(flags + ["--out_dir", out]) == 0
    printed = capsys.readouterr().out
    line = next(l for l in printed.splitlines() if l.startswith("micro-batch"))
    assert line.startswith(f"micro-batch 8 x 8 accumulation steps = 64: fits {cap:.6f} GB (TRAIN_MEMORY_GB)"), line
    assert "8 x 8 sequences per step" in printed
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert (ck["config"]["batch_size"], ck["config"]["grad_accum"]) == (8, 8)
    # the same steps as typing the split (bit for bit), and the same sequences per step as the preset's 64 x 1
    monkeypatch.delenv(memory.LIMIT_ENV)
    typed = str(tmp_path / "typed")
    assert train.main(flags + ["--out_dir", typed, "--batch_size", "8", "--grad_accum", "8"]) == 0
    assert_same_weights(weights(os.path.join(out, "ckpt.pt")), weights(os.path.join(typed, "ckpt.pt")))
    args.batch_size, args.grad_accum = 8, 8
    split = train.plan_steps(24, 1, args)
    args.batch_size, args.grad_accum = 64, 1
    assert [sorted(sum(s, [])) for s in split] == [sorted(sum(s, [])) for s in train.plan_steps(24, 1, args)]
    # not one that would drop the epoch's short last step: 1 x 64 would fit, but 24 sequences cannot fill 64
    # micro-batches (plan_steps drops them), so 4 x 16, the nearest to fitting of those that keep it, and says so
    args = train.parse_args(flags)
    monkeypatch.setenv(memory.LIMIT_ENV, f"{(need(1) + need(2)) / 2 / memory.HEADROOM / 2**30:.6f}")
    line = memory.fit_micro_batch(args, model, tokenized, torch.device("cpu"))
    assert line.startswith("micro-batch 4 x 16 accumulation steps = 64: may not fit"), line
    assert [sorted(sum(s, [])) for s in train.plan_steps(24, 0, args)] == [list(range(24))]
    with pytest.raises(ValueError, match="cannot fill the 64 micro-batches"):
        train.plan_steps(24, 0, argparse.Namespace(seed=0, batch_size=1, grad_accum=64))
    monkeypatch.delenv(memory.LIMIT_ENV)
    # a resumed run keeps its checkpoint's split, and may take another of the same product
    capsys.readouterr()
    assert train.main(["--out_dir", out, "--resume", "--epochs", "3", "--batch_size", "4", "--grad_accum", "16"]) == 0
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert (ck["config"]["batch_size"], ck["config"]["grad_accum"], ck["step"]) == (4, 16, 3)
    capsys.readouterr()
    assert train.main(["--out_dir", out, "--resume", "--epochs", "4", "--batch_size", "8", "--grad_accum", "4"]) == 1
    assert "--batch_size 8 differs from the run's 4" in capsys.readouterr().err  # 32 per step: another run


def test_a_typed_batch_is_kept_with_a_warning(data_dir, tmp_path, monkeypatch, capsys):
    from machinery import memory
    common = TINY + ["--data_dir", str(data_dir), "--epochs", "1"]
    args = train.parse_args(common)
    model, tok = train.make_model(args, None, load_split(str(data_dir), "tiny", "train"), torch.device("cpu"))
    tokenized = [tokenize(r, tok) for r in load_split(str(data_dir), "tiny", "train")]
    need = lambda m: memory.step_bytes(model, args, m, *memory.longest_sequence(tokenized, args, 128),
                                       torch.device("cpu"))
    monkeypatch.setenv(memory.LIMIT_ENV, f"{(need(1) + need(2)) / 2 / memory.HEADROOM / 2**30:.6f}")
    assert train.main(common + ["--out_dir", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    warning = [l for l in printed.splitlines() if l.startswith("warning: micro-batch 2 needs about")]
    assert len(warning) == 1 and warning[0].endswith("--batch_size 1 --grad_accum 4 keeps 4 per step"), printed
    assert "2 x 2 sequences per step" in printed  # honoured
    # not even one sequence: the state alone (fp32 at 8B on one GPU, say)
    monkeypatch.setenv(memory.LIMIT_ENV, f"{need(0) / 2**30:.6f}")
    assert train.main(common + ["--out_dir", str(tmp_path / "b")]) == 0
    assert "warning: even one sequence per micro-batch needs about" in capsys.readouterr().out


def test_out_of_memory_names_the_micro_batch(data_dir, tmp_path, monkeypatch, capsys):
    import coconut

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(coconut.Coconut, "forward", oom)
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "o"), "--batch_size", "4",
                              "--grad_accum", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("train.py: error: out of GPU memory at micro-batch 4: try --batch_size 2 --grad_accum 6 (the same "
                   "12 sequences per step)"), err


def test_the_resume_promise_waits_for_the_first_save(data_dir, tmp_path, capsys):
    out = str(tmp_path / "p")
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", out, "--epochs", "1", "--save_every", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    promise = [i for i, l in enumerate(lines) if "continues with" in l]
    step4 = next(i for i, l in enumerate(lines) if "| step 4/6 " in l)
    assert len(promise) == 1 and promise[0] == step4 + 1, lines
    assert lines[promise[0]] == (f"saved {out}/ckpt.pt (step 4): from now on a run stopped in any way, even killed, "
                                 f"continues with `python train.py --out_dir {out} --resume`")
    assert any("until the first save, a run killed starts again" in l for l in lines[:step4])


@pytest.mark.gpt2_bpe
def test_the_cards_first_command_fits_24_gb(tmp_path, monkeypatch):
    # `python train.py --dataset prosqa --stage_epochs 5` on a 24 GB machine: the default micro-batch of 32 was
    # killed there (23.7 GB resident in its first step); the estimate says so, and picks one that fits, 128 a step
    from machinery import memory
    from coconut import Coconut
    from gpt import GPT, GPTConfig
    from machinery.tokenizer import gpt2_tokenizer
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "prosqa", "prepare.py"), "--generate", "--out_dir",
                        str(tmp_path / "prosqa"), "--n_train", "200", "--n_valid", "0", "--n_test", "0"],
                       capture_output=True, text=True, env=dict(os.environ, **CPU_ONLY))
    assert r.returncode == 0, r.stderr
    args = train.parse_args(["--dataset", "prosqa", "--stage_epochs", "5"])
    assert (args.batch_size, args.grad_accum) == (32, 4)
    tok = gpt2_tokenizer()
    tokenized = [tokenize(x, tok) for x in load_split(str(tmp_path), "prosqa", "train")]
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50260, block_size=1024, dropout=0.1))
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id)  # GPT-2 124M's shape, as from gpt2
    need = lambda m: memory.step_bytes(model, args, m, *memory.longest_sequence(tokenized, args, 1024),
                                       torch.device("cpu"))
    monkeypatch.setenv(memory.LIMIT_ENV, "24")
    line = memory.fit_micro_batch(args, model, tokenized, torch.device("cpu"))
    assert need(32) > 24 * 2**30  # what the kernel's OOM killer said
    m = args.batch_size
    assert line.startswith(f"micro-batch {m} x {128 // m} accumulation steps = 128: fits 24 GB") and m < 32, line
    assert args.grad_accum == 128 // m and need(m) <= memory.HEADROOM * 24 * 2**30 < need(2 * m)


def test_every_process_a_test_starts_is_pinned_to_the_cpu():
    # how the suite was made to pass on 1- and 8-GPU machines without one here: every process a test starts
    # (subprocess.run / Popen) gets conftest.CPU_ONLY in its environment (no CUDA device visible, gloo), in the
    # call or in the helper that makes the call; only the data generators and an import check, which never
    # touch torch's devices, go without
    import ast
    exempt = {"prepare.py", "sys.modules['matplotlib']"}  # data/*/prepare.py; test_plots' import check
    tests = os.path.join(ROOT, "tests")
    unpinned = []
    for name in sorted(os.listdir(tests)):
        if not name.startswith("test_") or not name.endswith(".py"):
            continue
        source = open(os.path.join(tests, name)).read()
        for fn in ast.walk(ast.parse(source)):
            if not isinstance(fn, ast.FunctionDef):
                continue
            body = ast.get_source_segment(source, fn)
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                        and call.func.attr in ("run", "Popen") and getattr(call.func.value, "id", "") == "subprocess"):
                    text = ast.get_source_segment(source, call)
                    if "CPU_ONLY" not in body and not any(e in body for e in exempt):
                        unpinned.append(f"{name}:{call.lineno} {text.splitlines()[0]}")
    assert not unpinned, unpinned


def test_a_signal_repeated_at_once_or_during_a_save_is_the_same_stop(data_dir, tmp_path, monkeypatch, capsys):
    import signal
    # two Ctrl-Cs at once (a terminal's reaches torchrun too, which passes it on): the step ends, saves, stops
    monkeypatch.setenv(SIGNAL_HOOK, "3:INT,3:INT")
    out = str(tmp_path / "twice")
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", out, "--epochs", "1"]) == 130
    assert stop_line(capsys).startswith(f"train.py: stopped at step 4; saved {out}/ckpt.pt: continue with")
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4
    # during a save no signal cuts it short, even later than REPEAT_SECONDS; outside one, a later one does
    monkeypatch.setattr(interrupt, "REPEAT_SECONDS", 0)
    handlers = interrupt.install_signal_handlers()
    try:
        with interrupt.saving():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.STOP["requested"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        interrupt.restore_signal_handlers(handlers)
