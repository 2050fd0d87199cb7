"""
train.py's command line: its flags with their help (build_parser), the checks that fill the per-data-set
defaults in (check_args), and parse_args, which puts the two together.
"""
import argparse
import math
import os

import torch

from machinery.argparser import Parser
from machinery.checkpoint import LATENT_MODES, checkpoint_arch, is_llama
from curriculum import MODES, SET_LABELS, SET_LOSSES
from gpt import HUB_SIZES
from machinery.icot import ICOT_GSM8K
from machinery.presets import (DATASET_DEFAULTS, DEMO, GENERAL_DEFAULTS, LLAMA_DEFAULTS, LLAMA_GSM8K,
                               MAX_SCRATCH_BATCH, MIN_STEPS_PER_EPOCH, SCRATCH, USER)


def parse_args(argv=None, doc=None):
    """train.py's settings from its command line (argv; None: sys.argv), the per-data-set defaults filled in,
    and args.typed: the flags typed (a resumed run may change only some). A bad flag exits 2 with one line."""
    p = build_parser(doc)
    args = p.parse_args(argv)
    # argparse cannot tell a typed value from a default: parse again with every default suppressed.
    q = build_parser(doc)
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


def thought_labels(text):
    """--thought_labels: 0 or 1 (ints, as checkpoints have always held them), or a kind of set label."""
    if text in ("0", "1"):
        return int(text)
    if text in SET_LABELS:
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected 0, 1, {', '.join(SET_LABELS)}")


def build_parser(doc=None):
    """The flags of train.py; doc (train.py's docstring) gives --help its description and examples."""
    description, _, epilog = (doc or "Train Coconut.").strip().partition("\n\n")
    p = Parser(prog="train.py", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data and curriculum (defaults: the paper's for each data set)")
    d.add_argument("--dataset", default="prosqa", help=f"{', '.join(DATASET_DEFAULTS)}, or any folder "
                   f"<data_dir>/<name>/ holding train.json and valid.json (generic defaults)")
    d.add_argument("--data_dir", default="data", help="the folder holding <dataset>/train.json and valid.json (data)")
    d.add_argument("--mode", default="coconut", choices=MODES,
                   help="coconut, or a baseline of the paper's Table 1 (README: Reproducing the paper)")
    d.add_argument("--stage_epochs", type=int, default=None, help="epochs per stage (5; GSM8k 3; prosqa_graph 25; reach, the demo's, 1)")
    d.add_argument("--epochs", type=int, default=None, help="50 (GSM8k 25; prosqa_graph 300; reach 7)")
    d.add_argument("--start_epoch", type=int, default=0,
                   help="skip the first epochs (the official `resume: N`): 3 for GSM8k Coconut from a CoT checkpoint")
    d.add_argument("--c_thought", type=int, default=None, help="continuous thoughts per removed step (1; GSM8k 2)")
    d.add_argument("--max_latent_stage", type=int, default=None, help="the last stage that removes a step (6; GSM8k 3; reach 4)")
    d.add_argument("--pad_latent_to_max", type=int, default=1, choices=(0, 1),
                   help="past the last stage: 1 gives every question max_latent_stage x c thoughts (official), "
                        "0 as many as its steps")
    d.add_argument("--markers", type=int, default=None, choices=(0, 1),
                   help="1: <|start-latent|> and <|end-latent|> around the thoughts (the paper; the default); 0: bare "
                        "thoughts, as in 'Reasoning by Superposition' (reach, the demo's data)")
    d.add_argument("--thought_labels", type=thought_labels, default=None,
                   metavar="{0,1,frontier,within}",
                   help="what each thought is trained to name. 0: nothing, as in the paper (the default, except "
                        "on reach); 1: the node of the step it replaces, the label CoT's step has there (on reach: "
                        "the gold-labelled control); frontier: the set of nodes exactly k edges (roads) from the "
                        "question's start, for thought k (on reach the default, the demo's); within: every node at "
                        "most k edges from the start. frontier and within need graph records and are scored as "
                        "--set_loss says")
    d.add_argument("--set_loss", default=None, choices=SET_LOSSES,
                   help="how a set label (--thought_labels frontier or within) is scored. mass: -log of the "
                        "softmax mass on the set, Coconut-BFS (the default, except on reach); spread: the "
                        "cross-entropy against an even spread over the set, at least ln(set size) nats (on reach "
                        "the default, the demo's)")
    d.add_argument("--uniform_prob", type=float, default=None,
                   help="probability of training an example at a random stage (0; prosqa_graph 0.1)")
    d.add_argument("--skip_long", action="store_true", help="drop examples longer than the model's block_size "
                                                            "(default: stop with an error naming one)")
    d.add_argument("--shuffle_graph", type=int, default=None, choices=(0, 1),
                   help="rewrite each symbolic graph question with its edges and options reshuffled every epoch "
                        "(prosqa_graph: 1)")
    i = p.add_argument_group("iCoT (--mode icot; the authors' src/train.py flags)")
    i.add_argument("--remove_per_epoch", type=float, default=8.0, help="chain tokens removed per epoch")
    i.add_argument("--removal_smoothing_lambda", type=float, default=4.0,
                   help="each sequence loses Geometric(lambda) more tokens (inf: none)")
    i.add_argument("--remove_all_when_remove_beyond", type=float, default=None,
                   help="remove the whole chain once the count reaches this (inf; GSM8k 39)")
    m = p.add_argument_group("model")
    m.add_argument("--init_from", default=None,
                   help=f"gpt2 (the default: OpenAI's 124M weights, downloaded once), {', '.join(list(HUB_SIZES)[1:])}; "
                        f"a .safetensors file or a folder; a Llama: a hub repo such as meta-llama/Llama-3.2-1B or a "
                        f"folder whose config.json says llama (lr 1e-5, bfloat16 on a GPU); a .pt checkpoint of train.py; "
                        f"or 'scratch' (a new GPT of --n_layer/--n_head/--n_embd/--block_size; the default of "
                        f"prosqa_graph, reach and tiny)")
    for k in ("n_layer", "n_head", "n_embd", "block_size"):
        m.add_argument(f"--{k}", type=int, default=None, help=f"scratch only ({GENERAL_DEFAULTS[k]}; prosqa_graph "
                                                              f"{DATASET_DEFAULTS['prosqa_graph'][k]}; reach "
                                                              f"{DATASET_DEFAULTS['reach'][k]})")
    m.add_argument("--tokenizer", default=None, choices=("auto", "compact", "symbols"),
                   help="scratch only: compact (bytes + the data's words), symbols (one token per whitespace-"
                        "separated symbol), auto (symbols when the data looks like symbols)")
    m.add_argument("--dropout", type=float, default=None,
                   help="default 0.1 from OpenAI's weights (HF's GPT-2 config, what the paper trained), "
                        "0 from scratch (prosqa_graph 0.1), the checkpoint's from a .pt")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch_size", type=int, default=None,
                   help="sequences per micro-batch (32; prosqa_graph 256; reach and tiny 64; a data set of yours from scratch: "
                        f"what gives {MIN_STEPS_PER_EPOCH} steps per epoch, at most {MAX_SCRATCH_BATCH})")
    o.add_argument("--grad_accum", type=int, default=None,
                   help="micro-batches per optimizer step, summed over all processes (4: 4 x 32 = the paper's 128; "
                        "1 from scratch on reach, tiny, prosqa_graph or a data set of yours)")
    o.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate, constant (1e-4; 1e-3 from scratch on reach, tiny or a data set of yours)")
    o.add_argument("--decay_lr", type=int, default=None, choices=(0, 1),
                   help="1: the learning rate falls along a cosine to lr/10 over the run (nanoGPT's); 0: constant, "
                        "as the paper trains (the default)")
    o.add_argument("--weight_decay", type=float, default=0.01, help="on all parameters, as the official code")
    o.add_argument("--reset_optimizer", default=None, choices=("epoch", "stage", "never"),
                   help="fresh AdamW state every epoch (the official yaml of every curriculum run: the default), "
                        "at each stage switch (the paper's text), or never (the default for cot and nocot, and for reach)")
    r = p.add_argument_group("run")
    r.add_argument("--out_dir", default=None, help="default out-<dataset>-<mode> (out-demo with --demo)")
    r.add_argument("--resume", action="store_true", help="continue <out_dir>/ckpt.pt with its settings")
    r.add_argument("--overwrite", action="store_true", help="start afresh in an out_dir that already holds a run")
    r.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    r.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="float32, as the paper trained; bfloat16 autocast is faster on a GPU")
    r.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    r.add_argument("--fsdp", nargs="?", const="whole", default=None, choices=("whole", "sharded"),
                   help="under torchrun: shard the weights, gradients and AdamW's state over the processes (FSDP2) "
                        "instead of a whole copy in each (DDP), for a model whose training does not fit one GPU; "
                        "checkpoints: whole (the default: gathered into rank 0, one file) or sharded (every process "
                        "writes its slices: above a few B parameters)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's choice)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--save_every", type=int, default=0, help="also save ckpt.pt every N optimizer steps")
    r.add_argument("--log_every", type=float, default=10.0, help="seconds between progress lines (0: every step)")
    e = p.add_argument_group("validation")
    e.add_argument("--eval_every", type=int, default=1,
                   help="accuracy every N epochs (and always at a stage's last epoch and the run's last)")
    e.add_argument("--max_val", type=int, default=0, help="validate on the first N records only (0: all)")
    e.add_argument("--max_new_tokens", type=int, default=None,
                   help="generation limit (128; GSM8k 64; a data set of yours: its longest chain + answer, +25%%)")
    e.add_argument("--eval_batch_size", type=int, default=None, help="questions generated at once (64)")
    p.add_argument("--demo", action="store_true",
                   help="the CPU demo (about 8 minutes alone on a 2-core AVX-512 machine; a user's 2-core AVX2 machine took "
                        "13 minutes for the earlier, gold-labelled demo): makes its "
                        "graph-search data afresh in <out_dir>/data "
                        "(data/reach/prepare.py; --seed k: world k), trains Coconut, CoT and No-CoT from scratch for "
                        "the same optimizer steps into <out_dir>/coconut, cot and nocot (out_dir: out-demo), prints "
                        "their validation accuracy epoch by epoch and scores each on the held-out test questions "
                        "(<out_dir>/summary.json); --resume finishes a stopped one")
    return p


def check_args(p, args):
    if not args.dataset or os.sep in args.dataset or args.dataset.startswith("."):
        p.error(f"--dataset {args.dataset!r}: give a folder name under --data_dir")
    if args.init_from and (is_llama(args.init_from) or checkpoint_arch(args.init_from) == "llama"):
        gsm = LLAMA_GSM8K.get(args.mode, {}) if args.dataset == "gsm8k" else {}
        for k, v in {**LLAMA_DEFAULTS, **gsm}.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        if "dtype" not in args.typed and gpu:
            args.dtype = "bfloat16"  # the papers' 1B runs; fp32 compute would take about twice the time
    user = args.dataset not in DATASET_DEFAULTS
    scratch = (args.init_from or GENERAL_DEFAULTS["init_from"]) == "scratch"
    defaults = {**GENERAL_DEFAULTS, **DATASET_DEFAULTS.get(args.dataset, USER), **(SCRATCH if user and scratch else {})}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.reset_optimizer is None:  # iCoT resets whenever its count grows, not by epoch
        args.reset_optimizer = "never" if args.mode in ("cot", "nocot", "icot") else "epoch"
    if args.remove_all_when_remove_beyond is None:
        args.remove_all_when_remove_beyond = (float(ICOT_GSM8K["remove_all_when_remove_beyond"])
                                              if args.dataset == "gsm8k" else math.inf)
    if not (args.remove_per_epoch > 0 and args.removal_smoothing_lambda > 0):
        p.error("--remove_per_epoch and --removal_smoothing_lambda must be positive")
    for k in ("stage_epochs", "epochs", "batch_size", "grad_accum", "max_new_tokens", "n_layer", "n_head",
              "n_embd", "block_size", "eval_batch_size", "eval_every"):
        if getattr(args, k) is not None and getattr(args, k) < 1:  # None: settled from the data
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
        args.out_dir = f"out-{args.dataset}-{args.mode}"
