"""
Train Coconut (or one of the paper's baselines) through the stage curriculum, in the spirit of nanoGPT's train.py.

    python train.py --dataset prosqa --init_from gpt2                        # the paper's ProsQA run
    python train.py --dataset gsm8k --mode cot --init_from gpt2 --out_dir out-gsm-cot
    python train.py --dataset gsm8k --init_from out-gsm-cot/best.pt --start_epoch 3   # GSM8k Coconut
    python train.py --out_dir out-prosqa-coconut --resume                    # continue a stopped run
    torchrun --nproc_per_node 4 train.py --dataset prosqa --init_from gpt2   # several GPUs (DDP)
    python data/tiny/prepare.py && python train.py --demo                    # the CPU demo

Every epoch: train at that epoch's stage (its examples rebuilt and reshuffled from (seed, epoch) alone,
as the official code rebuilds them every epoch), then the validation loss, the validation accuracy by
greedy generation, <out_dir>/ckpt.pt, best.pt when the accuracy improves, and one line per epoch in
<out_dir>/metrics.jsonl. Ctrl-C or SIGTERM saves and stops; a run stopped in any way, even by SIGKILL,
continues with --resume and ends with the same weights as an uninterrupted one (bit for bit on a CPU).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from coconut import Coconut
from curriculum import (MODES, Tokenizer, build_examples, collate, compact_tokenizer, gpt2_tokenizer,
                        load_records, make_question, stage_for_epoch, tokenize)
from gpt import GPT, GPTConfig, HUB_SIZES

# -----------------------------------------------------------------------------
# Settings per data set: the paper's (official args/*.yaml), and the CPU demo's for `tiny`.

DATASETS = ("prosqa", "prontoqa", "gsm8k", "tiny")
DATASET_DEFAULTS = {
    "prosqa": dict(c_thought=1, max_latent_stage=6, stage_epochs=5, epochs=50, max_new_tokens=128),
    "prontoqa": dict(c_thought=1, max_latent_stage=6, stage_epochs=5, epochs=50, max_new_tokens=128),
    "gsm8k": dict(c_thought=2, max_latent_stage=3, stage_epochs=3, epochs=25, max_new_tokens=64),
    # tiny: the CPU demo's small world (data/tiny/prepare.py); a 2-layer model from scratch, a larger lr
    "tiny": dict(c_thought=1, max_latent_stage=4, stage_epochs=1, epochs=8, max_new_tokens=48,
                 batch_size=64, grad_accum=1, lr=1e-3),
}
# Elsewhere the paper's: AdamW lr 1e-4, and 32 sequences x 4 GPUs = 128 per optimizer step.
GENERAL_DEFAULTS = dict(batch_size=32, grad_accum=4, lr=1e-4)
SCRATCH_SHAPE = dict(n_layer=2, n_head=4, n_embd=128, block_size=256)  # --init_from scratch

# Modes whose sequences hold the three new tokens, so GPT-2's vocabulary grows by 3 (official run.py:
# all but cot, no_thoughts and no_cot); and the modes that feed hidden states back as thoughts.
LATENT_MODES = ("coconut", "pause_as_thought", "no_curriculum", "pause")
FEEDBACK_MODES = ("coconut", "no_curriculum")
GPT2_COPY_FROM = "<<"  # the new rows start as copies of this token's row (id 16791), as in the official code

CKPT_FORMAT = "coconut-train/1"
CKPT_KEYS = ("format", "model", "model_args", "coconut", "tokenizer", "config", "epoch", "stage")
# What a resumed run may change; a different value of anything else would make it another run.
RESUMABLE = {"resume", "out_dir", "epochs", "device", "dtype", "compile", "threads", "save_every", "log_every",
             "eval_every", "max_val", "eval_batch_size", "overwrite"}
SIGNAL_HOOK = "TRAIN_TEST_SIGNALS"  # tests: "5:KILL,9:INT" sends this process SIGKILL after step 5, SIGINT after 9

RANK, LOCAL_RANK, WORLD = 0, 0, 1  # set by setup_distributed()
STOP = {"requested": False}        # set by the Ctrl-C / SIGTERM handler, read between steps


class Diverged(RuntimeError):
    """A NaN or infinite loss (or weights): the run stops without saving over the last good checkpoint."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the state is saved, the run stops."""


def log(*a, **k):
    if RANK == 0:
        print(*a, **k, flush=True)


# -----------------------------------------------------------------------------
# Command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                epilog=__doc__.strip().split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data and curriculum (defaults: the paper's for each data set)")
    d.add_argument("--dataset", default="prosqa", help=f"{', '.join(DATASETS)}: reads <data_dir>/<name>/{{train,valid}}.json")
    d.add_argument("--data_dir", default="data")
    d.add_argument("--mode", default="coconut", choices=MODES)
    d.add_argument("--stage_epochs", type=int, default=None, help="epochs per stage (5; GSM8k 3)")
    d.add_argument("--epochs", type=int, default=None, help="50 (GSM8k 25)")
    d.add_argument("--start_epoch", type=int, default=0,
                   help="skip the first epochs (the official `resume: N`): 3 for GSM8k Coconut from a CoT checkpoint")
    d.add_argument("--c_thought", type=int, default=None, help="continuous thoughts per removed step (1; GSM8k 2)")
    d.add_argument("--max_latent_stage", type=int, default=None, help="the last stage that removes a step (6; GSM8k 3)")
    d.add_argument("--pad_latent_to_max", type=int, default=1, choices=(0, 1))
    d.add_argument("--uniform_prob", type=float, default=0.0, help="probability of training an example at a random stage")
    m = p.add_argument_group("model")
    m.add_argument("--init_from", default="gpt2",
                   help=f"{', '.join(HUB_SIZES)}; a .safetensors file or a folder; a .pt checkpoint of train.py; or "
                        f"'scratch' (a new GPT of --n_layer/--n_head/--n_embd/--block_size with a compact vocabulary)")
    for k, v in SCRATCH_SHAPE.items():
        m.add_argument(f"--{k}", type=int, default=v, help="scratch only")
    m.add_argument("--dropout", type=float, default=None,
                   help="default 0.1 from OpenAI's weights (HF's GPT-2 config, what the paper trained), "
                        "0 from scratch, the checkpoint's from a .pt")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch_size", type=int, default=None, help="sequences per micro-batch (32)")
    o.add_argument("--grad_accum", type=int, default=None,
                   help="micro-batches per optimizer step, summed over all processes (4: 4 x 32 = the paper's 128)")
    o.add_argument("--lr", type=float, default=None, help="AdamW learning rate, constant (1e-4)")
    o.add_argument("--weight_decay", type=float, default=0.01, help="on all parameters, as the official code")
    o.add_argument("--reset_optimizer", default=None, choices=("epoch", "stage", "never"),
                   help="fresh AdamW state every epoch (the official yaml of every curriculum run: the default), "
                        "at each stage switch (the paper's text), or never (the default for cot and nocot)")
    r = p.add_argument_group("run")
    r.add_argument("--out_dir", default=None, help="default out-<dataset>-<mode> (out-demo with --demo)")
    r.add_argument("--resume", action="store_true", help="continue <out_dir>/ckpt.pt with its settings")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that already holds a run")
    r.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    r.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 autocast on CUDA, float32 elsewhere (the paper trained in float32)")
    r.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    r.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's choice)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--save_every", type=int, default=0, help="also save ckpt.pt every N optimizer steps")
    r.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines (0: every step)")
    e = p.add_argument_group("validation")
    e.add_argument("--eval_every", type=int, default=1,
                   help="accuracy every N epochs (and always at a stage's last epoch and the run's last)")
    e.add_argument("--max_val", type=int, default=0, help="validate on the first N records only (0: all)")
    e.add_argument("--max_new_tokens", type=int, default=None, help="generation limit (128; GSM8k 64)")
    e.add_argument("--eval_batch_size", type=int, default=64, help="questions generated at once")
    p.add_argument("--demo", action="store_true",
                   help="the CPU demo: Coconut from scratch on data/tiny, then No-CoT for as many steps, side by side")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # argparse cannot tell a typed value from a default: parse again with every default suppressed.
    q = build_parser()
    for a in q._actions:
        a.default = argparse.SUPPRESS
    args.typed = sorted(vars(q.parse_args(argv)))
    if args.demo:
        if "mode" in args.typed or "resume" in args.typed:
            p.error("--demo trains coconut, then nocot, afresh: drop --mode and --resume")
        apply_demo(args)
    check_args(p, args)
    return args


def check_args(p, args):
    if args.dataset not in DATASETS:
        p.error(f"unknown data set {args.dataset!r}; expected one of {', '.join(DATASETS)}")
    for k, v in {**GENERAL_DEFAULTS, **DATASET_DEFAULTS[args.dataset]}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.reset_optimizer is None:
        args.reset_optimizer = "never" if args.mode in ("cot", "nocot") else "epoch"
    for k in ("stage_epochs", "epochs", "batch_size", "grad_accum", "max_new_tokens", "n_layer", "n_head",
              "n_embd", "block_size", "eval_batch_size", "eval_every"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    for k in ("c_thought", "max_latent_stage", "start_epoch", "save_every", "max_val", "threads"):
        if getattr(args, k) < 0:
            p.error(f"--{k} must not be negative")
    if args.mode in LATENT_MODES and args.c_thought < 1:
        p.error(f"--c_thought must be at least 1 in {args.mode} mode")
    if not 0.0 <= args.uniform_prob <= 1.0:
        p.error("--uniform_prob must be between 0 and 1")
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.weight_decay < 0:
        p.error("--lr must be positive and --weight_decay not negative")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        p.error("--dropout must be in [0, 1)")
    if args.start_epoch >= args.epochs:
        p.error(f"--start_epoch {args.start_epoch} leaves no epoch of --epochs {args.epochs}")
    if args.n_embd % args.n_head:
        p.error(f"--n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}")
    if args.out_dir is None:
        args.out_dir = "out-demo" if args.demo else f"out-{args.dataset}-{args.mode}"


# -----------------------------------------------------------------------------
# Checkpoints: one dict, torch.save'd to a temporary file then renamed over the old one, so a crash or
# a SIGKILL at any moment leaves either the old checkpoint or the new one, never half of one. Only
# tensors, numbers, strings, lists, tuples and dicts: it loads with torch.load(weights_only=True).

def save_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
    os.replace(tmp, path)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict, checked; one-line errors for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated zip, not a zip, pickled foreign objects...: all the same to the user
        raise ValueError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of train.py (no format {CKPT_FORMAT!r})")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: corrupt checkpoint (missing {', '.join(missing)})")
    for k in ("model", "model_args", "coconut", "tokenizer", "config"):
        if not isinstance(ckpt[k], dict):
            raise ValueError(f"{path}: corrupt checkpoint ({k} is a {type(ckpt[k]).__name__}, not a dict)")
    return ckpt


def gpt_from_checkpoint(ckpt, path, dropout=None):
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    try:
        gpt = GPT(GPTConfig(**args))
        gpt.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, AssertionError) as e:
        raise ValueError(f"{path}: corrupt checkpoint (the weights do not fit the model: {first_line(e)})") from None
    return gpt


def load_checkpoint(path, device="cpu"):
    """-> (model, tok, ckpt): the Coconut model in eval mode, its tokenizer, and the checkpoint dict
    (ckpt["config"] = the run's settings, ckpt["stage"], ckpt["epoch"], ckpt["metrics"], ...)."""
    ckpt = read_checkpoint(path, device)
    gpt = gpt_from_checkpoint(ckpt, path)
    try:
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint (tokenizer: {first_line(e)})") from None
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id,
                    feedback=bool(ckpt["coconut"].get("feedback", True)))
    return model.to(device).eval(), tok, ckpt


def first_line(e):
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


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
# Evaluation (also used by sample.py)

def extract_answer(text):
    """The official rule: what follows the last '#', commas removed."""
    return text.split("#")[-1].replace(",", "").strip()


def is_correct(prompt_ids, new_ids, answer, tok):
    """Like the official code: the decoded question + new tokens, through extract_answer, against the
    record's answer without commas."""
    return extract_answer(tok.decode(list(prompt_ids) + list(new_ids))) == answer.replace(",", "").strip()


@torch.no_grad()
def generate_batched(model, prompts, max_new_tokens, batch_size=32):
    """
    Greedy answers to prompts (token id lists) in batches -> (new token ids, thoughts) per prompt, in
    the prompts' order; thoughts are the (n, C) vectors fed back. Prompts of similar length share a batch
    (less padding); batching changes no answer (tests/test_sample.py).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs, thoughts = [None] * len(prompts), [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = collate([prompts[i] for i in idx], pad_id=model.eos_id, latent_id=model.latent_id)
        o, t = model.generate(b["input_ids"].to(device), b["attention_mask"].to(device), max_new_tokens,
                              return_thoughts=True)
        for i, oi, ti in zip(idx, o, t):
            outs[i], thoughts[i] = oi, ti.float().cpu()
    return outs, thoughts


@torch.no_grad()
def evaluate(model, tok, questions, answers, max_new_tokens, batch_size=32):
    """
    Greedy answers to question prompts (token id lists, as curriculum.make_question builds them), in
    batches, scored as the official code does: decode the question and the new tokens together
    (special tokens dropped), take extract_answer of that text, compare to the answer without commas.
    -> dict(acc, correct, total, mean_new_tokens, mean_thoughts, seconds_per_question, outputs), outputs
    one dict per question: text (the new tokens decoded), prediction, correct, new_tokens, thoughts.
    mean_thoughts counts the continuous thoughts fed back (not pause tokens), as the paper's "# tokens".
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    was_training = model.training
    model.eval()
    t0 = time.time()
    new, _ = generate_batched(model, questions, max_new_tokens, batch_size)
    seconds = time.time() - t0
    model.train(was_training)
    outputs = []
    for q, a, out in zip(questions, answers, new):
        pred = extract_answer(tok.decode(list(q) + out))
        outputs.append(dict(text=tok.decode(out), prediction=pred, correct=is_correct(q, out, a, tok),
                            new_tokens=len(out), thoughts=list(q).count(tok.latent_id) if model.feedback else 0))
    return summarize_outputs(outputs, seconds)


def summarize_outputs(outputs, seconds):
    n = len(outputs)
    correct = sum(o["correct"] for o in outputs)
    return dict(acc=correct / n if n else 0.0, correct=correct, total=n,
                mean_new_tokens=sum(o["new_tokens"] for o in outputs) / max(n, 1),
                mean_thoughts=sum(o["thoughts"] for o in outputs) / max(n, 1),
                seconds_per_question=seconds / max(n, 1), outputs=outputs)


# -----------------------------------------------------------------------------
# Data

def load_split(args, split):
    path = os.path.join(args.data_dir, args.dataset, f"{split}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: make it with `python data/{args.dataset}/prepare.py`")
    records = load_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def tokenize_all(records, tok, what):
    out, t0 = [], time.time()
    for i, r in enumerate(records):
        out.append(tokenize(r, tok))
        if time.time() - t0 > 10 and i % 10000 == 0:
            log(f"tokenizing {what}: {i}/{len(records)}")
    return out


def epoch_examples(tokenized, epoch, stage, args, tok, block_size, uniform_prob):
    """The epoch's training sequences, shaped from (seed, epoch) alone: a resumed run rebuilds the same."""
    rng = random.Random(f"{args.seed}/{epoch}")  # draws the uniform_prob stages, record by record
    return build_examples(tokenized, stage, args.mode, args.c_thought, args.max_latent_stage,
                          bool(args.pad_latent_to_max), uniform_prob, rng, tok, block_size=block_size)


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
    return steps


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# Model

def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and WORLD > 1:
        name = f"cuda:{LOCAL_RANK}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        torch.cuda.set_device(device)
    return device


def init_model(args, train_records):
    """A fresh run's GPT and tokenizer from --init_from, with the latent tokens added when the mode needs them."""
    src = args.init_from
    if src == "scratch":
        tok = compact_tokenizer(train_records)
        gpt = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                            vocab_size=tok.vocab_size, dropout=args.dropout if args.dropout is not None else 0.0))
        return gpt, tok
    if src.endswith(".pt"):
        ckpt = read_checkpoint(src)
        gpt = gpt_from_checkpoint(ckpt, src, args.dropout)
        tok = Tokenizer.from_dict(ckpt["tokenizer"])
    elif src in HUB_SIZES or os.path.exists(src):
        try:
            gpt = GPT.from_pretrained(src, dropout=0.1 if args.dropout is None else args.dropout)
        except RuntimeError as e:  # a failed download
            raise ValueError(f"--init_from {src}: {first_line(e)}") from None
        tok = gpt2_tokenizer()
        if gpt.config.vocab_size not in (50257, tok.vocab_size):
            raise ValueError(f"{src}: a vocabulary of {gpt.config.vocab_size} tokens is not GPT-2's 50257")
    else:
        raise FileNotFoundError(f"--init_from {src!r}: no such file; expected {', '.join(HUB_SIZES)}, a .safetensors "
                                f"file or folder, a .pt checkpoint, or scratch")
    if args.mode in LATENT_MODES and gpt.config.vocab_size < tok.vocab_size:
        copy = tok.encode(GPT2_COPY_FROM)
        gpt.grow_vocab(tok.vocab_size - gpt.config.vocab_size, copy_from=copy[0] if len(copy) == 1 else tok.eos_id)
    return gpt, tok


def make_optimizer(model, args):
    # AdamW over every parameter with the same weight decay, as the official code does.
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def resets_optimizer(epoch, args):
    """Does this epoch start with a fresh AdamW state? (A new run's first epoch has one anyway.)"""
    if args.reset_optimizer == "epoch":
        return True  # official: reset_optimizer True re-creates the optimizer at every epoch
    if args.reset_optimizer == "stage":
        stage = lambda e: stage_for_epoch(e, args.stage_epochs, args.mode, args.max_latent_stage)
        return epoch == 0 or stage(epoch - 1) != stage(epoch)
    return False


# -----------------------------------------------------------------------------
# Several processes (torchrun): DDP, gloo on CPU, nccl on CUDA

def setup_distributed():
    global RANK, LOCAL_RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("TRAIN_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        RANK, WORLD = dist.get_rank(), dist.get_world_size()
        LOCAL_RANK = int(os.environ.get("LOCAL_RANK", RANK))


def gather(obj):
    """Every process's obj, in rank order (a list of one without torchrun)."""
    if WORLD == 1:
        return [obj]
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# Validation

@torch.no_grad()
def validation_loss(model, examples, args, tok, device, autocast):
    """Mean over batches of the batch loss (the official eval loss), batches shared out between processes."""
    model.eval()
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    mine = {}
    for i in range(RANK, len(batches), WORLD):
        b = to_device(collate(batches[i], pad_id=tok.pad_id, latent_id=tok.latent_id), device)
        with autocast:
            loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
        mine[i] = loss.item()
    losses = {i: x for part in gather(mine) for i, x in part.items()}
    model.train()
    return sum(losses[i] for i in range(len(batches))) / len(batches)  # in batch order: the same sum anywhere


def validation_accuracy(model, tok, tokenized, answers, stage, args, autocast):
    prompts = [make_question(t, stage, args.mode, args.c_thought, args.max_latent_stage,
                             bool(args.pad_latent_to_max), tok) for t in tokenized]
    idx = list(range(RANK, len(prompts), WORLD))
    with autocast:
        r = evaluate(model, tok, [prompts[i] for i in idx], [answers[i] for i in idx], args.max_new_tokens,
                     args.eval_batch_size)
    parts = gather((idx, r["outputs"], r["seconds_per_question"] * r["total"]))
    outputs = [None] * len(prompts)
    for ids, outs, _ in parts:
        for i, o in zip(ids, outs):
            outputs[i] = o
    return summarize_outputs(outputs, max(p[2] for p in parts))


# -----------------------------------------------------------------------------
# Training

def settle_config(args):
    """The run's settings: the command line's for a new run, the checkpoint's for --resume."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if not args.resume:
        if os.path.exists(ckpt_path) and not args.overwrite:
            raise ValueError(f"{args.out_dir} already holds a run ({ckpt_path}): --resume it, or --overwrite, "
                             f"or pick another --out_dir")
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
    cfg.update(resume=True, out_dir=args.out_dir, typed=args.typed)
    return argparse.Namespace(**cfg), ckpt


def setup(args):
    """Everything a run needs, in one namespace: settings, device, data, model, optimizer, where to start."""
    args, ckpt = settle_config(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif WORLD > 1 and device.type == "cpu":  # the processes share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", WORLD))))
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if args.grad_accum % WORLD:
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {WORLD} processes")
    train_records, val_records = load_split(args, "train"), load_split(args, "valid")
    val_records = val_records[:args.max_val or None]

    torch.manual_seed(args.seed)  # the weights of a new model
    if ckpt is None:
        gpt, tok = init_model(args, train_records)
        args.dropout = gpt.config.dropout  # recorded resolved: 0.1 from released weights, 0 from scratch
    else:
        gpt, tok = gpt_from_checkpoint(ckpt, os.path.join(args.out_dir, "ckpt.pt")), Tokenizer.from_dict(ckpt["tokenizer"])
    feedback = args.mode in FEEDBACK_MODES
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id, feedback=feedback).to(device)
    if args.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=True)
    run = argparse.Namespace(
        args=args, device=device, dtype="bfloat16" if bf16 else "float32", tok=tok, model=model, feedback=feedback,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext(),
        step_model=DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if WORLD > 1 else model,
        optimizer=make_optimizer(model, args), ckpt_path=os.path.join(args.out_dir, "ckpt.pt"),
        best_path=os.path.join(args.out_dir, "best.pt"), n_train=len(train_records),
        train_tok=tokenize_all(train_records, tok, "train"), val_tok=tokenize_all(val_records, tok, "valid"),
        val_answers=[r["answer"] for r in val_records],
        # the progress of the run: what a checkpoint saves beside the weights
        state=dict(epoch=args.start_epoch, epoch_step=0, epoch_complete=False, step=0, best_acc=-1.0, metrics=[],
                   epoch_loss=[0.0, 0], epoch_tokens=0),
        saved_step=None, resumed_mid_epoch=False)
    if ckpt is not None:
        resume_from(run, ckpt)
    else:
        torch.manual_seed(args.seed + RANK)  # dropout: a stream of its own in each process
    if RANK == 0:
        os.makedirs(args.out_dir, exist_ok=True)
    return run


def resume_from(run, ckpt):
    for k in run.state:
        run.state[k] = ckpt.get(k, run.state[k])
    if ckpt.get("optimizer") is not None:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == WORLD:
        set_rng_state(rngs[RANK], run.device)
    else:
        log(f"warning: {run.ckpt_path} holds the random states of {len(rngs)} processes, not {WORLD}: "
            f"dropout will not repeat the uninterrupted run")
    run.saved_step = ckpt["step"]
    run.resumed_mid_epoch = not run.state["epoch_complete"]
    s = run.state
    where = "after it" if s["epoch_complete"] else f"{s['epoch_step']} steps into it"
    log(f"resuming {run.ckpt_path}: epoch {s['epoch'] + 1}, {where}; step {s['step']}")


def save_checkpoint(run, stage, epoch_step, complete, with_best=False):
    """ckpt.pt (and best.pt), after checking the weights are finite. Every process calls it: the RNG states."""
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise Diverged(f"the weights are not finite after step {run.state['step']}; stopped without saving: "
                       f"{last_good(run)}")
    rngs = gather(rng_state(run.device))
    run.saved_step = run.state["step"]
    if RANK != 0:
        return
    body = dict(format=CKPT_FORMAT, model=run.model.gpt.state_dict(),
                model_args=dataclasses.asdict(run.model.gpt.config), coconut=dict(feedback=run.feedback),
                tokenizer=run.tok.to_dict(), config={k: v for k, v in vars(run.args).items() if k != "typed"},
                **run.state, stage=stage, world_size=WORLD)
    body.update(epoch_step=epoch_step, epoch_complete=complete)
    if with_best:
        save_atomic(body, run.best_path)  # the weights and settings, no optimizer: what sample.py loads
    save_atomic(dict(body, optimizer=run.optimizer.state_dict(), rng=rngs), run.ckpt_path)
    # metrics.jsonl is rewritten from the checkpoint's list: a resume never loses or repeats a line
    path = os.path.join(run.args.out_dir, "metrics.jsonl")
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in run.state["metrics"])
    os.replace(path + ".tmp", path)


def train_step(run, micro_batches, examples):
    """Forward and backward over this process's micro-batches of one optimizer step -> (its share of the
    step's loss, its real tokens). The step's gradient is the mean of the micro-batch losses' gradients."""
    args, tok = run.args, run.tok
    loss_sum, n_tokens = 0.0, 0
    for j, ids in enumerate(micro_batches):
        b = to_device(collate([examples[i] for i in ids], pad_id=tok.pad_id, latent_id=tok.latent_id), run.device)
        # DDP averages the gradients over processes at the micro-batch that ends the step, not before
        last = WORLD == 1 or j == len(micro_batches) - 1
        with contextlib.nullcontext() if last else run.step_model.no_sync():
            with run.autocast:  # one call of the (DDP) module per micro-batch, its thoughts' passes inside
                loss, _ = run.step_model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
            (loss * (WORLD / args.grad_accum)).backward()  # DDP divides by WORLD
        loss_sum += loss.item() / args.grad_accum
        n_tokens += int(b["attention_mask"].sum())
    return loss_sum, n_tokens


def train_epoch(run, epoch, stage, test_signals):
    args, state = run.args, run.state
    resumed = run.resumed_mid_epoch
    run.resumed_mid_epoch = False
    state["epoch"] = epoch
    if not resumed:
        state.update(epoch_loss=[0.0, 0], epoch_tokens=0)
        if resets_optimizer(epoch, args):
            run.optimizer = make_optimizer(run.model, args)
    examples = epoch_examples(run.train_tok, epoch, stage, args, run.tok, run.model.gpt.config.block_size,
                              args.uniform_prob)
    steps = plan_steps(len(examples), epoch, args)
    if not steps:
        raise ValueError(f"{len(examples)} training examples cannot fill the {args.grad_accum} micro-batches of a step")
    skip = state["epoch_step"] if resumed else 0  # the steps a resumed run already took
    run.model.train()
    t0 = t_log = time.time()
    tokens_since = 0
    for k in range(skip, len(steps)):
        loss, n_tokens = train_step(run, steps[k][RANK::WORLD], examples)
        totals = torch.tensor([loss, n_tokens, float(STOP["requested"])], dtype=torch.float64)
        if WORLD > 1:
            dist.all_reduce(totals)  # every process sees the same loss and the same stop request
        loss, n_tokens, stop = totals[0].item(), int(totals[1].item()), totals[2].item() > 0
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at step {state['step'] + 1} (epoch {epoch + 1}, stage {stage}, batch "
                           f"{k + 1}/{len(steps)}); stopped without saving: {last_good(run)}")
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["epoch_loss"] = [state["epoch_loss"][0] + loss, state["epoch_loss"][1] + 1]
        state["epoch_tokens"] += n_tokens
        tokens_since += n_tokens
        now = time.time()
        if now - t_log >= args.log_every or k == skip or k == len(steps) - 1:
            eta = (now - t0) / (k + 1 - skip) * (len(steps) - k - 1)
            log(f"stage {stage} | epoch {epoch + 1}/{args.epochs} | step {k + 1}/{len(steps)} ({state['step']}) | "
                f"loss {loss:.4f} | {tokens_since / max(now - t_log, 1e-9):,.0f} tok/s | ETA {fmt_time(eta)}")
            t_log, tokens_since = now, 0
        if stop:
            save_checkpoint(run, stage, k + 1, False)
            raise Interrupted(f"stopped at step {state['step']}; saved {run.ckpt_path}: continue with "
                              f"`python train.py --out_dir {args.out_dir} --resume`")
        if args.save_every and state["step"] % args.save_every == 0:
            save_checkpoint(run, stage, k + 1, False)
        if state["step"] in test_signals:
            os.kill(os.getpid(), test_signals[state["step"]])
    return len(steps), time.time() - t0


def end_epoch(run, epoch, stage, n_steps, train_seconds):
    """Validation at the epoch's stage (the loss of its sequences, the accuracy of its prompts), then save."""
    args, state = run.args, run.state
    t0 = time.time()
    val_examples = epoch_examples(run.val_tok, epoch, stage, args, run.tok, run.model.gpt.config.block_size, 0.0)
    m = dict(epoch=epoch + 1, stage=stage, step=state["step"],
             train_loss=state["epoch_loss"][0] / max(state["epoch_loss"][1], 1),
             val_loss=validation_loss(run.model, val_examples, args, run.tok, run.device, run.autocast))
    next_stage = stage_for_epoch(epoch + 1, args.stage_epochs, args.mode, args.max_latent_stage)
    improved = False
    if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or next_stage != stage:
        r = validation_accuracy(run.model, run.tok, run.val_tok, run.val_answers, stage, args, run.autocast)
        m.update(val_acc=r["acc"], val_correct=r["correct"], val_total=r["total"],
                 mean_new_tokens=r["mean_new_tokens"], mean_thoughts=r["mean_thoughts"])
        improved = r["acc"] > state["best_acc"]
        state["best_acc"] = max(state["best_acc"], r["acc"])
    m.update(train_seconds=round(train_seconds, 2), epoch_seconds=round(train_seconds + time.time() - t0, 2),
             tokens_per_second=round(state["epoch_tokens"] / max(train_seconds, 1e-9)))
    state["metrics"] = state["metrics"] + [m]
    acc = (f"val acc {100 * m['val_acc']:.2f}% ({m['val_correct']}/{m['val_total']}), "
           f"{m['mean_thoughts'] + m['mean_new_tokens']:.1f} tokens/q" if "val_acc" in m else "val acc -")
    log(f"epoch {epoch + 1} (stage {stage}): train loss {m['train_loss']:.4f} | val loss {m['val_loss']:.4f} | "
        f"{acc}{' | best' if improved else ''} | {fmt_time(m['epoch_seconds'])}")
    save_checkpoint(run, stage, n_steps, True, with_best=improved)


def train(args):
    """One run; returns its metrics (one dict per epoch)."""
    run = setup(args)
    args, state = run.args, run.state
    n_params = sum(p.numel() for p in run.model.parameters())
    log(f"{args.mode} on {args.dataset}: {run.n_train} train / {len(run.val_tok)} valid records; {n_params / 1e6:.2f}M "
        f"parameters; {args.batch_size} x {args.grad_accum} sequences per step; {WORLD} process(es) on {run.device}, "
        f"{run.dtype}")
    first_epoch = state["epoch"] + 1 if state["epoch_complete"] else state["epoch"]
    test_signals = {int(s): getattr(signal, "SIG" + n) for s, n in
                    (x.split(":") for x in os.environ.get(SIGNAL_HOOK, "").split(",") if x)}
    previous_handlers = install_signal_handlers()
    try:
        for epoch in range(first_epoch, args.epochs):
            stage = stage_for_epoch(epoch, args.stage_epochs, args.mode, args.max_latent_stage)
            n_steps, seconds = train_epoch(run, epoch, stage, test_signals)
            end_epoch(run, epoch, stage, n_steps, seconds)
            if STOP["requested"]:
                raise Interrupted(f"stopped after epoch {epoch + 1}; saved {run.ckpt_path}: continue with --resume")
    finally:
        restore_signal_handlers(previous_handlers)
    log(stage_table(state["metrics"]))
    return state["metrics"]


def last_good(run):
    if run.saved_step is None:
        return "no checkpoint was saved"
    return f"{run.ckpt_path} (step {run.saved_step}) is the last good checkpoint"


def install_signal_handlers():
    """Ctrl-C / SIGTERM: finish the optimizer step, save, stop. A second Ctrl-C stops at once."""
    def handler(signum, frame):
        if STOP["requested"]:
            raise KeyboardInterrupt
        STOP["requested"] = True
        print(f"\n{signal.Signals(signum).name}: saving at the end of this step (again to stop at once)",
              file=sys.stderr, flush=True)
    STOP["requested"] = False
    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (e.g. called from a notebook worker): no handlers
        return {}


def restore_signal_handlers(previous):
    for s, h in previous.items():
        signal.signal(s, h)


def fmt_time(s):
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def stage_table(metrics, other=None, names=("accuracy", "")):
    """Validation accuracy at the last evaluated epoch of each stage (and another run's at the same epoch)."""
    rows = [f"{'stage':>5} {'epochs':>7} {'steps':>6} {names[0]:>10}" + (f" {names[1]:>10}" if other is not None else "")]
    by_epoch = {m["epoch"]: m for m in other or []}
    for stage in sorted({m["stage"] for m in metrics}):
        ms = [m for m in metrics if m["stage"] == stage and "val_acc" in m]
        if not ms:
            continue
        m = ms[-1]
        first = min(x["epoch"] for x in metrics if x["stage"] == stage)
        epochs = f"{first}-{m['epoch']}"
        row = f"{stage:>5} {epochs:>7} {m['step']:>6} {100 * m['val_acc']:9.2f}%"
        if other is not None:
            o = by_epoch.get(m["epoch"], {})
            row += f" {100 * o['val_acc']:9.2f}%" if "val_acc" in o else f" {'-':>10}"
        rows.append(row)
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# The CPU demo: Coconut from scratch on data/tiny through every stage, then No-CoT for the same number
# of optimizer steps, and their validation accuracy side by side.

DEMO = dict(dataset="tiny", init_from="scratch")


def apply_demo(args):
    """--demo's settings, under anything typed on the command line."""
    for k, v in DEMO.items():
        if k not in args.typed:
            setattr(args, k, v)


def run_demo(args):
    t0 = time.time()
    base = args.out_dir
    runs = {}
    for mode in ("coconut", "nocot"):
        a = argparse.Namespace(**vars(args))
        a.mode, a.out_dir, a.overwrite = mode, os.path.join(base, mode), True
        a.reset_optimizer = args.reset_optimizer if "reset_optimizer" in args.typed else \
            ("never" if mode == "nocot" else "epoch")
        log(f"=== {mode} -> {a.out_dir}")
        runs[mode] = train(a)
    log(f"\nvalidation accuracy by stage (No-CoT: after as many optimizer steps), {fmt_time(time.time() - t0)} in all")
    log(stage_table(runs["coconut"], runs["nocot"], names=("Coconut", "No-CoT")))


def main(argv=None):
    args = parse_args(argv)  # bad options end here: argparse prints one line and exits 2
    setup_distributed()
    try:
        run_demo(args) if args.demo else train(args)
        if WORLD > 1:
            dist.barrier()  # let rank 0 finish its last save before any process tears the group down
        return 0
    except Interrupted as e:
        log(f"train.py: {e}")
        return 130
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        return 130
    except (Diverged, OSError, ValueError) as e:
        if RANK == 0:
            print(f"train.py: error: {first_line(e)}", file=sys.stderr)
        return 1
    finally:
        if WORLD > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
