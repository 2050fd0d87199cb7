"""
Exact resume for train.py: the checkpoint holds the weights, AdamW's state, every process's random states and
where the run stands (`state`); the epoch's examples and steps are rebuilt from (seed, epoch). A run stopped in
any way, even by SIGKILL, continues with `python train.py --out_dir <dir> --resume` and ends with the same
weights as an uninterrupted one (bit for bit on a CPU). Also: the commands that the stop messages repeat.
"""
import argparse
import json
import os
import random
import shlex

import torch

from machinery import parallel
from machinery.checkpoint import checkpoint_body, drop_unused_shards, read_checkpoint, save_atomic, shards_folder
from machinery.interrupt import saving, slow_save_for_tests
from machinery.progress import log, saved_line

# What a resumed run may change; a different value of anything else would make it another run. Also the split
# of a step into micro-batches, --batch_size with --grad_accum, when their product (the sequences per step) stays.
RESUMABLE = {"resume", "out_dir", "epochs", "device", "dtype", "compile", "threads", "save_every", "log_every",
             "eval_every", "max_val", "eval_batch_size", "overwrite", "fsdp"}
LAUNCH = {"argv": []}  # this run's command-line arguments (train.main sets them), for the messages that repeat it


class Diverged(RuntimeError):
    """A NaN or infinite loss (or weights): the run stops without saving over the last good checkpoint."""


def run_config(args):
    """-> (the run's settings, the checkpoint dict or None): the command line's for a new run, the checkpoint's for
    --resume (with the flags in RESUMABLE typed now). One-line errors: a folder that holds a run, no checkpoint,
    a flag that would make the resumed run another one."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume:
        if os.path.exists(ckpt_path) and not args.overwrite:
            raise ValueError(f"{args.out_dir} already holds a run ({ckpt_path}): continue it with "
                             f"`{resume_command(args.out_dir)}`, or start afresh with --overwrite or another --out_dir")
        return args, None
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
    ckpt = read_checkpoint(ckpt_path)
    cfg = {**vars(args), **ckpt["config"]}  # today's defaults only for options the run did not know
    split = {k for k in ("batch_size", "grad_accum") if k in args.typed}
    if split and None not in (args.batch_size, args.grad_accum) and \
            args.batch_size * args.grad_accum == cfg["batch_size"] * cfg["grad_accum"]:
        cfg.update({k: getattr(args, k) for k in ("batch_size", "grad_accum")})  # the same steps, split otherwise
        args.typed = [k for k in args.typed if k not in split]
    for k in args.typed:
        if k in RESUMABLE:
            cfg[k] = getattr(args, k)
        elif k in cfg and cfg[k] != getattr(args, k):
            raise ValueError(f"--{k} {getattr(args, k)} differs from the run's {cfg[k]} in {ckpt_path}: a resumed run "
                             f"keeps its settings (it may change {', '.join(sorted(RESUMABLE - {'resume', 'overwrite'}))})")
    # where the run is now and how it continues are today's, not the checkpoint's (a moved folder, a demo)
    cfg.update(resume=True, out_dir=args.out_dir, typed=args.typed, continue_with=getattr(args, "continue_with", None))
    return argparse.Namespace(**cfg), ckpt


def start_state(args, ckpt, model, optimizer, device):
    """Where the run stands: a new run's start, or the checkpoint's place (its optimizer and random states restored)."""
    state = dict(epoch=args.start_epoch, stage=0, epoch_step=0, epoch_complete=False, step=0, best_acc=-1.0, metrics=[],
                 epoch_loss=[0.0, 0], epoch_tokens=0)
    if parallel.rank() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    if ckpt is None:
        torch.manual_seed(args.seed + parallel.rank())  # dropout: a stream of its own in each process
        return state
    state.update({k: ckpt[k] for k in state if k in ckpt})
    if ckpt.get("shards"):  # --fsdp sharded: the weights and AdamW's state, each process its slices
        parallel.load_sharded(model, optimizer, shards_folder(ckpt, os.path.join(args.out_dir, "ckpt.pt")))
    elif ckpt.get("optimizer") is not None:
        parallel.load_optimizer(optimizer, ckpt["optimizer"])  # whole moments: under FSDP each keeps its slices
    rngs = ckpt.get("rng") or []
    if len(rngs) == parallel.world():
        set_rng_state(rngs[parallel.rank()], device)
    else:
        log(f"warning: the checkpoint holds the random states of {len(rngs)} processes, not {parallel.world()}: "
            f"dropout will not repeat the uninterrupted run")
    n = state["epoch_step"]
    where = "after it" if state["epoch_complete"] else f"{n} step{'' if n == 1 else 's'} into it"
    log(f"resuming {args.out_dir}: epoch {state['epoch'] + 1}, {where}; step {state['step']}")
    return state


def begins_epoch(state, epoch):
    """Does the loop start this epoch from its first step (rather than continue it half-way from a checkpoint)?"""
    return state["epoch"] != epoch or state["epoch_complete"] or state["epoch_step"] == 0


def save_checkpoint(model, optimizer, tok, args, state, device, path, saved, best=False):
    """ckpt.pt (and best.pt), after checking the weights are finite; metrics.jsonl. Every process calls it
    (the random states are gathered; under FSDP the weights and AdamW's moments too, into rank 0, so that
    the file is the same as one process's), and every process returns only once rank 0 has written it: no
    process exits (and makes torchrun signal the others) while the save is under way, and no signal cuts it
    short (interrupt.saving). Returns the step saved."""
    with saving():
        _save(model, optimizer, tok, args, state, device, path, saved, best)
        parallel.barrier()
    return state["step"]


def _save(model, optimizer, tok, args, state, device, path, saved, best):
    if not parallel.all_finite(model):
        raise Diverged(f"the weights are not finite after step {state['step']}; stopped without saving: "
                       f"{last_good(path, saved)}")
    rngs = parallel.gather(rng_state(device))
    shards = None
    if args.fsdp == "sharded" and parallel.is_sharded(model):  # each process writes its slices; ckpt.pt names them
        shards = f"shards-{state['step']}{'-epoch' if state['epoch_complete'] else ''}"
        parallel.save_sharded(model, optimizer, os.path.join(args.out_dir, shards))
    weights, adam = ({}, None) if shards else parallel.whole_state(model, optimizer, keep=parallel.rank() == 0)
    if parallel.rank() == 0:
        slow_save_for_tests()
        config = {k: v for k, v in vars(args).items() if k not in ("typed", "continue_with")}
        body = checkpoint_body(model, tok, config, weights=weights, **state, world_size=parallel.world(),
                               **({"shards": shards} if shards else {}))
        if best:
            save_atomic(body, os.path.join(args.out_dir, "best.pt"))  # no optimizer: what sample.py loads
        save_atomic(dict(body, optimizer=adam, rng=rngs), path)
        drop_unused_shards(args.out_dir)
        # metrics.jsonl is rewritten from the checkpoint's list: a resume never loses or repeats a line
        metrics = os.path.join(args.out_dir, "metrics.jsonl")
        with open(metrics + ".tmp", "w") as f:
            f.writelines(json.dumps(m) + "\n" for m in state["metrics"])
        os.replace(metrics + ".tmp", metrics)
        if saved is None and not args.resume:
            log(saved_line(path, state["step"], continue_with(args)))


# -----------------------------------------------------------------------------
# The commands that the stop messages give

def last_good(path, saved):
    return "no checkpoint was saved" if saved is None else f"{path} (step {saved}) is the last good checkpoint"


def left_intact(path, saved, args):
    """What a stop at once left: the last checkpoint (saves are atomic: never half written) and the way on."""
    if saved is None:
        return f"no checkpoint was saved yet: start again with `{launch_command()}`"
    return f"the last checkpoint, {path} (step {saved}), is intact: continue with `{continue_with(args)}`"


def continue_with(args):
    """The whole command that continues this run (the demo's own when the run is part of it)."""
    return getattr(args, "continue_with", None) or resume_command(args.out_dir)


def resume_command(out_dir):
    """The whole command that continues the run in out_dir (torchrun's with as many processes)."""
    return f"{launcher()} --out_dir {shlex.quote(out_dir)} --resume"


def launch_command():
    """The command this process was started with (train.main(argv) in a test: that argv)."""
    return " ".join([launcher()] + [shlex.quote(a) for a in LAUNCH["argv"]])


def launcher():
    world = parallel.world()
    return f"torchrun --nproc_per_node {world} train.py" if world > 1 else "python train.py"


# -----------------------------------------------------------------------------
# Random states: Python's (the curriculum's uniform_prob draws) and torch's (dropout), CUDA's on a GPU

def rng_state(device):
    s = dict(python=random.getstate(), torch=torch.get_rng_state())
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s, device):
    random.setstate(_tuples(s["python"]))
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def _tuples(x):  # random.setstate wants tuples all the way down (the checkpoint holds lists)
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
