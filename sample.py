"""
Ask a trained Coconut questions, look inside its continuous thoughts, evaluate it, and measure what
the thoughts hold: the breadth-first-like search of the Coconut paper on ProsQA (Section 5: decoded
thoughts hold several frontier nodes at once), the reasoning paths of its Figure 5, and the
superposition groups of "Reasoning by Superposition" on the symbolic prosqa_graph.

    python sample.py --latent 6                                     # a first look: 3 answers, their thoughts
    python sample.py --question "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?"
    python sample.py --file my_questions.json --latent 3
    python sample.py --split test --eval --latent 0 1 2 3 4 5 6     # accuracy by number of thoughts
    python sample.py --split valid --analyze --plot search.png      # the search in the thoughts
    python sample.py --split valid --paths --latent 0 1 2 3 4 5 6   # Figure 5: path types after k thoughts
    python sample.py --out_dir out-prosqa_graph-coconut --analyze   # superposition: groups and attention
    python sample.py --out_dir out-demo/coconut --plot run.png      # a run's losses and accuracy

The model is <out_dir>/best.pt (best validation accuracy; out_dir defaults to train.py's
out-<dataset>-coconut, then to the CPU demo's out-demo/coconut) unless --ckpt names a file. A Coconut
prompt is the question, <|start-latent|>, N x <|latent|>, <|end-latent|>; N defaults to what the
checkpoint's stage uses (the validation prompts of its training run), and --latent N sets it. The
model then answers greedily in language.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.nn import functional as F

import analysis
import plots
from checkpoint import first_line, load_checkpoint, resolve_device
from curriculum import final_stage, is_correct, prompt
from evaluate import evaluate, generate_batched
from records import load_records, load_split, tokenize

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
                                                   "train.py's out-<dataset>-coconut, else the demo's out-demo/coconut)")
    p.add_argument("--ckpt", default=None, help="a checkpoint file instead (best.pt or ckpt.pt of train.py)")
    src = p.add_argument_group("questions (one source; default: the first 3 validation questions of the "
                               "checkpoint's data set, with their thoughts decoded)")
    src.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    src.add_argument("--file", default=None, help="records in the data sets' JSON format (steps may be left out)")
    src.add_argument("--split", default=None, choices=("train", "valid", "test"), help="a split of --dataset")
    src.add_argument("--dataset", default=None, help="data/<name>/<split>.json (default: the checkpoint's)")
    src.add_argument("--data_dir", default=None, help="default: the checkpoint's (data)")
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
                      help="what the thoughts hold: ProsQA's frontier mass (text), or the superposition groups "
                           "(symbolic prosqa_graph: inner products and attention by node group)")
    what.add_argument("--paths", action="store_true",
                      help="ProsQA, the paper's Figure 5: the reasoning path written after k thoughts, by type")
    what.add_argument("--probe", default="thought", choices=("thought", "language"),
                      help="--analyze on text ProsQA: the thought itself through lm_head (first token of each "
                           "name), or the paper's next step after k thoughts (the whole name)")
    what.add_argument("--plot", default=None, metavar="FILE.png",
                      help="draw what --eval, --analyze or --paths print (alone: the whole run's losses and accuracy, "
                           "from the metrics.jsonl beside the checkpoint); needs matplotlib")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    args = p.parse_args(argv)

    for q in args.question:
        if not q.strip():
            p.error("--question is empty")
    n_sources = bool(args.question) + (args.file is not None) + (args.split is not None)
    if n_sources > 1:
        p.error("give one source of questions: --question, --file or --split (with --dataset)")
    analyses = [k for k in ("eval", "analyze", "paths") if getattr(args, k)]
    if len(analyses) > 1:
        p.error(f"--{analyses[0]} and --{analyses[1]} run one at a time")
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


def load_model(args):
    """The checkpoint named, else the default run's (train.py's out_dir for the data set), else the CPU demo's."""
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
        if args.ckpt or args.out_dir:
            raise FileNotFoundError(f"no model to answer with: {candidates[0]} does not exist")
        raise FileNotFoundError(f"no trained model yet ({' or '.join(candidates)}): make one with `python train.py "
                                f"--demo` (CPU, minutes) or `python train.py --dataset prosqa` (the paper's run, a GPU), "
                                f"or pass --out_dir or --ckpt")
    # load_checkpoint's errors are one line already (missing, truncated, foreign, mismatched files)
    model, tok, ckpt = load_checkpoint(path, device=resolve_device(args.device))
    return model.eval(), tok, ckpt, path


def run_history(path, ckpt):
    """
    -> (the run's metrics, one dict per epoch, and where they come from): the whole run from the
    metrics.jsonl beside the checkpoint (train.py rewrites it at every save), else the checkpoint's own
    list, which for best.pt stops at the best epoch.
    """
    jsonl = os.path.join(os.path.dirname(path), "metrics.jsonl")
    if os.path.isfile(jsonl):
        try:
            return plots.read_metrics(jsonl), jsonl
        except ValueError as e:
            raise ValueError(f"{jsonl}: not one JSON object per line ({e})") from None
    return ckpt.get("metrics", []), f"{path} (no metrics.jsonl beside it: the epochs up to this checkpoint)"


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
        records = load_split(args.data_dir or cfg.get("data_dir") or "data", name, args.split)
    return records[:args.n], True


def run(args):
    model, tok, ckpt, path = load_model(args)
    cfg = ckpt.get("config", {})
    stage = final_stage(cfg, ckpt)
    print(f"{path}: {cfg.get('mode', 'coconut')} on {cfg.get('dataset', '?')}, epoch {ckpt.get('epoch', -1) + 1}, "
          f"stage {stage} (c_thought {cfg.get('c_thought', 1)}, max_latent_stage {cfg.get('max_latent_stage', 6)})")
    if args.plot and not (args.eval or args.analyze or args.paths):
        metrics, source = run_history(path, ckpt)
        print(f"the run's {len(metrics)} epoch(s) from {source}")
        return draw(plots.plot_run, args.plot, metrics, title=f"{cfg.get('mode')} on {cfg.get('dataset')}")
    records, answered = load_questions(args, cfg)
    tokenized = [tokenize(r, tok) for r in records]
    max_new = args.max_new_tokens or cfg.get("max_new_tokens") or 128
    print(f"{len(records)} question(s)")
    if args.analyze:
        return analyze(model, tok, records, tokenized, cfg, stage, (args.latent or [None])[0], args)
    if args.paths:
        return paths(model, tok, records, tokenized, cfg, max_new, args)
    if args.eval:
        return evaluate_latents(model, tok, records, tokenized, cfg, stage, max_new, args)

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


def evaluate_latents(model, tok, records, tokenized, cfg, stage, max_new, args):
    """One row per --latent value: evaluate.evaluate, the very function train.py's validation accuracy comes from."""
    print(f"{'thoughts':>8} {'accuracy':>9} {'correct':>9} {'tokens/q':>9} {'new/q':>7} {'s/q':>8}")
    rows = []
    for n in args.latent or [None]:
        prompts = [prompt(t, cfg, stage, tok, n) for t in tokenized]
        r = evaluate(model, tok, prompts, [rec["answer"] for rec in records], max_new, args.batch_size)
        # "thoughts" counts the continuous thoughts fed back; tokens/q adds the generated tokens
        # (the paper's "# tokens"); with the default a record may have fewer (pad_latent_to_max 0)
        label = f"{r['mean_thoughts']:g}" + ("" if n is not None else " (default)")
        print(f"{label:>8} {100 * r['acc']:8.2f}% {r['correct']:>4}/{r['total']:<4} "
              f"{r['mean_thoughts'] + r['mean_new_tokens']:9.1f} {r['mean_new_tokens']:7.1f} "
              f"{r['seconds_per_question']:8.4f}")
        rows.append(dict(thoughts=r["mean_thoughts"], acc=r["acc"], tokens_per_q=r["mean_thoughts"] + r["mean_new_tokens"]))
    return draw(plots.plot_eval, args.plot, rows) if args.plot else 0


def paths(model, tok, records, tokenized, cfg, max_new, args):
    """The paper's Figure 5: after k thoughts the model writes the rest of its path; sort each by type."""
    for i, r in enumerate(records):
        analysis.check_graph(r, f"record {i}")
    ks = args.latent or list(range(cfg.get("max_latent_stage", 6) + 1))
    labels, correct = {}, {}
    for k in ks:
        prompts = [prompt(t, cfg, None, tok, k) for t in tokenized]
        outs, _ = generate_batched(model, prompts, max_new, args.batch_size)
        labels[k] = [analysis.classify_path(tok.decode(o), r, k) for o, r in zip(outs, records)]
        correct[k] = [is_correct(p, o, r["answer"], tok) for p, o, r in zip(prompts, outs, records)]
    rows = analysis.path_table(labels, correct)
    names = [c.replace("_", " ") for c in analysis.PATH_CATEGORIES]
    print("the path written after k thoughts (the paper's Figure 5), share of questions; accuracy: the answer")
    print(f"{'k':>3} " + " ".join(f"{n:>15}" for n in names) + f" {'accuracy':>9}")
    for r in rows:
        print(f"{r['k']:>3} " + " ".join(f"{100 * r[c]:14.1f}%" for c in analysis.PATH_CATEGORIES) +
              f" {100 * r['acc']:8.1f}%")
    return draw(plots.plot_paths, args.plot, rows) if args.plot else 0


def draw(fn, path, *data, title=""):
    out = fn(*data, path, title=title)
    print(out if out != path else f"wrote {path}")
    return 0


def analyze(model, tok, records, tokenized, cfg, stage, n_latent, args):
    if not model.feedback:
        raise ValueError(f"--analyze reads continuous thoughts: a {cfg.get('mode')} model has none")
    for i, r in enumerate(records):
        analysis.check_graph(r, f"record {i}")
    prompts = [prompt(t, cfg, stage, tok, n_latent) for t in tokenized]
    if n_latent is None and not any(tok.latent_id in p for p in prompts):
        # a checkpoint saved before its stage had thoughts (a short run's best.pt at stage 0): the run's
        # last stage has them all
        last = cfg.get("max_latent_stage", 6) + 1
        prompts = [prompt(t, cfg, last, tok) for t in tokenized]
        print(f"note: stage {stage} feeds no continuous thoughts; analyzing with the run's final stage's "
              f"{max(p.count(tok.latent_id) for p in prompts)} (--latent N chooses)")
    if tok.spec.get("kind") == "symbols":  # one token per node: the superposition paper's measures
        return superposition(model, tok, records, prompts, args)
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


def superposition(model, tok, records, prompts, args):
    """
    "Reasoning by Superposition" (Zhu et al. 2025), its two tables in its layout: the inner product of
    thought i with each node's input embedding, mean by node group; and per layer, the attention that the
    position computing thought i pays to the question's edges, summed over heads, mean by edge group
    (an edge belongs to its source node's group).
    """
    t = analysis.superposition_tables(model, tok, records, prompts, args.batch_size)
    steps = sorted(t["inner"])
    if not steps:
        raise ValueError("no continuous thoughts to analyze: use --latent N with N > 0")
    names = {g: g.replace("_", " ") for g in analysis.GROUPS}
    cell = lambda table, i, g: f"{table[i][g][0]:9.2f}" if g in table.get(i, {}) else f"{'-':>9}"
    print("mean inner product of thought i with the node embeddings, by node group (records in the mean)")
    print(f"{'group':>14} " + " ".join(f"{f'thought {i}':>9}" for i in steps))
    for g in analysis.GROUPS:
        print(f"{names[g]:>14} " + " ".join(cell(t["inner"], i, g) for i in steps))
    for layer, table in enumerate(t["attention"]):
        print(f"layer {layer + 1}: attention mass on edges while thought i is computed (summed over heads), by edge group")
        print(f"{'edge group':>14} " + " ".join(f"{f'step {i}':>9}" for i in steps))
        for g in analysis.GROUPS:
            print(f"{names[g]:>14} " + " ".join(cell(table, i, g) for i in steps))
    return draw(plots.plot_superposition, args.plot, t) if args.plot else 0


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
