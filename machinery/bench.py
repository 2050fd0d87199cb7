"""
Side-by-side timings, as ratios measured in one run (absolute times on a shared machine are noise).

(a) training step: Coconut forward+backward with n thoughts / a plain forward+backward over the same
    padded batch (the latents read as ordinary tokens, the loss only where labels are, as Coconut's);
    with --official, the authors' Coconut (Hugging Face GPT-2 with the same weights) on the same batch,
    and HF's plain GPT-2 step against ours (both with logits at every position).
--memory: the peak memory of one training step before (logits everywhere, a cache copied per thought)
    and after (today's), each in a fresh process.
(b) evaluation: questions per second of our batched, KV-cached generate vs one question at a time
    re-running the whole sequence for every new token (the official generate's algorithm, here on our
    GPT), and vs one at a time with the cache.

    python machinery/bench.py                                 # GPT-2 124M shape and a small model, CPU, fp32
    python machinery/bench.py --device cuda --dtype bfloat16  # the same on a GPU, bf16 autocast
    python machinery/bench.py --official /path/to/facebookresearch/coconut   # adds the official code (needs transformers)

Weights are random (the timings do not depend on them); batches are real ProsQA validation records.

(c) --superposition: ONE EPOCH of the "Reasoning by Superposition" setting (symbolic ProsQA, a 2-layer,
    8-head, 768-wide GPT-2 from scratch): training, then validation accuracy, ours against the authors'
    code (github Ber666/reasoning-by-superposition: their dataset code and their Coconut around a Hugging
    Face GPT2LMHeadModel, imported from a checkout at run time, unmodified) on the same graphs; then an
    estimate of the full run's GPU time from its FLOP count. It runs alone (the sections above are skipped).

    python machinery/bench.py --superposition /path/to/reasoning-by-superposition   # theirs needs transformers
    python machinery/bench.py --superposition ours                                  # our side alone

(d) --fsdp N: N processes under torchrun (gloo on a CPU, nccl on GPUs), the same Coconut optimizer step three
    ways: train.py --fsdp (parallel.py: each group's weights gathered once per step), fully_shard's default
    (a block's weights gathered for each call and freed after it, in the backward too) and DDP. It prints
    the all-gathers and reduce-scatters per step of both FSDPs, their step time against DDP's (interleaved in
    the same processes) and what each process holds. The batch is random tokens in Coconut's layout (with
    --thoughts thoughts in every sequence: the default would hang on processes with different numbers).
    It runs alone.

    python machinery/bench.py --fsdp 2 --sizes small --threads 1      # 2 CPU processes
    torchrun-free: bench.py starts torchrun itself; on GPUs: python machinery/bench.py --fsdp 8 --device cuda --dtype bfloat16

(e) --demo_step: the CPU demo's optimizer step (reach questions, its 2-layer 128-wide GPT, batch 64, AdamW)
    for Coconut with all its thoughts, CoT and No-CoT: milliseconds per step with the last block run only in
    the columns that are read (coconut.py's read, gpt.py's out_cols) and over every column, their ratio, and
    the matmul FLOP rate of each step against a large fp32 matmul's on this machine. It runs alone.

    python machinery/bench.py --demo_step
    python machinery/bench.py --demo_step --against HEAD~1 --threads 1   # today's coconut.py against a commit's
    python machinery/bench.py --demo_step --profile --threads 1          # where Coconut's step spends its time

    --against REV: Coconut's step with coconut.py as committed at REV (git show) and as it is now, on the same
    weights and batches, the two alternating step by step (a noisy neighbour hits both alike): the median of the
    paired ratios, and whether the losses and weights stay bit-identical. --profile: torch.profiler over a few
    steps, the time by op, and the share of the one-column thought passes (the ops whose inputs have a
    one-column dimension: (B, 1, C), (B, nh, 1, hs), ...).
    ATEN_CPU_CAPABILITY=avx2 (with ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2) times an AVX-512 machine's
    AVX2 kernels.
"""
import argparse
import contextlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's root
sys.path.insert(0, ROOT)  # run as a file (python machinery/bench.py), the package and the scripts' modules import

import data.reach.prepare as reach_prepare
from machinery.argparser import Parser
from machinery.analysis import node_groups
from coconut import Coconut, set_cross_entropy
from curriculum import build_examples, collate, make_example, make_question
from machinery.evaluate import evaluate
from gpt import GPT, GPTConfig
from machinery.presets import DATASET_DEFAULTS
from machinery.records import graph_question, load_records, tokenize
from machinery.tokenizer import gpt2_tokenizer, symbol_tokenizer

SIZES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "small": dict(n_layer=4, n_head=4, n_embd=256),
         "tiny": dict(n_layer=2, n_head=2, n_embd=32)}  # tiny: the tests


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def bench_train(model, batch, args, official=None):
    """Median seconds of one forward+backward: plain (logits everywhere, as HF's), plain with the loss only
    where labels are, Coconut, and optionally the official Coconut and HF's plain GPT-2."""
    ids, mask, labels, pos = (batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids"))
    autocast = torch.autocast(args.device.split(":")[0], dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")

    def plain():
        with autocast:
            logits = model.gpt(ids, attention_mask=mask, position_ids=pos)[0]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()

    def coconut():
        with autocast:
            loss, _ = model(ids, mask, labels, pos)
        loss.backward()

    # The same forward with <|latent|> read as an ordinary token: one pass, lm_head only where a label is
    # (like Coconut's): the fair baseline for what the thoughts' passes cost.
    pause = Coconut(model.gpt, model.latent_id, model.start_id, model.end_id, model.eos_id, feedback=False)

    def labelled():
        with autocast:
            loss, _ = pause(ids, mask, labels, pos)
        loss.backward()

    def theirs():
        with autocast:
            loss = official(ids, mask, labels, pos).loss
        loss.backward()

    def hf_plain():  # Hugging Face's GPT-2 (inside the official Coconut), the same plain step
        with autocast:
            logits = official.base_causallm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()

    runs = {"plain": plain, "labelled": labelled, "coconut": coconut}
    if official is not None:
        runs.update(official=theirs, hf_plain=hf_plain)
    times = {k: [] for k in runs}
    for r in range(args.warmup + args.repeats):
        for name, fn in runs.items():  # interleaved, so a noisy neighbour hits every variant alike
            t, _ = timed(fn, args.device)
            model.zero_grad(set_to_none=True)
            if official is not None:
                official.zero_grad(set_to_none=True)
            if r >= args.warmup:
                times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def uncached_generate(model, question, max_new_tokens):
    """The official generate's algorithm on our GPT: batch 1, the whole sequence re-run per new token."""
    ids = torch.tensor([question], device=model.gpt.lm_head.weight.device)
    ones = torch.ones_like(ids)
    hidden, state = model.think(ids, ones, torch.arange(ids.size(1), device=ids.device)[None])
    logits = model.gpt.lm_head(hidden[:, -1:])
    embeds = model.gpt.transformer.wte(ids)
    latent_cols = (ids[0] == model.latent_id).nonzero().flatten()
    embeds[0, latent_cols] = state["thoughts"][0, :len(latent_cols)]  # the filled sequence
    out = []
    for step in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if step > 0 and token == model.eos_id:
            break
        out.append(token)
        embeds = torch.cat([embeds, model.gpt.transformer.wte(torch.tensor([[token]], device=ids.device))], 1)
        logits = model.gpt(inputs_embeds=embeds)[0]
    return out


def bench_generate(model, questions, args):
    """Questions per second: batched+cached, one at a time cached, one at a time uncached."""
    dev = args.device
    autocast = torch.autocast(dev.split(":")[0], dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")

    def batched():
        out = []
        for i in range(0, len(questions), args.gen_batch):
            b = collate(questions[i:i + args.gen_batch])
            out += model.generate(b["input_ids"].to(dev), b["attention_mask"].to(dev), args.max_new_tokens)
        return out

    def one_cached():
        return [model.generate(torch.tensor([q], device=dev), torch.ones(1, len(q), device=dev), args.max_new_tokens)[0]
                for q in questions]

    def one_uncached():
        return [uncached_generate(model, q, args.max_new_tokens) for q in questions]

    qps, outs = {}, {}
    with autocast:
        model.generate(torch.tensor([questions[0]], device=dev), torch.ones(1, len(questions[0]), device=dev), 2)  # warm-up
        for name, fn in [("batched, cached", batched), ("one at a time, cached", one_cached),
                         ("one at a time, uncached (official way)", one_uncached)]:
            t, outs[name] = timed(fn, dev)
            qps[name] = len(questions) / t
    same = len({json.dumps(o) for o in outs.values()}) == 1
    return qps, same


def memory_child(args):
    """
    One training step (forward + backward) of the GPT-2 124M shape, fp32, on --memory_batch real ProsQA
    records at stage 6, in a fresh process: prints {"variant", "loss", "peak_gb"} as JSON. "before" is the
    forward this project had first: logits at every position and a cache copied at every thought;
    "after" is today's (logits only where a label is, and a chunked cache). The peak is what the step
    adds to the process: on CUDA max_memory_allocated, on a CPU the peak resident set size.
    """
    tok = gpt2_tokenizer()
    records = [tokenize(r, tok) for r in load_records(args.data_path)][:args.memory_batch]
    b = {k: v.to(args.device) for k, v in collate([make_example(t, 6) for t in records]).items()}
    torch.manual_seed(0)
    model = Coconut(GPT(GPTConfig(**SIZES["gpt2"], vocab_size=50260)), tok.latent_id, tok.start_id, tok.end_id,
                    tok.eos_id).to(args.device)
    if args.memory_child == "before":
        model.gpt.chunk_cache = lambda past: past  # the plain cache, copied at every thought
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    ids, mask, labels, pos = (b[k] for k in ("input_ids", "attention_mask", "labels", "position_ids"))
    if args.memory_child == "before":
        hidden, _ = model.think(ids, mask, pos)
        logits = model.gpt.lm_head(hidden)  # (B, L, V): every position
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    else:
        loss, _ = model(ids, mask, labels, pos)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps(dict(variant=args.memory_child, shape=list(ids.shape), loss=loss.item(), peak_gb=peak / 2**30)))


def bench_memory(args):
    """The peak memory of a paper-default training step, before and after, each in a process of its own."""
    rows = {}
    for variant in args.memory:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory_child", variant, "--device", args.device,
               "--data", args.data_path, "--memory_batch", str(args.memory_batch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    shape = next(iter(rows.values()))["shape"]
    line = f"[gpt2] peak memory of one training step, {shape[0]} x {shape[1]} columns, 6 thoughts, fp32: " + \
        ", ".join(f"{v} {r['peak_gb']:.2f} GB (loss {r['loss']:.6f})" for v, r in rows.items())
    if len(rows) == 2:
        line += f" -> {100 * (1 - rows['after']['peak_gb'] / rows['before']['peak_gb']):.0f}% less"
    print(line, flush=True)


def coconut_batch(rows, question, thoughts, answer, vocab, seed, device):
    """A micro-batch of random tokens in Coconut's layout: question tokens, <|start-latent|>, the thoughts'
    <|latent|>, <|end-latent|>, answer tokens with labels (ids vocab-1, -2, -3 are latent, start, end); every
    row alike: what is measured (communication, time, memory) depends on the shapes only."""
    latent, start, end = vocab - 1, vocab - 2, vocab - 3
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, vocab - 3, (rows, question), generator=g)
    a = torch.randint(0, vocab - 3, (rows, answer), generator=g)
    col = lambda t: torch.full((rows, 1), t)
    ids = torch.cat([q, col(start), col(latent).expand(-1, thoughts), col(end), a], dim=1)  # (B, L)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = a
    pos = torch.arange(ids.size(1)).expand_as(ids)
    return [t.to(device) for t in (ids, torch.ones_like(ids), labels, pos)]


def fsdp_child(args):
    """One process of bench_fsdp: the three ways of one size, timed interleaved; rank 0 prints one JSON line."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from machinery import parallel
    rank, local_rank, world = parallel.setup()
    if args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or 1)
    # the collectives that fully_shard calls (torch.distributed.all_gather_single and reduce_scatter_single in
    # torch 2.13), counted
    counts = Counter()

    def counted(name, fn):
        def call(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return call
    dist.all_gather_single = counted("all_gather", dist.all_gather_single)
    dist.reduce_scatter_single = counted("reduce_scatter", dist.reduce_scatter_single)
    size, vocab = args.sizes[0], 50260
    batches = [coconut_batch(args.fsdp_batch, 24, args.thoughts, 16, vocab, 1000 * rank + j, device)
               for j in range(args.fsdp_micro)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    runs = {}
    for way in ("ours", "default", "DDP"):
        torch.manual_seed(0)
        model = Coconut(GPT(GPTConfig(**SIZES[size], vocab_size=vocab)), vocab - 1, vocab - 2, vocab - 3, 0)
        if way == "ours":
            step_model = parallel.wrap(model, device, fsdp=True, bf16=args.dtype == "bfloat16")
        elif way == "default":
            for block in model.gpt.transformer.h:
                fully_shard(block)
            step_model = fully_shard(model)
        else:
            step_model = parallel.wrap(model.to(device), device)
        runs[way] = (model, step_model, torch.optim.AdamW(model.parameters(), lr=1e-4))

    def step(way):
        model, step_model, optimizer = runs[way]
        loss_sum = 0.0
        with parallel.gathered(model) if way == "ours" else contextlib.nullcontext():
            for j, (ids, mask, labels, pos) in enumerate(batches):
                with parallel.no_sync(step_model, last=j == len(batches) - 1), autocast:
                    loss, _ = step_model(ids, mask, labels, pos)
                (loss / len(batches)).backward()
                loss_sum += loss.item() / len(batches)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum

    times, per_step, losses = {w: [] for w in runs}, {}, {w: [] for w in runs}
    for r in range(args.warmup + args.repeats):
        for way in runs:  # interleaved, so a noisy neighbour hits every way alike
            counts.clear()
            t, loss = timed(lambda: step(way), args.device)
            per_step[way], _ = dict(counts), losses[way].append(loss)
            if r >= args.warmup:
                times[way].append(t)
    held = {w: parallel.held_bytes(m, o) for w, (m, _, o) in runs.items()}
    if rank == 0:
        print(json.dumps(dict(size=size, world=world, blocks=SIZES[size]["n_layer"], counts=per_step, losses=losses,
                              seconds={w: statistics.median(v) for w, v in times.items()}, held=held,
                              shape=list(batches[0][0].shape), threads=torch.get_num_threads())), flush=True)
    parallel.teardown()


def bench_fsdp(args):
    """(d): bench.py again under torchrun with --fsdp N processes (fsdp_child), one size at a time; its numbers."""
    for size in args.sizes:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1))
        if not args.device.startswith("cuda"):
            env["TRAIN_BACKEND"] = "gloo"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.fsdp),
               os.path.abspath(__file__), "--fsdp_child", "--sizes", size, "--device", args.device,
               "--dtype", args.dtype, "--thoughts", str(args.thoughts), "--fsdp_batch", str(args.fsdp_batch),
               "--fsdp_micro", str(args.fsdp_micro), "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--warmup", str(args.warmup)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"bench.py --fsdp: the {args.fsdp} processes failed:\n{r.stderr[-3000:]}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        c, t, L, n, m = d["counts"], d["seconds"], d["blocks"], args.thoughts, args.fsdp_micro
        print(f"[{size}] FSDP over {d['world']} processes ({args.device}, {args.dtype}, {d['threads']} thread(s) each, "
              f"torch {torch.__version__}): one optimizer step of Coconut with {n} thoughts ({n + 1} passes), "
              f"{m} micro-batch(es) of {d['shape'][0]} x {d['shape'][1]} per process, {L} blocks", flush=True)
        print(f"[{size}] all-gathers per step: train.py --fsdp (gathered once per step) "
              f"{c['ours'].get('all_gather', 0)} "
              f"(= {L} blocks + the root), fully_shard's default {c['default'].get('all_gather', 0)} "
              f"(= {m} x (1 + 2 x {L} blocks x {n + 1} passes)); reduce-scatters {c['ours'].get('reduce_scatter', 0)} "
              f"and {c['default'].get('reduce_scatter', 0)} (= {m} x {L + 1})", flush=True)
        same = all(abs(a - b) <= 1e-5 * abs(b)
                   for w in ("ours", "default") for a, b in zip(d["losses"][w], d["losses"]["DDP"]))
        mib = lambda b: f"{b / 2**20:.1f} MiB"
        print(f"[{size}] step time: --fsdp {1e3 * t['ours']:.2f} ms, default {1e3 * t['default']:.2f} ms, DDP "
              f"{1e3 * t['DDP']:.2f} ms -> "
              f"(d) --fsdp/DDP = {t['ours'] / t['DDP']:.2f}x, default/DDP = {t['default'] / t['DDP']:.2f}x; "
              f"the same losses: {same}; weights and AdamW state per process: FSDP {mib(d['held']['ours'][0])}, "
              f"DDP {mib(d['held']['DDP'][0])}", flush=True)


# Llama 3's shapes for --fsdp_memory (config.json of meta-llama/Llama-3.2-1B and Llama-3.1-8B)
LLAMA_SHAPES = {"1b": dict(n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192, tied=True),
                "8b": dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336, tied=False)}
LLAMA_VOCAB = 128256


def layer_memory_child(args):
    """
    One Coconut training step (forward + backward, fp32, no optimizer) of a Llama of the shape's width with
    1 or 2 blocks and a 1024-token vocabulary, on 8 sequences x 160 columns (112 question tokens, 6 thoughts,
    40 labelled answer tokens: the measurement behind docs/reproduce.md's 1B figure), in a fresh process:
    prints {"peak": the peak resident memory the step adds, in bytes, "block_params"}.
    """
    import resource
    from machinery.llama import Llama, LlamaConfig
    shape, layers = args.layer_memory_child[0], int(args.layer_memory_child[1])
    c = LLAMA_SHAPES[shape]
    torch.manual_seed(0)
    gpt = Llama(LlamaConfig(**{k: v for k, v in c.items() if k != "tied"} | dict(n_layer=layers, vocab_size=1024,
                                                                               block_size=512, rope_scaling=None)))
    model = Coconut(gpt, 1023, 1022, 1021, 0)
    ids, mask, labels, pos = coconut_batch(8, 112, 6, 40, 1024, 0, "cpu")
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    loss, _ = model(ids, mask, labels, pos)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps(dict(peak=peak, block_params=sum(p.numel() for p in gpt.transformer.h[0].parameters()))))


def bench_fsdp_memory(args):
    """
    --fsdp_memory SHAPE:GPUS: the per-GPU memory of a Llama run under train.py --fsdp --dtype bfloat16 on GPUS
    GPUs, estimated: what one block adds to a CPU step (layer_memory_child with 2 blocks minus 1) less its fp32
    gradient gives its activations; the rest follows from the parameter counts (parallel.py's docstring).
    """
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    for item in args.fsdp_memory:
        shape, gpus = item.split(":")
        c, N = LLAMA_SHAPES[shape], int(gpus)
        m = {}
        for layers in (1, 2):
            cmd = [sys.executable, os.path.abspath(__file__), "--layer_memory_child", shape, str(layers),
                   "--threads", str(args.threads)]
            m[layers] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
        Pb = m[1]["block_params"] * c["n_layer"]                                # the blocks' parameters
        Pr = LLAMA_VOCAB * c["n_embd"] * (1 if c["tied"] else 2) + c["n_embd"]  # embeddings, lm_head, final norm
        act = (m[2]["peak"] - m[1]["peak"] - 4 * m[1]["block_params"]) * c["n_layer"]  # fp32 activations, batch 8
        sharded, gathered = 16 * (Pb + Pr) / N, 2 * Pb + 4 * Pr  # fp32 weights+grads+AdamW / N; bf16 blocks, fp32 root
        fixed = sharded + 2 * gathered  # gathered weights, and the whole gradients during Coconut's backward
        print(f"[{shape}] Llama {shape.upper()} ({(Pb + Pr) / 1e9:.2f}B parameters) under train.py --fsdp --dtype "
              f"bfloat16 on {N} GPUs, per GPU (estimate; one step of a block measured on this CPU: "
              f"{gib(m[2]['peak'] - m[1]['peak'])}, of which {gib(4 * m[1]['block_params'])} its fp32 gradient; "
              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)):", flush=True)
        print(f"[{shape}]   fp32 weights, gradients and AdamW's moments / {N}: {gib(sharded)}; gathered for the step "
              f"(blocks bf16, embeddings and lm_head fp32): {gib(gathered)}; whole gradients during Coconut's backward "
              f"(the same dtypes): {gib(gathered)}; activations (fp32, an upper figure under autocast): "
              f"{gib(act)} per micro-batch of 8 x 160 columns", flush=True)
        print(f"[{shape}]   -> about {gib(fixed + act)} per GPU at --batch_size 8, {gib(fixed + 4 * act)} at 32 "
              f"(DDP: {gib(16 * (Pb + Pr))} of fp32 state alone)", flush=True)


def estimate_child(args):
    """
    One Coconut training step (forward + backward, fp32) of a GPT of --sizes' first shape on --estimate_child's
    ROWS:QUESTION:THOUGHTS:ANSWER batch (coconut_batch), in a fresh process: prints {"peak": the peak resident
    memory the step adds, in bytes, "estimate": machinery/memory.py's activations and gradients for it}.
    """
    import resource
    from machinery import memory
    rows, question, thoughts, answer = map(int, args.estimate_child.split(":"))
    torch.manual_seed(0)
    config = GPTConfig(**SIZES[args.sizes[0]], vocab_size=50260, block_size=1024, dropout=args.dropout)
    model = Coconut(GPT(config), 50259, 50258, 50257, 0)
    ids, mask, labels, pos = coconut_batch(rows, question, thoughts, answer, 50260, 0, "cpu")
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    loss, _ = model(ids, mask, labels, pos)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    grads = 4 * sum(p.numel() for p in model.parameters())
    estimate = memory.activation_bytes(config, rows, ids.size(1), answer + 1, thoughts + 2 + answer) + grads
    print(json.dumps(dict(peak=peak, estimate=estimate, columns=ids.size(1))))


def bench_memory_estimate(args):
    """--memory_estimate: machinery/memory.py's estimate of a step against its measured peak, each batch in a
    fresh process (the estimate is meant to be above, never below)."""
    for size in args.sizes:
        for spec in args.memory_estimate:
            cmd = [sys.executable, os.path.abspath(__file__), "--estimate_child", spec, "--sizes", size,
                   "--threads", str(args.threads), "--dropout", str(args.dropout)]
            d = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip())
            rows, question, thoughts, answer = spec.split(":")
            print(f"[{size}] {rows} x {d['columns']} columns ({thoughts} thoughts, {answer} answer tokens): measured "
                  f"{d['peak'] / 2**30:.3f} GiB, estimated {d['estimate'] / 2**30:.3f} GiB -> estimate/measured = "
                  f"{d['estimate'] / d['peak']:.2f} (dropout {args.dropout:g}; torch {torch.__version__}, fp32, CPU)",
                  flush=True)


# (f) --resume_memory: what a resume holds in CPU memory, per process, up to the loop's first step
RSS_CHILD = """
import json, os, resource, sys, threading, time
sys.path.insert(0, os.environ["BENCH_TRAIN_ROOT"])
def anon():  # resident memory of the process's own (not of files it maps: the kernel may drop those)
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
PEAK = [0]
def sample():
    while True:
        PEAK[0] = max(PEAK[0], anon())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
import train
class Loaded(Exception):
    pass
def loaded(*a, **k):  # train() plans the epoch's steps once the checkpoint is applied and let go
    import gc
    gc.collect()
    peak = max(PEAK[0], anon())
    print("RSS " + json.dumps(dict(rank=int(os.environ.get("RANK", 0)), peak=peak, held=anon(),
                                   hwm=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)), flush=True)
    raise Loaded
train.plan_steps = loaded
try:
    train.main(sys.argv[1:])
except Loaded:
    pass
"""


def bench_resume_memory(args):
    """
    --resume_memory: a checkpoint of a GPT of --sizes' first shape from scratch on generated tiny records (one
    process, whole; two --fsdp sharded processes, sharded), then its resume in a fresh process or two, stopped
    once the checkpoint is applied: each process's peak of its own (anonymous) memory, what it holds then, and its
    peak resident set with the pages of mapped files (a memory-mapped checkpoint's, which the kernel may drop). Run
    with --train_root at another checkout (the same train.py flags) to measure its code on the same files.
    """
    root = os.path.abspath(args.train_root or ROOT)
    work = tempfile.mkdtemp(prefix="resume_memory-")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads or 1), TRAIN_BACKEND="gloo", CUDA_VISIBLE_DEVICES="",
               BENCH_TRAIN_ROOT=root, PYTHONPATH=root)
    child = os.path.join(work, "rss_child.py")
    with open(child, "w") as f:
        f.write(RSS_CHILD)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "tiny", "prepare.py"), "--out_dir",
                    os.path.join(work, "tiny"), "--n_train", "8", "--n_valid", "2", "--n_test", "2"], check=True,
                   capture_output=True)
    shape = SIZES[args.sizes[0]]
    flags = ["--dataset", "tiny", "--data_dir", work, "--init_from", "scratch", "--n_layer", str(shape["n_layer"]),
             "--n_head", str(shape["n_head"]), "--n_embd", str(shape["n_embd"]), "--block_size", "128",
             "--batch_size", "1", "--grad_accum", "2", "--epochs", "1", "--save_every", "1", "--device", "cpu",
             "--threads", "1"]
    whole, sharded = os.path.join(work, "whole"), os.path.join(work, "sharded")
    kill = dict(env, TRAIN_TEST_SIGNALS="1:KILL", BENCH_TRAIN_ROOT=ROOT, PYTHONPATH=ROOT)  # saved at step 1
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out_dir", whole], env=kill,
                   capture_output=True)
    subprocess.run([*torchrun, os.path.join(ROOT, "train.py"), *flags, "--out_dir", sharded, "--fsdp", "sharded"],
                   env=kill, capture_output=True)
    size = lambda d: sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs if
                         f.endswith((".pt", ".distcp")) and "best" not in f)
    print(f"[{args.sizes[0]}] resume memory of {root} (torch {torch.__version__}): a checkpoint of "
          f"{size(whole) / 2**30:.2f} GiB (whole), {size(sharded) / 2**30:.2f} GiB (sharded)", flush=True)
    for what, cmd in (("1 process, whole checkpoint", [sys.executable, child]),
                      ("2 processes --fsdp, whole checkpoint", [*torchrun, child, "--fsdp"]),
                      ("2 processes --fsdp sharded, sharded checkpoint", [*torchrun, child])):
        out = whole if "whole" in what else sharded
        r = subprocess.run([*cmd, "--out_dir", out, "--resume", "--device", "cpu"], cwd=root, env=env,
                           capture_output=True, text=True)
        rows = sorted(map(json.loads, re.findall(r"RSS (\{[^}]*\})", r.stdout)), key=lambda d: d["rank"])
        if not rows:
            sys.exit(f"bench.py --resume_memory: {what} failed:\n{r.stderr[-3000:]}")
        gib = lambda key: ", ".join(f"{d[key] / 2**30:.2f}" for d in rows)
        print(f"[{args.sizes[0]}] {what}: peak {gib('peak')} GiB per process of its own memory (anonymous, sampled "
              f"every 2 ms), {gib('held')} GiB held once loaded; peak resident with mapped files {gib('hwm')} GiB",
              flush=True)
    shutil.rmtree(work)


def bench_demo_step(args):
    """(e): the demo's step, the last block where read and everywhere, against the machine's matmul rate."""
    n = 2048
    a = torch.randn(n, n)

    def matmul_rate():  # measured between the steps' rounds: on a loaded machine, at the same moments as they
        t, _ = timed(lambda: [a @ a for _ in range(2)], "cpu")
        return 2 * 2 * n ** 3 / t / 1e9
    rows, peaks = [], []
    for mode in ("coconut", "cot", "nocot"):
        _, _, batches, step = demo_step_setup(mode)
        times, flops = {True: [], False: []}, {}
        for skip in (True, False):
            with FlopCounterMode(display=False) as fc:
                step(batches[0], skip)
            flops[skip] = fc.get_total_flops()
        mode_peaks = []
        for r in range(args.warmup + args.repeats):
            for skip in (True, False):  # interleaved: a noisy neighbour hits both alike
                t, _ = timed(lambda: [step(b, skip) for b in batches], "cpu")
                if r >= args.warmup:
                    times[skip].append(t / len(batches))
            if r >= args.warmup:
                mode_peaks.append(matmul_rate())
        read, every = (statistics.median(times[k]) for k in (True, False))
        rate = flops[True] / read / 1e9
        peaks += mode_peaks
        rows.append(f"{mode:>8} {flops[True] / 1e9:11.2f} {flops[False] / 1e9:7.2f} {1e3 * read:11.1f} "
                    f"{1e3 * every:7.1f} {read / every:6.2f} {rate:9.1f} {rate / statistics.median(mode_peaks):9.0%}")
    print(f"(e) the demo's step: torch {torch.__version__}, {torch.get_num_threads()} threads; a {n}x{n} fp32 matmul "
          f"runs at {statistics.median(peaks):.0f} GFLOP/s here (the median of {len(peaks)} measures between the "
          f"steps' rounds, {min(peaks):.0f}-{max(peaks):.0f}; each row's 'of peak' is against its own rounds')")
    print(f"{'':>8} {'GFLOP a step':>19} {'ms a step':>19} {'':>6} {'matmul rate':>19}")
    print(f"{'method':>8} {'where read':>11} {'all':>7} {'where read':>11} {'all':>7} {'ratio':>6} {'GFLOP/s':>9} "
          f"{'of peak':>9}")
    print("\n".join(rows))


def demo_step_setup(mode="coconut", n_batches=8, coconut_class=Coconut, thought_labels=None):
    """The demo's model (seed 0), AdamW and n_batches of its batches for one method -> (model, optimizer,
    batches, step): step(batch, skip_unread=True) is one optimizer step and returns its loss. thought_labels: the preset's
    (None), or 1, the gold labels that every commit's coconut.py understands (--against)."""
    cfg = DATASET_DEFAULTS["reach"]
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(None):
            reach_prepare.main(["--out_dir", tmp, "--n_train", str(cfg["batch_size"] * n_batches), "--n_valid", "1",
                                "--n_test", "1"])
        records = load_records(os.path.join(tmp, "train.json"))
    tok = symbol_tokenizer(records)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                        block_size=cfg["block_size"], vocab_size=tok.vocab_size))
    model = coconut_class(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id, feedback=mode == "coconut")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    stage = cfg["max_latent_stage"] if mode == "coconut" else 0
    examples = build_examples([tokenize(r, tok) for r in records], stage, mode, cfg["c_thought"],
                              cfg["max_latent_stage"], tok=tok, markers=bool(cfg["markers"]),
                              thought_labels=cfg["thought_labels"] if thought_labels is None else thought_labels)
    batches = [collate(examples[i:i + cfg["batch_size"]], tok.pad_id, tok.latent_id)
               for i in range(0, len(examples), cfg["batch_size"])]

    def step(b, skip_unread=True):  # skip_unread=False: the last block over every column, (e)'s "all"
        args4 = (b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
        sets = dict(label_sets=b["label_sets"], spread=cfg["set_loss"] == "spread") if "label_sets" in b else {}
        loss = model(*args4, **sets)[0] if skip_unread else loss_over_every_column(model, *args4, **sets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return model, optimizer, batches, step


def coconut_at(rev):
    """coconut.py as committed at rev (git show), imported as a module of its own -> its Coconut class."""
    source = subprocess.run(["git", "show", f"{rev}:coconut.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode:
        raise SystemExit(f"bench.py: error: --against {rev}: {source.stderr.strip()}")
    module = type(sys)(f"coconut_{rev}")
    exec(compile(source.stdout, f"{rev}:coconut.py", "exec"), module.__dict__)
    return module.Coconut


def bench_against(args):
    """--demo_step --against REV: Coconut's step, coconut.py at REV against today's, steps alternating."""
    # the gold thought labels on both sides: a commit before --set_loss knows no set labels, and the passes are the same
    sides = {args.against: demo_step_setup(coconut_class=coconut_at(args.against), thought_labels=1),
             "now": demo_step_setup(thought_labels=1)}
    times, losses = {k: [] for k in sides}, {k: [] for k in sides}
    for k, (_, _, batches, step) in sides.items():
        step(batches[0])  # warm-up, the same for both
    order = list(sides)
    for r in range(args.warmup + args.repeats):
        for j in range(len(sides["now"][2])):
            for k in (order if (r + j) % 2 == 0 else order[::-1]):  # alternate which goes first
                t, loss = timed(lambda: sides[k][3](sides[k][2][j]), "cpu")
                if r >= args.warmup:
                    times[k].append(t)
                losses[k].append(loss)
    weights = [side[0].state_dict() for side in sides.values()]
    same = losses[order[0]] == losses["now"] and all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    paired = statistics.median(a / b for a, b in zip(times["now"], times[args.against]))
    print(f"(e) Coconut's step, coconut.py now against {args.against}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(default)')}")
    before, now = (1e3 * statistics.median(times[k]) for k in (args.against, "now"))
    print(f"  ms a step (medians of {len(times['now'])}): {args.against} {before:.1f}, now {now:.1f}; now / "
          f"{args.against}, the median of paired steps: {paired:.3f}; losses and weights bit-identical after "
          f"{len(losses['now'])} steps: {same}")


def bench_profile(args):
    """--demo_step --profile: where Coconut's demo step spends its time, by op (torch.profiler, a few steps)."""
    from torch.profiler import ProfilerActivity, profile
    _, _, batches, step = demo_step_setup(n_batches=4)
    for b in batches:
        step(b)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for b in batches:
            step(b)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    by_op = Counter()
    for e in events:
        by_op[e.key] += e.self_cpu_time_total
    B = batches[0]["input_ids"].size(0)

    def one_column(s):  # (B, 1, C), (B * nh, 1, hs) or a one-column chunk (B * nh, T, 1); (B, nh, 1, hs) queries
        # (not a mask's (B, 1, T, S)); a matmul's (B, C) x (C, n): B rows, where a longer pass has B x T
        return len(s) == 3 and 1 in s[1:] or len(s) == 4 and s[2] == 1 or len(s) == 2 and B in s
    one = [e for e in events if any(one_column(s) for s in e.input_shapes if isinstance(s, list))]
    calls = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"(e) where Coconut's demo step goes: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(default)')}; {len(batches)} steps, "
          f"{1e3 * total / 1e6 / len(batches):.0f} ms a step of ops' own time, {calls / len(batches):.0f} aten calls a step")
    print("  by op: " + ", ".join(f"{k.replace('aten::', '')} {v / total:.1%}" for k, v in by_op.most_common(10)))
    print(f"  the one-column thought passes (ops with a one-column input): "
          f"{sum(e.self_cpu_time_total for e in one) / total:.1%} of the time, "
          f"{sum(e.count for e in one) / len(batches):.0f} calls a step")


def loss_over_every_column(model, input_ids, attention_mask, labels, position_ids, label_sets=None, spread=False):
    """Coconut's training loss with the last block run over every column (the "all" of --demo_step), where
    Coconut.forward runs it only in the columns whose output a label reads: the same loss, more work."""
    hidden, _ = model.think(input_ids, attention_mask, position_ids)  # (B, L, C), read=None: every column
    targets = labels[:, 1:]                                           # (B, L-1)
    if label_sets is None:
        scored = targets != -100
        return torch.nn.functional.cross_entropy(model.gpt.lm_head(hidden[:, :-1][scored]), targets[scored])
    sets = label_sets[:, 1:]                                          # (B, L-1, K)
    scored = (targets != -100) | (sets >= 0).any(-1)
    return set_cross_entropy(model.gpt.lm_head(hidden[:, :-1][scored]), targets[scored], sets[scored], spread)


def load_official(path, model):
    """The authors' Coconut around a Hugging Face GPT2LMHeadModel holding our model's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel  # only for this comparison; not a dependency
    sys.path.insert(0, path)
    import importlib.util
    spec = importlib.util.spec_from_file_location("official_coconut", os.path.join(path, "coconut.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = model.gpt.config
    hf = GPT2LMHeadModel(GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size,
                                    vocab_size=c.vocab_size, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    sd = {k: v for k, v in model.gpt.state_dict().items()}
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf.load_state_dict({k: (v.t() if k.endswith(conv1d) else v) for k, v in sd.items()}, strict=False)
    hf.to(model.gpt.lm_head.weight.device).eval()
    return mod.Coconut(hf, model.latent_id, model.start_id, model.end_id, model.eos_id)


# -----------------------------------------------------------------------------
# (c) "Reasoning by Superposition" (Zhu, Hao et al., arXiv 2505.12514): one epoch, ours vs the authors' code

SP_SHAPE = dict(n_layer=2, n_head=8, n_embd=768)  # the paper's model (about 15M parameters)
SP_SMALL = dict(n_layer=2, n_head=2, n_embd=64)   # --sp_small: the same run on a tiny model (tests)
# train.py's prosqa_graph preset, as the authors' args/prosqa_coconut_2l_8h_768d.yaml
SP_RECIPE = dict(max_latent_stage=4, c_thought=1, lr=1e-4, weight_decay=0.01, dropout=0.1, block_size=512,
                 max_new_tokens=16, eval_batch_size=256)
SP_FULL = dict(graphs=14785, valid=257, epochs=300, batch=256)  # the full run that the estimate is for
SP_AUTHORS_GPU_SECONDS = 24 * 3600 * 2  # reported: about 24 h on two A100 80GB
SP_GPU_TFLOPS = 100.0  # assumed, not measured: no GPU was lent to this project so far
SP_GPU_ASSUMPTION = "an H200 in fp32 with TF32 matmuls, about 20% of its 495 TFLOP/s dense peak"
SP_CONFIG = os.path.join("configs", "symbol-2layer-8head-768dim.json")  # the authors' model config
SP_MODULES = ("stokenizer", "dataset", "coconut", "utils")               # the authors' files this imports


def sp_records(args, tmp):
    """(train, valid, where from): data/prosqa_graph records from --data (a folder with train.json and
    valid.json; the first --sp_train / --sp_valid records) or generated into tmp by its prepare.py."""
    if args.data:
        if not os.path.isdir(args.data):
            sys.exit(f"bench.py: --data {args.data}: with --superposition, a folder with train.json and valid.json "
                     f"(made by data/prosqa_graph/prepare.py)")
        train = load_records(os.path.join(args.data, "train.json"))[:args.sp_train]
        valid = load_records(os.path.join(args.data, "valid.json"))[:args.sp_valid]
        source = f"read from {args.data}"
    else:
        cmd = [sys.executable, os.path.join(ROOT, "data", "prosqa_graph", "prepare.py"), "--generate", "--n_train",
               str(args.sp_train), "--n_valid", str(args.sp_valid), "--n_test", "0", "--seed", str(args.sp_seed),
               "--out_dir", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        train, valid = (load_records(os.path.join(tmp, f"{s}.json")) for s in ("train", "valid"))
        source = f"generated by data/prosqa_graph/prepare.py --generate --seed {args.sp_seed}"
    if not train or not valid:
        sys.exit("bench.py: --superposition needs at least one training and one validation graph")
    return train, valid, source


def superposition_record(r):
    """
    One data/prosqa_graph record in the authors' format (their data/prosqa_*_graph_4_coconut.json, read by
    their dataset.py): the graph fields with every node written as the integer of its symbol, so that their
    token "7" is our symbol "7" (also under prepare.py --permute), and neighbor_k[k], the hop-k nodes of the
    shortest root->target paths (k = 0..hops), which is analysis.node_groups(r, k)["optimal"]: the two agree
    on all 676 records of their valid and test files. Their code uses len(steps) as the number of hops.
    """
    ids = [int(s) for s in r["idx_to_symbol"]]
    hops = len(r["steps"])
    return dict(question=r["question"], answer=r["answer"], steps=list(r["steps"]),
                idx_to_symbol=[str(i) for i in range(max(ids) + 1)],
                edges=[[ids[a], ids[b]] for a, b in r["edges"]], root=ids[r["root"]], target=ids[r["target"]],
                neg_target=ids[r["neg_target"]],
                neighbor_k={str(k): sorted(ids[v] for v in node_groups(r, k)["optimal"]) for k in range(hops + 1)})


def sp_ours(train, valid, args, device):
    """One epoch of train.py's prosqa_graph recipe at --sp_stage, through the library: the epoch's sequences
    (questions reshuffled, uniform_prob stages drawn, as train.py's epoch 0), AdamW steps on collate's batches,
    then validation accuracy with evaluate.evaluate (batched, KV cache). A generator (see sp_interleave): it
    yields (phase, seconds) after each timed piece of work and returns its results."""
    R, M, stage = SP_RECIPE, SP_RECIPE["max_latent_stage"], args.sp_stage
    tok = symbol_tokenizer(train + valid)
    torch.manual_seed(args.sp_seed)
    gpt = GPT(GPTConfig(**(SP_SMALL if args.sp_small else SP_SHAPE), block_size=R["block_size"],
                        vocab_size=tok.vocab_size, dropout=R["dropout"]))
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=R["lr"], weight_decay=R["weight_decay"])
    model.train()

    t0 = time.perf_counter()  # the epoch's data
    rng = random.Random(f"{args.sp_seed}/0")
    tokenized = [tokenize(r, tok)._replace(question=tok.encode(graph_question(r, rng) + "\n")) for r in train]
    examples = build_examples(tokenized, stage, "coconut", R["c_thought"], M, True, args.sp_uniform_prob, rng, tok,
                              block_size=R["block_size"])
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.sp_seed * 1_000_003)).tolist()
    train_s = time.perf_counter() - t0
    yield "data", train_s
    losses, widths = [], []
    for s in range(0, len(perm), args.sp_batch):
        t0 = time.perf_counter()
        b = collate([examples[i] for i in perm[s:s + args.sp_batch]], pad_id=tok.pad_id, latent_id=tok.latent_id)
        b = {k: v.to(device) for k, v in b.items()}
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        widths.append(b["input_ids"].size(1))
        sync(device)
        dt = time.perf_counter() - t0
        train_s += dt
        yield "step", dt

    t0 = time.perf_counter()
    prompts = [make_question(tokenize(r, tok), stage, "coconut", R["c_thought"], M, True, tok) for r in valid]
    r = evaluate(model, tok, prompts, [x["answer"] for x in valid], R["max_new_tokens"], R["eval_batch_size"])
    sync(device)
    val_s = time.perf_counter() - t0
    yield "validation", val_s
    return dict(
        train_s=train_s, val_s=val_s, correct=r["correct"], total=r["total"], loss=statistics.mean(losses),
        steps=len(losses), width=statistics.mean(widths), sequences=len(examples),
        params=sum(p.numel() for p in model.parameters()), vocab=tok.vocab_size,
        tokens=statistics.mean(len(e["input_ids"]) for e in examples),
        thoughts=statistics.mean(e["input_ids"].count(tok.latent_id) for e in examples),
        labels=statistics.mean(sum(x != -100 for x in e["labels"]) for e in examples),
        questions=Counter(tuple(sorted(tok.decode(t.question).split())) for t in tokenized),
        prompt_tokens=statistics.mean(len(p) for p in prompts), new_tokens=r["mean_new_tokens"],
        val_thoughts=statistics.mean(p.count(tok.latent_id) for p in prompts))


def load_superposition(path):
    """The authors' modules, imported from their checkout under names of their own (their coconut.py is not
    ours, nor the official Coconut's). Their dataset.py imports Hugging Face `datasets` for a name it never
    uses: when that package is missing, a stand-in module holds the import (their file stays as it is)."""
    import importlib.util
    from types import ModuleType, SimpleNamespace
    missing = [f for f in [m + ".py" for m in SP_MODULES] + [SP_CONFIG] if not os.path.isfile(os.path.join(path, f))]
    if missing:
        sys.exit(f"bench.py: --superposition {path}: not a checkout of Ber666/reasoning-by-superposition "
                 f"(missing {', '.join(missing)}); --superposition ours runs our side alone")
    try:
        import transformers  # before any stand-in: transformers looks at which packages exist when imported
    except ImportError:
        sys.exit("bench.py: the authors' code needs Hugging Face transformers (not a dependency of this project): "
                 "pip install transformers==4.46.2")
    stand_in = None
    try:
        import datasets  # noqa: F401
    except ImportError:
        stand_in = sys.modules["datasets"] = ModuleType("datasets")
        stand_in.Dataset = None
    mods = {}
    try:
        for name in SP_MODULES:
            spec = importlib.util.spec_from_file_location(f"superposition_{name}", os.path.join(path, f"{name}.py"))
            mods[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mods[name])
    finally:
        if stand_in is not None:
            del sys.modules["datasets"]
    return SimpleNamespace(transformers=transformers, stand_in=stand_in is not None, **mods)


def sp_theirs(sp, path, train, valid, args, device, tmp):
    """
    One epoch of the authors' run.py loop (one process, so AdamW on their Coconut where run.py wraps it in
    FSDP), their code unmodified: their set_seed, their model config (a Hugging Face GPT2LMHeadModel from
    AutoModelForCausalLM.from_config), their STokenizer, get_graph_latent_question_dataset,
    get_graph_latent_cot_dataset and MyCollator on our graphs in their format (superposition_record), their
    Coconut's forward for the training steps, and for validation their Coconut.generate, one question at a
    time, no cache, with synced_gpus=True and max_new_tokens=1 as run.py's validation during training calls it,
    and run.py's answer rule. DataLoaders without worker processes (run.py: num_workers=1, pin_memory).
    Workarounds, without touching their files (each is printed when it applies):
      - their get_graph_latent_question_dataset returns an unassigned variable unless torch.cuda.device_count()
        > 1 (the branch their 2-GPU run takes): it runs with device_count reading 2, under a one-process gloo
        group, as their DistributedSamplers need one anyway;
      - STokenizer sets its pad/eos/bos tokens before PreTrainedTokenizer.__init__, which in transformers
        < 4.47 resets them to None (then their collator cannot pad): they are set again, to the same "<eos>".
    """
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler
    notes = [f"transformers {sp.transformers.__version__}"]
    if sp.stand_in:
        notes.append("`datasets` not installed: a stand-in module for their unused `from datasets import Dataset`")
    train_path, val_path = os.path.join(tmp, "sp_train.json"), os.path.join(tmp, "sp_valid.json")
    for recs, p in ((train, train_path), (valid, val_path)):
        with open(p, "w") as f:
            json.dump([superposition_record(r) for r in recs], f)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        configs = sp.utils.Config(dict(debug=False, uniform_prob=args.sp_uniform_prob))
        sp.utils.set_seed(args.sp_seed)
        cfg = sp.transformers.AutoConfig.from_pretrained(os.path.join(path, SP_CONFIG),
                                                         **(SP_SMALL if args.sp_small else {}))
        base = sp.transformers.AutoModelForCausalLM.from_config(cfg)
        tokenizer = sp.stokenizer.STokenizer()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token = tokenizer.bos_token = "<eos>"
            notes.append('STokenizer\'s pad/eos/bos reset to None by this transformers: set again to "<eos>"')
        latent_id, start_id, end_id = (tokenizer.convert_tokens_to_ids(t)
                                       for t in ("<|latent|>", "<|start-latent|>", "<|end-latent|>"))
        model = sp.coconut.Coconut(base, latent_id, start_id, end_id, tokenizer.eos_token_id).to(device)
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=SP_RECIPE["lr"], weight_decay=SP_RECIPE["weight_decay"])
        collator = sp.dataset.MyCollator(tokenizer, latent_id=latent_id, label_pad_token_id=-100)

        # run.py builds the validation questions first (its random draws come first), then the training set
        t0 = time.perf_counter()
        with mock.patch.object(torch.cuda, "device_count", return_value=2):
            dataset_gen_val = sp.dataset.get_graph_latent_question_dataset(val_path, args.sp_stage, configs, tokenizer)
        t_val_data = time.perf_counter() - t0
        notes.append("their get_graph_latent_question_dataset run on its multi-GPU branch (device_count read as 2, "
                     "a one-process gloo group): its one-GPU branch returns an unassigned variable")
        t0 = time.perf_counter()
        dataset_train = sp.dataset.get_graph_latent_cot_dataset(train_path, args.sp_stage, configs, tokenizer)
        train_s = time.perf_counter() - t0
        skip = {tokenizer.eos_token_id, latent_id, tokenizer.convert_tokens_to_ids("[A]")}
        stats = dict(  # before the collator pads these very lists in place
            sequences=len(dataset_train), tokens=statistics.mean(len(d["input_ids"]) for d in dataset_train),
            thoughts=statistics.mean(d["input_ids"].count(latent_id) for d in dataset_train),
            labels=statistics.mean(sum(x != -100 for x in d["labels"]) for d in dataset_train),
            questions=Counter(tuple(sorted(tokenizer.convert_ids_to_tokens(
                [t for t, l in zip(d["input_ids"], d["labels"]) if l == -100 and t not in skip])))
                for d in dataset_train))
        yield "data", t_val_data + train_s
        loader = DataLoader(dataset_train, num_workers=0, shuffle=False, batch_size=args.sp_batch,
                            collate_fn=collator, sampler=DistributedSampler(dataset_train, shuffle=True))
        model.train()
        losses, widths = [], []
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)  # the collator's time is the step's
            if batch is None:
                break
            batch = {k: batch[k].to(device) for k in batch.keys() if k != "idx"}
            outputs = model(**batch)
            loss = outputs.loss / 1  # gradient_accumulation_steps: 1
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            widths.append(batch["input_ids"].size(1))
            sync(device)
            dt = time.perf_counter() - t0
            train_s += dt
            yield "step", dt

        t0 = time.perf_counter()
        loader = DataLoader(dataset_gen_val, num_workers=0, batch_size=1, collate_fn=collator,
                            sampler=DistributedSampler(dataset_gen_val, shuffle=False))
        answers_val = [d["target"] for d in json.load(open(val_path))]
        cor = total = passes = prompt_tokens = thoughts = 0
        with torch.no_grad():
            model.eval()
            for batch in loader:
                test_idx = batch["idx"][0]
                batch = {k: v.to(device) for k, v in batch.items()
                         if v is not None and k not in ["idx", "position_ids"]}
                answer = str(answers_val[test_idx.cpu().item()])
                total += 1
                prompt_tokens += batch["input_ids"].size(1)
                thoughts += int((batch["input_ids"] == latent_id).sum())
                outputs = model.generate(**batch, max_new_tokens=1, synced_gpus=True,
                                         eos_token_id=tokenizer.eos_token_id)
                passes += model.gen_forward_cnt
                text_output = tokenizer.decode(outputs[0], skip_special_tokens=True).replace("<eos>", "").strip()
                answer_output = text_output.split("[A]")[-1].replace(",", "").strip()
                cor += answer_output == answer
        sync(device)
        val_s = t_val_data + time.perf_counter() - t0
        yield "validation", val_s
    finally:
        if own_group:
            dist.destroy_process_group()
    return dict(train_s=train_s, val_s=val_s, correct=cor, total=total, loss=statistics.mean(losses),
                steps=len(losses), width=statistics.mean(widths), params=params, vocab=cfg.vocab_size,
                attn=getattr(base.config, "_attn_implementation", "?"), passes=passes / total, notes=notes,
                prompt_tokens=prompt_tokens / total, val_thoughts=thoughts / total, **stats)


def sp_estimate(params, tokens, val_tokens, tflops):
    """FLOP of the full run for our loop, and its GPU seconds at an assumed sustained rate (not a measurement).
    Training: 6 x parameters x tokens, every column of every sequence counted once, the thought columns included
    (each thought pass runs one column per sequence on the KV cache: nothing is computed twice). Validation:
    2 x parameters x tokens of the cached generation (prompt, thoughts and answer). Attention's own FLOPs
    (about 1% at these lengths) are left out."""
    F = SP_FULL
    train = 6 * params * tokens * F["graphs"] * F["epochs"]
    val = 2 * params * val_tokens * F["valid"] * F["epochs"]
    return train, val, train + val, (train + val) / (tflops * 1e12)


def sp_interleave(sides, say):
    """
    Run the sides' generators by turns, one timed piece of work (the epoch's data, a training step, the
    validation) of each per turn, so that a noisy neighbour on a shared machine slows both alike; say() gets
    a line per turn. -> {name: what its generator returned}. (No piece may end inside a torch.no_grad(): the
    grad mode is global and would carry over to the other side.)
    """
    live, results, turn = dict(sides), {}, 0
    while live:
        done = []
        for name, gen in live.items():
            try:
                phase, seconds = next(gen)
                done.append(f"{name} {phase} {seconds:.2f} s")
            except StopIteration as stop:
                results[name] = stop.value
        live = {k: v for k, v in live.items() if k not in results}
        turn += 1
        if done:
            say(f"turn {turn}: " + ", ".join(done))
    return results


def bench_superposition(args):
    device, R = args.device, SP_RECIPE
    theirs_path = None if args.superposition == "ours" else args.superposition
    if args.sp_train < 1 or args.sp_valid < 1 or args.sp_batch < 1 or args.sp_stage < 0:
        sys.exit("bench.py: --sp_train, --sp_valid and --sp_batch must be >= 1, --sp_stage >= 0")
    shape = SP_SMALL if args.sp_small else SP_SHAPE
    P = "[superposition]"
    sp = load_superposition(theirs_path) if theirs_path else None  # a wrong path or no transformers: stop now
    with tempfile.TemporaryDirectory() as tmp:
        train, valid, source = sp_records(args, tmp)
        steps = -(-len(train) // args.sp_batch)
        print(f"{P} device {device}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{len(train)} training graphs, {len(valid)} validation graphs ({source}); stage {args.sp_stage} "
              f"(max_latent_stage {R['max_latent_stage']}), uniform_prob {args.sp_uniform_prob}, one epoch = "
              f"{steps} AdamW steps of batch {args.sp_batch} (lr {R['lr']}, weight decay {R['weight_decay']}), "
              f"model {shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} wide, "
              f"dropout {R['dropout']}, from scratch", flush=True)
        sides = {"ours": sp_ours(train, valid, args, device)}
        if sp is not None:
            sides["theirs"] = sp_theirs(sp, theirs_path, train, valid, args, device, tmp)
        results = sp_interleave(sides, lambda line: print(f"{P} {line}", flush=True))
    ours, theirs = results["ours"], results.get("theirs")
    print(f"{P} ours: P={ours['params']} parameters (vocabulary {ours['vocab']}, block {R['block_size']}); "
          f"training epoch {ours['train_s']:.2f} s ({ours['steps']} steps, mean batch width "
          f"{ours['width']:.1f} columns, mean loss {ours['loss']:.4f}); validation {ours['val_s']:.2f} s "
          f"({ours['total']} questions, batched, KV cache, {ours['val_thoughts']:.2f} thoughts, "
          f"{ours['new_tokens']:.1f} new tokens each); accuracy {100 * ours['correct'] / ours['total']:.2f}% "
          f"({ours['correct']}/{ours['total']})")

    print(f"{P} data, ours: {ours['sequences']} training sequences, {ours['tokens']:.2f} tokens/sequence "
          f"({ours['thoughts']:.2f} thoughts, {ours['labels']:.2f} label tokens: question <start> thoughts <end> "
          f"remaining steps ### answer <eos>), {ours['prompt_tokens']:.2f} prompt tokens/validation question")
    if theirs is not None:
        same = ours["questions"] == theirs["questions"]
        print(f"{P} data, theirs: {theirs['sequences']} training sequences, {theirs['tokens']:.2f} tokens/sequence "
              f"({theirs['thoughts']:.2f} thoughts, {theirs['labels']:.2f} label tokens: <eos> question thoughts "
              f"then one node, or [A] answer), {theirs['prompt_tokens']:.2f} prompt tokens/validation question "
              f"({theirs['val_thoughts']:.2f} thoughts)")
        print(f"{P} same data: {ours['sequences']} / {theirs['sequences']} training sequences; the question's "
              f"symbols (edges, options, root; order aside) identical for every graph: {same}")
        print(f"{P} theirs: {theirs['params']} parameters (Hugging Face GPT2LMHeadModel, vocabulary "
              f"{theirs['vocab']}, 1024 positions, attention {theirs['attn']}); "
              f"training epoch {theirs['train_s']:.2f} s "
              f"({theirs['steps']} steps, mean batch width {theirs['width']:.1f} columns, mean loss "
              f"{theirs['loss']:.4f}); validation {theirs['val_s']:.2f} s ({theirs['total']} questions one at a time, "
              f"uncached, {theirs['passes']:.1f} forward passes each: run.py's synced_gpus=True); accuracy "
              f"{100 * theirs['correct'] / theirs['total']:.2f}% ({theirs['correct']}/{theirs['total']})")
        print(f"{P} their code: " + "; ".join(theirs["notes"]))
        print(f"{P} theirs/ours: training {theirs['train_s'] / ours['train_s']:.1f}x, "
              f"validation {theirs['val_s'] / ours['val_s']:.1f}x")
    print(f"{P} accuracy: one epoch of {steps} steps from random weights teaches nothing yet; chance (50%) needs a "
          f"model that already answers with one of the two options, so anything from 0% to about 50% is expected")
    tokens, val_tokens = round(ours["tokens"], 2), round(ours["prompt_tokens"] + 3, 2)
    train_f, val_f, total_f, gpu_s = sp_estimate(ours["params"], tokens, val_tokens, args.sp_gpu_tflops)
    F = SP_FULL
    print(f"{P} estimate (not a measurement), ours, the full run ({F['epochs']} epochs of {F['graphs']} graphs at "
          f"batch {F['batch']}, validation on {F['valid']} each epoch; this stage's sequence length for every "
          f"epoch): 6 x P={ours['params']} params x {tokens:.2f} tokens/sequence x {F['graphs'] * F['epochs']} "
          f"sequences = {train_f:.4e} FLOP training + 2 x P x {val_tokens:.2f} tokens/question x "
          f"{F['valid'] * F['epochs']} questions = {val_f:.4e} FLOP validation = {total_f:.4e} FLOP total "
          f"(the reference: about 5e16)")
    authors = SP_AUTHORS_GPU_SECONDS
    why = f" ({SP_GPU_ASSUMPTION})" if args.sp_gpu_tflops == SP_GPU_TFLOPS else ""
    print(f"{P} at an assumed sustained {args.sp_gpu_tflops:g} TFLOP/s{why} that is "
          f"{gpu_s:.0f} s = {gpu_s / 60:.1f} min of GPU time; the authors report about 24 h on two A100 80GB = "
          f"{authors} GPU-seconds ({authors / gpu_s:.0f}x this estimate; {total_f / authors / 1e12:.2f} TFLOP/s "
          f"per GPU on average)")


def main():
    p = Parser(prog="machinery/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="*", default=["gpt2", "small"], choices=list(SIZES),
                   help="model shapes for the speed ratios (none: skip them)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--data", default=None, help="ProsQA-format JSON (default: data/prosqa/valid.json or ../shared/data); "
                   "with --superposition, a folder with data/prosqa_graph's train.json and valid.json")
    p.add_argument("--batch_size", type=int, default=8, help="training batch (records)")
    p.add_argument("--thoughts", type=int, default=6, help="stage of the training batch (c=1: its thoughts)")
    p.add_argument("--questions", type=int, default=16, help="questions to generate for")
    p.add_argument("--gen_batch", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--official", default=None, help="a checkout of facebookresearch/coconut to compare with")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--memory", nargs="*", default=None, choices=("before", "after"),
                   help="also the peak memory of a training step: before (logits everywhere, a copied cache) and "
                        "after (today's); no value: both")
    p.add_argument("--memory_batch", type=int, default=8, help="records in that step (the paper's micro-batch: 32)")
    p.add_argument("--memory_child", default=None, choices=("before", "after"), help=argparse.SUPPRESS)
    p.add_argument("--against", default=None, metavar="REV", help="with --demo_step: coconut.py at a git commit "
                   "against today's, steps alternating: the paired ratio and whether results stay bit-identical")
    p.add_argument("--profile", action="store_true", help="with --demo_step: Coconut's step by op (torch.profiler)")
    p.add_argument("--memory_estimate", nargs="+", default=None, metavar="ROWS:QUESTION:THOUGHTS:ANSWER",
                   help="machinery/memory.py's step estimate against the measured peak, per --sizes, on batches of "
                        "random tokens in Coconut's layout")
    p.add_argument("--resume_memory", action="store_true",
                   help="(f) the peak CPU memory per process of a resume, whole and sharded, for --sizes' first shape")
    p.add_argument("--train_root", default=None, help="--resume_memory: the checkout whose train.py resumes (this one)")
    p.add_argument("--dropout", type=float, default=0.0, help="--memory_estimate's model dropout (GPT-2's: 0.1)")
    p.add_argument("--estimate_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--demo_step", action="store_true", help="(e) the CPU demo's step, the last block where read "
                                                             "and everywhere, against the matmul rate")
    f = p.add_argument_group("(d) --fsdp N: train.py --fsdp, fully_shard's default and DDP over N processes")
    f.add_argument("--fsdp", type=int, default=0, metavar="N", help="processes (2 on a CPU); the first of --sizes")
    f.add_argument("--fsdp_batch", type=int, default=4, help="sequences per micro-batch")
    f.add_argument("--fsdp_micro", type=int, default=2, help="micro-batches per process and optimizer step")
    f.add_argument("--fsdp_child", action="store_true", help=argparse.SUPPRESS)
    f.add_argument("--fsdp_memory", nargs="+", default=None, metavar="SHAPE:GPUS",
                   help="per-GPU memory estimates of Llama runs under --fsdp, from a CPU step of 1 and 2 blocks "
                        f"({', '.join(LLAMA_SHAPES)}; e.g. 8b:8 1b:2)")
    f.add_argument("--layer_memory_child", nargs=2, default=None, help=argparse.SUPPRESS)
    s = p.add_argument_group("(c) --superposition: one epoch of the 'Reasoning by Superposition' setting")
    s.add_argument("--superposition", default=None, metavar="CHECKOUT",
                   help="a checkout of Ber666/reasoning-by-superposition to compare with, or 'ours' for our side alone "
                        "(with it, --data is a folder with data/prosqa_graph's train.json and valid.json)")
    s.add_argument("--sp_train", type=int, default=64, help="training graphs (the epoch)")
    s.add_argument("--sp_valid", type=int, default=32, help="validation graphs")
    s.add_argument("--sp_batch", type=int, default=16, help="sequences per AdamW step (the recipe: 256)")
    s.add_argument("--sp_stage", type=int, default=4, help="curriculum stage (4: the last, 4 thoughts)")
    s.add_argument("--sp_uniform_prob", type=float, default=0.1, help="the recipe's random-stage probability")
    s.add_argument("--sp_seed", type=int, default=0, help="data, weights and shuffles")
    s.add_argument("--sp_small", action="store_true", help=f"a tiny model ({SP_SMALL}) instead of the paper's")
    s.add_argument("--sp_gpu_tflops", type=float, default=SP_GPU_TFLOPS,
                   help=f"the sustained TFLOP/s assumed for the full run's GPU-time estimate ({SP_GPU_TFLOPS:g}: "
                        f"{SP_GPU_ASSUMPTION.replace('%', '%%')})")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.superposition:
        return bench_superposition(args)
    if args.fsdp_child:
        return fsdp_child(args)
    if args.estimate_child:
        return estimate_child(args)
    if args.resume_memory:
        return bench_resume_memory(args)
    if args.memory_estimate:
        return bench_memory_estimate(args)
    if args.layer_memory_child:
        return layer_memory_child(args)
    if args.fsdp_memory:
        return bench_fsdp_memory(args)
    if args.fsdp:
        return bench_fsdp(args)
    if args.demo_step:
        return bench_against(args) if args.against else bench_profile(args) if args.profile else bench_demo_step(args)
    candidates = [args.data, os.path.join(ROOT, "data", "prosqa", "valid.json"),
                  os.path.join(ROOT, "..", "shared", "data", "prosqa_valid.json")]
    args.data_path = path = next((c for c in candidates if c and os.path.exists(c)), None)
    if path is None:
        sys.exit("bench.py: no ProsQA data: run `python data/prosqa/prepare.py` (or --generate) or pass --data")
    if args.memory_child:
        return memory_child(args)
    tok = gpt2_tokenizer()
    records = [tokenize(r, tok) for r in load_records(path)]
    batch = collate([make_example(t, args.thoughts) for t in records[:args.batch_size]])
    batch = {k: v.to(args.device) for k, v in batch.items()}
    questions = [make_question(t, args.thoughts) for t in records[:args.questions]]
    print(f"device {args.device}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"training batch {tuple(batch['input_ids'].shape)} with {args.thoughts} thoughts, "
          f"{len(questions)} questions x {args.max_new_tokens} new tokens")
    if args.memory is not None:
        args.memory = args.memory or ["before", "after"]
        bench_memory(args)
    for size in args.sizes:
        torch.manual_seed(0)
        gpt = GPT(GPTConfig(**SIZES[size], vocab_size=50260)).to(args.device)
        model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id)
        official = load_official(args.official, model) if args.official else None
        if official is not None:  # first, the same numbers: loss and logits at every real token
            ids, mask, labels, pos = (batch[k] for k in ("input_ids", "attention_mask", "labels", "position_ids"))
            with torch.no_grad():
                theirs, (loss, logits) = official(ids, mask, labels, pos), model(ids, mask, labels, pos, with_logits=True)
            d = ((theirs.logits - logits).abs() * mask[..., None]).max().item()
            print(f"[{size}] vs official: loss {loss.item():.6f} / {theirs.loss.item():.6f}, max |logit diff| {d:.1e}")
        t = bench_train(model, batch, args, official)
        line = (f"[{size}] train step: plain {t['plain']:.3f}s (logits everywhere), plain {t['labelled']:.3f}s "
                f"(loss only where labels are), coconut {t['coconut']:.3f}s -> (a) coconut/plain = "
                f"{t['coconut'] / t['labelled']:.2f}")
        if official is not None:
            line += (f"; official {t['official']:.3f}s -> official/ours = {t['official'] / t['coconut']:.2f}x; "
                     f"plain step in HF's GPT-2 {t['hf_plain']:.3f}s -> HF/ours = {t['hf_plain'] / t['plain']:.2f}x")
        print(line, flush=True)
        model.eval()
        qps, same = bench_generate(model, questions, args)
        base = qps["one at a time, uncached (official way)"]
        print(f"[{size}] generation, questions/s: " + ", ".join(f"{k} {v:.2f}" for k, v in qps.items()) +
              f" -> (b) batched cached / official way = {qps['batched, cached'] / base:.1f}x; "
              f"same tokens in all three: {same}", flush=True)


if __name__ == "__main__":
    main()
