"""
Finding a model and its run for sample.py: the checkpoint named, or the default run's (train.py's out_dir for the
data set), or the CPU demo's; the runs inside a folder (the demo's out-demo holds three); the run's history
(metrics.jsonl); the data folder a checkpoint's own data set lives in. Every miss is one line naming what to type.
"""
import os

from curriculum import stage_name
from machinery import plots
from machinery.records import load_split, tokenize

METHOD_NAMES = {"coconut": "Coconut", "cot": "CoT", "nocot": "No-CoT"}  # the demo's three runs, in its order


def runs_inside(folder):
    """The training runs one level down (the demo's coconut, cot, nocot first): folders with a checkpoint or a
    metrics.jsonl."""
    if not os.path.isdir(folder):
        return []
    found = [d for d in sorted(os.listdir(folder)) if any(os.path.isfile(os.path.join(folder, d, f))
                                                         for f in ("best.pt", "ckpt.pt", "metrics.jsonl"))]
    return sorted(found, key=lambda d: (list(METHOD_NAMES).index(d) if d in METHOD_NAMES else len(METHOD_NAMES), d))


def not_a_run(folder, flag):
    """The error for a folder that holds no checkpoint: name what it holds instead."""
    runs = runs_inside(folder)
    if runs:
        named = ", ".join(f"--out_dir {os.path.join(folder, r)}" for r in runs)
        return FileNotFoundError(f"{folder} holds {len(runs)} runs, not one: {named} (with --plot alone, "
                                 f"--out_dir {folder} draws their validation accuracy in one figure)")
    pts = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
    if flag == "--ckpt":
        inside = f" (it holds {', '.join(pts)}: --ckpt {os.path.join(folder, pts[0])}, or --out_dir {folder})" \
            if pts else " with no .pt file in it"
        return FileNotFoundError(f"--ckpt wants a checkpoint file: {folder} is a folder{inside}")
    return FileNotFoundError(f"no model to answer with: {folder} holds no best.pt" +
                             (f" (it holds {', '.join(pts)}: --ckpt {os.path.join(folder, pts[0])})" if pts else ""))


def find_checkpoint(args):
    """
    The checkpoint named (args.ckpt, or args.out_dir's best.pt), else the default run's (train.py's out_dir for
    args.dataset), else the CPU demo's. A run that has saved no best.pt yet (stopped before its first validation
    accuracy) answers with its own last save, ckpt.pt, before any other run's. -> (path, why): why says how the
    path was chosen when nothing named it exactly. FileNotFoundError, one line, when there is none: it names the
    file to pass instead, or the command that makes one.
    """
    if args.ckpt and os.path.isdir(args.ckpt):
        raise not_a_run(args.ckpt, "--ckpt")
    if args.out_dir and os.path.isfile(args.out_dir):
        raise FileNotFoundError(f"--out_dir wants a run's folder: {args.out_dir} is a file (--ckpt {args.out_dir})")
    if args.ckpt:
        if not os.path.isfile(args.ckpt):
            raise FileNotFoundError(f"no model to answer with: {args.ckpt} does not exist")
        return args.ckpt, None
    runs = [args.out_dir] if args.out_dir else [f"out-{args.dataset or 'prosqa'}-coconut"] + \
        ([] if args.dataset else [os.path.join("out-demo", "coconut")])
    for i, run in enumerate(runs):
        best, last = os.path.join(run, "best.pt"), os.path.join(run, "ckpt.pt")
        if os.path.isfile(best):
            return best, None if args.out_dir else default_why(run, i, args)
        if os.path.isfile(last):  # stopped before its first validation accuracy: no best.pt yet, its last save
            why = (f"no {best} yet (the run has not measured a validation accuracy): answering with its last save, "
                   f"{last}" + ("" if args.out_dir else f"; {default_why(run, i, args)}"))
            return last, why
    if args.out_dir and os.path.isdir(args.out_dir):
        raise not_a_run(args.out_dir, "--out_dir")
    if args.out_dir:
        raise FileNotFoundError(f"no model to answer with: {os.path.join(args.out_dir, 'best.pt')} does not exist")
    raise FileNotFoundError(f"no trained model yet ({' or '.join(os.path.join(r, 'best.pt') for r in runs)}): make "
                            f"one with `python train.py --demo` (CPU, minutes) or `python train.py --dataset prosqa` "
                            f"(the paper's run, a GPU), or pass --out_dir or --ckpt")


def default_why(run, i, args):
    """How the default model was chosen: the data set's own run (i = 0), or the demo's when that has none."""
    why = (f"the default model: {run}, the run of train.py --dataset {args.dataset or 'prosqa'}" if i == 0 else
           "the CPU demo's Coconut, since there is no out-prosqa-coconut/best.pt or ckpt.pt (the paper's ProsQA run)")
    return why + "; --out_dir or --ckpt chooses another"


def run_history(path, ckpt):
    """
    -> (the run's metrics, one dict per epoch, and where they come from): the whole run from the
    metrics.jsonl beside the checkpoint (train.py rewrites it at every save), else the checkpoint's own
    list, which for best.pt stops at the best epoch.
    """
    jsonl = os.path.join(os.path.dirname(path), "metrics.jsonl")
    if os.path.isfile(jsonl):
        return read_jsonl(jsonl), jsonl
    return ckpt.get("metrics", []), f"{path} (no metrics.jsonl beside it: the epochs up to this checkpoint)"


def read_jsonl(jsonl):
    try:
        return plots.read_metrics(jsonl)
    except ValueError as e:
        raise ValueError(f"{jsonl}: not one JSON object per line ({e})") from None


def data_dir_for(args, cfg):
    """The checkpoint's data_dir serves its own data set (the demo's is out-demo/data); another data set named
    with --dataset lives in data/ unless --data_dir says otherwise."""
    if args.data_dir:
        return args.data_dir
    own = not args.dataset or args.dataset == cfg.get("dataset")
    return (cfg.get("data_dir") or "data") if own else "data"


def no_thoughts_note(path, cfg, ckpt):
    """
    The note for a Coconut checkpoint saved at stage 0 (a short run's best.pt: its best validation accuracy came
    before any thought): its answers have no continuous thoughts, and the run's last save (ckpt.pt beside it,
    at the stage metrics.jsonl last names) has them.
    """
    where = f"{path} was saved at stage 0 (epoch {ckpt.get('epoch', -1) + 1}, before the curriculum's first thought)"
    last = os.path.join(os.path.dirname(path), "ckpt.pt")
    if os.path.abspath(last) == os.path.abspath(path) or not os.path.isfile(last):
        return f"note: {where}: its answers have no continuous thoughts (--latent N asks for N all the same)"
    try:
        metrics = read_jsonl(os.path.join(os.path.dirname(path), "metrics.jsonl"))
        reached = f" ({stage_name(metrics[-1]['stage'], cfg)})"
    except (OSError, ValueError, IndexError, KeyError):
        reached = ""
    return (f"note: {where}: its answers have no continuous thoughts; the run's last save{reached} has them: "
            f"`python sample.py --ckpt {last}`")


def length_warning(tokenized, args, cfg, tok):
    """
    One line (or None) when a question written by hand is shorter or longer, in tokens, than every validation
    question of the checkpoint's data set: a model answers questions shaped like its data's (the demo's: 24 roads),
    and a question of another shape runs on without an error. None when that data set is not on this machine.
    """
    name = args.dataset or cfg.get("dataset")
    try:
        reference = [len(tokenize(r, tok).question) for r in load_split(data_dir_for(args, cfg), name, "valid")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    low, high = min(reference), max(reference)
    outside = [(i + 1, len(t.question)) for i, t in enumerate(tokenized) if not low <= len(t.question) <= high]
    if not outside:
        return None
    said = ", ".join(f"question {i} has {n} tokens" for i, n in outside)
    have = f"{low} tokens" if low == high else f"{low}-{high}"
    return (f"warning: {said}, where the {name} data's validation questions have {have}: this model was "
            f"trained on questions of that shape, and answers others untested")
