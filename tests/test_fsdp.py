"""train.py --fsdp (parallel.py): 2 gloo processes on the CPU against one process, for a small GPT (--fsdp sharded)
and a small Llama (--fsdp, whole checkpoints): the same loss at every step and the same weights; each process holds
half of the weights and AdamW state; SIGKILL, then the command the run printed: bit-identical weights; the
checkpoint answers through sample.py as the run validated it; and the bad inputs, one line each."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from machinery import parallel
from machinery.parallel import COUNT_HOOK
import sample
import train
from conftest import CPU_ONLY
from machinery.checkpoint import load_checkpoint, one_file
from coconut import Coconut
from gpt import GPT, GPTConfig
from machinery.interrupt import SAVE_DELAY_HOOK, SIGNAL_HOOK
from test_train import TINY, assert_same_weights, data_dir, weights  # noqa: F401 (data_dir: the fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# TINY, longer and wider so that answers stop before the limit; half the examples at a random stage, so that the
# two processes' micro-batches hold different numbers of thoughts (different numbers of passes)
RUN = TINY + ["--n_embd", "64", "--epochs", "3", "--uniform_prob", "0.5", "--save_every", "4"]


def torchrun(argv, env=None, timeout=120, **popen):
    """train.py under torchrun with 2 CPU processes (gloo, one thread each, no GPU visible, --device cpu)."""
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **CPU_ONLY, **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *argv, "--device", "cpu"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout,
                          **popen)


def why(r):
    """What a failed torchrun says: the workers' errors, not the launcher's report."""
    errors = "\n".join(l for l in r.stderr.splitlines() if "rank" in l or "what()" in l or "Error" in l)
    return f"{r.stdout[-1500:]}\n{errors[-3000:]}"


def step_losses(out):
    """Every step's loss from the progress lines (--log_every 0: one line per step)."""
    return [float(x) for x in re.findall(r"\| step \d+/\d+ \(\d+\) \| loss ([0-9.]+) \|", out)]


def metrics(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def saved_weights(path):
    """The GPT's weights of a checkpoint, whole or sharded (--fsdp sharded: read from its folder)."""
    return load_checkpoint(path)[0].gpt.state_dict()


def show(request, capsys, text):
    """Printed under pytest -s only."""
    if request.config.getoption("capture") == "no":
        with capsys.disabled():
            print(text)


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def collectives(out):
    """Each process's (all-gathers, reduce-scatters) per `gathered` block, in order (TRAIN_TEST_COLLECTIVES)."""
    counts = {}
    for rank, gathers, scatters in re.findall(r"collectives \(rank (\d)\): (\d+) all-gathers, (\d+) reduce-scatters",
                                              out):
        counts.setdefault(int(rank), []).append((int(gathers), int(scatters)))
    return counts


def mib(text):
    return float(text.split()[0]) * (1024 if text.endswith("GiB") else 1)


@pytest.mark.multiprocess
def test_fsdp_sharded_matches_one_process_and_resumes_after_sigkill(data_dir, tmp_path, capsys, request, monkeypatch):
    # --fsdp sharded: every checkpoint is written by both processes, each its slices (the Llama test: whole files)
    common = RUN + ["--data_dir", str(data_dir)]
    one, a, b = str(tmp_path / "one"), str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main(common + ["--out_dir", one]) == 0
    losses_one = step_losses(capsys.readouterr().out)
    r = torchrun(["train.py", *common, "--out_dir", a, "--fsdp", "sharded"], env={COUNT_HOOK: "1"})
    assert r.returncode == 0, why(r)
    assert "2 process(es) sharded (FSDP) on cpu" in r.stdout
    # the processes' micro-batches hold different numbers of thoughts (passes), yet every step makes the same
    # collectives: 2 all-gathers (the block, the root) and 2 reduce-scatters (one per group and micro-batch), not
    # one per pass; validation gathers once and reduces nothing (parallel.py's docstring says why)
    epoch = [(2, 2)] * 6 + [(2, 0)]
    assert collectives(r.stdout) == {0: epoch * 3, 1: epoch * 3}

    # the same loss at every step (printed to 4 decimals) and at every epoch, the same weights within float error
    assert len(losses_one) == 18 and step_losses(r.stdout) == losses_one
    for x, y in zip(metrics(one), metrics(a)):
        for k in ("train_loss", "val_loss"):
            assert x[k] == pytest.approx(y[k], rel=1e-6), k
        for k in ("val_correct", "val_total", "mean_new_tokens", "mean_thoughts"):  # validation under sharding
            assert x[k] == y[k], k
    assert metrics(a)[-1]["mean_new_tokens"] < 24  # the answers stop: generation really ran a varying number of passes
    ck = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    assert ck["model"] == {} and ck["optimizer"] is None and ck["shards"] == "shards-18-epoch"
    diff = max_difference(saved_weights(os.path.join(one, "ckpt.pt")), saved_weights(os.path.join(a, "ckpt.pt")))
    show(request, capsys, f"\nFSDP (2 processes) vs one process, GPT: max |weight difference| {diff:.1e}")
    assert diff < 1e-5

    # memory: the weights and AdamW's state that each process holds, measured on its tensors after the first step
    line = next(l for l in r.stdout.splitlines() if l.startswith("weights and AdamW state held per process"))
    per, total = re.fullmatch(r".*: (.*) \(slices \(FSDP\); (.*) in all\)", line).groups()
    per = [mib(x) for x in per.split(", ")]
    ck1 = torch.load(os.path.join(one, "ckpt.pt"), weights_only=True)
    held_one = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in ck1["model"].values()}.values()) + \
        sum(t.numel() * t.element_size() for s in ck1["optimizer"]["state"].values() for t in s.values())
    assert mib(total) == pytest.approx(held_one / 2**20, rel=0.01)  # "in all" is what one process holds
    assert len(per) == 2 and all(p == pytest.approx(mib(total) / 2, rel=0.03) for p in per), line

    # SIGKILL at step 9 (saved at 8), then the command the run printed when it started
    r = torchrun(["train.py", *common, "--out_dir", b, "--fsdp", "sharded"], env={SIGNAL_HOOK: "9:KILL"})
    assert r.returncode != 0
    assert torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["step"] == 8
    printed = re.search(r"continues with `([^`]+)`", r.stdout).group(1)
    assert printed == f"torchrun --nproc_per_node 2 train.py --out_dir {b} --resume"
    argv = shlex.split(printed)
    r = torchrun(argv[argv.index("train.py"):])
    assert r.returncode == 0, why(r)
    assert "resuming" in r.stdout and "sharded (FSDP)" in r.stdout  # --fsdp sharded comes from the checkpoint
    for name in ("ckpt.pt", "best.pt"):
        assert_same_weights(saved_weights(os.path.join(a, name)), saved_weights(os.path.join(b, name)))
    strip = lambda ms: [{k: v for k, v in m.items() if "second" not in k} for m in ms]
    assert strip(metrics(a)) == strip(metrics(b))
    named = {torch.load(os.path.join(b, f), weights_only=True)["shards"] for f in ("ckpt.pt", "best.pt")}
    assert {d for d in os.listdir(b) if d.startswith("shards-")} == named  # older and interrupted saves are gone

    # the checkpoint answers through sample.py as the sharded run's validation scored it; and as one file
    assert sample.main(["--ckpt", os.path.join(a, "ckpt.pt"), "--eval", "--batch_size", "4"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    m = metrics(a)[-1]
    assert row[3] == f"{m['val_correct']}/{m['val_total']}"
    assert float(row[5]) == pytest.approx(m["mean_new_tokens"], abs=0.05)
    one_file(os.path.join(a, "ckpt.pt"), str(tmp_path / "one-file.pt"))
    assert_same_weights(weights(str(tmp_path / "one-file.pt")), saved_weights(os.path.join(a, "ckpt.pt")))

    # a sharded checkpoint without its folder: one line
    shutil.rmtree(os.path.join(b, torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["shards"]))
    assert sample.main(["--ckpt", os.path.join(b, "ckpt.pt"), "--eval"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "which is missing or incomplete" in err, err

    # one process continues it too: a fourth epoch from the sharded run's checkpoint, then whole files; the resume
    # reads the shards once (make_model builds the model without them, start_state loads them)
    import torch.distributed.checkpoint as dcp
    reads = []
    monkeypatch.setattr(dcp, "load", lambda *a, _load=dcp.load, **k: reads.append(k["checkpoint_id"]) or _load(*a, **k))
    assert train.main(["--out_dir", a, "--resume", "--epochs", "4"]) == 0
    assert reads == [os.path.join(a, "shards-18-epoch")]
    assert "holds the random states of 2 processes, not 1" in capsys.readouterr().out
    assert [x["epoch"] for x in metrics(a)] == [1, 2, 3, 4]
    assert weights(os.path.join(a, "ckpt.pt")) and not [d for d in os.listdir(a) if d.startswith("shards-")
                                                       and d != torch.load(os.path.join(a, "best.pt"))["shards"]]


@pytest.mark.multiprocess
def test_fsdp_on_a_small_llama_matches_one_process_and_resumes(data_dir, tmp_path, capsys, request):
    # --fsdp (whole checkpoints, one file as one process writes it), killed at step 5 (saved at 4) and resumed
    from test_llama import tiny_llama_folder
    records = json.load(open(data_dir / "tiny" / "train.json")) + json.load(open(data_dir / "tiny" / "valid.json"))
    folder = str(tmp_path / "llama")
    tiny_llama_folder(folder, records)
    common = [x for x in TINY if x != "scratch"]
    common[common.index("--init_from") + 1:common.index("--init_from") + 1] = [folder]
    common += ["--data_dir", str(data_dir), "--epochs", "2", "--uniform_prob", "0.5", "--save_every", "4"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert train.main(common + ["--out_dir", one]) == 0
    losses_one = step_losses(capsys.readouterr().out)
    r = torchrun(["train.py", *common, "--out_dir", two, "--fsdp"], env={SIGNAL_HOOK: "5:KILL"})
    assert r.returncode != 0 and "2 process(es) sharded (FSDP)" in r.stdout
    assert torch.load(os.path.join(two, "ckpt.pt"), weights_only=True)["step"] == 4
    argv = shlex.split(re.search(r"continues with `([^`]+)`", r.stdout).group(1))
    first = step_losses(r.stdout)[:4]
    r = torchrun(argv[argv.index("train.py"):])
    assert r.returncode == 0, why(r)
    assert "resuming" in r.stdout and "sharded (FSDP)" in r.stdout
    # the same loss at every step as one process, before the kill and after the resume
    assert first + step_losses(r.stdout) == losses_one and len(losses_one) == 12
    for x, y in zip(metrics(one), metrics(two)):
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-6)
        assert (x["val_correct"], x["mean_new_tokens"]) == (y["val_correct"], y["mean_new_tokens"])
    w1, w2 = weights(os.path.join(one, "ckpt.pt")), weights(os.path.join(two, "ckpt.pt"))
    diff = max_difference(w1, w2)
    show(request, capsys, f"\nFSDP (2 processes) vs one process, Llama: max |weight difference| {diff:.1e}")
    assert diff < 1e-5
    # --fsdp (whole): one file, as one process writes it, gathered into rank 0
    ck1, ck2 = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (one, two))
    assert ck2["arch"] == "llama" and "shards" not in ck2
    assert ck1["optimizer"]["state"].keys() == ck2["optimizer"]["state"].keys()
    assert ck2["model"]["lm_head.weight"].data_ptr() == ck2["model"]["transformer.wte.weight"].data_ptr()  # still tied
    assert sample.main(["--ckpt", os.path.join(two, "best.pt"), "--eval", "--batch_size", "4"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    best = max(metrics(two), key=lambda m: m["val_acc"])  # the first epoch of the best accuracy
    assert row[3] == f"{best['val_correct']}/{best['val_total']}"


@pytest.mark.multiprocess
def test_four_micro_batches_on_two_processes_match_one(data_dir, tmp_path, capsys, request):
    # --grad_accum 4 of 1 sequence: each process accumulates 2 micro-batches (of different numbers of thoughts)
    # per step, under FSDP and DDP; one process accumulates all 4
    common = RUN + ["--data_dir", str(data_dir), "--epochs", "1", "--batch_size", "1", "--grad_accum", "4"]
    one, fsdp, ddp = str(tmp_path / "one"), str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    assert train.main(common + ["--out_dir", one]) == 0
    losses_one = step_losses(capsys.readouterr().out)
    r = torchrun(["train.py", *common, "--out_dir", fsdp, "--fsdp"], env={COUNT_HOOK: "1"})
    assert r.returncode == 0, why(r)
    assert len(losses_one) == 6 and step_losses(r.stdout) == losses_one
    # per step: the 2 groups gathered once, and reduce-scattered once per group and micro-batch: 2 x 2
    assert collectives(r.stdout) == {0: [(2, 4)] * 6 + [(2, 0)], 1: [(2, 4)] * 6 + [(2, 0)]}
    r = torchrun(["train.py", *common, "--out_dir", ddp])
    assert r.returncode == 0, why(r)
    assert step_losses(r.stdout) == losses_one
    # the same weights within float reordering (two processes sum (g1 + g3) + (g2 + g4), one ((g1 + g2) + g3) + g4),
    # but for the attention's key bias: its gradient is zero but for rounding (a constant added to every key's score
    # leaves the softmax as it was), and AdamW divides rounding by its own size, so that bias moves by up to lr a
    # step, differently in every order of summation
    key_bias = lambda w: w["transformer.h.0.attn.c_attn.bias"][64:128]  # n_embd 64: q, k, v
    w = saved_weights(os.path.join(one, "ckpt.pt"))
    diffs = {}
    for name, d in (("FSDP", fsdp), ("DDP", ddp)):
        w2 = saved_weights(os.path.join(d, "ckpt.pt"))
        assert (key_bias(w) - key_bias(w2)).abs().max() < 6 * 2 * 1e-2  # 6 steps, lr 1e-2
        key_bias(w2).copy_(key_bias(w))
        diffs[name] = max_difference(w, w2)
    show(request, capsys, f"\n--grad_accum 4 on 2 processes vs one, max |weight difference| but the key bias: FSDP "
                          f"{diffs['FSDP']:.1e}, DDP {diffs['DDP']:.1e}")
    assert max(diffs.values()) < 1e-5


# -----------------------------------------------------------------------------
# Bad input: one line each, before any collective

def test_fsdp_bad_input(data_dir, tmp_path, capsys, monkeypatch):
    # without torchrun
    assert train.main(TINY + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "x"), "--fsdp"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fsdp shards the model over several processes" in err, err
    assert "torchrun --nproc_per_node N train.py" in err and not (tmp_path / "x").exists()
    # with --compile (checked as under torchrun)
    monkeypatch.setattr(parallel, "world", lambda: 2)
    with pytest.raises(ValueError, match=r"--fsdp with --compile is not supported yet.*drop --compile") as e:
        parallel.check_args(train.parse_args(TINY + ["--fsdp", "--compile"]))
    assert "\n" not in str(e.value)
    # a model without transformer blocks: refused before fully_shard (no process group needed to say so)
    gpt = GPT(GPTConfig(n_layer=0, n_head=2, n_embd=32, block_size=16, vocab_size=8))
    with pytest.raises(ValueError, match=r"--fsdp: the GPT has no transformer blocks .* run it with DDP") as e:
        parallel.shard(Coconut(gpt, 5, 6, 7, 0), torch.device("cpu"))
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# Stops under torchrun: every process agrees on the step, waits for rank 0's save, and the command resumes

STOPPED = re.compile(r"train.py: stopped at step (\d+); saved (\S+): continue with `([^`]+)`")


def stop_and_resume(common, out, hook, reference, **popen):
    """A 2-process run stopped by `hook` (TRAIN_TEST_SIGNALS) mid-epoch with a slow save (3 s in rank 0), then the
    command it printed: the saved step is the one it names, and the end is the reference run's, bit for bit."""
    r = torchrun(["train.py", *common, "--out_dir", out], env={SIGNAL_HOOK: hook, SAVE_DELAY_HOOK: "3"}, **popen)
    stopped = STOPPED.search(r.stdout)
    assert stopped, why(r)
    step = int(stopped.group(1))
    assert 3 <= step <= 5, r.stdout  # the step after the signal (or the next: torchrun passes it on a little later)
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == step  # that step, not an older one
    assert "interrupted at once" not in r.stdout + r.stderr
    argv = shlex.split(stopped.group(3))
    assert argv[:4] == ["torchrun", "--nproc_per_node", "2", "train.py"]
    r = torchrun(argv[argv.index("train.py"):])
    assert r.returncode == 0, why(r)
    assert f"step {step}" in r.stdout.split("resuming", 1)[1].splitlines()[0]
    for name in ("ckpt.pt", "best.pt"):
        assert_same_weights(saved_weights(os.path.join(reference, name)), saved_weights(os.path.join(out, name)))


@pytest.mark.multiprocess
@pytest.mark.parametrize("way", ["fsdp", "ddp"])
def test_a_signal_saves_on_every_rank_and_resumes(data_dir, tmp_path, way):
    # one epoch of 6 steps, a signal after step 2: the checkpoint holds step 2 and the printed command resumes
    # bit for bit
    common = RUN + ["--data_dir", str(data_dir), "--epochs", "1"] + (["--fsdp", "sharded"] if way == "fsdp" else [])
    reference = str(tmp_path / "reference")
    r = torchrun(["train.py", *common, "--out_dir", reference])
    assert r.returncode == 0, why(r)
    if way == "fsdp":
        # SIGTERM to each process alone (a scheduler's): before the barrier, rank 1 left while rank 0 still wrote,
        # torchrun took its exit for a failure and signalled rank 0, whose second signal cut the save short. The
        # signal through torchrun (TERM@parent) reaches each process in the same way; the DDP case below tests
        # torchrun's part of it, so the FSDP run is not launched twice more for it (the suite's time)
        stop_and_resume(common, str(tmp_path / "each"), "2:TERM", reference)
    else:
        stop_and_resume(common, str(tmp_path / "parent"), "2:TERM@parent", reference)
        # a terminal's Ctrl-C: SIGINT to every process and to torchrun, which passes it on (two signals at once)
        stop_and_resume(common, str(tmp_path / "group"), "2:INT@group", reference, start_new_session=True)
