"""
Train Coconut (or one of the paper's baselines) through the stage curriculum, in the spirit of nanoGPT's train.py.

    python train.py --dataset prosqa --stage_epochs 5                        # the paper's ProsQA run (GPU)
    python train.py --dataset prosqa_graph                                   # "Reasoning by Superposition" (GPU)
    python train.py --dataset gsm8k --mode cot --out_dir out-gsm-cot
    python train.py --dataset gsm8k --init_from out-gsm-cot/best.pt --start_epoch 3   # GSM8k Coconut
    python train.py --out_dir out-prosqa-coconut --resume                    # continue a stopped run
    torchrun --nproc_per_node 4 train.py --dataset prosqa                    # several GPUs (DDP)
    torchrun --nproc_per_node 8 train.py --init_from meta-llama/Llama-3.1-8B --fsdp ...  # sharded (FSDP2)
    python train.py --demo                                                   # the CPU demo, minutes

Every epoch: train at that epoch's stage (its examples rebuilt and reshuffled from (seed, epoch) alone,
as the official code rebuilds them every epoch), then the validation loss, the validation accuracy by
greedy generation, <out_dir>/ckpt.pt, best.pt when the accuracy improves, and one line per epoch in
<out_dir>/metrics.jsonl. Ctrl-C or SIGTERM saves and stops; a run stopped in any way, even by SIGKILL,
continues with --resume and ends with the same weights as an uninterrupted one (bit for bit on a CPU).
"""
import argparse
import contextlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from machinery import parallel
from machinery.checkpoint import (LATENT_MODES, checkpoint_body, drop_unused_shards, first_line, gpt_from_checkpoint, init_model,
                        load_checkpoint, read_checkpoint, resolve_device, save_atomic, shards_folder,
                        tokenizer_from_checkpoint)
from coconut import Coconut
from curriculum import build_examples, collate, make_question, prompt, spreads, stage_for_epoch
from machinery.evaluate import evaluate, summarize_outputs
from machinery.icot import icot_epoch
from machinery.interrupt import STOP, install_signal_handlers, restore_signal_handlers, send_test_signal
from machinery.options import build_parser, check_args
from machinery.presets import DEMO, DEMO_METHODS, MAX_SCRATCH_BATCH, MIN_STEPS_PER_EPOCH
from machinery.records import graph_question, load_split, tokenize

SLOW_RUN_HOURS = 2  # a CPU run estimated longer than this after its first step is told about the demo
SHARDED_CHECKPOINTS_ABOVE = 3e9  # parameters: above, --fsdp whole is told about --fsdp sharded

FEEDBACK_MODES = ("coconut", "no_curriculum", "frontier")  # the modes that feed hidden states back as thoughts

# What a resumed run may change; a different value of anything else would make it another run.
RESUMABLE = {"resume", "out_dir", "epochs", "device", "dtype", "compile", "threads", "save_every", "log_every",
             "eval_every", "max_val", "eval_batch_size", "overwrite", "fsdp"}

RANK, LOCAL_RANK, WORLD = 0, 0, 1  # set by setup_distributed()
LAUNCH = {"argv": []}              # this run's command-line arguments, for the messages that repeat the command
DEMO_FLAGS = "demo.json"           # in a demo's out_dir: the flags it was started with, for --demo --resume


class Diverged(RuntimeError):
    """A NaN or infinite loss (or weights): the run stops without saving over the last good checkpoint."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the state is saved, the run stops."""


def log(*a, **k):
    if RANK == 0:
        print(*a, **k, flush=True)


# -----------------------------------------------------------------------------
# The curriculum

def train(args):
    """One run; returns its metrics (one dict per epoch)."""
    args, ckpt = settle_config(args)
    check_parallel(args)
    device, autocast = setup_device(args)
    train_records = load_split(args.data_dir, args.dataset, "train")
    val_records = load_split(args.data_dir, args.dataset, "valid")[:args.max_val or None]
    settle_from_data(args, train_records)
    model, tok = make_model(args, ckpt, train_records, device)
    step_model = parallel.wrap(model, device, args.fsdp, bf16=autocast is not None)  # DDP, FSDP, or the model
    optimizer = make_optimizer(model, args)
    state = start_state(args, ckpt, model, optimizer, device)
    train_tok = [tokenize(r, tok) for r in train_records]
    val_tok = [tokenize(r, tok) for r in val_records]
    if args.max_new_tokens is None:  # a user's data set: what its longest target needs, and some room
        args.max_new_tokens = min(longest_target(train_tok + val_tok) * 5 // 4 + 4, model.gpt.config.block_size)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    saved = ckpt["step"] if ckpt else None  # the step of the last good checkpoint, for error messages
    per_epoch = len(plan_steps(len(train_records), 0, args))
    log(f"{args.mode} on {args.dataset}: {len(train_records)} train / {len(val_records)} valid records; "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {args.batch_size} x {args.grad_accum} "
        f"sequences per step; {WORLD} process(es){' sharded (FSDP)' if parallel.is_sharded(model) else ''} on "
        f"{device}, {'bfloat16' if autocast else 'float32'}")
    n_epochs = args.epochs - args.start_epoch
    log(f"{per_epoch} optimizer steps per epoch, {per_epoch * n_epochs} in the whole run ({n_epochs} epoch"
        f"{'' if n_epochs == 1 else 's'}); validation writes up to {args.max_new_tokens} tokens per question")
    log(f"{ckpt_path} is saved after every epoch{f' and every {args.save_every} steps' if args.save_every else ''}; "
        f"a run stopped in any way, even killed, continues with `{continue_with(args)}`")
    for note in run_notes(args, train_records, per_epoch, model):
        log(f"note: {note}")
    noted, first_step = False, state["step"]

    handlers = install_signal_handlers()
    try:
        for epoch in range(state["epoch"] + state["epoch_complete"], args.epochs):
            examples, steps, stage, resets = epoch_examples(train_records, train_tok, tok, epoch, args,
                                                            model.gpt.config.block_size)
            if state["epoch"] != epoch or state["epoch_complete"] or state["epoch_step"] == 0:  # not resumed half-way
                state.update(epoch=epoch, stage=stage, epoch_step=0, epoch_complete=False, epoch_loss=[0.0, 0],
                             epoch_tokens=0)
                if resets_optimizer(epoch, args):
                    optimizer = make_optimizer(model, args)
            model.train()
            meter = Meter(state["epoch_step"])
            for k in range(state["epoch_step"], len(steps)):
                if k in resets:  # iCoT: a fresh AdamW whenever more of the chain is removed
                    optimizer = make_optimizer(model, args)
                batches = [[examples[i] for i in mb] for mb in steps[k][RANK::WORLD]]  # this process's share
                loss, n_tokens, stop = train_step(step_model, batches, args, tok, device, autocast)
                if not math.isfinite(loss):
                    raise Diverged(f"loss is {loss} at step {state['step'] + 1} (epoch {epoch + 1}, stage {stage}, "
                                   f"batch {k + 1}/{len(steps)}); stopped without saving: {last_good(ckpt_path, saved)}")
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], per_epoch * n_epochs, args)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if WORLD > 1 and state["step"] == first_step + 1:  # after the first step AdamW's moments exist
                    log(held_line(model, optimizer))
                state.update(step=state["step"] + 1, epoch_step=k + 1, epoch_tokens=state["epoch_tokens"] + n_tokens,
                             epoch_loss=[state["epoch_loss"][0] + loss, state["epoch_loss"][1] + 1])
                run_eta = meter.progress(state, loss, n_tokens, len(steps), args)
                if run_eta is not None and not noted:  # the first progress line: right after the first step
                    noted, note = True, slow_run_note(run_eta, device)
                    if note:
                        log(note)
                if stop or (args.save_every and state["step"] % args.save_every == 0):
                    saved = save_checkpoint(model, optimizer, tok, args, state, device, ckpt_path, saved)
                if stop:
                    raise Interrupted(f"stopped at step {state['step']}; saved {ckpt_path}: continue with "
                                      f"`{continue_with(args)}`")
                send_test_signal(state["step"])
            m, improved = validate(model, tok, val_tok, val_records, epoch, stage, args, device, autocast, state,
                                   meter.seconds())
            state.update(epoch_complete=True, metrics=state["metrics"] + [m])
            saved = save_checkpoint(model, optimizer, tok, args, state, device, ckpt_path, saved, best=improved)
            if STOP["requested"]:
                raise Interrupted(f"stopped after epoch {epoch + 1}; saved {ckpt_path}: continue with "
                                  f"`{continue_with(args)}`")
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, wherever it fell; a save is atomic
        raise Interrupted(f"interrupted at once; {intact(ckpt_path, saved, args)}") from None
    finally:
        restore_signal_handlers(handlers)
    log(stage_table(state["metrics"]))
    return state["metrics"]


def continue_with(args):
    """The whole command that continues this run (the demo's own when the run is part of it)."""
    return getattr(args, "continue_with", None) or resume_command(args.out_dir)


def train_step(step_model, micro_batches, args, tok, device, autocast):
    """
    Forward and backward over this process's micro-batches of one optimizer step -> (the step's loss,
    its real tokens, was a stop requested?), the same in every process. The step's gradient is the mean
    of the micro-batch losses' gradients, over all processes.
    """
    loss_sum, n_tokens = 0.0, 0
    with parallel.gathered(step_model):  # FSDP: the weights gathered once for every micro-batch and thought pass
        for j, examples in enumerate(micro_batches):
            b = to_device(collate(examples, pad_id=tok.pad_id, latent_id=tok.latent_id), device)
            # DDP averages the gradients over processes at the micro-batch that ends the step, not before
            with parallel.no_sync(step_model, last=j == len(micro_batches) - 1):
                with autocast or contextlib.nullcontext():  # one call per micro-batch, its thoughts' passes inside
                    loss, _ = step_model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"],
                                         label_sets=b.get("label_sets"), spread=spreads(args.thought_labels))
                (loss * (WORLD / args.grad_accum)).backward()  # DDP and FSDP divide by WORLD
            loss_sum += loss.item() / args.grad_accum
            n_tokens += int(b["attention_mask"].sum())
    totals = torch.tensor([loss_sum, n_tokens, float(STOP["requested"])], dtype=torch.float64)
    if WORLD > 1:
        dist.all_reduce(totals)  # every process sees the same loss and the same stop request
    return totals[0].item(), int(totals[1].item()), totals[2].item() > 0


def validate(model, tok, tokenized, records, epoch, stage, args, device, autocast, state, train_seconds):
    """The epoch's line of metrics.jsonl: validation loss at its stage and, when due, accuracy by generation."""
    t0 = time.time()
    examples = build_examples(tokenized, stage, args.mode, args.c_thought, args.max_latent_stage,
                              bool(args.pad_latent_to_max), 0.0, None, tok, model.gpt.config.block_size, args.skip_long,
                              bool(args.markers), args.thought_labels)
    next_stage = stage_for_epoch(epoch + 1, args.stage_epochs, args.mode, args.max_latent_stage)
    improved = False
    # FSDP: the weights gathered once for all of it (processes generate for different numbers of passes)
    with parallel.gathered(model):
        m = dict(epoch=epoch + 1, stage=stage, step=state["step"],
                 train_loss=state["epoch_loss"][0] / max(state["epoch_loss"][1], 1),
                 val_loss=validation_loss(model, examples, args, tok, device, autocast))
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or next_stage != stage:
            r = validation_accuracy(model, tok, tokenized, [r["answer"] for r in records], stage, args, autocast)
            m.update(val_acc=r["acc"], val_correct=r["correct"], val_total=r["total"],
                     mean_new_tokens=r["mean_new_tokens"], mean_thoughts=r["mean_thoughts"])
            improved = r["acc"] > state["best_acc"]
            state["best_acc"] = max(state["best_acc"], r["acc"])
    m.update(train_seconds=round(train_seconds, 2), epoch_seconds=round(train_seconds + time.time() - t0, 2),
             tokens_per_second=round(state["epoch_tokens"] / max(train_seconds, 1e-9)))
    acc = (f"val acc {100 * m['val_acc']:.2f}% ({m['val_correct']}/{m['val_total']}), "
           f"{m['mean_thoughts'] + m['mean_new_tokens']:.1f} tokens/q" if "val_acc" in m else "val acc -")
    log(f"epoch {epoch + 1} (stage {stage}): train loss {m['train_loss']:.4f} | val loss {m['val_loss']:.4f} | "
        f"{acc}{' | best' if improved else ''} | {fmt_time(m['epoch_seconds'])}")
    return m, improved


@torch.no_grad()
def validation_loss(model, examples, args, tok, device, autocast):
    """Mean over batches of the batch loss (the official eval loss), batches shared out between processes."""
    model.eval()
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    mine = {}
    for i in range(RANK, len(batches), WORLD):
        b = to_device(collate(batches[i], pad_id=tok.pad_id, latent_id=tok.latent_id), device)
        with autocast or contextlib.nullcontext():
            loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"],
                            label_sets=b.get("label_sets"), spread=spreads(args.thought_labels))
        mine[i] = loss.item()
    losses = {i: x for part in parallel.gather(mine) for i, x in part.items()}
    model.train()
    return sum(losses[i] for i in range(len(batches))) / len(batches)  # in batch order: the same sum anywhere


def validation_accuracy(model, tok, tokenized, answers, stage, args, autocast):
    """Greedy answers to the stage's prompts (this process's share), scored by the official rule."""
    prompts = [make_question(t, stage, args.mode, args.c_thought, args.max_latent_stage,
                             bool(args.pad_latent_to_max), tok, bool(args.markers)) for t in tokenized]
    idx = list(range(RANK, len(prompts), WORLD))
    t0, last = time.time(), [time.time()]

    def progress(done, total):  # generation can take minutes: say so
        if time.time() - last[0] >= args.log_every and done < total:
            log(f"validation: {done * WORLD}/{len(prompts)} questions, {fmt_time(time.time() - t0)}")
            last[0] = time.time()

    with autocast or contextlib.nullcontext():
        r = evaluate(model, tok, [prompts[i] for i in idx], [answers[i] for i in idx], args.max_new_tokens,
                     args.eval_batch_size, progress)
    parts = parallel.gather((idx, r["outputs"], r["seconds_per_question"] * r["total"]))
    outputs = [None] * len(prompts)
    for ids, outs, _ in parts:
        for i, o in zip(ids, outs):
            outputs[i] = o
    return summarize_outputs(outputs, max(p[2] for p in parts))


# -----------------------------------------------------------------------------
# Data: each epoch's examples and its optimizer steps, from (seed, epoch) alone, so a resumed run rebuilds them

def epoch_examples(records, tokenized, tok, epoch, args, block_size):
    """
    -> (the epoch's training sequences, its optimizer steps (plan_steps), its stage, the steps before
    which iCoT resets the optimizer). The rng draws the uniform_prob stages record by record, as the
    official code does, after (with shuffle_graph) reshuffling each graph question's edges and options.
    """
    if args.mode == "icot":  # the count of removed chain tokens follows the step: plan the steps first
        steps = plan_steps(len(tokenized), epoch, args)
        examples, stage, resets = icot_epoch(tokenized, steps, epoch, args.epochs, args.remove_per_epoch,
                                             args.removal_smoothing_lambda, args.remove_all_when_remove_beyond,
                                             args.seed, block_size)
        return examples, steps, stage, resets
    stage = stage_for_epoch(epoch, args.stage_epochs, args.mode, args.max_latent_stage)
    rng = random.Random(f"{args.seed}/{epoch}")
    if args.shuffle_graph:
        tokenized = [t._replace(question=tok.encode(graph_question(r, rng) + "\n")) for r, t in zip(records, tokenized)]
    examples = build_examples(tokenized, stage, args.mode, args.c_thought, args.max_latent_stage,
                              bool(args.pad_latent_to_max), args.uniform_prob, rng, tok, block_size, args.skip_long,
                              bool(args.markers), args.thought_labels)
    return examples, plan_steps(len(examples), epoch, args), stage, set()


def plan_steps(n, epoch, args):
    """
    The epoch's optimizer steps, each a list of grad_accum micro-batches (lists of example indices):
    a permutation seeded by (seed, epoch), cut into global batches of batch_size * grad_accum. A short
    last batch is split evenly into grad_accum micro-batches (dropped if it has fewer sequences than that).
    Process r of W takes micro-batches r, r+W, ...: the same steps, whatever the number of processes.
    """
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    G = args.grad_accum
    steps = []
    for s in range(0, n, args.batch_size * G):
        chunk = perm[s:s + args.batch_size * G]
        if len(chunk) < G:
            break
        steps.append([chunk[j * len(chunk) // G:(j + 1) * len(chunk) // G] for j in range(G)])
    if not steps:
        raise ValueError(f"{n} training examples cannot fill the {G} micro-batches of a step")
    return steps


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# The model, its optimizer, the device

def make_model(args, ckpt, train_records, device):
    """The Coconut model (its GPT from --init_from, or from the checkpoint being resumed) and its tokenizer."""
    torch.manual_seed(args.seed)  # the weights of a new model
    if ckpt is None:
        gpt, tok = init_model(args, train_records)
        args.dropout = gpt.config.dropout  # recorded resolved: 0.1 from released weights, 0 from scratch
    else:
        path = os.path.join(args.out_dir, "ckpt.pt")
        gpt, tok = gpt_from_checkpoint(ckpt, path), tokenizer_from_checkpoint(ckpt, path)
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id, feedback=args.mode in FEEDBACK_MODES)
    if args.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=True)
    if args.fsdp and WORLD > 1:
        return model, tok  # fully_shard moves each process's slices to the device, never the whole model
    return model.to(device), tok


def make_optimizer(model, args):
    # AdamW over every parameter with the same weight decay, as the official code does.
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def lr_at(step, total_steps, args):
    """The learning rate of optimizer step `step` (from 0): --lr throughout, as the paper trains; with --decay_lr,
    a cosine from --lr down to --lr / 10 over the run's total_steps (nanoGPT's schedule, without its warmup)."""
    if not args.decay_lr:
        return args.lr
    t = min(step / max(total_steps, 1), 1.0)
    return args.lr / 10 + 0.5 * (1 + math.cos(math.pi * t)) * (args.lr - args.lr / 10)


def resets_optimizer(epoch, args):
    """Does this epoch start with a fresh AdamW state? (A new run's first epoch has one anyway.)"""
    if args.reset_optimizer == "epoch":
        return True  # official: reset_optimizer True re-creates the optimizer at every epoch
    if args.reset_optimizer == "stage":
        stage = lambda e: stage_for_epoch(e, args.stage_epochs, args.mode, args.max_latent_stage)
        return epoch == 0 or stage(epoch - 1) != stage(epoch)
    return False


def setup_device(args):
    """-> (device, a bf16 autocast context or None: --dtype float32 by default, as the paper trained)."""
    device = resolve_device(args.device, LOCAL_RANK if WORLD > 1 else 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif WORLD > 1 and device.type == "cpu":  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", WORLD))))
    if args.grad_accum % WORLD:
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {WORLD} processes")
    bf16 = args.dtype == "bfloat16"
    return device, (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else None)


def slow_run_note(run_seconds, device):
    """
    After the first step, from the run's estimated time on this device: a CPU run of many hours (the
    paper's GPT-2 runs, the superposition recipe) is a GPU recipe; say so rather than let it look stuck.
    """
    if device.type == "cpu" and run_seconds > SLOW_RUN_HOURS * 3600:
        return (f"note: at this speed the run takes about {fmt_time(run_seconds)} on this CPU: this is a GPU "
                f"recipe. The CPU demo is `python train.py --demo` (minutes).")
    return None


def run_notes(args, records, per_epoch, model=None):
    """What the first lines should warn about: too few steps to learn, stages with no step left to replace,
    whole checkpoints of a sharded model that big."""
    notes = []
    n = sum(p.numel() for p in model.parameters()) if model is not None else 0
    if args.fsdp == "whole" and parallel.is_sharded(model) and n > SHARDED_CHECKPOINTS_ABOVE:
        notes.append(f"every save gathers the whole weights and AdamW's state of these {n / 1e9:.1f}B parameters "
                     f"into rank 0's CPU memory ({fmt_bytes(12 * n)}): --fsdp sharded has each process write its own")
    total = per_epoch * (args.epochs - args.start_epoch)
    if args.init_from == "scratch" and total < 500:
        notes.append(f"{total} optimizer steps may be too few for a model from scratch (the demo takes 2,000): "
                     f"a smaller --batch_size or more --epochs gives more")
    longest = max((len(r["steps"]) for r in records), default=0)
    if args.mode in LATENT_MODES and args.max_latent_stage > longest:
        # the official curriculum: stage k feeds k*c thoughts even to a record of fewer steps
        notes.append(f"--max_latent_stage {args.max_latent_stage} is past the records' longest chain ({longest} "
                     f"steps): stages {longest + 1}-{args.max_latent_stage} replace no more steps but still add "
                     f"thoughts, up to {args.max_latent_stage * args.c_thought} per question; --max_latent_stage "
                     f"{longest} matches the data")
    return notes


def settle_from_data(args, records):
    """The defaults that depend on the data (a user's data set from scratch): the batch (see SCRATCH)."""
    if args.batch_size is None:
        args.batch_size = max(1, min(MAX_SCRATCH_BATCH, len(records) // (MIN_STEPS_PER_EPOCH * args.grad_accum)))


def longest_target(tokenized):
    """The most tokens a record's chain and answer take (what CoT at stage 0 writes after the question)."""
    return max((sum(map(len, t.steps)) + len(t.answer) for t in tokenized), default=1)


# -----------------------------------------------------------------------------
# Progress lines

class Meter:
    """Times an epoch's steps for the progress lines: tokens/s, and the ETA of the epoch and of the run."""

    def __init__(self, first_step):
        self.t0 = self.t_log = time.time()
        self.first, self.tokens = first_step, 0

    def seconds(self):
        return time.time() - self.t0

    def progress(self, state, loss, n_tokens, n_steps, args):
        """Logs a progress line when due (the epoch's first and last step, then every log_every seconds);
        returns the run's ETA in seconds when it did, else None."""
        self.tokens += n_tokens
        now, k = time.time(), state["epoch_step"]
        if now - self.t_log < args.log_every and k != self.first + 1 and k != n_steps:
            return None
        per_step = (now - self.t0) / (k - self.first)
        val = [m["epoch_seconds"] - m["train_seconds"] for m in state["metrics"]][-1:] or [0.0]
        epoch_eta = per_step * (n_steps - k)
        run_eta = epoch_eta + (args.epochs - state["epoch"] - 1) * (per_step * n_steps + val[0]) + val[0]
        log(f"stage {state['stage']} | epoch {state['epoch'] + 1}/{args.epochs} | step {k}/{n_steps} ({state['step']}) | "
            f"loss {loss:.4f} | {self.tokens / max(now - self.t_log, 1e-9):,.0f} tok/s | "
            f"ETA epoch {fmt_time(epoch_eta)}, run {fmt_time(run_eta)}")
        self.t_log, self.tokens = now, 0
        return run_eta


def fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def stage_table(metrics):
    """Validation accuracy at the last evaluated epoch of each stage."""
    rows = [f"{'stage':>5} {'epochs':>7} {'steps':>6} {'accuracy':>9}"]
    for stage in sorted({m["stage"] for m in metrics}):
        ms = [m for m in metrics if m["stage"] == stage and "val_acc" in m]
        if ms:
            epochs = f"{min(x['epoch'] for x in metrics if x['stage'] == stage)}-{ms[-1]['epoch']}"
            rows.append(f"{stage:>5} {epochs:>7} {ms[-1]['step']:>6} {100 * ms[-1]['val_acc']:8.2f}%")
    return "\n".join(rows)


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


# -----------------------------------------------------------------------------
# Exact resume: the checkpoint holds the weights, AdamW's state, every process's random states and where
# the run stands (state); the epoch's examples and steps are rebuilt from (seed, epoch).

def settle_config(args):
    """The run's settings: the command line's for a new run, the checkpoint's for --resume."""
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
    if RANK == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    if ckpt is None:
        torch.manual_seed(args.seed + RANK)  # dropout: a stream of its own in each process
        return state
    state.update({k: ckpt[k] for k in state if k in ckpt})
    if ckpt.get("shards"):  # --fsdp sharded: the weights and AdamW's state, each process its slices
        parallel.load_sharded(model, optimizer, shards_folder(ckpt, os.path.join(args.out_dir, "ckpt.pt")))
    elif ckpt.get("optimizer") is not None:
        parallel.load_optimizer(optimizer, ckpt["optimizer"])  # whole moments: under FSDP each keeps its slices
    rngs = ckpt.get("rng") or []
    if len(rngs) == WORLD:
        set_rng_state(rngs[RANK], device)
    else:
        log(f"warning: the checkpoint holds the random states of {len(rngs)} processes, not {WORLD}: "
            f"dropout will not repeat the uninterrupted run")
    n = state["epoch_step"]
    where = "after it" if state["epoch_complete"] else f"{n} step{'' if n == 1 else 's'} into it"
    log(f"resuming {args.out_dir}: epoch {state['epoch'] + 1}, {where}; step {state['step']}")
    return state


def save_checkpoint(model, optimizer, tok, args, state, device, path, saved, best=False):
    """ckpt.pt (and best.pt), after checking the weights are finite; metrics.jsonl. Every process calls it
    (the random states are gathered; under FSDP the weights and AdamW's moments too, into rank 0, so that
    the file is the same as one process's). Returns the step saved."""
    if not parallel.all_finite(model):
        raise Diverged(f"the weights are not finite after step {state['step']}; stopped without saving: "
                       f"{last_good(path, saved)}")
    rngs = parallel.gather(rng_state(device))
    shards = None
    if args.fsdp == "sharded" and parallel.is_sharded(model):  # each process writes its slices; ckpt.pt names them
        shards = f"shards-{state['step']}{'-epoch' if state['epoch_complete'] else ''}"
        parallel.save_sharded(model, optimizer, os.path.join(args.out_dir, shards))
    weights, adam = ({}, None) if shards else parallel.whole_state(model, optimizer, keep=RANK == 0)
    if RANK == 0:
        config = {k: v for k, v in vars(args).items() if k not in ("typed", "continue_with")}
        body = checkpoint_body(model, tok, config, weights=weights, **state, world_size=WORLD,
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
    return state["step"]


def last_good(path, saved):
    return "no checkpoint was saved" if saved is None else f"{path} (step {saved}) is the last good checkpoint"


def intact(path, saved, args):
    """What a stop at once left: the last checkpoint (saves are atomic: never half written) and the way on."""
    if saved is None:
        return f"no checkpoint was saved yet: start again with `{launch_command()}`"
    return f"the last checkpoint, {path} (step {saved}), is intact: continue with `{continue_with(args)}`"


def resume_command(out_dir):
    """The whole command that continues the run in out_dir (torchrun's with as many processes)."""
    return f"{launcher()} --out_dir {shlex.quote(out_dir)} --resume"


def launch_command():
    """The command this process was started with (train.main(argv) in a test: that argv)."""
    return " ".join([launcher()] + [shlex.quote(a) for a in LAUNCH["argv"]])


def launcher():
    return f"torchrun --nproc_per_node {WORLD} train.py" if WORLD > 1 else "python train.py"


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


def _tuples(x):  # random.setstate wants tuples all the way down
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# -----------------------------------------------------------------------------
# Several processes (torchrun): DDP by default, FSDP with --fsdp (parallel.py); gloo on CPU, nccl on CUDA

def setup_distributed():
    global RANK, LOCAL_RANK, WORLD
    RANK, LOCAL_RANK, WORLD = parallel.setup()


def check_parallel(args):
    """--fsdp needs several processes, and runs eagerly: one line each (a resumed FSDP run may go on in one)."""
    if args.fsdp and WORLD == 1 and "fsdp" in args.typed:
        raise ValueError("--fsdp shards the model over several processes: start it with `torchrun "
                         "--nproc_per_node N train.py ... --fsdp` (one process holds the whole model anyway)")
    if args.fsdp and args.compile and WORLD > 1:
        raise ValueError("--fsdp with --compile is not supported yet (the sharded step is tested eagerly only): "
                         "drop --compile, or train with DDP (without --fsdp)")


def held_line(model, optimizer):
    """What each process holds of the weights and AdamW's state, measured (every process calls it)."""
    held = parallel.gather(parallel.held_bytes(model, optimizer))
    how = "slices (FSDP)" if parallel.is_sharded(model) else "whole copies (DDP)"
    return (f"weights and AdamW state held per process: {', '.join(fmt_bytes(h) for h, _ in held)} "
            f"({how}; {fmt_bytes(held[0][1])} in all)")


def fmt_bytes(b):
    return f"{b / 2**30:.3g} GiB" if b >= 2**30 else f"{b / 2**20:.3g} MiB"


# -----------------------------------------------------------------------------
# Command line: the flags are in options.py, the per-data-set defaults in presets.py

def parse_args(argv=None):
    p = build_parser(__doc__)
    args = p.parse_args(argv)
    # argparse cannot tell a typed value from a default: parse again with every default suppressed.
    q = build_parser(__doc__)
    for a in q._actions:
        a.default = argparse.SUPPRESS
    args.typed = sorted(vars(q.parse_args(argv)))
    if args.demo:
        if "mode" in args.typed:
            p.error("--demo trains coconut, cot and nocot in turn: drop --mode")
        for k, v in DEMO.items():  # under anything typed on the command line
            if k not in args.typed:
                setattr(args, k, v)
    check_args(p, args)
    return args


# -----------------------------------------------------------------------------
# The CPU demo: Coconut, CoT and No-CoT of the same size, trained from scratch in turn for the same number of
# optimizer steps on data/reach (graph search: two roots' chains of open roads, one of them the start), then
# scored on its held-out test questions side by side. --demo --resume finishes whatever an interrupted demo left.

def run_demo(args):
    t0 = time.time()
    demo_flags(args)
    demo_data(args)
    if WORLD > 1:
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
        summary[mode] = test_accuracy(os.path.join(a.out_dir, "best.pt"), test, args)
        summary[mode]["last"] = test_accuracy(os.path.join(a.out_dir, "ckpt.pt"), test, args)
    if RANK == 0:
        with open(os.path.join(args.out_dir, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(args.out_dir, "summary.json.tmp"), os.path.join(args.out_dir, "summary.json"))
    log(f"\nvalidation accuracy by epoch (Coconut's thoughts at each; CoT and No-CoT after as many optimizer "
        f"steps), {fmt_time(time.time() - t0)} for this command")
    log(epoch_table([runs[m] for m in DEMO_METHODS], ("Coconut", "CoT", "No-CoT"),
                    lambda stage: min(stage, args.max_latent_stage) * args.c_thought))
    log(f"\n{len(test)} held-out test questions (out_dir/summary.json): best.pt, the best validation accuracy "
        f"(the paper's choice), and the last checkpoint")
    log(f"{'method':>8} {'accuracy':>9} {'tokens/question':>16} {'epoch':>6} {'last':>9} {'epoch':>6}")
    for mode, name in zip(DEMO_METHODS, ("Coconut", "CoT", "No-CoT")):
        s, last = summary[mode], summary[mode]["last"]
        log(f"{name:>8} {100 * s['accuracy']:8.2f}% {s['tokens_per_question']:16.1f} {s['epoch']:6d} "
            f"{100 * last['accuracy']:8.2f}% {last['epoch']:6d}")


def demo_flags(args):
    """
    A new demo refuses a folder that holds one (as a run does), and writes the flags it was started with to
    <out_dir>/demo.json: --demo --resume takes them back (resume_demo_argv), so that the methods it has not
    started yet get the demo's --seed and sizes, whatever the resuming command leaves out.
    """
    path = os.path.join(args.out_dir, DEMO_FLAGS)
    if args.resume:
        return
    held = [p for p in [path] + [os.path.join(args.out_dir, m, "ckpt.pt") for m in DEMO_METHODS] if os.path.exists(p)]
    if held and not args.overwrite:
        raise ValueError(f"{args.out_dir} already holds a demo ({held[0]}): finish it with `{launcher()} --demo "
                         f"--out_dir {shlex.quote(args.out_dir)} --resume`, or start afresh with --overwrite or "
                         f"another --out_dir")
    if WORLD > 1:
        dist.barrier()  # every process has looked before rank 0 writes
    if RANK == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"argv": typed_flags(args)}, f)
        os.replace(path + ".tmp", path)


def resume_demo_argv(args):
    """
    --demo --resume: the command line that finishes the demo in args.out_dir, its flags from demo.json and
    then those typed now (a flag typed now with another value than the demo's is one line, but for those a
    resumed run may change).
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
    for k in args.typed:
        if k in before.typed and k not in RESUMABLE and getattr(before, k) != getattr(args, k):
            raise ValueError(f"--{k} {getattr(args, k)} differs from the demo's {getattr(before, k)} in {path}: a "
                             f"resumed demo keeps its settings")
    return ["--demo"] + saved + typed_flags(args, skip=("demo",))


def typed_flags(args, skip=("demo", "resume", "overwrite", "out_dir")):
    """The flags typed on the command line (args.typed), written out again: ["--seed", "1", ...]."""
    flags = []
    for k in args.typed:
        v = getattr(args, k)
        if k not in skip:
            flags += ([f"--{k}"] if v else []) if isinstance(v, bool) else [f"--{k}", str(v)]
    return flags


def demo_data(args):
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
    if RANK == 0 and (not made or (own and not args.resume)):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", args.dataset, "prepare.py")
        log(f"making the demo's data: python data/{args.dataset}/prepare.py --out_dir {data} --seed {args.seed}")
        subprocess.run([sys.executable, script, "--out_dir", data, "--seed", str(args.seed)], check=True)


def test_accuracy(ckpt_path, records, args):
    """A checkpoint of a run on held-out records, prompted as its validation was: -> {"accuracy": fraction
    correct, "tokens_per_question": thoughts + generated tokens, "n": questions, "correct", "epoch" (from 1)}."""
    model, tok, ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    prompts = [prompt(tokenize(r, tok), cfg, int(ckpt["stage"]), tok) for r in records]
    r = evaluate(model, tok, prompts, [x["answer"] for x in records], cfg["max_new_tokens"], cfg["eval_batch_size"])
    return {"accuracy": r["acc"], "tokens_per_question": round(r["mean_thoughts"] + r["mean_new_tokens"], 2),
            "n": r["total"], "correct": r["correct"], "epoch": int(ckpt["epoch"]) + 1}


def main(argv=None):
    LAUNCH["argv"] = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # bad options end here: argparse prints one line and exits 2
    setup_distributed()
    try:
        if args.demo and args.resume:  # the demo's own flags back from its folder, then today's
            args = parse_args(resume_demo_argv(args))
            LAUNCH["argv"] = ["--demo"] + typed_flags(args, skip=("demo",))  # each flag once, for the messages
        run_demo(args) if args.demo else train(args)
        if WORLD > 1:
            dist.barrier()  # let rank 0 finish its last save before any process tears the group down
        return 0
    except Interrupted as e:
        log(f"train.py: {e}")
        return 130
    except KeyboardInterrupt:  # before the run's loop began (loading data or the model): nothing was written
        print(f"train.py: interrupted before the first step; {args.out_dir} is as it was: run "
              f"`{resume_command(args.out_dir) if args.resume else launch_command()}` again", file=sys.stderr)
        return 130
    except (Diverged, OSError, ValueError, subprocess.CalledProcessError) as e:
        if RANK == 0:
            print(f"train.py: error: {first_line(e)}", file=sys.stderr)
        return 1
    finally:
        parallel.teardown()


if __name__ == "__main__":
    sys.exit(main())
