"""analysis.py: superposition groups, attention by edge group and reasoning-path categories, on hand-built
graphs (values worked out by hand below), a tiny random GPT, and the real ProsQA validation records."""
import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

import machinery.analysis as A
import data.prosqa.prepare as prosqa_data
from coconut import Coconut
from machinery.evaluate import generate_batched
from gpt import GPT, GPTConfig
from machinery.records import graph_question
from machinery.tokenizer import gpt2_tokenizer, symbol_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSQA = os.path.join(os.path.dirname(ROOT), "shared", "data", "prosqa_valid.json")

# A hand-built graph. Tom (0) is the root, Ann (1) the other seed; dorpus (5) the target, erpus (6) the other option.
#   edges (index: parent -> child)
#     e0 Tom->alpus  e1 Tom->bempus  e2 Tom->hompus  e3 alpus->cimpus  e4 bempus->cimpus  e5 bempus->fumpus
#     e6 alpus->gorpus  e7 cimpus->dorpus  e8 fumpus->gorpus  e9 gorpus->dorpus  e10 Ann->erpus  e11 Ann->fumpus
#   depth:          Tom 0 | alpus bempus hompus 1 | cimpus fumpus gorpus 2 | dorpus 3 | Ann erpus: unreachable
#   to the target:  dorpus 0 | cimpus gorpus 1 | alpus bempus fumpus 2 | Tom Ann 3 | hompus erpus: never
#   shortest paths: Tom-alpus-cimpus-dorpus, Tom-bempus-cimpus-dorpus, Tom-alpus-gorpus-dorpus (3 hops)
#     -> optimal: hop 0 {Tom}, hop 1 {alpus, bempus}, hop 2 {cimpus, gorpus}, hop 3 {dorpus}
#   a longer path: Tom-bempus-fumpus-gorpus-dorpus (4 hops)
NAMES = ["Tom", "Ann", "alpus", "bempus", "cimpus", "dorpus", "erpus", "fumpus", "gorpus", "hompus"]
EDGES = [[0, 2], [0, 3], [0, 9], [2, 4], [3, 4], [3, 7], [2, 8], [4, 5], [7, 8], [8, 5], [1, 6], [1, 7]]
GRAPH = dict(question="", steps=["Tom is a alpus.", "Every alpus is a cimpus.", "Every cimpus is a dorpus."],
             answer="Tom is a dorpus.", idx_to_symbol=NAMES, edges=EDGES, root=0, target=5, neg_target=6)
# The same graph written in symbols (data/prosqa_graph): the question lists the edges, a step names a node.
SYM = dict(GRAPH, question=graph_question(GRAPH), steps=["alpus", "cimpus", "dorpus"], answer="dorpus")


def load_prosqa():
    """The real ProsQA validation file (CI has ../shared); a fresh clone without it skips, saying why."""
    if not os.path.exists(PROSQA):
        pytest.skip(f"prosqa_valid.json not found at {PROSQA}")
    with open(PROSQA) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# Node groups, inner products

def test_node_groups_by_hand():
    g = [A.node_groups(GRAPH, i) for i in range(5)]
    assert g[0] == dict(not_reachable=set(range(10)) - {0}, reachable={0}, frontier={0}, optimal={0})
    assert g[1] == dict(not_reachable={1, 4, 5, 6, 7, 8}, reachable={0, 2, 3, 9}, frontier={2, 3, 9}, optimal={2, 3})
    assert g[2] == dict(not_reachable={1, 5, 6}, reachable={0, 2, 3, 9, 4, 7, 8}, frontier={4, 7, 8}, optimal={4, 8})
    assert g[3] == dict(not_reachable={1, 6}, reachable={0, 2, 3, 4, 5, 7, 8, 9}, frontier={5}, optimal={5})
    assert g[4] == dict(not_reachable={1, 6}, reachable={0, 2, 3, 4, 5, 7, 8, 9}, frontier=set(), optimal=set())


def test_optimal_is_empty_when_the_target_is_unreachable():
    rec = dict(GRAPH, target=6)  # erpus hangs off Ann only
    assert all(A.node_groups(rec, i)["optimal"] == set() for i in range(4))
    assert A.node_groups(rec, 1)["frontier"] == {2, 3, 9}


def test_thought_node_products_and_group_means_by_hand():
    thoughts = torch.tensor([[1.0, 2.0], [0.0, -1.0]])       # (2, C=2)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 1.0]])  # (3 nodes, C)
    assert A.thought_node_products(thoughts, emb).tolist() == [[1.0, 2.0, 5.0], [0.0, -1.0, -1.0]]

    values = [list(range(10))] * 4  # node v has value v at every thought
    m = A.group_means(values, GRAPH)
    assert set(m) == {1, 2, 3, 4}
    assert m[1] == pytest.approx(dict(not_reachable=31 / 6, reachable=14 / 4, frontier=14 / 3, optimal=2.5))
    assert m[2] == pytest.approx(dict(not_reachable=4.0, reachable=33 / 7, frontier=19 / 3, optimal=6.0))
    assert m[3] == pytest.approx(dict(not_reachable=3.5, reachable=38 / 8, frontier=5.0, optimal=5.0))
    assert m[4] == pytest.approx(dict(not_reachable=3.5, reachable=38 / 8))  # no node at hop 4: no entry


def test_average_groups_skips_missing_entries():
    per_record = [{1: dict(frontier=1.0, optimal=3.0), 2: dict(frontier=2.0)},
                  {1: dict(frontier=2.0), 2: dict(frontier=4.0, optimal=1.0)},
                  {1: dict(frontier=6.0)}]
    avg = A.average_groups(per_record)
    assert avg == {1: dict(frontier=(3.0, 3), optimal=(3.0, 1)), 2: dict(frontier=(3.0, 2), optimal=(1.0, 1))}
    assert list(avg[1]) == ["frontier", "optimal"]  # groups in GROUPS order


def orthonormal(n, C, seed=0):
    q, _ = torch.linalg.qr(torch.randn(C, n, generator=torch.Generator().manual_seed(seed)))
    return q.T.contiguous()  # (n, C), rows orthonormal


def test_known_superposition_thoughts():
    # Node embeddings orthonormal: <sum_{u in S} a_u e_u, e_v> = a_v exactly.
    E = orthonormal(10, 32)
    fr = [A.node_groups(GRAPH, i)["frontier"] for i in (1, 2, 3)]
    opt = [A.node_groups(GRAPH, i)["optimal"] for i in (1, 2, 3)]
    # 1) thought i = the plain superposition of the frontier at hop i
    th = torch.stack([E[sorted(f)].sum(0) for f in fr])  # (3, C)
    m = A.group_means(A.thought_node_products(th, E).tolist(), GRAPH)
    for i in (1, 2, 3):
        assert m[i]["frontier"] == pytest.approx(1.0, abs=1e-5)
        assert m[i]["not_reachable"] == pytest.approx(0.0, abs=1e-5)
        assert m[i]["frontier"] == pytest.approx(max(m[i].values()), abs=1e-5)
        assert m[i]["frontier"] > m[i]["reachable"] + 0.05
    assert m[1]["reachable"] == pytest.approx(3 / 4, abs=1e-5)  # 3 frontier nodes of 4 reachable
    # 2) the optimal nodes weighted twice, as the paper finds: not reachable < reachable < frontier < optimal
    th = torch.stack([E[sorted(f)].sum(0) + E[sorted(o)].sum(0) for f, o in zip(fr, opt)])
    m = A.group_means(A.thought_node_products(th, E).tolist(), GRAPH)
    assert m[1] == pytest.approx(dict(not_reachable=0.0, reachable=5 / 4, frontier=5 / 3, optimal=2.0), abs=1e-5)
    assert m[2] == pytest.approx(dict(not_reachable=0.0, reachable=5 / 7, frontier=5 / 3, optimal=2.0), abs=1e-5)
    for i in (1, 2, 3):
        r = m[i]
        assert r["not_reachable"] < r["reachable"] < r["frontier"] <= r["optimal"]


def test_node_token_ids():
    tok = symbol_tokenizer([SYM])
    ids = A.node_token_ids(SYM, tok)
    assert ids == [tok.encode(n)[0] for n in NAMES] and len(set(ids)) == 10
    assert [tok.decode([i]) for i in ids] == NAMES


# -----------------------------------------------------------------------------
# Edges in the question, attention

def test_edge_columns_reads_shuffled_questions():
    tok = symbol_tokenizer([SYM])
    q = graph_question(SYM, rng=random.Random(3))  # edges shuffled
    ids = tok.encode(q)
    cols = A.edge_columns(ids, SYM, tok)
    assert len(cols) == len(EDGES)
    for (a, b), c in zip(EDGES, cols):
        assert [tok.decode([ids[j]]) for j in c] == [NAMES[a], NAMES[b]]
        assert c[1] == c[0] + 1 and c[0] % 3 == 0  # "a b |" repeats every three columns
    assert [c[0] // 3 for c in cols] != list(range(len(EDGES)))  # really shuffled: order read, not assumed
    # a prefix (e.g. <eos>) and the latents after the question shift nothing but the columns
    shifted = A.edge_columns([tok.eos_id] + ids + [tok.start_id, tok.latent_id, tok.end_id], SYM, tok)
    assert shifted == [[a + 1, b + 1] for a, b in cols]
    # an edge that the question lacks, or one it has but the record does not
    with pytest.raises(ValueError, match="not in the question"):
        A.edge_columns(tok.encode(graph_question(dict(SYM, edges=EDGES[:-1]))), SYM, tok)
    with pytest.raises(ValueError, match="do not write an edge"):
        A.edge_columns(ids, dict(SYM, edges=EDGES[:-1]), tok)


def test_edge_attention_by_group_by_hand():
    # edge e sits at columns 2e, 2e+1 and gets mass (e+1)/100 in all
    row = torch.zeros(2 * len(EDGES) + 3)
    spans = [[2 * e, 2 * e + 1] for e in range(len(EDGES))]
    for e in range(len(EDGES)):
        row[2 * e], row[2 * e + 1] = 0.004 * (e + 1), 0.006 * (e + 1)
    row[-3:] = 5.0  # columns outside every edge count for nothing
    mass = lambda es: sum((e + 1) / 100 for e in es) / len(es)
    # step 1 (computing thought 1): edges leaving hop 0 = the root's e0 e1 e2; optimal ones reach alpus/bempus
    assert A.edge_attention_by_group(row, spans, GRAPH, 1) == pytest.approx(dict(
        not_reachable=mass(range(3, 12)), reachable=mass([0, 1, 2]), frontier=mass([0, 1, 2]), optimal=mass([0, 1])))
    # step 2: sources within hop 1 (Tom alpus bempus hompus); the frontier's edges e3-e6; e5 (bempus->fumpus)
    # leaves an optimal node for a node on no shortest path, so it is not optimal
    assert A.edge_attention_by_group(row, spans, GRAPH, 2) == pytest.approx(dict(
        not_reachable=mass(range(7, 12)), reachable=mass(range(7)), frontier=mass([3, 4, 5, 6]),
        optimal=mass([3, 4, 6])))
    # step 3: frontier cimpus fumpus gorpus: e7 e8 e9; optimal: e7 e9 (into dorpus)
    assert A.edge_attention_by_group(row, spans, GRAPH, 3) == pytest.approx(dict(
        not_reachable=mass([10, 11]), reachable=mass(range(10)), frontier=mass([7, 8, 9]), optimal=mass([7, 9])))
    # step 5: nothing leaves hop 4: no frontier or optimal entry
    assert set(A.edge_attention_by_group(row, spans, GRAPH, 5)) == {"not_reachable", "reachable"}


def tiny_gpt(vocab_size, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=vocab_size))
    return gpt.eval()


def manual_attention(gpt, x, position_ids, attention_mask=None):
    """GPT-2's attention written out: per layer the softmax probabilities, and the final hidden states."""
    B, T, C = x.shape
    x = x + gpt.transformer.wpe(position_ids)
    keep = torch.ones(T, T).tril().bool()[None, None]  # (1, 1, T, T)
    if attention_mask is not None:  # padding keys off, each query always sees itself (as gpt.py does)
        keep = (keep & attention_mask.bool()[:, None, None, :]) | torch.eye(T).bool()
    probs = []
    for blk in gpt.transformer.h:
        nh = blk.attn.n_head
        q, k, v = (t.reshape(B, T, nh, C // nh).transpose(1, 2) for t in blk.attn.c_attn(blk.ln_1(x)).split(C, 2))
        att = F.softmax((q @ k.transpose(-2, -1) / math.sqrt(C // nh)).masked_fill(~keep, float("-inf")), dim=-1)
        probs.append(att)
        x = x + blk.attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
        x = x + blk.mlp(blk.ln_2(x))
    return probs, gpt.transformer.ln_f(x)


@torch.no_grad()
def test_attention_probs_match_a_manual_attention():
    gpt = tiny_gpt(30)
    x = torch.randn(2, 12, 16)
    pos = torch.arange(12).expand(2, 12)
    probs = A.attention_probs(gpt, x)
    want, hidden = manual_attention(gpt, x, pos)
    assert torch.allclose(hidden, gpt(inputs_embeds=x)[2], atol=1e-5)  # the manual model is GPT-2
    assert len(probs) == 2 and probs[0].shape == (2, 2, 12, 12)
    for p, w in zip(probs, want):
        assert torch.allclose(p, w, atol=1e-5)
        assert torch.allclose(p.sum(-1), torch.ones(2, 2, 12), atol=1e-5)
        assert p.triu(1).abs().max() == 0  # causal
    uniform = torch.full((2, 2, 6), 1 / 6)
    assert not torch.allclose(probs[1][:, :, 5, :6], uniform, atol=1e-3)  # the test can tell rows apart
    for blk in gpt.transformer.h:
        assert len(blk.attn.c_attn._forward_hooks) == 0


@torch.no_grad()
def test_attention_probs_with_left_padding_and_hook_cleanup():
    gpt = tiny_gpt(30)
    x = torch.randn(1, 9, 16)
    mask = torch.tensor([[0, 0, 0] + [1] * 9])  # 3 pads on the left, then the same 9 columns
    pos = torch.tensor([[0, 0, 0] + list(range(9))])
    padded = A.attention_probs(gpt, torch.cat([torch.randn(1, 3, 16), x], 1), pos, mask)
    alone = A.attention_probs(gpt, x)
    want, _ = manual_attention(gpt, torch.cat([torch.zeros(1, 3, 16), x], 1), pos, mask)
    for p, a, w in zip(padded, alone, want):
        assert p[..., 3:, :3].abs().max() == 0  # real queries never see padding
        assert torch.allclose(p[..., 3:, 3:], a, atol=1e-5)
        assert torch.allclose(p[..., 3:, :], w[..., 3:, :], atol=1e-5)
    with pytest.raises(ValueError, match="block_size"):  # gpt fails inside: the hooks go all the same
        A.attention_probs(gpt, torch.randn(1, 65, 16))
    assert all(len(blk.attn.c_attn._forward_hooks) == 0 for blk in gpt.transformer.h)


# -----------------------------------------------------------------------------
# The driver, on a tiny random Coconut

# a second, smaller symbolic record: Ann -> erpus -> fumpus (target), Ann -> hompus (the other option)
SYM2 = dict(question="", steps=["erpus", "fumpus"], answer="fumpus", idx_to_symbol=["Ann", "erpus", "fumpus", "hompus"],
            edges=[[0, 1], [1, 2], [0, 3]], root=0, target=2, neg_target=3)
SYM2["question"] = graph_question(SYM2)


def tiny_coconut(records):
    tok = symbol_tokenizer(records)
    return Coconut(tiny_gpt(tok.vocab_size, seed=1), tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval(), tok


def prompt_ids(rec, tok, n):
    return tok.encode(rec["question"] + "\n") + [tok.start_id] + [tok.latent_id] * n + [tok.end_id]


@torch.no_grad()
def test_filled_embeddings_reproduce_the_thoughts():
    model, tok = tiny_coconut([SYM, SYM2])
    prompts = [prompt_ids(SYM, tok, 4), prompt_ids(SYM2, tok, 2)]
    _, thoughts = generate_batched(model, prompts, 1)
    for p, th in zip(prompts, thoughts):
        ids = torch.tensor([p])
        x = A.filled_embeddings(model.gpt, ids, [th], tok.latent_id)
        start = p.index(tok.start_id)
        assert torch.equal(x[0, :start + 1], model.gpt.transformer.wte(ids)[0, :start + 1])
        assert torch.equal(x[0, start + 1:start + 1 + len(th)], th)
        hidden = model.gpt(inputs_embeds=x)[2][0]  # one uncached pass: thought i is the output at start + i - 1
        assert torch.allclose(hidden[start:start + len(th)], th, atol=1e-5)


@torch.no_grad()
def test_superposition_tables_against_a_direct_computation():
    model, tok = tiny_coconut([SYM, SYM2])
    records = [SYM, SYM2]
    prompts = [prompt_ids(SYM, tok, 4), prompt_ids(SYM2, tok, 2)]
    one = A.superposition_tables(model, tok, records, prompts, batch_size=1)
    two = A.superposition_tables(model, tok, records, prompts, batch_size=2)  # left padding in the batch
    assert not model.training
    # direct: the thoughts from Coconut.think, the attention of the manual model, spans by hand (the
    # unshuffled question writes edge e at columns 3e, 3e+1)
    inner, attn = [], [[], []]
    wte = model.gpt.transformer.wte.weight
    for rec, p in zip(records, prompts):
        ids = torch.tensor([p])
        _, st = model.think(ids, torch.ones_like(ids), torch.arange(len(p))[None])
        th = st["thoughts"][0]
        inner.append(A.group_means((th @ wte[A.node_token_ids(rec, tok)].T).tolist(), rec))
        x = model.gpt.transformer.wte(ids).clone()
        x[0, p.index(tok.start_id) + 1:p.index(tok.end_id)] = th
        probs, _ = manual_attention(model.gpt, x, torch.arange(len(p))[None])
        spans = [[3 * e, 3 * e + 1] for e in range(len(rec["edges"]))]
        start = p.index(tok.start_id)
        for layer in range(2):
            attn[layer].append({i: A.edge_attention_by_group(probs[layer][0, :, start + i - 1].sum(0), spans, rec, i)
                                for i in range(1, len(th) + 1)})
    want = dict(inner=A.average_groups(inner), attention=[A.average_groups(a) for a in attn])
    for got in (one, two):
        assert set(got["inner"]) == {1, 2, 3, 4} and len(got["attention"]) == 2
        assert got["inner"][3]["frontier"][1] == 1 and got["inner"][1]["frontier"][1] == 2  # SYM2 has no hop 3
        for i in want["inner"]:
            for g, (mean, n) in want["inner"][i].items():
                assert got["inner"][i][g][0] == pytest.approx(mean, abs=1e-5) and got["inner"][i][g][1] == n
        for layer in range(2):
            assert set(got["attention"][layer]) == set(want["attention"][layer])
            for i, row in want["attention"][layer].items():
                for g, (mean, n) in row.items():
                    assert got["attention"][layer][i][g][0] == pytest.approx(mean, abs=1e-5)
                    assert got["attention"][layer][i][g][1] == n
                    assert 0 < mean <= 2 * 2  # at most 2 heads x 2 columns


@torch.no_grad()
def test_superposition_tables_with_known_thoughts():
    # Give the node tokens orthonormal embeddings and hand the driver thoughts = frontier superpositions.
    model, tok = tiny_coconut([SYM, SYM2])
    ids = A.node_token_ids(SYM, tok)
    model.gpt.transformer.wte.weight[ids] = orthonormal(10, 16, seed=2)
    E = model.gpt.transformer.wte.weight[ids]
    thoughts = [torch.stack([E[sorted(A.node_groups(SYM, i)["frontier"])].sum(0) for i in (1, 2, 3)])]
    got = A.superposition_tables(model, tok, [SYM], [prompt_ids(SYM, tok, 3)], thoughts=thoughts)
    for i in (1, 2, 3):
        row = {g: m for g, (m, _) in got["inner"][i].items()}
        assert row["frontier"] == pytest.approx(1.0, abs=1e-5) and row["not_reachable"] == pytest.approx(0.0, abs=1e-5)
        assert row["frontier"] > row["reachable"]
    assert got["inner"][2]["reachable"][0] == pytest.approx(3 / 7, abs=1e-5)


@pytest.mark.gpt2_bpe
def test_superposition_needs_one_token_per_node():
    rec = prosqa_data.generate(1, random.Random(0))[0]  # a ProsQA-format record with invented names
    tok = gpt2_tokenizer()
    with pytest.raises(ValueError, match="one token per node"):
        A.node_token_ids(rec, tok)  # BPE cuts a name such as "shumpus" into pieces
    with pytest.raises(ValueError, match="one token per node"):
        A.edge_columns(tok.encode(graph_question(rec)), rec, tok)


# -----------------------------------------------------------------------------
# Search or a layer prior (layered data: data/reach)

# A hand-made reach record: 3 layers of 4 nodes, a0..a3 (0-3), b0..b3 (4-7), c0..c3 (8-11). The start a1 opens
# two branches, a1>b0>c2 (the gold one: c2 is the target) and a1>b3>c0; the other root a2 one, a2>b1>c3 (c3 the
# other option). No open road reaches b2 and c1; a0 and a3 open none.
REACH = dict(question="a1>b0 b0>c2 a1>b3 b3>c0 a2>b1 b1>c3 [Q] c2 c3 [R] a1", steps=["b0", "c2"], answer="c2",
             idx_to_symbol=["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3", "c0", "c1", "c2", "c3"],
             edges=[[1, 4], [4, 10], [1, 7], [7, 8], [2, 5], [5, 11]], root=1, target=10, neg_target=11)


def test_layer_groups_by_hand():
    assert A.gold_path(REACH) == [1, 4, 10] and A.layer_width(REACH) == 4
    assert A.layer_groups(REACH, 1, 4) == dict(gold={4}, start={7}, other_root={5}, unused={6})
    assert A.layer_groups(REACH, 2, 4) == dict(gold={10}, start={8}, other_root={11}, unused={9})
    assert A.layer_groups(REACH, 0, 4) == dict(gold={1}, start=set(), other_root={2}, unused={0, 3})
    assert A.node_roles(REACH, 4) == ["unused", "gold", "other_root", "unused", "gold", "other_root", "unused",
                                      "start", "start", "unused", "gold", "other_root"]
    # not layered: text steps (ProsQA), an edge that skips a layer, a start outside layer 0, steps off the layers
    assert A.gold_path(GRAPH) is None and A.layer_width(GRAPH) is None
    assert A.layer_width(dict(REACH, edges=REACH["edges"] + [[0, 9]])) is None
    assert A.layer_width(dict(REACH, root=4, steps=["c2"])) is None
    assert A.layer_width(dict(REACH, steps=["b0", "b3"])) is None
    # two nodes a step (reach's --hops_per_step 2): the path reads through both
    two = dict(REACH, steps=["b0 c2"])
    assert A.gold_path(two) == [1, 4, 10] and A.layer_width(two) == 4


def test_layer_split_by_hand():
    # thought 1's probabilities on the 12 nodes (the rest of its softmax is on other tokens)
    p = [0.01, 0.0, 0.0, 0.0, 0.3, 0.05, 0.05, 0.4, 0.02, 0.0, 0.0, 0.0]
    s = A.layer_split(p, REACH, 1, 4)
    assert s["layer"] == pytest.approx(0.8)  # b0 + b1 + b2 + b3: the layer's share of the whole softmax
    assert (s["gold"], s["start"], s["other_root"], s["unused"]) == pytest.approx((0.375, 0.5, 0.0625, 0.0625))
    assert (s["n_gold"], s["n_start"], s["n_other_root"], s["n_unused"]) == (1, 1, 1, 1)
    empty = A.layer_split([0.0] * 12, REACH, 2, 4)  # no mass on the layer: shares 0, not nan
    assert empty["layer"] == 0 and all(empty[g] == 0 for g in A.LAYER_GROUPS)
    rows = A.average_splits({1: [s, A.layer_split([0.0] * 4 + [1.0, 0, 0, 0] + [0.0] * 4, REACH, 1, 4)], 2: [empty]})
    assert [r["position"] for r in rows] == [1, 2] and [r["records"] for r in rows] == [2, 1]
    assert rows[0]["gold"] == pytest.approx((0.375 + 1.0) / 2) and rows[0]["layer"] == pytest.approx(0.9)
    assert rows[0]["start"] == pytest.approx(0.25)
    # one question at a time: the top node's share of the layer (b3's 0.4 of 0.8) and whether it is gold (b0)
    assert (s["top"], s["top_gold"]) == pytest.approx((0.5, 0.0))
    assert rows[0]["top"] == pytest.approx((0.5 + 1.0) / 2) and rows[0]["top_gold"] == pytest.approx(0.5)


@torch.no_grad()
def test_position_node_probs_read_the_thoughts_and_cots_next_steps():
    tok = symbol_tokenizer([REACH])
    model = Coconut(tiny_gpt(tok.vocab_size, seed=3), tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval()
    nodes = A.node_token_ids(REACH, tok)
    q = tok.encode(REACH["question"])
    # bare thoughts (the demo's format), two prompts of different lengths in one batch (left padding)
    prompts = [q + [tok.latent_id] * 2, q[6:] + [tok.latent_id] * 3]
    cols = [A.thought_positions(p, tok.latent_id) for p in prompts]
    assert cols == [[len(q) - 1, len(q)], [len(q) - 7, len(q) - 6, len(q) - 5]]
    assert A.thought_positions(q + [tok.start_id] + [tok.latent_id] * 4 + [tok.end_id], tok.latent_id, 2) == \
        [len(q), len(q) + 2]  # with markers thought 1 is <start>'s; c = 2: the first of each pair
    got = A.position_node_probs(model, prompts, cols, [nodes, nodes], batch_size=2)
    _, thoughts = generate_batched(model, prompts, 1)
    for g, th in zip(got, thoughts):
        want = F.softmax(model.gpt.lm_head(th), -1)[:, nodes]  # "decode the thought"
        assert g.shape == want.shape and torch.allclose(g, want, atol=1e-5)
    # CoT's training input: the question and every step; the columns that predict the steps
    t = SimpleNamespace(question=q, steps=[tok.encode(s) for s in REACH["steps"]])
    row, cs = A.teacher_forced(t)
    assert row == q + tok.encode("b0 c2") and cs == [len(q) - 1, len(q)]
    (got,) = A.position_node_probs(model, [row, row[:-1]], [cs, cs[:1]], [nodes, nodes], batch_size=2)[:1]
    logits = model.gpt(torch.tensor([row]))[0][0]  # (T, V), one plain pass
    assert torch.allclose(got, F.softmax(logits[cs], -1)[:, nodes], atol=1e-5)


# -----------------------------------------------------------------------------
# Reasoning paths (Coconut Figure 5)

def text(*steps, answer="Tom is a dorpus."):
    return "".join(s + "\n" for s in steps) + "### " + answer


def test_classify_path_hand_built_sentences():
    c = lambda t, k=0: A.classify_path(t, GRAPH, k)
    assert c(text("Tom is a alpus.", "Every alpus is a cimpus.", "Every cimpus is a dorpus.")) == "correct_path"
    assert c(text("Tom is a alpus.", "Every alpus is a gorpus.", "Every gorpus is a dorpus.")) == "correct_path"
    assert c(text("Every bempus is a cimpus.", "Every cimpus is a dorpus."), k=1) == "correct_path"
    assert c(text("Every gorpus is a dorpus."), k=2) == "correct_path"
    assert c("Tom is a alpus. Every alpus is a cimpus. Every cimpus is a dorpus.") == "no_answer"  # never answered
    assert c(text("Tom is a bempus.", "Every bempus is a fumpus.", "Every fumpus is a gorpus.",
                  "Every gorpus is a dorpus.")) == "longer_path"
    assert c(text("Every fumpus is a gorpus.", "Every gorpus is a dorpus."), k=1) == "longer_path"  # 2 + 2 hops
    assert c(text("Tom is a alpus.", "Every alpus is a zorpus.")) == "hallucination"              # unknown node
    assert c(text("Tom is a alpus.", "Every alpus is a dorpus.")) == "hallucination"              # no such edge
    assert c(text("Tom is a alpus.", "Every bempus is a cimpus.", "Every cimpus is a dorpus.")) == "hallucination"
    assert c(text("Ann is a fumpus.", "Every fumpus is a gorpus.", "Every gorpus is a dorpus.")) == "hallucination"
    assert c(text("Tom likes alpus.", "Every cimpus is a dorpus.")) == "hallucination"            # does not parse
    assert c(text("Tom is a hompus.", answer="Tom is a erpus.")) == "wrong_target"
    assert c(text("Tom is a alpus.", "Every alpus is a cimpus.")) == "wrong_target"              # stops short
    assert c(text()) == "correct_label"
    assert c(text(), k=6) == "correct_label"
    assert c(text(answer="Tom is a, dorpus.")) == "correct_label"  # the official rule drops commas
    assert c(text(answer="Tom is a erpus.")) == "incorrect_label"
    assert c("nothing useful") == "hallucination"  # an invented path is one, answered or not
    assert c("Tom is a alpus. Every alpus is a zorpus.") == "hallucination"
    assert c("") == "no_answer"


def test_classify_path_symbolic():
    c = lambda t, k=0: A.classify_path(t, SYM, k)
    assert c("alpus cimpus dorpus ### dorpus") == "correct_path"
    assert c("alpus\ngorpus\ndorpus\n### dorpus") == "correct_path"
    assert c("cimpus dorpus ### dorpus", k=1) == "correct_path"
    assert c("dorpus ### dorpus", k=2) == "correct_path"
    assert c("bempus fumpus gorpus dorpus ### dorpus") == "longer_path"
    assert c("fumpus gorpus dorpus ### dorpus", k=1) == "longer_path"
    assert c("alpus dorpus ### dorpus") == "hallucination"      # alpus -> dorpus is no edge
    assert c("cimpus dorpus ### dorpus") == "hallucination"     # k = 0: the root has no edge to cimpus
    assert c("alpus zorpus ### dorpus") == "hallucination"
    assert c("erpus ### erpus", k=1) == "hallucination"         # erpus is not reachable from the root
    assert c("alpus cimpus ### dorpus") == "wrong_target"
    assert c("### dorpus") == "correct_label"
    assert c("### erpus", k=4) == "incorrect_label"
    # after more thoughts than the path has hops: the last node alone, no answer marker (issue 23's k = 6 row)
    assert c("dorpus", k=6) == "no_answer" and c("alpus cimpus dorpus") == "no_answer"
    assert c("dorpus ### dorpus", k=2) == "correct_path"
    # node symbols "0".."9" (data/prosqa_graph), through the symbol tokenizer's encode/decode as generated
    num = dict(SYM, idx_to_symbol=[str(i) for i in range(10)], answer="5")
    num["question"] = graph_question(num)
    tok = symbol_tokenizer([dict(num, steps=["2", "4", "5"])])
    decoded = lambda t: tok.decode(tok.encode(t))
    assert decoded("2\n4\n5\n### 5") == "2 4 5 ### 5"
    assert A.classify_path(decoded("2\n4\n5\n### 5"), num) == "correct_path"
    assert A.classify_path(decoded("8\n5\n### 5"), num, k=1) == "correct_path"
    assert A.classify_path(decoded("3\n7\n8\n5\n### 5"), num) == "longer_path"
    assert A.classify_path(decoded("9\n### 5"), num) == "wrong_target"
    assert A.classify_path(decoded("2\n5\n### 5"), num) == "hallucination"
    assert A.classify_path(decoded("### 6"), num, k=4) == "incorrect_label"


def sentence(rec, a, b):
    names = rec["idx_to_symbol"]
    is_person = all(child != a for _, child in rec["edges"])
    return ("" if is_person else "Every ") + f"{names[a]} is a {names[b]}."


@pytest.mark.parametrize("source", ["generated", "real"])
def test_classify_path_on_prosqa(source):
    # ProsQA's own sentences: the generator's (always here) and the released validation file's (with ../shared)
    records = prosqa_data.generate(300, random.Random(1)) if source == "generated" else load_prosqa()
    assert len(records) == 300
    wrong_target = longer = 0
    for r in records:
        steps, names, n = r["steps"], r["idx_to_symbol"], len(r["steps"])
        edges = {tuple(e) for e in r["edges"]}
        ans, neg = "### " + r["answer"], names[r["neg_target"]]
        for k in range(n):
            assert A.classify_path("\n".join(steps[k:]) + "\n" + ans, r, k) == "correct_path"
        assert A.classify_path(ans, r, n) == "correct_label"
        assert A.classify_path(ans.replace(names[r["target"]], neg), r, n) == "incorrect_label"
        # the last step's target replaced by the other option: an edge that exists leads to a wrong target
        last = steps[-1].rsplit(" ", 1)[0] + f" {neg}."
        x = A.SENTENCE.fullmatch(steps[-1][:-1]).group(1)
        want = "wrong_target" if (names.index(x), r["neg_target"]) in edges else "hallucination"
        assert A.classify_path("\n".join(steps[:-1] + [last]) + "\n" + ans, r) == want
        # a real edge out of the last step's source to another node: unambiguously a wrong target
        others = [c for p, c in r["edges"] if p == names.index(x) and c != r["target"]]
        if others:
            alt = steps[:-1] + [sentence(r, names.index(x), others[0])]
            assert A.classify_path("\n".join(alt) + "\n" + ans, r) == "wrong_target"
            wrong_target += 1
        # an invented first edge: the root to a node that is not its child
        fake = next(v for v in range(len(names)) if v != r["root"] and (r["root"], v) not in edges)
        assert A.classify_path("\n".join([sentence(r, r["root"], fake)] + steps[1:]) + "\n" + ans, r) == "hallucination"
        # a longer path to the target, found by search
        path = longer_path(r)
        if path is not None:
            assert all((a, b) in edges for a, b in zip(path, path[1:])) and len(path) - 1 > n
            t = "\n".join(sentence(r, a, b) for a, b in zip(path, path[1:])) + "\n" + ans
            assert A.classify_path(t, r) == "longer_path"
            longer += 1
    assert wrong_target > 0 and longer > 0


def longer_path(r):
    """Some root-to-target path longer than the shortest one (depth-first; the graphs are DAGs), or None."""
    kids = A.children(r)
    shortest = A.depths(r)[r["target"]]

    def walk(path):
        if path[-1] == r["target"]:
            return path if len(path) - 1 > shortest else None
        for c in kids[path[-1]]:
            found = walk(path + [c])
            if found:
                return found
        return None
    return walk([r["root"]])


def test_path_table():
    labels = {1: ["correct_label", "incorrect_label"],
              0: ["correct_path", "correct_path", "longer_path", "hallucination"]}
    correct = {0: [True, True, True, False], 1: [True, False]}
    rows = A.path_table(labels, correct)
    assert [r["k"] for r in rows] == [0, 1]
    assert rows[0] == dict(k=0, n=4, acc=0.75, correct_path=0.5, longer_path=0.25, hallucination=0.25,
                           wrong_target=0.0, correct_label=0.0, incorrect_label=0.0, no_answer=0.0)
    assert rows[1]["correct_label"] == 0.5 and rows[1]["incorrect_label"] == 0.5 and rows[1]["acc"] == 0.5
    for r in rows:
        assert sum(r[c] for c in A.PATH_CATEGORIES) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels but"):
        A.path_table({0: ["correct_path"]}, {0: []})


@torch.no_grad()
def test_piece_losses_name_every_label_and_average_it():
    # --losses: each labelled token of the training sequence gets its piece's name, for every shaping of Table 1
    # that keeps whole steps, and the loss of a piece is the mean cross-entropy at its labels
    from curriculum import make_example
    from machinery.records import tokenize
    tok = symbol_tokenizer([REACH])
    t = tokenize(REACH, tok)  # steps b0, c2; answer "### c2" <eos>
    cases = [(dict(mode="cot"), 0, ["step 1", "step 2", "###", "answer", "end"]),
             (dict(mode="nocot"), 0, ["###", "answer", "end"]),
             (dict(mode="coconut", markers=0, thought_labels=1), 1, ["thought 1", "step 2", "###", "answer", "end"]),
             (dict(mode="coconut", markers=1, thought_labels=0), 2, ["###", "answer", "end"]),
             (dict(mode="pause_as_thought", markers=0, thought_labels=1, max_latent_stage=2), 5,
              ["thought 1", "thought 2", "###", "answer", "end"]),
             (dict(mode="pause", max_latent_stage=2), 0, ["###", "answer", "end"])]
    for cfg, stage, want in cases:
        e = make_example(t, stage, cfg["mode"], 1, cfg.get("max_latent_stage", 6), True, 0.0, None, tok,
                         bool(cfg.get("markers", 1)), bool(cfg.get("thought_labels", 0)))
        assert A.pieces(t, e, tok, cfg["mode"]) == want, cfg
        assert sum(x != -100 for x in e["labels"]) == len(want)
    with pytest.raises(ValueError, match="frontier"):
        A.pieces(t, make_example(t, 0, "cot", tok=tok), tok, "frontier")
    # the numbers: one pass by hand over the CoT sequence of two copies of the record
    model = Coconut(tiny_gpt(tok.vocab_size, seed=5), tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval()
    rows = A.piece_losses(model, tok, [t, t], dict(mode="cot"), 0)
    assert [r[0] for r in rows] == ["step 1", "step 2", "###", "answer", "end"] and all(r[3] == 2 for r in rows)
    ids = make_example(t, 0, "cot", tok=tok)["input_ids"]
    logits = model.gpt(torch.tensor([ids]))[0][0]  # (T, V)
    start = len(t.question) - 1  # the question's last token predicts step 1
    for k, (name, loss, acc, n) in enumerate(rows):
        want = F.cross_entropy(logits[start + k], torch.tensor(ids[start + k + 1])).item()
        assert loss == pytest.approx(want, abs=1e-5), name
        assert acc == float(logits[start + k].argmax().item() == ids[start + k + 1])
