"""
The memory of a training step, estimated before the first one, and the micro-batch that fits the device.

A step holds the fp32 state (weights, gradients, AdamW's two moments: 16 bytes per parameter, each process its
1/N under --fsdp, plus the weights gathered for the step and the whole gradients during Coconut's backward) and
the activations of one micro-batch: per sequence, per block and per column about ACT_WIDTHS floats of the block's
width (the saved inputs of the norms, qkv, attention, the MLP's 4x), the attention's scores where Coconut's
chunked cache materialises them (heads x columns after the first thought x columns, ATT_COPIES copies: scores,
mask, softmax, their gradients; and with dropout on a CPU every column's, DROPOUT_ATT_COPIES), lm_head's logits
where a label is (LOGIT_COPIES copies of the vocabulary per scored column), and FIXED_BYTES. The constants are
fitted to the peaks that `python machinery/bench.py --memory_estimate` measures on the CPU (docs/performance.md),
rounded up: the estimate is meant to be above the measurement, never below. Under bf16 autocast the same figure
is kept (an upper one).

train.py keeps the effective batch (batch_size x grad_accum sequences per optimizer step, so the same sequences
in the same steps, plan_steps) and takes the largest micro-batch whose step fits HEADROOM of what the device has:
free GPU memory, or the RAM available to this process on a CPU. TRAIN_MEMORY_GB caps that figure (the tests; or
a machine shared with other work).
"""
import os

import torch

from machinery import parallel
from machinery.resume import continue_with

LIMIT_ENV = "TRAIN_MEMORY_GB"  # caps the memory the step's estimate may use, in GB (2**30 bytes)
HEADROOM = 0.9                 # of what the device has: the rest for the allocator's fragmentation, the CUDA context
ACT_WIDTHS, ATT_COPIES, LOGIT_COPIES, DROPOUT_ATT_COPIES = 14, 9, 4, 3
FIXED_BYTES = 2**28  # the allocator's and the backward's transients beyond the formula: 0.25 GB


class OutOfMemory(RuntimeError):
    """CUDA ran out of memory in a step: train.py says which micro-batch to use instead."""


def gb(n_bytes):
    return f"{n_bytes / 2**30:.3g} GB"


def longest_sequence(tokenized, args, block_size):
    """-> (columns, scored columns, columns from the first thought on) of the longest training sequence any stage
    can build from these records: the question, the markers, every step (or its thoughts, up to max_latent_stage x
    c_thought), the answer, <eos>; collate aligns the first thought, so a batch may hold the longest question
    beside the longest rest."""
    thoughts = args.max_latent_stage * args.c_thought
    question = max((len(t.question) for t in tokenized), default=1)
    rest = max((sum(map(len, t.steps)) + thoughts + len(t.answer) + 3 for t in tokenized), default=1)
    scored = max((sum(map(len, t.steps)) + len(t.answer) + 2 for t in tokenized), default=1)
    return min(question + rest, block_size), min(scored, block_size), min(rest, block_size)


def state_bytes(n_params, fsdp_world=1, bf16_weights=False, ddp=False):
    """fp32 weights, gradients and AdamW's moments (16 bytes a parameter; under FSDP 1/N of them, the weights
    gathered for the step, 2 or 4 bytes, and the whole gradients of Coconut's backward, 4 bytes); DDP adds its
    gradient buckets (4 bytes)."""
    if fsdp_world > 1:
        return 16 * n_params / fsdp_world + (2 if bf16_weights else 4) * n_params + 4 * n_params
    return 16 * n_params + (4 * n_params if ddp else 0)


def activation_bytes(config, rows, columns, scored, rest=None, bf16_lm_head=False, fused_attention=False):
    """
    One micro-batch's activations, forward and backward, in bytes: rows sequences of `columns` columns with
    `scored` labelled columns each, `rest` of them (None: all) from the first thought on, where Coconut's passes
    attend through the chunked cache that materialises the scores (before it, pass 0 runs
    scaled_dot_product_attention, fused on a GPU; on a CPU with dropout it materialises every column's scores and
    their masks: DROPOUT_ATT_COPIES). config: a GPTConfig or LlamaConfig (n_layer, n_head, n_embd, vocab_size,
    dropout).
    """
    rest = columns if rest is None else rest
    per_block = ACT_WIDTHS * columns * config.n_embd + ATT_COPIES * config.n_head * rest * columns
    if getattr(config, "dropout", 0) and not fused_attention:
        per_block += DROPOUT_ATT_COPIES * config.n_head * columns * columns
    per_row = config.n_layer * per_block + 4 * columns * config.n_embd + LOGIT_COPIES * scored * config.vocab_size
    extra = 2 * config.vocab_size * config.n_embd if bf16_lm_head else 0  # autocast's bf16 copy of lm_head
    return 4 * rows * per_row + extra + FIXED_BYTES


def available_bytes(device, held=0):
    """-> (bytes this process's step may use, what they are): TRAIN_MEMORY_GB, else the GPU's free memory plus what
    this process already holds there, else the RAM available to this process (its share when several run here)
    plus `held`, the bytes of the weights it has loaded already (the estimate counts them; the interpreter, torch's
    libraries and the data, 0.26 GiB resident with GPT-2's tokenizer, it does not)."""
    if os.environ.get(LIMIT_ENV):
        return float(os.environ[LIMIT_ENV]) * 2**30, f"{os.environ[LIMIT_ENV]} GB ({LIMIT_ENV})"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device), f"{gb(total)} of {torch.cuda.get_device_name(device)}"
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no estimate, the run's own batch
        return None, "unknown RAM"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world()))
    return avail / local + held, f"{gb(avail / local + held)} of RAM{' per process' if local > 1 else ''}"


def step_bytes(model, args, rows, columns, scored, rest, device):
    """The estimated peak of one optimizer step at micro-batch `rows`, in bytes (this process's)."""
    n = sum(p.numel() for p in model.parameters())
    fsdp = parallel.world() if parallel.is_sharded(model) else 1
    bf16 = args.dtype == "bfloat16" and device.type == "cuda"
    state = state_bytes(n, fsdp, bf16_weights=bf16, ddp=parallel.world() > 1 and fsdp == 1)
    return state + activation_bytes(model.gpt.config, rows, columns, scored, rest, bf16_lm_head=bf16,
                                    fused_attention=device.type == "cuda")


def splits(batch_size, grad_accum, world, n=None):
    """The micro-batches that keep batch_size x grad_accum per step, largest first: (micro, accumulation) with the
    accumulation a multiple of the processes and the micro-batch at most batch_size. With n (the sequences of an
    epoch), only those that give the same steps: plan_steps drops a short last step of fewer sequences than its
    accumulation, and it must be dropped (or kept) under the new split as under the old."""
    total, rest = batch_size * grad_accum, (n or 0) % (batch_size * grad_accum)
    same = lambda g: rest == 0 or (rest >= g) == (rest >= grad_accum)
    return [(m, total // m) for m in range(batch_size, 0, -1)
            if total % m == 0 and (total // m) % world == 0 and same(total // m)]


def fit_micro_batch(args, model, tokenized, device):
    """
    Sets args.batch_size and args.grad_accum to the largest micro-batch whose step fits this device, keeping their
    product, and returns the line that says so; or, for a --batch_size typed or a resumed run (whose split is its
    checkpoint's), keeps them and returns a warning when they will not fit (None when they do). Also warns when
    not even one sequence fits (the state alone: --dtype float32 at 8B, say).
    """
    held = sum(p.numel() * p.element_size() for p in model.parameters()) // max(1, parallel.world()
                                                                                if parallel.is_sharded(model) else 1)
    limits = parallel.gather(available_bytes(device, held))  # every process takes the same split: the smallest fits
    limit, what = min(limits, key=lambda lw: float("inf") if lw[0] is None else lw[0])
    if limit is None:
        return None
    columns, scored, rest = longest_sequence(tokenized, args, model.gpt.config.block_size)
    need = lambda m: step_bytes(model, args, m, columns, scored, rest, device)
    budget, total = HEADROOM * limit, args.batch_size * args.grad_accum
    if need(1) > budget:
        return (f"warning: even one sequence per micro-batch needs about {gb(need(1))} ({gb(need(0))} of it before "
                f"any activation: the weights, gradients and AdamW state), more than {what} allow: it will run out "
                f"of memory; more processes with --fsdp, or --dtype bfloat16 on a GPU, hold less")
    if "batch_size" in args.typed or args.resume:
        if need(args.batch_size) <= budget:
            return None
        best = next((m for m, _ in splits(args.batch_size, args.grad_accum, parallel.world(), len(tokenized))
                     if need(m) <= budget), 1)
        return (f"warning: micro-batch {args.batch_size} needs about {gb(need(args.batch_size))}, more than {what} "
                f"allow: it may run out of memory; --batch_size {best} --grad_accum {total // best} keeps {total} "
                f"per step")
    same_steps = splits(args.batch_size, args.grad_accum, parallel.world(), len(tokenized))
    fits = [(m, g) for m, g in same_steps if need(m) <= budget]
    args.batch_size, args.grad_accum = fits[0] if fits else same_steps[-1]  # else the nearest to fitting
    return (f"micro-batch {args.batch_size} x {args.grad_accum} accumulation steps = {total}: "
            f"{'fits' if fits else 'may not fit'} {what} (about {gb(need(args.batch_size))} at the longest "
            f"sequence, {columns} columns)")


def out_of_memory_line(args):
    """What a CUDA out-of-memory error becomes: one line naming the micro-batch to try (half of it or less)."""
    total = args.batch_size * args.grad_accum
    world = parallel.world()
    smaller = [(m, g) for m, g in splits(args.batch_size, args.grad_accum, world) if m <= args.batch_size // 2]
    if not smaller:
        return ("out of GPU memory at micro-batch 1: more processes with --fsdp, or --dtype bfloat16, hold less")
    m, g = smaller[0]
    how = f"--batch_size {m} --grad_accum {g}"
    if args.resume:
        how = f"`{continue_with(args)} {how}`"
    return f"out of GPU memory at micro-batch {args.batch_size}: try {how} (the same {total} sequences per step)"
