"""
What sample.py prints (and draws, with --plot) for each analysis of a trained model: --losses (the loss by piece),
--paths (the paper's Figure 5), --analyze (what the thoughts hold: ProsQA's frontier mass, the superposition
groups, the split inside each thought's layer on layered data), --search (one question's thoughts on every node
of the world), and the demo's three runs in one figure. The measures themselves are in analysis.py.
"""
import os
from collections import defaultdict

from curriculum import PLAIN, SET_LABELS, is_correct, prompt, stage_name
from machinery import analysis, plots
from machinery.evaluate import generate_batched
from machinery.progress import THOUGHT_LABELS
from machinery.runs import METHOD_NAMES, read_jsonl, runs_inside


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


def losses(model, tok, tokenized, cfg, stage):
    """--losses: where a model's training loss is, piece by piece (analysis.piece_losses)."""
    print(f"the training sequences at {stage_name(stage, cfg)}, teacher-forced: loss (nats) and accuracy (the argmax "
          f"is the label) of each piece")
    if cfg.get("thought_labels") in SET_LABELS and stage > 0:  # stage 0 has no thoughts
        floor = ("; scored against an even spread (--set_loss spread), a set of n costs at least ln n nats, 1.10 for "
                 "three" if cfg.get("set_loss") == "spread" else "")
        print(f"  a thought labelled with a set ({cfg['thought_labels']}): accurate when its argmax is in the set{floor}")
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
    print("the path written after k thoughts (the paper's Figure 5), share of questions in each column:")
    for name, c in zip(names, analysis.PATH_CATEGORIES):
        print(f"  {name:<16} {analysis.PATH_MEANINGS[c]}")
    print(f"  {'accuracy':<16} the answer right by the official rule, whatever the path before it")
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
        trained_on = THOUGHT_LABELS.get(str(cfg.get("thought_labels", 0)), THOUGHT_LABELS["0"])
        print(f"where each thought's softmax (lm_head of the thought) goes inside its own layer: thought k is "
              f"trained on {trained_on}" +
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
