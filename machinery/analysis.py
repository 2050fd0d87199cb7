"""
What continuous thoughts hold: pure functions from records, thoughts and model outputs to numbers.
sample.py prints them (--analyze) and tests/test_analysis.py checks them on hand-built graphs.

ProsQA (Coconut paper, Section 5): decoded thoughts put their probability on several nodes of the
breadth-first frontier at once, and nodes of low height are told apart better than high ones.
"""
import math
import re
from collections import defaultdict

import torch
from torch.nn import functional as F

from coconut import set_cross_entropy
from curriculum import collate, make_example, prompt
from machinery.evaluate import generate_batched
from machinery.records import bfs


# -----------------------------------------------------------------------------
# ProsQA's graph. A record carries idx_to_symbol (node names), edges ([parent, child] index pairs:
# "Every <parent> is a <child>", or "<person> is a <child>" for a person), root (the person asked
# about), target (the answer) and neg_target (the other option). The steps walk a shortest path
# from root to target, so step i names a node at shortest distance i from the root.

def children(record):
    kids = [[] for _ in record["idx_to_symbol"]]
    for parent, child in record["edges"]:
        kids[parent].append(child)
    return kids


def parents(record):
    ps = [[] for _ in record["idx_to_symbol"]]
    for parent, child in record["edges"]:
        ps[child].append(parent)
    return ps


def depths(record):
    """Shortest distance from the root to each node (None: unreachable from the root)."""
    return bfs(children(record), [record["root"]], len(record["idx_to_symbol"]))


def frontier(record, i):
    """
    The frontier at thought i: the nodes whose shortest distance from the root is exactly i, i.e. the
    level a breadth-first search reaches at step i. (The paper's "children of Alex" after thought 1,
    "grandchildren" after thought 2.) Thought i stands for step i, which names such a node.
    """
    return {v for v, d in enumerate(depths(record)) if d == i}


def heights(record):
    """A node's height: its shortest distance to a leaf (a node with no children; leaves have 0)."""
    kids = children(record)
    leaves = [v for v, k in enumerate(kids) if not k]
    return bfs(parents(record), leaves, len(kids))


def leads_to_target(record):
    """The nodes from which the target is reachable (the target itself included): the "correct" ones."""
    dist = bfs(parents(record), [record["target"]], len(record["idx_to_symbol"]))
    return {v for v, d in enumerate(dist) if d is not None}


def check_graph(record, where):
    for key in ("idx_to_symbol", "edges", "root", "target"):
        if key not in record:
            raise ValueError(f"{where}: --analyze needs ProsQA records with a graph (no field '{key}')")


def thought_stats(raw, record, i):
    """
    One thought, one record. raw[v]: the probability the thought gives node v (see node_probs_*).
    Values are normalised over the graph's nodes (all of them, people included), so that a thought
    which puts little mass on names at all still compares; that raw mass is kept as node_mass.
    Returns None when no node sits at level i.
    """
    F_i = frontier(record, i)
    if not F_i:
        return None
    total = sum(raw)
    values = [r / total for r in raw] if total > 0 else [0.0] * len(raw)
    good, h = leads_to_target(record), heights(record)
    ranked = sorted((values[v] for v in F_i), reverse=True)
    return dict(
        node_mass=total,                                      # how much of the distribution is on nodes at all
        frontier=sum(values[v] for v in F_i),                 # the rest (1 - frontier) is on other nodes
        top=[sum(ranked[:k]) for k in (1, 2, 3)],             # paper Fig. 8: cumulative top-1/2/3 frontier values
        nodes=[(h[v], v in good, values[v]) for v in F_i])    # paper Fig. 9: value by height, correct or not


def summarize(stats_by_thought):
    """
    stats_by_thought: {i: [thought_stats(...) per record]}. Returns (rows by thought, rows by height):
    means over the records whose frontier at i is not empty, and mean values of frontier nodes that
    lead to the target ("correct") and that do not, per thought and per height (pooled over thoughts).
    """
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    by_thought, by_height = [], defaultdict(lambda: ([], []))
    for i in sorted(stats_by_thought):
        ss = [s for s in stats_by_thought[i] if s is not None]
        nodes = [n for s in ss for n in s["nodes"]]
        for height, good, value in nodes:
            by_height[height][0 if good else 1].append(value)
        by_thought.append(dict(
            thought=i, records=len(ss), node_mass=mean([s["node_mass"] for s in ss]),
            frontier=mean([s["frontier"] for s in ss]), other=mean([1 - s["frontier"] for s in ss]),
            top1=mean([s["top"][0] for s in ss]), top2=mean([s["top"][1] for s in ss]),
            top3=mean([s["top"][2] for s in ss]),
            correct=mean([v for _, g, v in nodes if g]), incorrect=mean([v for _, g, v in nodes if not g])))
    heights_ = sorted(h for h in by_height if h is not None)
    rows = [dict(height=h, correct=mean(by_height[h][0]), n_correct=len(by_height[h][0]),
                 incorrect=mean(by_height[h][1]), n_incorrect=len(by_height[h][1])) for h in heights_]
    return by_thought, rows


def node_first_tokens(record, tok):
    """
    The rule of the "thought" probe: a node's probability is that of the first token of " " + its name
    (the way a step writes it: "Every lempus is a ..."). A thought is one vector, so only a first token
    can be read from it; with GPT-2's BPE two names may share a first token and then share a value.
    """
    return [tok.encode(" " + name)[0] for name in record["idx_to_symbol"]]


@torch.no_grad()
def node_probs_thought(model, thoughts, record, tok):
    """Per thought: [p(first token of node v)] from softmax(lm_head(thought))."""
    ids = torch.tensor(node_first_tokens(record, tok))
    probs = F.softmax(model.gpt.lm_head(thoughts.to(model.gpt.lm_head.weight)).float(), dim=-1)  # (n, V)
    return probs[:, ids].cpu().tolist()


@torch.no_grad()
def node_probs_language(model, tokenized, record, cfg, tok, n, batch_size=32):
    """
    The paper's own probe: after k thoughts switch back to language; the next step reads "Every
    [node] is a ...", so a node's value is p(" " + name | prompt with k thoughts, "Every"), the
    product of its tokens' probabilities (p("lempus") = p("le") p("mp") p("us")). For k = 1..n.
    """
    names = [tok.encode(" " + s) for s in record["idx_to_symbol"]]
    every = tok.encode("Every")
    rows, spans = [], []
    for k in range(1, n + 1):
        head = prompt(tokenized, cfg, None, tok, n_latent=k) + every
        for name in names:
            spans.append((k, len(head), name))
            rows.append(head + name)
    out = defaultdict(list)
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad_id=model.eos_id, latent_id=model.latent_id)
        hidden, _ = model.think(*(b[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")))
        left = (b["attention_mask"].argmax(1)).tolist()  # the left padding of each row
        for r, (k, start, name) in enumerate(spans[i:i + batch_size]):
            cols = [left[r] + start + j - 1 for j in range(len(name))]  # the positions predicting the name
            # lm_head only there: over GPT-2's 50k tokens at every position it would cost far more
            logp = F.log_softmax(model.gpt.lm_head(hidden[r, cols]).float(), dim=-1)  # (len(name), V)
            out[k].append(math.exp(float(logp[torch.arange(len(name)), name].sum())))
    return [out[k] for k in range(1, n + 1)]


# -----------------------------------------------------------------------------
# Superposition ("Reasoning by Superposition", Zhu, Hao et al. 2025, arXiv 2505.12514; Section 5).
# A Coconut model trained from scratch on symbolic ProsQA (one token per node) keeps, in thought i, a
# superposition of every node i hops from the root. The paper shows it two ways, per thought i:
#   - the inner product of thought i with each node's input embedding, averaged over four node groups
#     (not reachable < reachable < frontier < optimal);
#   - the attention of the second layer, while thought i is computed, on the question's edges "a b",
#     grouped by their source node: it reads the edges that leave the current frontier.
# The groups (node_groups) use shortest distances from the root. (The authors' notebook grows its
# frontier by walks of exactly i edges, which in a DAG can also hold nodes whose shortest distance is
# smaller; "reachable" is the same either way.)

GROUPS = ("not_reachable", "reachable", "frontier", "optimal")


def to_target(record):
    """Shortest distance from each node to the target (None: the target is not below it)."""
    return bfs(parents(record), [record["target"]], len(record["idx_to_symbol"]))


def node_groups(record, i):
    """
    The paper's four node groups at hop i (thought i stands for hop i; i = 0 is the root alone):
      reachable      within i hops of the root, the root included
      not_reachable  every other node of the graph (the other seed, its descendants, deeper nodes)
      frontier       exactly i hops from the root (shortest distance)
      optimal        the hop-i nodes of SOME shortest root-to-target path: depth(v) = i and
                     depth(v) + dist(v, target) = depth(target)  (the authors' neighbor_k[i])
    frontier and optimal are subsets of reachable; optimal is a subset of frontier.
    """
    d, up = depths(record), to_target(record)
    D = d[record["target"]]
    n = len(d)
    reachable = {v for v in range(n) if d[v] is not None and d[v] <= i}
    frontier = {v for v in reachable if d[v] == i}
    optimal = {v for v in frontier if D is not None and up[v] is not None and d[v] + up[v] == D}
    return dict(not_reachable=set(range(n)) - reachable, reachable=reachable, frontier=frontier, optimal=optimal)


def thought_node_products(thoughts, node_embeddings):
    """
    thoughts (n, C): the vectors fed back at the latent positions; node_embeddings (n_nodes, C): each
    node's input embedding (its row of wte). -> (n, n_nodes) inner products <thought i, e_v>: a thought
    that is a superposition sum_v a_v e_v of nearly orthogonal embeddings gives about a_v for node v.
    """
    return thoughts.float() @ node_embeddings.float().T  # (n, C) @ (C, n_nodes) -> (n, n_nodes)


def group_means(values_per_thought, record):
    """
    values_per_thought: a list over thoughts i = 1..n of per-node values (one per idx_to_symbol entry,
    e.g. a row of thought_node_products). -> {i: {group: mean over the group's nodes}}.
    An empty group (no optimal node at a hop past the target, no frontier past the deepest node) has
    NO entry, so that average_groups skips this record for it instead of averaging a nan.
    """
    out = {}
    for i, values in enumerate(values_per_thought, start=1):
        values = [float(x) for x in values]
        groups = node_groups(record, i)
        out[i] = {g: sum(values[v] for v in groups[g]) / len(groups[g]) for g in GROUPS if groups[g]}
    return out


def average_groups(per_record):
    """
    per_record: a list of {i: {group: value}} (group_means or edge_attention_by_group per record).
    -> {i: {group: (mean over the records that have the entry, how many records that is)}}.
    Each record weighs the same. (The authors' notebook pools nodes over all records instead, so a
    record with a large group weighs more; the ordering of the groups is what the paper reads.)
    """
    acc = defaultdict(lambda: defaultdict(list))
    for rec in per_record:
        for i, row in rec.items():
            for g, v in row.items():
                acc[i][g].append(v)
    return {i: {g: (sum(acc[i][g]) / len(acc[i][g]), len(acc[i][g])) for g in GROUPS if acc[i][g]}
            for i in sorted(acc)}


def node_token_ids(record, tok):
    """Each node's single token id: tok.encode(name) must be exactly one token (symbolic data)."""
    ids = []
    for name in record["idx_to_symbol"]:
        t = tok.encode(name)
        if len(t) != 1:
            raise ValueError(f"node {name!r} is {len(t)} tokens: the superposition analysis needs one token per "
                             f"node (symbolic data such as data/prosqa_graph, with its symbol tokenizer)")
        ids.append(t[0])
    return ids


def _one_token(tok, symbol):
    t = tok.encode(symbol)
    if len(t) != 1:
        raise ValueError(f"{symbol!r} is {len(t)} tokens: edge_columns reads symbolic questions (one token per symbol)")
    return t[0]


def edge_columns(question_ids, record, tok):
    """
    The columns that write each edge in a tokenized symbolic question: "a b | c d | ... [Q] x y [R] r"
    (records.graph_question, edges possibly shuffled; anything before the first edge, such as a
    leading <eos>, is allowed), or one token per edge, "a>b c>d ... [Q] x y [R] r" (data/reach).
    -> a list over e of record["edges"]: [first column, last column] of the tokens that write it.
    Edges are matched by reading the tokens back, never by assuming the record's order.
    (The authors' notebook also counts the "|" after an edge and leaves the last edge out; here an
    edge is exactly its symbols.)
    """
    names = record["idx_to_symbol"]
    node = {t: v for v, t in enumerate(node_token_ids(record, tok))}
    q = _one_token(tok, "[Q]")
    ids = [int(t) for t in question_ids]
    if q not in ids:
        raise ValueError("edge_columns: no [Q] in the question")
    where = defaultdict(list)  # (a, b) -> the edge indices with those ends, in record order
    for e, (a, b) in enumerate(record["edges"]):
        where[(a, b)].append(e)
    cols = [None] * len(record["edges"])
    one_token = {}  # the id of "a>b" for each edge written as one token
    for a, b in where:
        try:
            t = tok.encode(f"{names[a]}>{names[b]}")
        except ValueError:  # a symbol vocabulary without it: the edges are written in two tokens
            continue
        if len(t) == 1:
            one_token[t[0]] = (a, b)
    if any(t in one_token for t in ids):
        spans = [(p, p, one_token[ids[p]]) for p in range(ids.index(q)) if ids[p] in one_token]
    else:
        bar = _one_token(tok, "|")
        ends = [p for p in range(ids.index(q)) if ids[p + 1] in (bar, q)]  # the column of each edge's "b"
        spans = [(p - 1, p, (node.get(ids[p - 1]) if p >= 1 else None, node.get(ids[p]))) for p in ends]
    for first, last, (a, b) in spans:
        if a is None or b is None or not where[(a, b)]:
            raise ValueError(f"edge_columns: columns {first}, {last} do not write an edge of the record")
        cols[where[(a, b)].pop(0)] = [first, last]
    if None in cols:
        raise ValueError(f"edge_columns: edge {record['edges'][cols.index(None)]} is not in the question")
    return cols


def edge_attention_by_group(probs_row, edge_spans, record, i):
    """
    The paper's attention table (Zhu et al. 2025; layer 2 in their 2-layer model): probs_row (T,) is one
    layer's attention of the query that computes thought i (i = 1..L), summed over heads;
    edge_spans[e] the question columns of edge e (edge_columns). An edge's mass is the sum of
    probs_row over its columns. -> {group: mean mass over the edges of that group}, empty groups omitted.

    Our reading of "step i": the query that COMPUTES thought i (in this project's format the column
    start + i - 1, <|start-latent|> for i = 1; in the authors' code the last input position after
    i - 1 latents). Thought i is to hold hop i, so it must read the edges that LEAVE hop i - 1:
      - an edge's group is its source node's group at hop i - 1 (node_groups(record, i - 1));
      - an optimal edge: source optimal at hop i - 1 and target optimal at hop i (equivalently, the
        edge lies on a shortest root-to-target path, as its i-th edge).
    Evidence: at step 1 the reference table gives reachable = frontier (2.12 both), which holds only
    if the groups are taken at hop 0 ({root} both); and the authors' notebook, for n_step = i - 1
    latents, groups by the frontier after n_step hops and checks the target against neighbor_k[n_step + 1].
    """
    src = node_groups(record, i - 1)
    next_optimal = node_groups(record, i)["optimal"]
    probs_row = probs_row.float()  # (T,)
    masses = defaultdict(list)
    for (a, b), cols in zip(record["edges"], edge_spans):
        m = float(probs_row[cols].sum())
        for g in ("not_reachable", "reachable", "frontier"):
            if a in src[g]:
                masses[g].append(m)
        if a in src["optimal"] and b in next_optimal:
            masses["optimal"].append(m)
    return {g: sum(masses[g]) / len(masses[g]) for g in GROUPS if masses[g]}


def attention_probs(gpt, inputs_embeds, position_ids=None, attention_mask=None):
    """
    The softmax attention probabilities of every layer of gpt (gpt.GPT or llama.Llama) on inputs_embeds
    (B, T, C), from one uncached pass -> a list over layers of (B, n_head, T, T), row = query, column = key.
    The models' attention runs F.scaled_dot_product_attention, which returns no weights, so hooks recompute
    them from each layer's q and k: GPT's are the first two thirds of attn.c_attn's output; Llama's come
    from self_attn.rotated_qk on the layer's input (after RoPE), each key head repeated for the query heads
    it serves. Scores q k^T / sqrt(head size), with the same mask the model itself uses (causal; padding
    keys off when attention_mask (B, T) is given). The hooks are removed afterwards, even on an error.
    """
    B, T, C = inputs_embeds.shape
    mask = gpt._attention_mask(attention_mask, B, T, 0, inputs_embeds.device)  # (B|1, 1, T, T) or None
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=inputs_embeds.device).tril()[None, None]  # causal
    probs, handles = [], []

    def keep(q, k):  # (B, nh, T, hs) each
        att = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
        probs.append(F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1))

    def gpt_hook(n_head):
        def hook(module, inputs, out):  # out (B, T, 3C): q, k, v side by side
            q, k = out[..., :C], out[..., C:2 * C]  # (B, T, C) each; v is not needed
            keep(*(t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k)))
        return hook

    def llama_hook(module, args):  # args: the layer's (x, mask, past, rope)
        q, k = module.rotated_qk(args[0], args[3])  # (B, nh, T, hd), (B, n_kv, T, hd)
        keep(q, k.repeat_interleave(module.n_head // module.n_kv_head, dim=1))

    try:
        for block in gpt.transformer.h:  # blocks run in order, so probs[l] is layer l
            if hasattr(block, "self_attn"):
                handles.append(block.self_attn.register_forward_pre_hook(llama_hook))
            else:
                handles.append(block.attn.c_attn.register_forward_hook(gpt_hook(block.attn.n_head)))
        with torch.no_grad():
            gpt(inputs_embeds=inputs_embeds, position_ids=position_ids, attention_mask=attention_mask,
                with_logits=False)
    finally:
        for h in handles:
            h.remove()
    return probs


def filled_embeddings(gpt, input_ids, thoughts, latent_id):
    """
    The input embeddings exactly as Coconut fed them: wte(input_ids) (B, T, C) with row b's <|latent|>
    columns, in order, replaced by thoughts[b] (n_b, C). One uncached pass over them reproduces the
    model's cached passes (the same thoughts, the same attention).
    """
    embeds = gpt.transformer.wte(input_ids).clone()  # (B, T, C)
    for b, th in enumerate(thoughts):
        cols = (input_ids[b] == latent_id).nonzero().flatten()[:len(th)]
        embeds[b, cols] = th[:len(cols)].to(embeds)
    return embeds


@torch.no_grad()
def superposition_tables(model, tok, records, prompts, batch_size=32, thoughts=None):
    """
    The two tables of Zhu et al. (2025) for a Coconut model on symbolic ProsQA. prompts: per record,
    the question + <|start-latent|> + L x <|latent|> + <|end-latent|>, or with bare thoughts the question +
    L x <|latent|> (curriculum.prompt).
    thoughts: the (n, C) thoughts per prompt if already computed (evaluate.generate_batched), else run.
    -> dict(inner={i: {group: (mean, records)}}: <thought i, node embedding> by node group;
            attention=[per layer {i: {group: (mean, records)}}]: attention mass of the query that computes
            thought i (column start + i - 1) on the question's edges, summed over heads, by edge group).
    """
    if not model.feedback:
        raise ValueError("the superposition analysis reads continuous thoughts: this model feeds none back")
    was_training = model.training
    model.eval()
    try:
        if thoughts is None:
            _, thoughts = generate_batched(model, prompts, 1, batch_size)
        device = next(model.parameters()).device
        wte = model.gpt.transformer.wte.weight.detach().float().cpu()  # (V, C)
        inner, attention = [], [[] for _ in model.gpt.transformer.h]
        for s in range(0, len(prompts), batch_size):
            idx = list(range(s, min(s + batch_size, len(prompts))))
            b = collate([prompts[j] for j in idx], pad_id=model.eos_id, latent_id=model.latent_id)
            ids = b["input_ids"].to(device)  # (B, T), left-padded so the first latents share a column
            embeds = filled_embeddings(model.gpt, ids, [thoughts[j] for j in idx], model.latent_id)
            probs = attention_probs(model.gpt, embeds, b["position_ids"].to(device), b["attention_mask"].to(device))
            for r, j in enumerate(idx):
                rec, th = records[j], thoughts[j].float().cpu()
                inner.append(group_means(thought_node_products(th, wte[node_token_ids(rec, tok)]).tolist(), rec))
                left = int(b["attention_mask"][r].argmax())  # this row's left padding
                spans = [[left + c for c in cols] for cols in edge_columns(prompts[j], rec, tok)]
                # the query for thought 1: the column before the first latent (<|start-latent|>, or the
                # question's last token when the thoughts are bare)
                start = left + list(prompts[j]).index(model.latent_id) - 1
                for layer, p in enumerate(probs):  # p: (B, nh, T, T)
                    attention[layer].append({i: edge_attention_by_group(p[r, :, start + i - 1].sum(0).cpu(),
                                                                        spans, rec, i)
                                             for i in range(1, len(th) + 1)})
    finally:
        model.train(was_training)
    return dict(inner=average_groups(inner), attention=[average_groups(a) for a in attention])


# -----------------------------------------------------------------------------
# Search or a layer prior? Data whose nodes are layered (data/reach): node v sits in layer v // width,
# the roots in layer 0, and every road goes one layer down. With --thought_labels 1, thought k is trained
# to name the layer-k node of the gold path, so the superposition groups above (optimal within frontier
# within reachable) would come out ordered even for a model that learned only "thought k names some
# node of layer k". What tells a search from that layer prior is where, inside the thought's own layer,
# the mass goes: to the start's branches (which the open roads reach), or just as much to the other
# root's branches and to the nodes no open road reaches.

LAYER_GROUPS = ("gold", "start", "other_root", "unused")
LAYER_NAMES = dict(gold="gold node", start="start's other branches", other_root="other root's branches",
                   unused="unused nodes")


def gold_path(record):
    """[root, then the node each step names, in order]: the steps' symbols read as node names (a step may
    name several nodes: reach's --hops_per_step). None when a symbol is not a node name (text data)."""
    index = {name: v for v, name in enumerate(record["idx_to_symbol"])}
    names = [w for s in record.get("steps", []) for w in s.split()]
    if not names or any(n not in index for n in names):
        return None
    return [record["root"]] + [index[n] for n in names]


def layer_width(record):
    """
    Nodes per layer when the record's nodes are layered, else None: with depth = the gold path's hops,
    width = n_nodes / (depth + 1) must be whole, the root must be in layer 0 (node < width), every edge
    must go from layer v // width to the next, and the path must go one layer a hop. data/reach's nodes
    a0..a7 are layer 0, b0..b7 layer 1, and so on.
    """
    path = gold_path(record)
    n = len(record["idx_to_symbol"])
    if path is None or n % len(path):
        return None
    w = n // len(path)
    if record["root"] >= w or any(b // w != a // w + 1 for a, b in record["edges"]):
        return None
    if [v // w for v in path] != list(range(len(path))):
        return None
    return w


def layer_groups(record, layer, width):
    """
    The nodes of one layer in four groups, by the question's open roads (record["edges"]):
      gold        the gold path's node in this layer (the label of thought `layer`)
      start       the other nodes that the open roads reach from the start (its other branches)
      other_root  the nodes that the open roads reach from another layer-0 node, and not from the start
      unused      the rest: no open road reaches them
    -> {group: set of nodes}; the four are disjoint and cover the layer.
    """
    nodes = set(range(layer * width, (layer + 1) * width))
    kids, n = children(record), len(record["idx_to_symbol"])
    from_start = {v for v, d in enumerate(bfs(kids, [record["root"]], n)) if d is not None}
    others = [v for v in range(width) if v != record["root"] and kids[v]]
    from_others = {v for v, d in enumerate(bfs(kids, others, n)) if d is not None} if others else set()
    gold = {gold_path(record)[layer]}
    start = (nodes & from_start) - gold
    other = (nodes & from_others) - from_start - gold
    return dict(gold=gold, start=start, other_root=other, unused=nodes - gold - start - other)


def node_roles(record, width):
    """Every node's group in its own layer (layer_groups; in layer 0 the start is "gold"): a list of LAYER_GROUPS
    names in idx_to_symbol order, what the picture of one question colours by."""
    roles = [None] * len(record["idx_to_symbol"])
    for layer in range(len(roles) // width):
        for g, nodes in layer_groups(record, layer, width).items():
            for v in nodes:
                roles[v] = g
    return roles


def layer_split(probs, record, layer, width):
    """
    One position, one record. probs: each node's probability (idx_to_symbol order) under a softmax over
    the whole vocabulary (lm_head of a thought, or CoT's next-token distribution). -> dict(layer=the mass
    on the layer's nodes, out of 1; then for each LAYER_GROUPS group its share of that mass, renormalised
    over the layer so the four sum to 1 (0 each when the layer has no mass); n_<group>: its nodes; top: the
    share of the layer's most probable node (1: one node holds it all; 1/3: spread over three); top_gold: 1.0
    if that node is the gold one, else 0.0).
    """
    groups = layer_groups(record, layer, width)
    mass = {g: sum(float(probs[v]) for v in groups[g]) for g in LAYER_GROUPS}
    total = sum(mass.values())
    out = dict(layer=total, **{g: (mass[g] / total if total > 0 else 0.0) for g in LAYER_GROUPS})
    out.update({f"n_{g}": len(groups[g]) for g in LAYER_GROUPS})
    # One record's thought, not the mean: a third on gold on average may be a third on each branch in every
    # question (a search that holds them all), or all of it on one branch drawn anew each question.
    layer_nodes = range(layer * width, (layer + 1) * width)
    top = max(layer_nodes, key=lambda v: float(probs[v]))
    out.update(top=float(probs[top]) / total if total > 0 else 0.0, top_gold=float(top in groups["gold"]))
    return out


def average_splits(splits_by_position):
    """{k: [layer_split per record]} -> rows [dict(position=k, records, layer, the groups, n_<group>, top,
    top_gold)], means over the records (each weighs the same), in order of k."""
    rows = []
    for k in sorted(splits_by_position):
        ss = splits_by_position[k]
        row = dict(position=k, records=len(ss))
        for key in ("layer",) + LAYER_GROUPS + tuple(f"n_{g}" for g in LAYER_GROUPS) + ("top", "top_gold"):
            row[key] = sum(s[key] for s in ss) / len(ss) if ss else float("nan")
        rows.append(row)
    return rows


def thought_positions(prompt_ids, latent_id, c_thought=1):
    """
    The columns of a prompt whose hidden states are the thoughts that name a step: thought j is the hidden
    state at the column before the j-th <|latent|> (<|start-latent|>, or the question's last token when
    the thoughts are bare), and with c thoughts a step, the first of each c carries the step's label
    (--thought_labels 1). -> [column of step 1's thought, step 2's, ...].
    """
    latents = [j for j, t in enumerate(prompt_ids) if t == latent_id]
    return [j - 1 for j in latents[::c_thought]]


def teacher_forced(tokenized):
    """
    CoT's own training input, for one record: (the question and every gold step, [the column that predicts
    step k's first token, for k = 1..]). Column k is the question's last token for k = 1; with one-token
    steps these are exactly the columns of Coconut's bare thoughts 1, 2, ...
    """
    seq, cols = list(tokenized.question), []
    for s in tokenized.steps:
        cols.append(len(seq) - 1)
        seq += s
    return seq, cols


@torch.no_grad()
def position_node_probs(model, rows, cols, node_ids, batch_size=32):
    """
    rows: token id lists (prompts with <|latent|> columns are run as Coconut runs them, the thoughts fed
    back); cols: per row, the columns to read; node_ids: per row, each node's token (node_token_ids).
    -> per row a (len(cols), n_nodes) tensor: the softmax of lm_head over the whole vocabulary at each
    column, read at the nodes' tokens. At the column before a <|latent|> that is the thought itself
    decoded, softmax(lm_head(thought)).
    """
    out = []
    device = next(model.parameters()).device
    head = model.gpt.lm_head
    for i in range(0, len(rows), batch_size):
        b = collate(rows[i:i + batch_size], pad_id=model.eos_id, latent_id=model.latent_id)
        hidden, _ = model.think(*(b[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")))
        left = b["attention_mask"].argmax(1).tolist()  # each row's left padding
        for r, (cs, ids) in enumerate(zip(cols[i:i + batch_size], node_ids[i:i + batch_size])):
            h = hidden[r, [left[r] + c for c in cs]]  # (len(cs), C)
            out.append(F.softmax(head(h).float(), dim=-1)[:, ids].cpu())  # (len(cs), V) -> (len(cs), n_nodes)
    return out


# -----------------------------------------------------------------------------
# Where the loss is: the training sequence at the checkpoint's stage, teacher-forced, its loss split by the
# piece each label belongs to. On the demo's data a chain of thought pays for its first step (a guess among
# the start's branches) and for nothing after it; a chain written backward pays for nothing but the answer.

def pieces(tokenized, example, tok, mode="coconut"):
    """
    The name of every labelled token of a training example (curriculum.make_example), in order: "thought j"
    (a removed step's label kept on its thought, --thought_labels), "step j" (j counts the record's steps
    from 1), "###" (the answer marker), "answer", "end" (<|endoftext|>). Read off the example itself: the
    labels on <|latent|> columns are the thoughts', the answer ends it, and the words between are the last
    steps of the record.
    """
    if mode in ("icot", "frontier"):
        raise ValueError(f"--losses names the pieces of Table 1's shapings by step; a {mode} sequence is cut "
                         f"inside its steps")
    sets = example.get("label_sets", {})  # --thought_labels frontier: the thoughts' labels are sets
    labelled = [i for j, (i, x) in enumerate(zip(example["input_ids"], example["labels"])) if x != -100 or j in sets]
    n_thoughts = labelled.count(tok.latent_id)
    a = list(tokenized.answer)
    marker = tok.encode("###")
    answer = ["###" if a[:len(marker)] == marker and i < len(marker) else "end" if i == len(a) - 1 else "answer"
              for i in range(len(a))]
    words = [f"step {j + 1}" for j, s in enumerate(tokenized.steps) for _ in s]  # one name per step token
    kept = len(labelled) - n_thoughts - len(answer)
    return [f"thought {j + 1}" for j in range(n_thoughts)] + words[len(words) - kept:] + answer


@torch.no_grad()
def piece_losses(model, tok, tokenized, cfg, stage, batch_size=64):
    """
    Teacher-forced cross-entropy (nats) and accuracy (the argmax is the label) of every labelled token of
    the training sequences at `stage`, made as train.py makes them (the checkpoint's mode, c_thought,
    markers, thought_labels), averaged by piece (pieces()). -> [(piece, mean loss, accuracy, tokens)] in
    the order the pieces first appear.
    """
    examples = [make_example(t, stage, cfg.get("mode", "coconut"), cfg.get("c_thought", 1),
                             cfg.get("max_latent_stage", 6), cfg.get("pad_latent_to_max", True), 0.0, None, tok,
                             bool(cfg.get("markers", 1)), cfg.get("thought_labels", 0)) for t in tokenized]
    device = next(model.parameters()).device
    sums = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate(chunk, pad_id=tok.pad_id, latent_id=tok.latent_id).items()}
        _, logits = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"], with_logits=True)
        targets = b["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
        hits = logits[:, :-1].argmax(-1) == targets
        scored = targets != -100
        if "label_sets" in b:  # a set label: scored as training scores it; a hit when the argmax is in the set
            sets = b["label_sets"][:, 1:]                                            # (B, L-1, K)
            has_set = (sets >= 0).any(-1)                                            # (B, L-1)
            losses[has_set] = set_cross_entropy(logits[:, :-1][has_set], targets[has_set], sets[has_set],
                                                cfg.get("set_loss") == "spread", reduction="none")
            in_set = (logits[:, :-1].argmax(-1)[..., None] == sets) & (sets >= 0)  # (B, L-1, K)
            hits = torch.where(has_set, in_set.any(-1), hits)
            scored = scored | has_set
        for r, (t, e) in enumerate(zip(tokenized[i:i + batch_size], chunk)):
            cols = scored[r].nonzero().flatten().tolist()
            for name, c in zip(pieces(t, e, tok, cfg.get("mode", "coconut")), cols):
                acc = sums.setdefault(name, [0.0, 0, 0])
                acc[0] += losses[r, c].item()
                acc[1] += int(hits[r, c])
                acc[2] += 1
    return [(name, total / n, right / n, n) for name, (total, right, n) in sums.items()]


# -----------------------------------------------------------------------------
# Reasoning paths (Coconut paper, Section 5.2 and Figure 5). After k continuous thoughts the model
# switches back to language and writes the rest of its path, then "### " and the answer. The paper
# sorts each output by the path it writes, which tells a right answer reached by a shortest path
# from one reached by a longer path, a made-up edge, or a path to the other option.

PATH_CATEGORIES = ("correct_path", "longer_path", "hallucination", "wrong_target", "correct_label", "incorrect_label",
                   "no_answer")
# What each category means, in the words --paths prints above its table (and the README uses): an edge of the
# question is an open road of the demo's worlds, a fact "X is a Y" of ProsQA's.
PATH_MEANINGS = {
    "correct_path": "the target's chain: a shortest chain of the question's edges from the start to the target",
    "longer_path": "a longer chain of the question's edges that ends at the target",
    "hallucination": "uses an edge that is not in the question (a road that is not open), a name that is no "
                     "node, or a broken chain",
    "wrong_target": "a valid chain to another node (the other option, or a node that is neither)",
    "correct_label": "no chain, the right answer at once",
    "incorrect_label": "no chain, a wrong answer at once",
    "no_answer": "stopped before '###' (an addition to the paper's six)",
}
SENTENCE = re.compile(r"(?:[Ee]very\s+)?(\S+)\s+is\s+an?\s+(\S+)")  # "X is a Y" / "Every X is a Y"


def _parse_chain(before, record, k):
    """
    The path written before the answer -> (first node, [(X, Y) edges]) in node indices, [] edges if none;
    None when a name is unknown or a sentence does not parse (the model wrote something not in the graph).
    """
    index = {name: v for v, name in enumerate(record["idx_to_symbol"])}
    symbolic = "." not in before and not re.search(r"\bis\b", before)
    if symbolic:  # data/prosqa_graph: one node name per step, each the next node of the path
        names = before.split()
        if names and names[-1] == "[A]":
            names = names[:-1]
        if not names:
            return None, []
        if any(n not in index for n in names):
            return None
        nodes = [index[n] for n in names]
        if k == 0:
            nodes = [record["root"]] + nodes  # the first step names a child of the root
        return nodes[0], list(zip(nodes, nodes[1:]))  # after k thoughts: the first named node is at hop k+1
    edges = []
    for sentence in (s.strip() for s in re.split(r"[.\n]+", before)):
        if not sentence:
            continue
        m = SENTENCE.fullmatch(sentence)
        if m is None or m.group(1) not in index or m.group(2) not in index:
            return None
        edges.append((index[m.group(1)], index[m.group(2)]))
    return (edges[0][0] if edges else None), edges


def classify_path(text, record, k=0):
    """
    The category of the output `text` generated after k continuous thoughts (Coconut Figure 5):
      1. Split at the last "#": the answer follows "### ". The part before it is the path, written as
         sentences "X is a Y." / "Every X is a Y." (X, Y node names of idx_to_symbol), or, for symbolic
         data (data/prosqa_graph: no "." and no "is"), as node names separated by whitespace, each the
         next node of the path: the chain starts at the node after the root (k = 0, the root is
         prepended) or, after k thoughts, at the first node named (hop k+1).
      2. No step: "correct_label" if the answer is right by the official rule
         (text.split("#")[-1].replace(",", "").strip() == answer.replace(",", "").strip()), else
         "incorrect_label".
      3. "hallucination": a name that is not a node, a sentence that does not parse, an edge X -> Y that
         is not in the graph, a chain that is not connected (each X must be the previous Y), or a first
         node that is not reachable from the root (the thoughts stood for the first k hops).
      4. "wrong_target": a valid chain that ends at a node other than the target (e.g. neg_target).
      5. "no_answer": a valid chain, or no step at all, but no "#" in the text: the model stopped (or ran
         out of tokens) before it answered (an addition to the paper's six categories). A path without
         its answer is not a correct path: a model asked for more thoughts than it was trained with may
         write one last node and stop.
      6. Ends at the target: hops = depth(first node) + number of edges; "correct_path" if that is
         depth(target) (a shortest path), "longer_path" if more.
    """
    cut = text.rfind("#")
    before = (text[:cut] if cut >= 0 else text).replace("#", " ")
    parsed = _parse_chain(before, record, k)
    if parsed is None:
        return "hallucination"
    first, edges = parsed
    answered = cut >= 0
    if first is None:  # no step: the model answered directly
        if not answered:
            return "no_answer"
        answer = text.split("#")[-1].replace(",", "").strip()
        return "correct_label" if answer == record["answer"].replace(",", "").strip() else "incorrect_label"
    graph = {tuple(e) for e in record["edges"]}
    d = depths(record)
    if d[first] is None or any(e not in graph for e in edges):
        return "hallucination"
    if any(x != y_prev for (_, y_prev), (x, _) in zip(edges, edges[1:])):
        return "hallucination"  # not connected
    if not answered:
        return "no_answer"
    end = edges[-1][1] if edges else first
    if end != record["target"]:
        return "wrong_target"
    return "correct_path" if d[first] + len(edges) == d[record["target"]] else "longer_path"


def path_table(labels_by_k, correct_by_k):
    """
    labels_by_k: {k: [classify_path label per output]}, correct_by_k: {k: [answer correct? per output]}.
    -> one row per k: dict(k, n, acc, and the share of each PATH_CATEGORIES label; the shares sum to 1).
    """
    rows = []
    for k in sorted(labels_by_k):
        labels, correct = labels_by_k[k], correct_by_k[k]
        if len(labels) != len(correct):
            raise ValueError(f"k={k}: {len(labels)} labels but {len(correct)} answers")
        n = len(labels)
        row = dict(k=k, n=n, acc=sum(map(bool, correct)) / n if n else float("nan"))
        row.update({c: (labels.count(c) / n if n else float("nan")) for c in PATH_CATEGORIES})
        rows.append(row)
    return rows
