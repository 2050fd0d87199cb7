"""
The CPU demo (`python train.py --demo`): Coconut, CoT and No-CoT of the same size, trained from scratch in turn
for the same number of optimizer steps on data/reach (graph search: two roots' chains of open roads, one of them
the start), then scored on its held-out test questions side by side. --demo --resume finishes whatever an
interrupted demo left. train.py hands its own `train` function in: nothing here imports a script.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import torch.distributed as dist

from curriculum import prompt
from machinery import parallel
from machinery.checkpoint import first_line, load_checkpoint
from machinery.evaluate import evaluate
from machinery.options import parse_args
from machinery.presets import DEMO_METHODS
from machinery.progress import fmt_time, log
from machinery.records import load_split, tokenize
from machinery.resume import LAUNCH, RESUMABLE, launcher

DEMO_FLAGS = "demo.json"  # in a demo's out_dir: the flags it was started with, for --demo --resume
NAMES = ("Coconut", "CoT", "No-CoT")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, train):
    """The three methods in turn (train(args) -> one metrics dict per epoch), their test accuracy in
    <out_dir>/summary.json, and the two tables."""
    t0 = time.time()
    save_flags(args)
    make_data(args)
    if parallel.world() > 1:
        dist.barrier()
    test = load_split(args.data_dir, args.dataset, "test")
    runs, summary = {}, {}
    for i, mode in enumerate(DEMO_METHODS):
        a = argparse.Namespace(**vars(args))
        a.mode, a.out_dir = mode, os.path.join(args.out_dir, mode)
        # the whole command again: the methods not started yet take their settings from it
        a.continue_with = f"{launcher()} " + shlex.join([x for x in LAUNCH["argv"] if x != "--resume"] + ["--resume"])
        a.resume = args.resume and os.path.exists(os.path.join(a.out_dir, "ckpt.pt"))  # else start it afresh
        a.overwrite = not a.resume
        if "reset_optimizer" not in args.typed:
            a.reset_optimizer = "never"  # from scratch a fresh AdamW every epoch only slows every method down
        log(f"=== {mode} ({i + 1} of {len(DEMO_METHODS)}) -> {a.out_dir}" + (" (resumed)" if a.resume else ""))
        runs[mode] = train(a)
        # as the paper: the checkpoint with the best validation accuracy; the last one beside it
        summary[mode] = test_accuracy(os.path.join(a.out_dir, "best.pt"), test)
        summary[mode]["last"] = test_accuracy(os.path.join(a.out_dir, "ckpt.pt"), test)
    if parallel.rank() == 0:
        with open(os.path.join(args.out_dir, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(args.out_dir, "summary.json.tmp"), os.path.join(args.out_dir, "summary.json"))
    log(f"\nvalidation accuracy by epoch (Coconut's thoughts at each; CoT and No-CoT after as many optimizer "
        f"steps), {fmt_time(time.time() - t0)} for this command")
    log(epoch_table([runs[m] for m in DEMO_METHODS], NAMES,
                    lambda stage: min(stage, args.max_latent_stage) * args.c_thought))
    log(f"\n{len(test)} held-out test questions ({os.path.join(args.out_dir, 'summary.json')}): best.pt, the best "
        f"validation accuracy (the paper's choice), and the last checkpoint; tokens/question: what each writes "
        f"after the question, its thoughts counted as tokens")
    log(f"{'method':>8} {'accuracy':>9} {'tokens/question':>16} {'epoch':>6} {'last':>9} {'epoch':>6}")
    for mode, name in zip(DEMO_METHODS, NAMES):
        s, last = summary[mode], summary[mode]["last"]
        log(f"{name:>8} {100 * s['accuracy']:8.2f}% {s['tokens_per_question']:16.1f} {s['epoch']:6d} "
            f"{100 * last['accuracy']:8.2f}% {last['epoch']:6d}")


def save_flags(args):
    """
    A new demo refuses a folder that holds one (as a run does), and writes the flags it was started with to
    <out_dir>/demo.json: --demo --resume takes them back (resumed_args), so that the methods it has not
    started yet get the demo's --seed and sizes, whatever the resuming command leaves out.
    """
    path = os.path.join(args.out_dir, DEMO_FLAGS)
    if args.resume:
        return
    held = [p for p in [path] + [os.path.join(args.out_dir, m, "ckpt.pt") for m in DEMO_METHODS] if os.path.exists(p)]
    if held and not args.overwrite:
        done = os.path.exists(os.path.join(args.out_dir, "summary.json"))
        raise ValueError(f"{args.out_dir} already holds a {'finished ' if done else ''}demo ({held[0]}): "
                         f"{'print its tables again' if done else 'finish it'} with `{launcher()} --demo --out_dir "
                         f"{shlex.quote(args.out_dir)} --resume`, or start afresh with --overwrite or another "
                         f"--out_dir")
    if parallel.world() > 1:
        dist.barrier()  # every process has looked before rank 0 writes
    if parallel.rank() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"argv": typed_flags(args)}, f)
        os.replace(path + ".tmp", path)


def resumed_args(args):
    """
    --demo --resume: the settings that finish the demo in args.out_dir, its flags from demo.json and then those
    typed now (a flag typed now with another value than the demo's is one line, but for those a resumed run may
    change). Sets LAUNCH["argv"] to the whole command, each flag once, for the messages.
    """
    path = os.path.join(args.out_dir, DEMO_FLAGS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: {args.out_dir} holds no demo to finish ({path} does not exist): start "
                                f"one with `{launcher()} --demo --out_dir {shlex.quote(args.out_dir)}`")
    try:
        with open(path) as f:
            saved = json.load(f)["argv"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a demo's flags ({first_line(e)})") from None
    before = parse_args(["--demo"] + saved)
    for k in args.typed:  # typed now against the demo's value, typed then or its default
        if k not in RESUMABLE and k != "demo" and getattr(before, k) != getattr(args, k):
            another = (f"; another world goes in a folder of its own: `{launcher()} --demo --seed {args.seed} "
                       f"--out_dir out-demo-{args.seed}`" if k == "seed" else "")
            raise ValueError(f"--{k} {getattr(args, k)} differs from the demo's {getattr(before, k)} in {path}: a "
                             f"resumed demo keeps its settings{another}")
    args = parse_args(["--demo"] + saved + typed_flags(args, skip=("demo",)))
    LAUNCH["argv"] = ["--demo"] + typed_flags(args, skip=("demo",))
    return args


def typed_flags(args, skip=("demo", "resume", "overwrite", "out_dir")):
    """The flags typed on the command line (args.typed), written out again: ["--seed", "1", ...]."""
    flags = []
    for k in args.typed:
        v = getattr(args, k)
        if k not in skip:
            flags += ([f"--{k}"] if v else []) if isinstance(v, bool) else [f"--{k}", str(v)]
    return flags


def make_data(args):
    """
    The demo's data is its own, made afresh in <out_dir>/data unless the demo resumes: a data/reach left by an
    older prepare.py would change the table without a word. Its world and questions come from --seed (0: the
    same every time; 1, 2: other worlds, the models seeded alike). With --data_dir typed, that folder's data,
    made only when it has none. Sets args.data_dir.
    """
    own = "data_dir" not in args.typed
    if own:
        args.data_dir = os.path.join(args.out_dir, "data")
    data = os.path.join(args.data_dir, args.dataset)
    made = os.path.isfile(os.path.join(data, "test.json"))  # the last file prepare.py writes
    if parallel.rank() == 0 and (not made or (own and not args.resume)):
        script = os.path.join(ROOT, "data", args.dataset, "prepare.py")
        log(f"making the demo's data: python data/{args.dataset}/prepare.py --out_dir {data} --seed {args.seed}")
        subprocess.run([sys.executable, script, "--out_dir", data, "--seed", str(args.seed)], check=True)


def test_accuracy(ckpt_path, records):
    """A checkpoint of a run on held-out records, prompted as its validation was: -> {"accuracy": fraction
    correct, "tokens_per_question": thoughts + generated tokens, "n": questions, "correct", "epoch" (from 1)}."""
    model, tok, ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    prompts = [prompt(tokenize(r, tok), cfg, int(ckpt["stage"]), tok) for r in records]
    r = evaluate(model, tok, prompts, [x["answer"] for x in records], cfg["max_new_tokens"], cfg["eval_batch_size"])
    return {"accuracy": r["acc"], "tokens_per_question": round(r["mean_thoughts"] + r["mean_new_tokens"], 2),
            "n": r["total"], "correct": r["correct"], "epoch": int(ckpt["epoch"]) + 1}


def epoch_table(runs, names, thoughts):
    """The demo's validation accuracy, epoch by epoch: the runs side by side (the first one's epochs), and the
    continuous thoughts of the first at each (thoughts(stage))."""
    rows = [f"{'epoch':>5} {'steps':>6} {'thoughts':>8}" + "".join(f" {n:>9}" for n in names)]
    by_epoch = [{m["epoch"]: m for m in run} for run in runs]
    for m in runs[0]:
        row = f"{m['epoch']:>5} {m['step']:>6} {thoughts(m['stage']):>8}"
        for run in by_epoch:
            o = run.get(m["epoch"], {})
            row += f" {100 * o['val_acc']:8.2f}%" if "val_acc" in o else f" {'-':>9}"
        rows.append(row)
    return "\n".join(rows)
