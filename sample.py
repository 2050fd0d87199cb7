"""
Ask a trained Coconut questions, look inside its continuous thoughts, evaluate it, and measure the
breadth-first-like search the paper reports on ProsQA (Section 5: decoded thoughts hold several
frontier nodes at once, and nodes of low height are told apart better than high ones).

    python sample.py --question "Every wumpus is a yumpus. Alex is a wumpus. Is Alex a yumpus or rompus?"
    python sample.py --split valid --n 5 --show_thoughts           # the checkpoint's data set
    python sample.py --file my_questions.json --latent 3
    python sample.py --split test --eval --latent 0 1 2 3 4 5 6     # accuracy by number of thoughts
    python sample.py --split valid --analyze                        # ProsQA: the search in the thoughts
    python sample.py --out_dir out-demo/coconut --dataset tiny --split valid --n 3 --show_thoughts

The model is <out_dir>/best.pt (best validation accuracy; out_dir defaults to train.py's
out-<dataset>-coconut) unless --ckpt names a file. A Coconut prompt is the question, <|start-latent|>,
N x <|latent|>, <|end-latent|>; N defaults to what the checkpoint's stage uses (the validation prompts
of its training run), and --latent N sets it. The model then answers greedily in language.
"""
import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.nn import functional as F

import analysis
from checkpoint import first_line, load_checkpoint, resolve_device
from coconut import evaluate, generate_batched
from curriculum import final_stage, is_correct, load_records, prompt, tokenize

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
    p.add_argument("--out_dir", default=None, help="a training run's folder: its best.pt answers "
                                                   "(default: train.py's out-<dataset>-coconut)")
    p.add_argument("--ckpt", default=None, help="a checkpoint file instead (best.pt or ckpt.pt of train.py)")
    src = p.add_argument_group("questions (one source)")
    src.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    src.add_argument("--file", default=None, help="records in the data sets' JSON format")
    src.add_argument("--split", default=None, choices=("train", "valid", "test"), help="a split of --dataset")
    src.add_argument("--dataset", default=None, help="data/<name>/<split>.json (default: the checkpoint's)")
    src.add_argument("--data_dir", default=None, help="default: the checkpoint's (data)")
    src.add_argument("--n", type=int, default=None, help="only the first n records")
    p.add_argument("--latent", type=nonneg_int, nargs="+", default=None,
                   help="continuous thoughts per question (default: what the checkpoint's stage uses); "
                        "several values with --eval give one row each")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the checkpoint's (128; GSM8k 64)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--show_thoughts", action="store_true", help="the top-k tokens each thought decodes to")
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--eval", action="store_true", help="accuracy, tokens and seconds per question over a split")
    p.add_argument("--analyze", action="store_true", help="ProsQA: what the thoughts put on frontier nodes")
    p.add_argument("--probe", default="thought", choices=("thought", "language"),
                   help="--analyze node values: the thought itself through lm_head (first token of each name), "
                        "or the paper's next step after k thoughts (the whole name)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, ...")
    args = p.parse_args(argv)

    for q in args.question:
        if not q.strip():
            p.error("--question is empty")
    n_sources = bool(args.question) + (args.file is not None) + (args.split is not None)
    if n_sources > 1:
        p.error("give one source of questions: --question, --file or --split (with --dataset)")
    if n_sources == 0:
        if args.eval or args.analyze or args.dataset:
            args.split = "valid"  # a data set's natural default
        else:
            p.error("nothing to answer: give --question, --file or --split (with --dataset)")
    if (args.eval or args.analyze) and args.question:
        p.error("--eval and --analyze need records with answers: --file or --split")
    if args.eval and args.analyze:
        p.error("--eval and --analyze run one at a time")
    if args.latent is not None and len(args.latent) > 1 and not args.eval:
        p.error("several --latent values need --eval")
    for k in ("n", "batch_size", "top_k", "max_new_tokens"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    return args


def load_model(args):
    out_dir = args.out_dir or f"out-{args.dataset or 'prosqa'}-coconut"  # train.py's default out_dir
    path = args.ckpt or os.path.join(out_dir, "best.pt")
    if not os.path.isfile(path):
        where = f"--ckpt {path}" if args.ckpt else path + ("" if args.out_dir else " (train.py's default out_dir)")
        raise FileNotFoundError(f"no model to answer with: {where} does not exist; train one with train.py, "
                                f"or pass --out_dir or --ckpt")
    # load_checkpoint's errors are one line already (missing, truncated, foreign, mismatched files)
    model, tok, ckpt = load_checkpoint(path, device=resolve_device(args.device))
    return model.eval(), tok, ckpt, path


def load_questions(args, cfg):
    """The records ({"question", "steps", "answer"}, ProsQA's graph too) and whether they have answers."""
    if args.question:
        return [{"question": q, "steps": [], "answer": ""} for q in args.question], False
    if args.file is not None:
        path = args.file
    else:
        name = args.dataset or cfg.get("dataset")
        if not name:
            raise ValueError("which data set? the checkpoint does not say: pass --dataset")
        path = os.path.join(args.data_dir or cfg.get("data_dir") or "data", name, f"{args.split}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: make it with `python data/{name}/prepare.py`")
    records = load_records(path)  # one-line errors for a malformed file
    if not records:
        raise ValueError(f"{path}: no records")
    return records[:args.n], True


def run(args):
    model, tok, ckpt, path = load_model(args)
    cfg = ckpt.get("config", {})
    stage = final_stage(cfg, ckpt)
    records, answered = load_questions(args, cfg)
    tokenized = [tokenize(r, tok) for r in records]
    max_new = args.max_new_tokens or cfg.get("max_new_tokens") or 128
    latents = args.latent or [None]
    print(f"{path}: {cfg.get('mode', 'coconut')} on {cfg.get('dataset', '?')}, epoch {ckpt.get('epoch', -1) + 1}, "
          f"stage {stage} (c_thought {cfg.get('c_thought', 1)}, max_latent_stage {cfg.get('max_latent_stage', 6)}); "
          f"{len(records)} question(s)")

    if args.analyze:
        return analyze(model, tok, records, tokenized, cfg, stage, latents[0], args)

    if args.eval:
        # coconut.evaluate: the very function train.py's validation accuracy comes from
        print(f"{'thoughts':>8} {'accuracy':>9} {'correct':>9} {'tokens/q':>9} {'new/q':>7} {'s/q':>8}")
        for n in latents:
            prompts = [prompt(t, cfg, stage, tok, n) for t in tokenized]
            r = evaluate(model, tok, prompts, [rec["answer"] for rec in records], max_new, args.batch_size)
            # "thoughts" counts the continuous thoughts fed back; tokens/q adds the generated tokens
            # (the paper's "# tokens"); with the default a record may have fewer (pad_latent_to_max 0)
            label = f"{r['mean_thoughts']:g}" + ("" if n is not None else " (default)")
            print(f"{label:>8} {100 * r['acc']:8.2f}% {r['correct']:>4}/{r['total']:<4} "
                  f"{r['mean_thoughts'] + r['mean_new_tokens']:9.1f} {r['mean_new_tokens']:7.1f} "
                  f"{r['seconds_per_question']:8.4f}")
        return 0

    prompts = [prompt(t, cfg, stage, tok, latents[0]) for t in tokenized]
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


def analyze(model, tok, records, tokenized, cfg, stage, n_latent, args):
    if not model.feedback:
        raise ValueError(f"--analyze reads continuous thoughts: a {cfg.get('mode')} model has none")
    for i, r in enumerate(records):
        analysis.check_graph(r, f"record {i}")
    prompts = [prompt(t, cfg, stage, tok, n_latent) for t in tokenized]
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
    return 0


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
