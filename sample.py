"""
Ask a trained Coconut questions, look inside its continuous thoughts, evaluate it, and measure what
the thoughts hold: the breadth-first-like search of the Coconut paper on ProsQA (Section 5: decoded
thoughts hold several frontier nodes at once), the reasoning paths of its Figure 5, the superposition
groups of "Reasoning by Superposition" on symbolic data, and on the CPU demo's layered worlds where
each thought's mass goes inside its own layer.

The CPU demo's models (python train.py --demo writes out-demo/coconut, out-demo/cot, out-demo/nocot):
    python sample.py --out_dir out-demo/coconut                         # 3 answers and their thoughts
    python sample.py --out_dir out-demo/coconut --split test --eval     # accuracy on the held-out questions
    python sample.py --out_dir out-demo/coconut --split test --analyze  # the search: each thought's layer, groups
    python sample.py --out_dir out-demo/cot --split test --analyze      # CoT's next node at the same positions
    python sample.py --out_dir out-demo/coconut --split test --search 0 --plot search.png  # one question's thoughts
    python sample.py --out_dir out-demo/cot --split test --paths        # the paths CoT writes, by type
    python sample.py --out_dir out-demo --plot demo.png                 # the three methods' validation accuracy
    python sample.py --out_dir out-demo/coconut --plot run.png          # one run's losses and accuracy
The paper's runs (GPU; README: Reproducing the paper), e.g. python train.py --dataset prosqa:
    python sample.py --latent 6                                     # a first look: 3 answers, their thoughts
    python sample.py --question "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?"
    python sample.py --file my_questions.json --latent 3
    python sample.py --split test --eval --latent 0 1 2 3 4 5 6     # accuracy by number of thoughts
    python sample.py --split valid --analyze --plot search.png      # the search in the thoughts
    python sample.py --split valid --paths --latent 0 1 2 3 4 5 6   # Figure 5: path types after k thoughts
    python sample.py --out_dir out-prosqa_graph-coconut --analyze   # superposition: groups and attention
A question must be written as the model's training data writes them: a word or symbol it never saw
is an error that shows one of its own questions.

The model is <out_dir>/best.pt (best validation accuracy; out_dir defaults to train.py's
out-<dataset>-coconut, then to the CPU demo's out-demo/coconut, and the first line says which) unless
--ckpt names a file. A Coconut prompt is the question, <|start-latent|>, N x <|latent|>, <|end-latent|>
(the demo's: N x <|latent|> alone); N defaults to what the checkpoint's stage uses (the validation
prompts of its training run), and --latent N sets it. The model then answers greedily in language.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.nn import functional as F

from machinery import analysis
from machinery import plots
from machinery.checkpoint import first_line, load_checkpoint, resolve_device
from curriculum import PLAIN, final_stage, is_correct, prompt
from machinery.evaluate import evaluate, generate_batched
from machinery.records import load_records, load_split, tokenize

METHOD_NAMES = {"coconut": "Coconut", "cot": "CoT", "nocot": "No-CoT"}  # the demo's three runs, in its order

# -----------------------------------------------------------------------------
# Thoughts

@torch.no_grad()
def top_tokens(model, thought, k):
    """The paper's "decode the thought": softmax(lm_head(thought)) -> the k likeliest (token id, p)."""
    probs = F.softmax(model.gpt.lm_head(thought.to(model.gpt.lm_head.weight)).float(), dim=-1)
    p, ids = probs.topk(min(k, probs.numel()))
    return list(zip(ids.tolist(), p.tolist()))


def format_thought(i, top, tok):
    # repr() keeps a token's leading space visible: ' lempus' vs 'lempus'
    return f"  thought {i}: " + ", ".join(f"{tok.decode([t], skip_special=False)!r} {p:.4f}" for t, p in top)


def trained_thoughts(cfg, stage):
    """
    The most continuous thoughts a checkpoint met in training: its stage's min(stage, M) x c, or M x c where
    any stage could be drawn (uniform_prob) or every example has them all (no_curriculum, pause, frontier).
    None for a model without thoughts.
    """
    mode = cfg.get("mode", "coconut")
    if mode in PLAIN:
        return None
    M, c = cfg.get("max_latent_stage", 6), cfg.get("c_thought", 1)
    if mode in ("no_curriculum", "pause", "frontier") or cfg.get("uniform_prob", 0) > 0:
        return M * c
    return min(stage, M) * c


# -----------------------------------------------------------------------------
# The command line

def nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"the number of thoughts cannot be negative (got {v})")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=None, help="a training run's folder: its best.pt answers (default: "
                                                   "train.py's out-<dataset>-coconut, else the demo's out-demo/coconut); "
                                                   "the demo's out-demo with --plot alone: its three runs in one figure")
    p.add_argument("--ckpt", default=None, help="a checkpoint file instead (best.pt or ckpt.pt of train.py)")
    src = p.add_argument_group("questions (one source; default: the first 3 validation questions of the "
                               "checkpoint's data set, with their thoughts decoded)")
    src.add_argument("--question", action="append", default=[],
                     help="a question (repeatable), written as the model's data writes them")
    src.add_argument("--file", default=None, help="records in the data sets' JSON format (steps may be left out)")
    src.add_argument("--split", default=None, choices=("train", "valid", "test"), help="a split of --dataset")
    src.add_argument("--dataset", default=None, help="<data_dir>/<name>/<split>.json (default: the checkpoint's)")
    src.add_argument("--data_dir", default=None,
                     help="default: the checkpoint's (the demo's out-demo/data) for its own data set, else data")
    src.add_argument("--n", type=int, default=None, help="only the first n records")
    p.add_argument("--latent", type=nonneg_int, nargs="+", default=None,
                   help="continuous thoughts per question (default: what the checkpoint's stage uses); "
                        "several values with --eval or --paths give one row each")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the checkpoint's (128; GSM8k 64)")
    p.add_argument("--batch_size", type=int, default=32, help="questions generated at once")
    p.add_argument("--show_thoughts", action="store_true", help="the top-k tokens each thought decodes to")
    p.add_argument("--top_k", type=int, default=5, help="with --show_thoughts: how many tokens per thought")
    what = p.add_argument_group("analyses (one at a time)")
    what.add_argument("--eval", action="store_true", help="accuracy, tokens and seconds per question over a split")
    what.add_argument("--analyze", action="store_true",
                      help="what the thoughts hold: ProsQA's frontier mass (text); the superposition groups (symbolic "
                           "data, one token per node: prosqa_graph, the demo's reach: inner products and attention "
                           "by node group); on layered data (reach) first each thought's mass inside its own layer, "
                           "and for a CoT model its next-node distribution at the same positions")
    what.add_argument("--paths", action="store_true",
                      help="the paper's Figure 5: the reasoning path written after k thoughts, by type (default k: "
                           "0 .. max_latent_stage; 0 for CoT and No-CoT)")
    what.add_argument("--losses", action="store_true",
                      help="the training sequence at the checkpoint's stage, teacher-forced: its loss and accuracy by "
                           "piece (each thought's label, each step, the answer marker, the answer)")
    what.add_argument("--search", type=int, default=None, metavar="I",
                      help="layered data (the demo's reach): question I of the split (from 0), each thought's "
                           "probability on every node of the world (CoT: its next node, teacher-forced); with "
                           "--plot drawn on the world's grid with the question's open roads")
    what.add_argument("--probe", default="thought", choices=("thought", "language"),
                      help="--analyze on text ProsQA: the thought itself through lm_head (first token of each "
                           "name), or the paper's next step after k thoughts (the whole name)")
    what.add_argument("--plot", default=None, metavar="FILE.png",
                      help="draw what --eval, --analyze, --paths or --search print (alone: the whole run's losses "
                           "and accuracy, from the metrics.jsonl beside the checkpoint); needs matplotlib")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    args = p.parse_args(argv)

    for q in args.question:
        if not q.strip():
            p.error("--question is empty")
    n_sources = bool(args.question) + (args.file is not None) + (args.split is not None)
    if n_sources > 1:
        p.error("give one source of questions: --question, --file or --split (with --dataset)")
    analyses = [k for k in ("eval", "analyze", "paths", "losses") if getattr(args, k)] + \
        ["search"] * (args.search is not None)
    if len(analyses) > 1:
        p.error(f"--{analyses[0]} and --{analyses[1]} run one at a time")
    if args.search is not None and args.search < 0:
        p.error("--search I counts questions from 0")
    if n_sources == 0:
        args.split = "valid"  # a data set's natural default
        if not analyses and not args.dataset and args.n is None:  # a first look: a few answers and their thoughts
            args.n, args.show_thoughts = 3, True
    if analyses and args.question:
        p.error(f"--{analyses[0]} needs records with answers: --file or --split")
    if args.latent is not None and len(args.latent) > 1 and not (args.eval or args.paths):
        p.error("several --latent values need --eval or --paths")
    for k in ("n", "batch_size", "top_k", "max_new_tokens"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    return args


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


def load_model(args):
    """
    The checkpoint named, else the default run's (train.py's out_dir for the data set), else the CPU demo's.
    -> (model, tok, ckpt, path, why): why says how the path was chosen when nothing named it.
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
    # load_checkpoint's errors are one line already (missing, truncated, foreign, mismatched files)
    model, tok, ckpt = load_checkpoint(path, device=resolve_device(args.device))
    return model.eval(), tok, ckpt, path, why


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


def load_questions(args, cfg):
    """The records ({"question", "steps", "answer"}, ProsQA's graph too) and whether they have answers."""
    if args.question:
        return [{"question": q, "steps": [], "answer": ""} for q in args.question], False
    if args.file is not None:
        records = load_records(args.file, steps_optional=True)  # one-line errors for a malformed file
        if not records:
            raise ValueError(f"{args.file}: no records")
    else:
        name = args.dataset or cfg.get("dataset")
        if not name:
            raise ValueError("which data set? the checkpoint does not say: pass --dataset")
        records = load_split(data_dir_for(args, cfg), name, args.split)
    if args.search is not None:
        if args.search >= len(records):
            raise ValueError(f"--search {args.search}: the {args.split or 'file'}'s questions are 0..{len(records) - 1}")
        return [records[args.search]], True
    return records[:args.n], True


def tokenize_all(records, tok, cfg):
    """Each record's tokens; a word the model's vocabulary lacks is one line that shows a question it knows."""
    try:
        return [tokenize(r, tok) for r in records]
    except ValueError as e:
        name = cfg.get("dataset", "?")
        try:
            example = load_split(cfg.get("data_dir") or "data", name, "valid")[0]["question"]
            like = f"a question for this model ({name}) reads like its first validation question: {example!r}"
        except (OSError, ValueError, IndexError, KeyError):
            like = f"this model was trained on {name}: ask in the form of its questions"
        raise ValueError(f"{first_line(e)}; {like}") from None


def warn_thoughts(cfg, stage, latents):
    """One line when more thoughts are asked for than the model ever met in training."""
    most = trained_thoughts(cfg, stage)
    over = [n for n in latents or [] if n is not None and most is not None and n > most]
    if over:
        print(f"warning: --latent {' '.join(map(str, over))}: this model was trained with at most {most} continuous "
              f"thoughts (stage {stage}, max_latent_stage {cfg.get('max_latent_stage', 6)}, c_thought "
              f"{cfg.get('c_thought', 1)}); what it does with more is untested")


def run(args):
    if args.plot and plots.missing():  # say so before any work, not after the tables with no file and exit 0
        raise RuntimeError(f"--plot: {plots.MISSING}")
    plot_alone = args.plot and not (args.eval or args.analyze or args.paths or args.losses or args.search is not None)
    if plot_alone and args.out_dir and not args.ckpt and not os.path.isfile(os.path.join(args.out_dir, "best.pt")) \
            and runs_inside(args.out_dir):  # the demo's out-demo: its runs side by side
        return plot_methods(args)
    model, tok, ckpt, path, why = load_model(args)
    cfg = ckpt.get("config", {})
    stage = final_stage(cfg, ckpt)
    print(f"{path}: {cfg.get('mode', 'coconut')} on {cfg.get('dataset', '?')}, epoch {ckpt.get('epoch', -1) + 1}, "
          f"stage {stage} (c_thought {cfg.get('c_thought', 1)}, max_latent_stage {cfg.get('max_latent_stage', 6)})")
    if why:
        print(why)
    if plot_alone:
        metrics, source = run_history(path, ckpt)
        print(f"the run's {len(metrics)} epoch(s) from {source}")
        return draw(plots.plot_run, args.plot, metrics, title=f"{cfg.get('mode')} on {cfg.get('dataset')}",
                    max_latent_stage=cfg.get("max_latent_stage"))
    warn_thoughts(cfg, stage, args.latent)
    records, answered = load_questions(args, cfg)
    tokenized = tokenize_all(records, tok, cfg)
    max_new = args.max_new_tokens or cfg.get("max_new_tokens") or 128
    if args.search is not None:
        return search(model, tok, records[0], tokenized[0], cfg, stage, max_new, args)
    print(f"{len(records)} question(s)")
    if args.analyze:
        return analyze(model, tok, records, tokenized, cfg, stage, (args.latent or [None])[0], args)
    if args.paths:
        return paths(model, tok, records, tokenized, cfg, max_new, args)
    if args.eval:
        return evaluate_latents(model, tok, records, tokenized, cfg, stage, max_new, args)
    if args.losses:
        return losses(model, tok, tokenized, cfg, stage)

    prompts = [prompt(t, cfg, stage, tok, (args.latent or [None])[0]) for t in tokenized]
    outs, thoughts = generate_batched(model, prompts, max_new, args.batch_size)
    correct = 0
    for i, (rec, pr, out, th) in enumerate(zip(records, prompts, outs, thoughts)):
        q = rec["question"] if len(rec["question"]) <= 120 else "..." + rec["question"][-117:]
        print(f"[{i + 1}] Q: {q}")
        mark = ""
        if answered:
            ok = is_correct(pr, out, rec["answer"], tok)
            correct += ok
            mark = "  (correct)" if ok else f"  (wrong; expected {rec['answer']!r})"
        print(f"    A: {tok.decode(out).strip()!r}{mark}")
        if args.show_thoughts:
            if len(th) == 0:
                print("  (no continuous thoughts)")
            for j, t in enumerate(th):
                print(format_thought(j + 1, top_tokens(model, t, args.top_k), tok))
    if answered:
        print(f"accuracy {correct}/{len(records)} = {100 * correct / len(records):.2f}%")
    return 0


def plot_methods(args):
    """`--out_dir out-demo --plot FILE`: the validation accuracy per epoch of every run in the folder, one figure."""
    runs = {}
    for d in runs_inside(args.out_dir):
        jsonl = os.path.join(args.out_dir, d, "metrics.jsonl")
        if os.path.isfile(jsonl):
            runs[METHOD_NAMES.get(d, d)] = read_jsonl(jsonl)
    if not runs:
        raise FileNotFoundError(f"{args.out_dir}: no metrics.jsonl in its runs ({', '.join(runs_inside(args.out_dir))})")
    for name, ms in runs.items():
        accs = [(m["val_acc"], m["epoch"]) for m in ms if m.get("val_acc") is not None]
        best = f", best {100 * max(accs)[0]:.2f}% at epoch {max(accs, key=lambda x: (x[0], -x[1]))[1]}" if accs else ""
        print(f"{name:>8}: {len(ms)} epoch(s){best}")
    return draw(plots.plot_methods, args.plot, runs, title=os.path.basename(os.path.normpath(args.out_dir)))


EVAL_LABEL = 12  # "5 (default)" and the header "thoughts" in one column


def evaluate_latents(model, tok, records, tokenized, cfg, stage, max_new, args):
    """One row per --latent value: evaluate.evaluate, the very function train.py's validation accuracy comes from."""
    print(f"{'thoughts':>{EVAL_LABEL}} {'accuracy':>9} {'correct':>9} {'tokens/q':>9} {'new/q':>7} {'s/q':>8}")
    rows = []
    for n in args.latent or [None]:
        prompts = [prompt(t, cfg, stage, tok, n) for t in tokenized]
        r = evaluate(model, tok, prompts, [rec["answer"] for rec in records], max_new, args.batch_size)
        # "thoughts" counts the continuous thoughts fed back; tokens/q adds the generated tokens
        # (the paper's "# tokens"); with the default a record may have fewer (pad_latent_to_max 0)
        label = f"{r['mean_thoughts']:g}" + ("" if n is not None else " (default)")
        print(f"{label:>{EVAL_LABEL}} {100 * r['acc']:8.2f}% {r['correct']:>4}/{r['total']:<4} "
              f"{r['mean_thoughts'] + r['mean_new_tokens']:9.1f} {r['mean_new_tokens']:7.1f} "
              f"{r['seconds_per_question']:8.4f}")
        rows.append(dict(thoughts=r["mean_thoughts"], acc=r["acc"], tokens_per_q=r["mean_thoughts"] + r["mean_new_tokens"]))
    return draw(plots.plot_eval, args.plot, rows) if args.plot else 0


def losses(model, tok, tokenized, cfg, stage):
    """--losses: where a model's training loss is, piece by piece (analysis.piece_losses)."""
    print(f"the training sequences at stage {stage}, teacher-forced: loss (nats) and accuracy (the argmax is the "
          f"label) of each piece")
    print(f"{'piece':>10} {'loss':>8} {'accuracy':>9} {'tokens':>7}")
    for name, loss, acc, n in analysis.piece_losses(model, tok, tokenized, cfg, stage):
        print(f"{name:>10} {loss:8.4f} {100 * acc:8.2f}% {n:7d}")
    return 0


def paths(model, tok, records, tokenized, cfg, max_new, args):
    """The paper's Figure 5: after k thoughts the model writes the rest of its path; sort each by type."""
    for i, r in enumerate(records):
        analysis.check_graph(r, f"record {i}")
    plain = cfg.get("mode", "coconut") in PLAIN  # CoT, No-CoT: the path it writes from the question alone
    ks = args.latent or ([0] if plain else list(range(cfg.get("max_latent_stage", 6) + 1)))
    labels, correct = {}, {}
    for k in ks:
        prompts = [prompt(t, cfg, None, tok, k) for t in tokenized]
        outs, _ = generate_batched(model, prompts, max_new, args.batch_size)
        labels[k] = [analysis.classify_path(tok.decode(o), r, k) for o, r in zip(outs, records)]
        correct[k] = [is_correct(p, o, r["answer"], tok) for p, o, r in zip(prompts, outs, records)]
    rows = analysis.path_table(labels, correct)
    names = [c.replace("_", " ") for c in analysis.PATH_CATEGORIES]
    print("the path written after k thoughts (the paper's Figure 5), share of questions; accuracy: the answer; "
          "no answer: stopped before '###'")
    print(f"{'k':>3} " + " ".join(f"{n:>15}" for n in names) + f" {'accuracy':>9}")
    for r in rows:
        print(f"{r['k']:>3} " + " ".join(f"{100 * r[c]:14.1f}%" for c in analysis.PATH_CATEGORIES) +
              f" {100 * r['acc']:8.1f}%")
    return draw(plots.plot_paths, args.plot, rows) if args.plot else 0


def draw(fn, path, *data, **kw):
    out = fn(*data, path, **kw)
    print(out if out != path else f"wrote {path}")
    return 0


# -----------------------------------------------------------------------------
# What the thoughts hold

def thought_prompts(tok, tokenized, cfg, stage, n_latent):
    """The prompts whose thoughts are analyzed: the checkpoint's stage's (or --latent N); a checkpoint saved
    before its stage had thoughts (a short run's best.pt at stage 0) gets the run's last stage, said in a note."""
    prompts = [prompt(t, cfg, stage, tok, n_latent) for t in tokenized]
    if n_latent is None and cfg.get("mode", "coconut") not in PLAIN and not any(tok.latent_id in p for p in prompts):
        last = cfg.get("max_latent_stage", 6) + 1
        prompts = [prompt(t, cfg, last, tok) for t in tokenized]
        print(f"note: stage {stage} feeds no continuous thoughts; analyzing with the run's final stage's "
              f"{max(p.count(tok.latent_id) for p in prompts)} (--latent N chooses)")
    return prompts


def layer_positions(tok, records, tokenized, prompts, cfg):
    """
    What the layer split reads, per record: (token row, its columns, the gold node each column is trained to
    name). A model with thoughts: its prompt, and the column of each thought that names a step; CoT: the
    question and the gold steps (teacher forcing), and the column that predicts each step.
    """
    rows, cols, golds = [], [], []
    for rec, t, pr in zip(records, tokenized, prompts):
        path = analysis.gold_path(rec)
        if cfg.get("mode") == "cot":
            row, cs = analysis.teacher_forced(t)
        else:
            row, cs = pr, analysis.thought_positions(pr, tok.latent_id, cfg.get("c_thought", 1))
        first = [1 + sum(len(s.split()) for s in rec["steps"][:k]) for k in range(len(rec["steps"]))]  # in path
        n = min(len(cs), len(first))  # a thought past the last step has no gold node
        rows.append(row)
        cols.append(cs[:n])
        golds.append([path[j] for j in first[:n]])
    return rows, cols, golds


def layer_split(model, tok, records, tokenized, prompts, cfg, args):
    """Each thought's (CoT: each next step's) softmax inside its own layer, by group, averaged over the records
    (analysis.layer_split). -> the rows, printed."""
    rows, cols, golds = layer_positions(tok, records, tokenized, prompts, cfg)
    probs = analysis.position_node_probs(model, rows, cols, [analysis.node_token_ids(r, tok) for r in records],
                                         args.batch_size)
    splits = defaultdict(list)
    for rec, p, gs in zip(records, probs, golds):
        w = analysis.layer_width(rec)
        for k, (gold, pk) in enumerate(zip(gs, p.tolist()), start=1):
            splits[k].append(analysis.layer_split(pk, rec, gold // w, w))
    table = analysis.average_splits(splits)
    if not table:
        raise ValueError("no continuous thoughts to analyze: use --latent N with N > 0")
    cot = cfg.get("mode") == "cot"
    what = "step" if cot else "thought"
    if cot:
        print("where CoT's next-node softmax goes inside the layer of the step it writes, teacher-forced (the "
              "question and the gold steps before it): the positions of Coconut's thoughts")
    else:
        print("where each thought's softmax (lm_head of the thought) goes inside its own layer: thought k is "
              "trained to name the gold path's node of layer k" +
              ("" if model.feedback else f" (a {cfg.get('mode')} model: the output at the column before each "
                                         f"<|latent|>, which is not fed back)"))
    print("  layer: the mass on that layer's nodes, out of the whole vocabulary; the four groups split it by the "
          "question's open roads, renormalised over the layer (they sum to 1):")
    print("  gold: the gold path's node; start: the start's other branches; other root: the other root's branches; "
          "unused: nodes that no open road reaches")
    print(f"{what:>7} {'records':>7} {'layer':>6} {'gold':>6} {'start':>6} {'other root':>10} {'unused':>6}")
    for r in table:
        print(f"{r['position']:>7} {r['records']:>7} {r['layer']:6.3f} {r['gold']:6.3f} {r['start']:6.3f} "
              f"{r['other_root']:10.3f} {r['unused']:6.3f}")
    n = {g: sum(r[f"n_{g}"] for r in table) / len(table) for g in analysis.LAYER_GROUPS}
    width = sum(n.values())
    even = " ".join(f"{n[g] / width:.3f}" for g in analysis.LAYER_GROUPS)
    sizes = ", ".join(f"{n[g]:g}" for g in analysis.LAYER_GROUPS)
    print(f"  a guess spread evenly over the layer would give {even} (nodes per group: {sizes}); a search puts "
          f"the mass on gold + start")
    print("one question at a time: the share of the layer's mass on its most probable node (1: all on one node; "
          "a third: spread over three branches), and how often that node is the gold one")
    for r in table:
        print(f"  {what} {r['position']}: top node {r['top']:.3f} of the layer, the gold node in "
              f"{100 * r['top_gold']:.1f}%")
    return table


def analyze(model, tok, records, tokenized, cfg, stage, n_latent, args):
    mode = cfg.get("mode", "coconut")
    for i, r in enumerate(records):
        analysis.check_graph(r, f"record {i}")
    symbolic = tok.spec.get("kind") == "symbols"  # one token per node: the superposition paper's measures
    if symbolic and args.probe == "language":
        raise ValueError("--probe language reads node names written in words (text ProsQA); this model's nodes "
                         "are one symbol each: drop --probe")
    layered = symbolic and all(analysis.layer_width(r) for r in records)
    if not model.feedback and not (layered and mode != "nocot"):
        raise ValueError(f"--analyze reads continuous thoughts: a {mode} model has none"
                         + ("" if mode != "cot" else " (on layered data such as the demo's reach, its next-node "
                                                     "distribution instead)"))
    prompts = thought_prompts(tok, tokenized, cfg, stage, n_latent)
    split = layer_split(model, tok, records, tokenized, prompts, cfg, args) if layered else None
    if not model.feedback:  # CoT, pause_as_thought: the split is what there is to see
        return draw(plots.plot_layer_split, args.plot, split, what="step" if mode == "cot" else "thought",
                    title=f"{mode} on {cfg.get('dataset')}") if args.plot else 0
    if symbolic:
        return superposition(model, tok, records, prompts, args, split)
    stats = defaultdict(list)
    if args.probe == "thought":
        _, thoughts = generate_batched(model, prompts, 1, args.batch_size)  # only the thoughts are needed
        for rec, th in zip(records, thoughts):
            for i, raw in enumerate(analysis.node_probs_thought(model, th, rec, tok)):
                stats[i + 1].append(analysis.thought_stats(raw, rec, i + 1))
    else:
        for rec, t, pr in zip(records, tokenized, prompts):
            n = pr.count(tok.latent_id)
            for i, raw in enumerate(analysis.node_probs_language(model, t, rec, cfg, tok, n, args.batch_size)):
                stats[i + 1].append(analysis.thought_stats(raw, rec, i + 1))
    if not stats:
        raise ValueError("no continuous thoughts to analyze: use --latent N with N > 0")
    by_thought, by_height = analysis.summarize(stats)
    print(f"node values ({args.probe} probe) normalised over each graph's nodes; the frontier at thought i: "
          f"the nodes i hops from the root; correct: the target is reachable from it")
    if args.probe == "thought":
        firsts = [analysis.node_first_tokens(r, tok) for r in records]
        shared = sum(len(f) - len(set(f)) for f in firsts)
        if shared:
            print(f"note: {shared} of {sum(map(len, firsts))} nodes repeat the first token of another node of "
                  f"their graph and share its value (--probe language scores whole names)")
    print(f"{'thought':>7} {'records':>7} {'on nodes':>8} {'frontier':>8} {'other':>6} {'top1':>6} {'top2':>6} "
          f"{'top3':>6} {'correct':>8} {'incorrect':>9}")
    for r in by_thought:
        print(f"{r['thought']:>7} {r['records']:>7} {r['node_mass']:8.3f} {r['frontier']:8.3f} {r['other']:6.3f} "
              f"{r['top1']:6.3f} {r['top2']:6.3f} {r['top3']:6.3f} {r['correct']:8.3f} {r['incorrect']:9.3f}")
    print("mean value of frontier nodes by height (shortest distance to a leaf), all thoughts pooled")
    print(f"{'height':>6} {'correct':>8} {'(n)':>5} {'incorrect':>9} {'(n)':>5}")
    for r in by_height:
        print(f"{r['height']:>6} {r['correct']:8.3f} {r['n_correct']:>5} {r['incorrect']:9.3f} {r['n_incorrect']:>5}")
    return draw(plots.plot_search, args.plot, by_thought, by_height) if args.plot else 0


def superposition(model, tok, records, prompts, args, split=None):
    """
    "Reasoning by Superposition" (Zhu et al. 2025), its two tables in its layout: the inner product of
    thought i with each node's input embedding, mean by node group; and per layer, the attention that the
    position computing thought i pays to the question's edges, summed over heads, mean by edge group
    (an edge belongs to its source node's group). split: layer_split's rows, drawn beside them.
    """
    t = analysis.superposition_tables(model, tok, records, prompts, args.batch_size)
    steps = sorted(t["inner"])
    if not steps:
        raise ValueError("no continuous thoughts to analyze: use --latent N with N > 0")
    names = {g: g.replace("_", " ") for g in analysis.GROUPS}
    cell = lambda table, i, g: f"{table[i][g][0]:9.2f}" if g in table.get(i, {}) else f"{'-':>9}"
    counts = lambda table, i: max((n for _, n in table.get(i, {}).values()), default=0)

    def rows(table, label):
        print(f"{label:>14} " + " ".join(f"{f'thought {i}':>9}" for i in steps))
        for g in analysis.GROUPS:
            print(f"{names[g]:>14} " + " ".join(cell(table, i, g) for i in steps))
        print(f"{'records':>14} " + " ".join(f"{counts(table, i):>9}" for i in steps))
        fewer = [f"{names[g]} at thought {i}: {table[i][g][1]}" for i in steps for g in analysis.GROUPS
                 if g in table.get(i, {}) and table[i][g][1] < counts(table, i)]
        if fewer:  # a group that is empty in some records (no optimal node past the target) averages fewer
            print(f"{'':>14} fewer records in " + "; ".join(fewer))

    print("the superposition groups (nested: optimal within frontier within reachable; not reachable: the rest), "
          "taken at thought i's hop")
    print("mean inner product of thought i with the node embeddings, by node group")
    rows(t["inner"], "group")
    for layer, table in enumerate(t["attention"]):
        print(f"layer {layer + 1}: attention of the position that computes thought i on the question's edges "
              f"(summed over heads), mean per edge, by the group of the edge's source at hop i-1")
        rows(table, "edge group")
    return draw(plots.plot_superposition, args.plot, t, split=split) if args.plot else 0


# -----------------------------------------------------------------------------
# One question's search, drawn on the world

def branches_text(rec, top):
    """The open roads below node `top`, branch by branch, a layer at a time: 'b4 c2 d1 | b2 c5 d3'."""
    kids, names = analysis.children(rec), rec["idx_to_symbol"]
    parts = []
    for c in kids[top]:
        layers, frontier = [], [c]
        while frontier:
            layers.append("/".join(names[v] for v in sorted(frontier)))
            frontier = sorted({x for v in frontier for x in kids[v]})
        parts.append(" ".join(layers))
    return " | ".join(parts)


def search(model, tok, rec, t, cfg, stage, max_new, args):
    """--search I: one question's thoughts (CoT: its next steps, teacher-forced) on every node of the world."""
    mode = cfg.get("mode", "coconut")
    analysis.check_graph(rec, f"question {args.search}")
    w = analysis.layer_width(rec) if tok.spec.get("kind") == "symbols" else None
    if w is None:
        raise ValueError(f"--search draws layered data, one token per node (the demo's reach: node v in layer "
                         f"v // width, every road one layer down); {cfg.get('dataset')}'s question {args.search} is not")
    if mode == "nocot":
        raise ValueError("--search shows thoughts or written steps: a nocot model has neither")
    names, n_layers = rec["idx_to_symbol"], len(rec["idx_to_symbol"]) // w
    layer_name = lambda l: names[l * w].rstrip("0123456789") or str(l)  # reach: a, b, ...
    (pr,) = thought_prompts(tok, [t], cfg, stage, (args.latent or [None])[0])
    (out,), _ = generate_batched(model, [pr], max_new, 1)
    ok = is_correct(pr, out, rec["answer"], tok)
    if mode == "cot":
        row, cols = analysis.teacher_forced(t)
        labels = [f"step {k} (teacher-forced)" for k in range(1, len(cols) + 1)]
    else:
        row, cols = pr, analysis.thought_positions(pr, tok.latent_id)
        labels = [f"thought {k}" for k in range(1, len(cols) + 1)]
    if not cols:
        raise ValueError("no continuous thoughts to show: use --latent N with N > 0")
    (probs,) = analysis.position_node_probs(model, [row], [cols], [analysis.node_token_ids(rec, tok)])
    roles = analysis.node_roles(rec, w)
    others = [v for v in range(w) if v != rec["root"] and analysis.children(rec)[v]]
    print(f"question {args.search} of {args.split or 'the file'}: {rec['question']}")
    print(f"the start {names[rec['root']]}'s open roads: {branches_text(rec, rec['root'])}")
    for o in others:
        print(f"the other root {names[o]}'s: {branches_text(rec, o)}")
    print(f"the gold path: {' '.join(names[v] for v in analysis.gold_path(rec))}; the options "
          f"{names[rec['target']]} (the answer) and {names[rec['neg_target']]}")
    print(f"the model writes {tok.decode(out).strip()!r}: " +
          ("correct" if ok else f"wrong (expected {rec['answer']!r})"))
    tag = dict(gold="*", start="+", other_root="-", unused=".")
    print(f"each {'next step' if mode == 'cot' else 'thought'}'s softmax on the world's nodes (at least 0.01, or the "
          f"top 3; "
          f"* gold path, + the start's other branches, - the other root's, . unused)")
    for label, p in zip(labels, probs.tolist()):
        by_layer = [sum(p[v] for v in range(l * w, (l + 1) * w)) for l in range(n_layers)]
        top = [(x, v) for i, (x, v) in enumerate(sorted(((x, v) for v, x in enumerate(p)), reverse=True))
               if x >= 0.01 or i < 3]
        layer = max(range(n_layers), key=lambda l: by_layer[l])
        print(f"  {label}: {sum(p):.3f} on nodes, {by_layer[layer]:.3f} on layer {layer_name(layer)}: "
              + " ".join(f"{names[v]}{tag[roles[v]]} {x:.3f}" for x, v in top))
    if not args.plot:
        return 0
    world = dict(names=names, width=w, edges=rec["edges"], roles=roles, gold_path=analysis.gold_path(rec),
                 root=rec["root"], target=rec["target"], neg_target=rec["neg_target"])
    return draw(plots.plot_world, args.plot, world, probs.tolist(), labels,
                title=f"{mode} on {cfg.get('dataset')}, question {args.search} of {args.split or 'the file'} "
                      f"({'correct' if ok else 'wrong'})")


def main(argv=None):
    args = parse_args(argv)  # bad arguments end here: argparse prints one line, exit code 2
    try:
        return run(args)
    except (OSError, ValueError, RuntimeError) as e:
        # One line, no traceback: a missing or corrupt checkpoint, a bad data file, a prompt longer
        # than the model's block_size, --latent on a model without thoughts.
        print(f"sample.py: error: {first_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
