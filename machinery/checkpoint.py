"""
Where models come from: train.py's checkpoints, OpenAI's weights or a new GPT (init_model), and what
every script needs to load one: the device and one-line errors.

A checkpoint is one dict, torch.save'd to a temporary file and renamed over the old one, so that a
crash or a SIGKILL at any moment leaves either the old checkpoint or the new one, never half of one.
It holds only tensors, numbers, strings, lists, tuples and dicts: it loads with
torch.load(weights_only=True), which never runs code from the file.

    format      CKPT_FORMAT
    model       the GPT's (or Llama's) state_dict;  model_args: its GPTConfig (LlamaConfig) as a dict
    arch        "gpt2" or "llama" (absent in older checkpoints: gpt2)
    coconut     {"feedback": bool}: does <|latent|> feed hidden states back (False: pause as thought)
    tokenizer   tokenizer.Tokenizer.to_dict()
    config      the run's settings (train.py's flags, resolved)
    epoch, stage, step, epoch_step, epoch_complete, best_acc, metrics, ...: where the run stands
    optimizer, rng  (ckpt.pt only, not best.pt): what an exact resume needs
    shards      (train.py --fsdp sharded only) the folder beside the file, written by torch.distributed.checkpoint,
                that holds the weights (and, for ckpt.pt, AdamW's state) as every process's slices; "model" is
                then empty. The loaders here read the weights from it; one_file() writes them into one file.
"""
import dataclasses
import json
import os
import shutil
import warnings

import torch

from coconut import Coconut
from gpt import GPT, GPTConfig, HUB_SIZES
from machinery.llama import Llama, LlamaConfig, hub_folder
from machinery.tokenizer import Tokenizer, compact_tokenizer, gpt2_tokenizer, llama3_tokenizer, looks_symbolic, symbol_tokenizer

ARCHS = {"gpt2": (GPT, GPTConfig), "llama": (Llama, LlamaConfig)}  # a checkpoint's "arch" -> its classes

# Modes whose sequences hold the three new tokens, so GPT-2's vocabulary grows by 3 (official run.py:
# all but cot, no_thoughts and no_cot).
LATENT_MODES = ("coconut", "pause_as_thought", "no_curriculum", "pause", "frontier")
GPT2_COPY_FROM = "<<"  # the new rows start as copies of this token's row (id 16791), as in the official code

CKPT_FORMAT = "coconut-train/1"
CKPT_KEYS = ("format", "model", "model_args", "coconut", "tokenizer", "config", "epoch", "stage")


def first_line(e):
    """An exception as one line: what every script prints instead of a traceback."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def resolve_device(name, local_rank=0):
    """'auto' is cuda > mps > cpu; 'cuda' means this process's GPU under torchrun."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")
        torch.cuda.set_device(device)
    return device


def save_atomic(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
    os.replace(tmp, path)


def checkpoint_body(model, tok, config, weights=None, **progress):
    """What best.pt holds (ckpt.pt adds the optimizer and the random states). weights: the GPT's state dict
    when model.gpt.state_dict() would not give whole tensors (FSDP's slices: parallel.whole_state)."""
    arch = "llama" if isinstance(model.gpt, Llama) else "gpt2"
    weights = model.gpt.state_dict() if weights is None else weights
    return dict(format=CKPT_FORMAT, arch=arch, model=weights, model_args=dataclasses.asdict(model.gpt.config),
                coconut=dict(feedback=model.feedback), tokenizer=tok.to_dict(), config=dict(config), **progress)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict, checked; one-line errors for a missing, truncated or foreign file. Memory-mapped: a
    tensor's bytes are read when it is used (copied into the model, say), and what the page cache holds of the file
    is the kernel's to drop; nothing of it stays once the dict is let go."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a zip, pickled foreign objects...: all the same to the user
        # torch's own message for pickled objects advises weights_only=False, which would run the
        # file's code: never pass that advice on.
        why = "it holds objects other than tensors and plain data" if "weights_only" in str(e) else first_line(e)
        raise ValueError(f"{path}: not a readable checkpoint ({why})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a checkpoint of train.py (no format {CKPT_FORMAT!r})")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: corrupt checkpoint (missing {', '.join(missing)})")
    for k in ("model", "model_args", "coconut", "tokenizer", "config"):
        if not isinstance(ckpt[k], dict):
            raise ValueError(f"{path}: corrupt checkpoint ({k} is a {type(ckpt[k]).__name__}, not a dict)")
    return ckpt


def gpt_from_checkpoint(ckpt, path, dropout=None, weights=True):
    """The checkpoint's GPT (or Llama), its weights read in unless weights=False (train.py's sharded resume, whose
    parallel.load_sharded reads each process's slices once, rather than every whole weight here first)."""
    args = dict(ckpt["model_args"])
    if dropout is not None:
        args["dropout"] = dropout
    if ckpt.get("arch", "gpt2") not in ARCHS:
        raise ValueError(f"{path}: corrupt checkpoint (arch {ckpt.get('arch')!r}; expected {' or '.join(ARCHS)})")
    model_class, config_class = ARCHS[ckpt.get("arch", "gpt2")]
    try:
        gpt = model_class(config_class(**args))
        if not weights:
            pass
        elif ckpt.get("shards"):
            read_shards(gpt, shards_folder(ckpt, path))
        else:
            gpt.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError, AssertionError) as e:
        raise ValueError(f"{path}: corrupt checkpoint (the weights do not fit the model: {first_line(e)})") from None
    return gpt


def shards_folder(ckpt, path):
    """The folder of a sharded checkpoint's slices (train.py --fsdp sharded), beside the file."""
    folder = os.path.join(os.path.dirname(path), ckpt["shards"])
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise ValueError(f"{path}: its weights are in {folder}, which is missing or incomplete")
    return folder


def drop_unused_shards(out_dir):
    """Removes the shards-* folders of out_dir that neither ckpt.pt nor best.pt names (older or interrupted saves)."""
    folders = [d for d in os.listdir(out_dir) if d.startswith("shards-")]
    if folders:
        named = {torch.load(os.path.join(out_dir, f), weights_only=True, mmap=True).get("shards")
                 for f in ("ckpt.pt", "best.pt") if os.path.exists(os.path.join(out_dir, f))}
        for d in folders:
            if d not in named:
                shutil.rmtree(os.path.join(out_dir, d))


def read_shards(gpt, folder):
    """The whole weights from a sharded checkpoint's folder into gpt, in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        dcp.load({"model": {"gpt." + k: v for k, v in gpt.state_dict().items()}}, checkpoint_id=folder, no_dist=True)


def one_file(path, out):
    """
    A sharded checkpoint (train.py --fsdp sharded) as one file in the usual format, the weights inside and
    no optimizer (best.pt's contents): `python -c "import checkpoint; checkpoint.one_file('out/best.pt',
    'best-one.pt')"`. Every script reads the sharded one as well; one file travels alone.
    """
    model, _, ckpt = load_checkpoint(path)
    body = {k: v for k, v in ckpt.items() if k not in ("shards", "optimizer", "rng")}
    save_atomic(dict(body, model=model.gpt.state_dict()), out)


def checkpoint_arch(path):
    """The "arch" of a .pt checkpoint of train.py ("gpt2" or "llama"), or None for anything else. Memory-
    mapped: the weights are not read."""
    if not (path.endswith(".pt") and os.path.isfile(path)):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return ckpt.get("arch", "gpt2") if isinstance(ckpt, dict) else None
    except Exception:  # read_checkpoint says later what is wrong with the file
        return None


def tokenizer_from_checkpoint(ckpt, path):
    try:
        return Tokenizer.from_dict(ckpt["tokenizer"])
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint (tokenizer: {first_line(e)})") from None


def load_checkpoint(path, device="cpu"):
    """-> (model, tok, ckpt): the Coconut model in eval mode, its tokenizer, and the checkpoint dict
    (ckpt["config"] = the run's settings, ckpt["stage"], ckpt["epoch"], ckpt["metrics"], ...)."""
    ckpt = read_checkpoint(path, device)
    gpt = gpt_from_checkpoint(ckpt, path)
    tok = tokenizer_from_checkpoint(ckpt, path)
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id,
                    feedback=bool(ckpt["coconut"].get("feedback", True)))
    return model.to(device).eval(), tok, ckpt


def init_model(args, train_records):
    """
    A fresh run's model (GPT or Llama) and tokenizer from args.init_from (train.py's flags: init_from, mode,
    dropout, and for scratch n_layer, n_head, n_embd, block_size, tokenizer), with the three latent tokens
    added to GPT-2's vocabulary when the mode needs them (on Llama they are reserved tokens, set to "<<").
    """
    src = args.init_from
    if src == "scratch":
        tok = scratch_tokenizer(args, train_records)
        gpt = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                            vocab_size=tok.vocab_size, dropout=args.dropout if args.dropout is not None else 0.0))
        return gpt, tok
    if src.endswith(".pt"):
        ckpt = read_checkpoint(src)
        gpt, tok = gpt_from_checkpoint(ckpt, src, args.dropout), tokenizer_from_checkpoint(ckpt, src)
        if isinstance(gpt, Llama):
            if args.mode in LATENT_MODES and ckpt["config"].get("mode") not in LATENT_MODES:
                init_markers(gpt, tok)  # a CoT run never used the markers: they start now, as from the release
            return gpt, tok
    elif is_llama(src):
        try:
            folder = hub_folder(src)
            gpt = Llama.from_pretrained(folder, dropout=args.dropout or 0.0)
        except RuntimeError as e:  # a failed download
            raise ValueError(f"--init_from {src}: {first_line(e)}") from None
        tok = llama3_tokenizer(llama_tokenizer_path(folder))
        if gpt.config.vocab_size != tok.vocab_size:
            raise ValueError(f"{src}: a vocabulary of {gpt.config.vocab_size} tokens, but its tokenizer has {tok.vocab_size}")
        if args.mode in LATENT_MODES:
            init_markers(gpt, tok)
        return gpt, tok
    elif src in HUB_SIZES or os.path.exists(src):
        try:
            gpt = GPT.from_pretrained(src, dropout=0.1 if args.dropout is None else args.dropout)
        except RuntimeError as e:  # a failed download
            raise ValueError(f"--init_from {src}: {first_line(e)}; on a CPU, the demo needs no download: "
                             f"`python train.py --demo`") from None
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


def is_llama(src):
    """Is --init_from a Llama: a hub repo id (owner/name, not a path here) or a folder whose config.json
    names a model_type other than GPT-2's (llama.py then loads it, or names what else it is)."""
    if os.path.isdir(src):
        path = os.path.join(src, "config.json")
        if not os.path.isfile(path):
            return False
        try:
            with open(path) as f:
                return json.load(f).get("model_type") not in (None, "gpt2")
        except (ValueError, AttributeError):
            return False  # gpt.py's loader says what is wrong with it
    return src.count("/") == 1 and not os.path.exists(src) and src not in HUB_SIZES and not src.endswith(".pt")


def llama_tokenizer_path(folder):
    """Meta's tokenizer.model: the hub keeps it under original/, a folder of one's own may hold it at the top."""
    for path in (os.path.join(folder, "tokenizer.model"), os.path.join(folder, "original", "tokenizer.model")):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{folder}: no tokenizer.model (Llama 3's tiktoken rank file, in the hub repo's "
                            f"original/ folder); copy it into the folder")


def init_markers(gpt, tok):
    # The official code starts Coconut's new tokens as copies of "<<"; on Llama they are reserved tokens
    copy = tok.encode(GPT2_COPY_FROM)
    gpt.copy_rows([tok.start_id, tok.end_id, tok.latent_id], copy[0] if len(copy) == 1 else tok.eos_id)


def scratch_tokenizer(args, records):
    """--tokenizer auto: one token per symbol for data written in symbols, else the compact byte+word one."""
    kind = args.tokenizer
    if kind == "auto":
        kind = "symbols" if looks_symbolic(records) else "compact"
    return symbol_tokenizer(records) if kind == "symbols" else compact_tokenizer(records)
