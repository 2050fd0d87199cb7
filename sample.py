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
is an error that shows one of its own questions, and one shorter or longer than all of the data's gets a
warning (the demo's have 24 roads, [Q], two options, [R], the start). A --question prints whole, with its thoughts.

The model is <out_dir>/best.pt (best validation accuracy; out_dir defaults to train.py's
out-<dataset>-coconut, then to the CPU demo's out-demo/coconut, and the first line says which), or the
run's ckpt.pt while it has no best.pt yet, unless --ckpt names a file. A Coconut prompt is the question,
<|start-latent|>, N x <|latent|>, <|end-latent|> (the demo's: N x <|latent|> alone); N defaults to what the
checkpoint's stage uses (the validation prompts of its training run), and --latent N sets it. The model then
answers greedily in language.
"""
import argparse
import os
import sys

import torch
from torch.nn import functional as F

from curriculum import PLAIN, final_stage, is_correct, prompt, stage_name
from machinery import plots, report, runs
from machinery.argparser import Parser
from machinery.checkpoint import first_line, load_checkpoint, resolve_device
from machinery.evaluate import evaluate, generate_batched
from machinery.records import load_records, load_split, tokenize

EVAL_LABEL = 12  # --eval's first column: "5 (default)" and the header "thoughts"


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


def thoughts_said(cfg, stage):
    """', n thoughts' after a stage up to the last (stage_name names the last one's)."""
    n = trained_thoughts(cfg, stage)
    return "" if n is None or stage > cfg.get("max_latent_stage", 6) else f", {n} thought{'s' * (n != 1)}"


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
    p = Parser(prog="sample.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
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
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's choice), as train.py's --threads")
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
    if args.question:  # a question typed in: what the thoughts hold is half of the answer
        args.show_thoughts = True
    if analyses and args.question:
        p.error(f"--{analyses[0]} needs records with answers: --file or --split")
    if args.latent is not None and len(args.latent) > 1 and not (args.eval or args.paths):
        p.error("several --latent values need --eval or --paths")
    if args.threads < 0:
        p.error("--threads must not be negative")
    for k in ("n", "batch_size", "top_k", "max_new_tokens"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k} must be at least 1")
    return args


# -----------------------------------------------------------------------------
# The model and the questions

def load_model(args):
    """-> (model, tok, ckpt, path, why): the checkpoint that runs.find_checkpoint chooses, loaded on --device
    (load_checkpoint's errors are one line already: missing, truncated, foreign, mismatched files)."""
    path, why = runs.find_checkpoint(args)
    model, tok, ckpt = load_checkpoint(path, device=resolve_device(args.device))
    return model.eval(), tok, ckpt, path, why


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
        records = load_split(runs.data_dir_for(args, cfg), name, args.split)
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


# -----------------------------------------------------------------------------
# Answer with N thoughts, show them; or --eval, or one of the analyses (machinery/report.py)

def run(args):
    if args.plot and plots.missing():  # say so before any work, not after the tables with no file and exit 0
        raise RuntimeError(f"--plot: {plots.MISSING}")
    if args.threads:
        torch.set_num_threads(args.threads)
    plot_alone = args.plot and not (args.eval or args.analyze or args.paths or args.losses or args.search is not None)
    if plot_alone and args.out_dir and not args.ckpt and not os.path.isfile(os.path.join(args.out_dir, "best.pt")) \
            and runs.runs_inside(args.out_dir):  # the demo's out-demo: its runs side by side
        return report.plot_methods(args)
    model, tok, ckpt, path, why = load_model(args)
    cfg = ckpt.get("config", {})
    stage = final_stage(cfg, ckpt)
    print(f"{path}: {cfg.get('mode', 'coconut')} on {cfg.get('dataset', '?')}, epoch {ckpt.get('epoch', -1) + 1}, "
          f"{stage_name(stage, cfg)}{thoughts_said(cfg, stage)} (c_thought {cfg.get('c_thought', 1)}, "
          f"max_latent_stage {cfg.get('max_latent_stage', 6)})")
    if why:
        print(why)
    answering = not (plot_alone or args.analyze or args.paths or args.losses or args.search is not None)
    if answering and args.latent is None and trained_thoughts(cfg, stage) == 0:  # (--analyze says its own)
        print(runs.no_thoughts_note(path, cfg, ckpt))
    if plot_alone:
        metrics, source = runs.run_history(path, ckpt)
        print(f"the run's {len(metrics)} epoch(s) from {source}")
        return report.draw(plots.plot_run, args.plot, metrics, title=f"{cfg.get('mode')} on {cfg.get('dataset')}",
                    max_latent_stage=cfg.get("max_latent_stage"))
    warn_thoughts(cfg, stage, args.latent)
    records, answered = load_questions(args, cfg)
    tokenized = tokenize_all(records, tok, cfg)
    warning = runs.length_warning(tokenized, args, cfg, tok) if args.question else None
    if warning:
        print(warning)
    max_new = args.max_new_tokens or cfg.get("max_new_tokens") or 128
    if args.search is not None:
        return report.search(model, tok, records[0], tokenized[0], cfg, stage, max_new, args)
    print(f"{len(records)} question(s)")
    if args.analyze:
        return report.analyze(model, tok, records, tokenized, cfg, stage, (args.latent or [None])[0], args)
    if args.paths:
        return report.paths(model, tok, records, tokenized, cfg, max_new, args)
    if args.eval:
        return evaluate_latents(model, tok, records, tokenized, cfg, stage, max_new, args)
    if args.losses:
        return report.losses(model, tok, tokenized, cfg, stage)

    prompts = [prompt(t, cfg, stage, tok, (args.latent or [None])[0]) for t in tokenized]
    outs, thoughts = generate_batched(model, prompts, max_new, args.batch_size)
    correct = 0
    for i, (rec, pr, out, th) in enumerate(zip(records, prompts, outs, thoughts)):
        q = rec["question"]  # a question of the data's cut short, a question typed in whole
        q = q if args.question or len(q) <= 120 else "..." + q[-117:]
        print(f"[{i + 1}] Q: {q}")
        mark = ""
        if answered:
            ok = is_correct(pr, out, rec["answer"], tok)
            correct += ok
            mark = "  (correct)" if ok else f"  (wrong; expected {rec['answer']!r})"
        print(f"    A: {tok.decode(out).strip()!r}{mark}")
        if args.show_thoughts:
            if len(th) == 0:
                why = ": stage 0 feeds none" if args.latent is None and stage == 0 else ""
                print(f"  (no continuous thoughts{why})")
            for j, t in enumerate(th):
                print(format_thought(j + 1, top_tokens(model, t, args.top_k), tok))
    if answered:
        print(f"accuracy {correct}/{len(records)} = {100 * correct / len(records):.2f}%")
    return 0


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
    return report.draw(plots.plot_eval, args.plot, rows) if args.plot else 0


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
