"""
Finding a model and its run for sample.py: the checkpoint named, or the default run's (train.py's out_dir for the
data set), or the CPU demo's; the runs inside a folder (the demo's out-demo holds three); the run's history
(metrics.jsonl); the data folder a checkpoint's own data set lives in. Every miss is one line naming what to type.
"""
import os

from machinery import plots

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
    args.dataset), else the CPU demo's. -> (path, why): why says how the path was chosen when nothing named it.
    FileNotFoundError, one line, when there is none: it names the file to pass instead, or the command that makes one.
    """
    why = None
    if args.ckpt and os.path.isdir(args.ckpt):
        raise not_a_run(args.ckpt, "--ckpt")
    if args.out_dir and os.path.isfile(args.out_dir):
        raise FileNotFoundError(f"--out_dir wants a run's folder: {args.out_dir} is a file (--ckpt {args.out_dir})")
    if args.ckpt or args.out_dir:
        candidates = [args.ckpt or os.path.join(args.out_dir, "best.pt")]
    else:
        candidates = [os.path.join(f"out-{args.dataset or 'prosqa'}-coconut", "best.pt")]
        if not args.dataset:
            candidates.append(os.path.join("out-demo", "coconut", "best.pt"))
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        last = [os.path.join(os.path.dirname(c), "ckpt.pt") for c in candidates if os.path.basename(c) == "best.pt"]
        last = next((c for c in last if os.path.isfile(c)), None)
        if last:  # a run stopped before its first validation accuracy: no best.pt yet, but its last save
            raise FileNotFoundError(f"no best.pt yet (the run has not measured a validation accuracy), but {last} "
                                    f"holds its last save: `python sample.py --ckpt {last}`")
        if args.out_dir and not args.ckpt and os.path.isdir(args.out_dir):
            raise not_a_run(args.out_dir, "--out_dir")
        if args.ckpt or args.out_dir:
            raise FileNotFoundError(f"no model to answer with: {candidates[0]} does not exist")
        raise FileNotFoundError(f"no trained model yet ({' or '.join(candidates)}): make one with `python train.py "
                                f"--demo` (CPU, minutes) or `python train.py --dataset prosqa` (the paper's run, a GPU), "
                                f"or pass --out_dir or --ckpt")
    if not (args.ckpt or args.out_dir):
        run = os.path.dirname(candidates[0])
        why = (f"the default model: {run}, the run of train.py --dataset {args.dataset or 'prosqa'}"
               if path == candidates[0] else
               f"the CPU demo's Coconut, since there is no {candidates[0]} (the paper's ProsQA run)")
        why += "; --out_dir or --ckpt chooses another"
    return path, why


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
