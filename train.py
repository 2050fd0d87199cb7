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
import contextlib
import math
import os
import random
import subprocess
import sys
import time

import torch

from coconut import Coconut
from curriculum import build_examples, collate, make_question, stage_for_epoch, stage_name
from machinery import demo, memory, parallel, resume
from machinery.checkpoint import first_line, gpt_from_checkpoint, init_model, resolve_device, tokenizer_from_checkpoint
from machinery.evaluate import evaluate, summarize_outputs
from machinery.icot import icot_epoch
from machinery.interrupt import STOP, Interrupted, install_signal_handlers, restore_signal_handlers, send_test_signal
from machinery.options import parse_args
from machinery.presets import MAX_SCRATCH_BATCH, MIN_STEPS_PER_EPOCH
from machinery.progress import Meter, first_step_notes, fmt_time, log, run_notes, stage_table, start_lines
from machinery.records import graph_question, load_split, tokenize
from machinery.resume import Diverged, continue_with, last_good, left_intact, save_checkpoint

FEEDBACK_MODES = ("coconut", "no_curriculum", "frontier")  # the modes that feed hidden states back as thoughts


# -----------------------------------------------------------------------------
# The curriculum

def train(args):
    """One run; returns its metrics (one dict per epoch)."""
    args, ckpt = resume.run_config(args)  # the command line's settings, or the checkpoint's for --resume
    parallel.check_args(args)
    device, autocast = setup_device(args)
    train_records = load_split(args.data_dir, args.dataset, "train")
    val_records = load_split(args.data_dir, args.dataset, "valid")[:args.max_val or None]
    settle_from_data(args, train_records)
    model, tok = make_model(args, ckpt, train_records, device)
    step_model = parallel.wrap(model, device, args.fsdp, bf16=args.dtype == "bfloat16")  # DDP, FSDP or the model
    optimizer = make_optimizer(model, args)
    state = resume.start_state(args, ckpt, model, optimizer, device)
    saved, ckpt = (ckpt["step"] if ckpt else None), None  # the last good checkpoint's step; the file's dict let go
    train_tok = [tokenize(r, tok) for r in train_records]
    val_tok = [tokenize(r, tok) for r in val_records]
    fit = memory.fit_micro_batch(args, model, train_tok, device)  # the largest micro-batch that fits, the same steps
    if fit:
        log(fit)
    if args.max_new_tokens is None:  # a user's data set: what its longest target needs, and some room
        args.max_new_tokens = min(longest_target(train_tok + val_tok) * 5 // 4 + 4, model.gpt.config.block_size)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    per_epoch = len(plan_steps(len(train_records), 0, args))
    start_lines(args, len(train_records), len(val_records), per_epoch, model, device, args.dtype == "bfloat16",
                ckpt_path, continue_with(args))
    for note in run_notes(args, train_records, per_epoch, model):
        log(f"note: {note}")
    first_step, total_steps = state["step"], per_epoch * (args.epochs - args.start_epoch)

    handlers = install_signal_handlers()  # Ctrl-C or SIGTERM: finish the step, save, stop
    try:
        for epoch in range(state["epoch"] + state["epoch_complete"], args.epochs):
            # the stage's examples, rebuilt and reshuffled from (seed, epoch) alone
            examples, steps, stage, resets = epoch_examples(train_records, train_tok, tok, epoch, args,
                                                            model.gpt.config.block_size)
            if resume.begins_epoch(state, epoch):
                state.update(epoch=epoch, stage=stage, epoch_step=0, epoch_complete=False, epoch_loss=[0.0, 0],
                             epoch_tokens=0)
                if resets_optimizer(epoch, args):
                    optimizer = make_optimizer(model, args)
            model.train()
            meter = Meter(state["epoch_step"])
            for step_in_epoch in range(state["epoch_step"], len(steps)):  # from where the epoch stands
                if step_in_epoch in resets:  # iCoT: a fresh AdamW whenever more of the chain is removed
                    optimizer = make_optimizer(model, args)
                loss, n_tokens, stop = train_step(step_model, examples, steps[step_in_epoch], args, tok, device,
                                                  autocast)
                if not math.isfinite(loss):
                    raise Diverged(f"loss is {loss} at step {state['step'] + 1} (epoch {epoch + 1}, "
                                   f"{stage_name(stage, vars(args))}, batch {step_in_epoch + 1}/{len(steps)}); "
                                   f"stopped without saving: {last_good(ckpt_path, saved)}")
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], total_steps, args)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.update(step=state["step"] + 1, epoch_step=step_in_epoch + 1,
                             epoch_tokens=state["epoch_tokens"] + n_tokens,
                             epoch_loss=[state["epoch_loss"][0] + loss, state["epoch_loss"][1] + 1])
                run_eta = meter.progress(state, loss, n_tokens, len(steps), args)
                if state["step"] == first_step + 1:
                    first_step_notes(model, optimizer, device, run_eta)
                if stop or (args.save_every and state["step"] % args.save_every == 0):
                    saved = save_checkpoint(model, optimizer, tok, args, state, device, ckpt_path, saved)
                if stop:
                    raise Interrupted(f"stopped at step {state['step']}; saved {ckpt_path}: continue with "
                                      f"`{continue_with(args)}`")
                send_test_signal(state["step"])  # the tests' SIGKILL or SIGINT at an exact step
            line, improved = validate(model, tok, val_tok, val_records, epoch, stage, args, device, autocast, state,
                                   meter.seconds())
            state.update(epoch_complete=True, metrics=state["metrics"] + [line])
            saved = save_checkpoint(model, optimizer, tok, args, state, device, ckpt_path, saved, best=improved)
            if parallel.any_rank(STOP["requested"]):  # agreed: a signal may reach the processes between steps
                raise Interrupted(f"stopped after epoch {epoch + 1}; saved {ckpt_path}: continue with "
                                  f"`{continue_with(args)}`")
    except KeyboardInterrupt:  # a second Ctrl-C: out at once, wherever it fell; a save is atomic
        raise Interrupted(f"interrupted at once; {left_intact(ckpt_path, saved, args)}") from None
    except torch.OutOfMemoryError:  # one line that names the micro-batch to use
        raise memory.OutOfMemory(memory.out_of_memory_line(args)) from None
    finally:
        restore_signal_handlers(handlers)
    log(stage_table(state["metrics"], vars(args)))
    return state["metrics"]


def train_step(step_model, examples, step, args, tok, device, autocast):
    """
    Forward and backward over this process's micro-batches of one optimizer step (step: grad_accum lists of
    example indices, plan_steps) -> (the step's loss, its real tokens, was a stop requested?), the same in every
    process. The step's gradient is the mean of the micro-batch losses' gradients, over all processes.
    """
    micro_batches = step[parallel.rank()::parallel.world()]  # process r of W: micro-batches r, r+W, ...
    loss_sum, n_tokens = 0.0, 0
    with parallel.gathered(step_model):  # FSDP: the weights gathered once for every micro-batch and thought pass
        for j, indices in enumerate(micro_batches):
            b = to_device(collate([examples[i] for i in indices], pad_id=tok.pad_id, latent_id=tok.latent_id), device)
            # DDP and FSDP reduce the gradients over processes at the micro-batch that ends the step, not before
            with parallel.no_sync(step_model, last=j == len(micro_batches) - 1):
                with autocast:  # Coconut: n thoughts, n + 1 passes, the loss on the language after them
                    loss, _ = step_model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"],
                                         label_sets=b.get("label_sets"), spread=args.set_loss == "spread")
                (loss * (parallel.world() / args.grad_accum)).backward()  # DDP and FSDP divide by the processes
            loss_sum += loss.item() / args.grad_accum
            n_tokens += int(b["attention_mask"].sum())
    totals = torch.tensor([loss_sum, n_tokens, float(STOP["requested"])], dtype=torch.float64)
    if parallel.world() > 1:
        torch.distributed.all_reduce(totals)  # every process sees the same loss and the same stop request
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
    log(f"epoch {epoch + 1} ({stage_name(stage, vars(args))}): train loss {m['train_loss']:.4f} | "
        f"val loss {m['val_loss']:.4f} | {acc}{' | best' if improved else ''} | {fmt_time(m['epoch_seconds'])}")
    return m, improved


@torch.no_grad()
def validation_loss(model, examples, args, tok, device, autocast):
    """Mean over batches of the batch loss (the official eval loss), batches shared out between processes."""
    model.eval()
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    mine = {}
    for i in range(parallel.rank(), len(batches), parallel.world()):
        b = to_device(collate(batches[i], pad_id=tok.pad_id, latent_id=tok.latent_id), device)
        with autocast:
            loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"],
                            label_sets=b.get("label_sets"), spread=args.set_loss == "spread")
        mine[i] = loss.item()
    losses = {i: x for part in parallel.gather(mine) for i, x in part.items()}
    model.train()
    return sum(losses[i] for i in range(len(batches))) / len(batches)  # in batch order: the same sum anywhere


def validation_accuracy(model, tok, tokenized, answers, stage, args, autocast):
    """Greedy answers to the stage's prompts (this process's share), scored by the official rule."""
    prompts = [make_question(t, stage, args.mode, args.c_thought, args.max_latent_stage,
                             bool(args.pad_latent_to_max), tok, bool(args.markers)) for t in tokenized]
    idx = list(range(parallel.rank(), len(prompts), parallel.world()))
    t0, last = time.time(), [time.time()]

    def progress(done, total):  # generation can take minutes: say so
        if time.time() - last[0] >= args.log_every and done < total:
            log(f"validation: {done * parallel.world()}/{len(prompts)} questions, {fmt_time(time.time() - t0)}")
            last[0] = time.time()

    with autocast:
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


def settle_from_data(args, records):
    """The defaults that depend on the data (a user's data set from scratch): the batch (see SCRATCH)."""
    if args.batch_size is None:
        args.batch_size = max(1, min(MAX_SCRATCH_BATCH, len(records) // (MIN_STEPS_PER_EPOCH * args.grad_accum)))


def longest_target(tokenized):
    """The most tokens a record's chain and answer take (what CoT at stage 0 writes after the question)."""
    return max((sum(map(len, t.steps)) + len(t.answer) for t in tokenized), default=1)


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
        # a sharded checkpoint's weights: read once, each process its slices, by resume.start_state
        gpt = gpt_from_checkpoint(ckpt, path, weights=not ckpt.get("shards"))
        tok = tokenizer_from_checkpoint(ckpt, path)
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id, feedback=args.mode in FEEDBACK_MODES)
    if args.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=True)
    if args.fsdp and parallel.world() > 1:
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
    """-> (device, the step's autocast: bf16 with --dtype bfloat16, else nothing (float32, as the paper trained))."""
    device = resolve_device(args.device, parallel.local_rank())
    if args.threads:
        torch.set_num_threads(args.threads)
    elif parallel.world() > 1 and device.type == "cpu":  # the processes share the cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world()))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    bf16 = args.dtype == "bfloat16"
    return device, (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())


# -----------------------------------------------------------------------------

def main(argv=None):
    resume.LAUNCH["argv"] = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, __doc__)  # bad options end here: argparse prints one line and exits 2
    parallel.setup()
    try:
        if args.demo and args.resume:  # the demo's own flags back from its folder, then today's
            args = demo.resumed_args(args)
        demo.run(args, train) if args.demo else train(args)
        if parallel.world() > 1:
            torch.distributed.barrier()  # let rank 0 finish its last save before any process tears the group down
        return 0
    except Interrupted as e:
        log(f"train.py: {e}")
        return 130
    except KeyboardInterrupt:  # before the run's loop began (loading data or the model): nothing was written
        again = resume.resume_command(args.out_dir) if args.resume else resume.launch_command()
        print(f"train.py: interrupted before the first step; {args.out_dir} is as it was: run `{again}` again",
              file=sys.stderr)
        return 130
    except (Diverged, memory.OutOfMemory, OSError, ValueError, subprocess.CalledProcessError) as e:
        if parallel.rank() == 0:
            print(f"train.py: error: {first_line(e)}", file=sys.stderr)
        return 1
    finally:
        parallel.teardown()


if __name__ == "__main__":
    sys.exit(main())
