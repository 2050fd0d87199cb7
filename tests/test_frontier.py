"""The frontier curriculum of "Reasoning by Superposition" (--mode frontier), bare thoughts (--markers 0),
and the demo's graph data sets (data/dag, data/reach). Offline, hand-built graphs and generated data."""
import random

import pytest
import torch

import curriculum as C
import test_coconut
from coconut import Coconut
from gpt import GPT, GPTConfig
from machinery.records import shortest_path_layers, tokenize
from machinery.tokenizer import symbol_tokenizer

# root 0 -> 1, 2; 1 -> 3; 2 -> 3, 4; 3 -> 5 (the target); 4 -> 6; 7 -> 8 (the negative's component)
GRAPH = dict(idx_to_symbol=list("rabcdtxyn"), edges=[[0, 1], [0, 2], [1, 3], [2, 3], [2, 4], [3, 5], [4, 6], [7, 8]],
             root=0, target=5, neg_target=8)
RECORD = dict(GRAPH, question="r a | r b | a c | b c | b d | c t | d x | y n [Q] t n [R] r", steps=["a", "c", "t"],
              answer="t")


@pytest.fixture(scope="module")
def tok():
    return symbol_tokenizer([RECORD])


def ids(tok, text):
    return tok.encode(text)


def test_shortest_path_layers():
    # every node on some shortest root->target path, by hop: both branches at hop 1, only c at hop 2
    assert shortest_path_layers(GRAPH) == [[1, 2], [3], [5]]
    assert shortest_path_layers(dict(GRAPH, target=8)) == []  # unreachable
    # a longer detour is not on a shortest path: 0 -> 1 -> 2 -> 3 and 0 -> 3
    assert shortest_path_layers(dict(idx_to_symbol=list("abcd"), edges=[[0, 1], [1, 2], [2, 3], [0, 3]], root=0,
                                     target=3)) == [[3]]


def test_tokenize_keeps_the_hops(tok):
    t = tokenize(RECORD, tok)
    assert t.hops == [[ids(tok, "a"), ids(tok, "b")], [ids(tok, "c")], [ids(tok, "t")]]
    assert tokenize({k: RECORD[k] for k in ("question", "steps", "answer")}, tok).hops is None


def test_frontier_examples_stage_by_stage(tok):
    t = tokenize(RECORD, tok)
    q, L = t.question, tok.latent_id
    seen = set()
    rng = random.Random(0)
    for _ in range(50):  # stage 0: no thought, one node of hop 1 drawn at random, the loss on it alone
        e = C.make_example(t, 0, "frontier", max_latent_stage=6, rng=rng, tok=tok)
        assert e["input_ids"][:len(q)] == q and len(e["input_ids"]) == len(q) + 1
        assert e["labels"] == [-100] * len(q) + e["input_ids"][-1:]
        seen.add(e["input_ids"][-1])
    assert seen == {ids(tok, "a")[0], ids(tok, "b")[0]}  # both hop-1 nodes on a shortest path, nothing else
    e = C.make_example(t, 2, "frontier", max_latent_stage=6, rng=rng, tok=tok)  # two thoughts, then hop 3
    assert e["input_ids"] == q + [L, L] + ids(tok, "t") and e["labels"] == [-100] * (len(q) + 2) + ids(tok, "t")
    for stage in (3, 9):  # the last stage and beyond: n = 3 hops -> 3 thoughts, then the answer
        e = C.make_example(t, stage, "frontier", max_latent_stage=6, rng=rng, tok=tok)
        assert e["input_ids"] == q + [L] * 3 + t.answer and e["labels"] == [-100] * (len(q) + 3) + t.answer
    # M caps the thoughts: with M = 2 the answer follows two thoughts
    e = C.make_example(t, 5, "frontier", max_latent_stage=2, rng=rng, tok=tok)
    assert e["input_ids"] == q + [L] * 2 + t.answer
    assert C.make_question(t, 0, "frontier", max_latent_stage=6, tok=tok) == q + [L] * 3
    assert C.prompt(t, {"mode": "frontier", "max_latent_stage": 6}, 0, tok, n_latent=2) == q + [L] * 2


def test_frontier_uniform_prob_trains_earlier_stages(tok):
    t = tokenize(RECORD, tok)
    rng = random.Random(1)
    thoughts = [C.make_example(t, 3, "frontier", max_latent_stage=6, uniform_prob=0.5, rng=rng, tok=tok)
                ["input_ids"].count(tok.latent_id) for _ in range(400)]
    counts = [thoughts.count(k) for k in range(4)]
    assert all(c > 0 for c in counts)  # every stage 0..3 is drawn
    assert counts[3] > 200  # the scheduled stage keeps about 1 - p + p/4 of the records
    with pytest.raises(ValueError, match="graph records"):
        C.make_example(tokenize({k: RECORD[k] for k in ("question", "steps", "answer")}, tok), 0, "frontier", tok=tok)


def test_bare_thoughts_in_the_papers_curriculum(tok):
    t = tokenize(RECORD, tok)
    q, L = t.question, tok.latent_id
    e = C.make_example(t, 2, "coconut", max_latent_stage=6, tok=tok, markers=False)
    assert e["input_ids"] == q + [L, L] + t.steps[2] + t.answer
    assert e["labels"] == [-100] * (len(q) + 2) + t.steps[2] + t.answer
    with_markers = C.make_example(t, 2, "coconut", max_latent_stage=6, tok=tok)
    assert with_markers["input_ids"] == q + [tok.start_id, L, L, tok.end_id] + t.steps[2] + t.answer
    assert C.make_question(t, 2, "coconut", max_latent_stage=6, tok=tok, markers=False) == q + [L, L]
    cfg = {"mode": "coconut", "max_latent_stage": 6, "markers": 0}
    assert C.prompt(t, cfg, 2, tok) == q + [L, L] and C.prompt(t, cfg, 0, tok, n_latent=3) == q + [L] * 3


def test_coconut_runs_a_frontier_batch_like_one_pass_per_thought(tok):
    # the bare thoughts of a batch mixing stages: the feedback loop equals running the thoughts one by one
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size, dropout=0.0))
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval()
    t = tokenize(RECORD, tok)
    exs = [C.make_example(t, s, "frontier", max_latent_stage=6, rng=random.Random(s), tok=tok) for s in (0, 1, 3)]
    b = C.collate(exs, pad_id=tok.pad_id, latent_id=tok.latent_id)
    with torch.no_grad():
        loss, logits = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"], with_logits=True)
        for row, e in enumerate(exs):
            cols = b["attention_mask"][row].nonzero().flatten()
            torch.testing.assert_close(logits[row, cols], naive_logits(model, e["input_ids"], tok), atol=1e-5, rtol=1e-5)


def naive_logits(model, seq, tok):
    """(T, V): test_coconut's reference (one full pass per thought, no cache) on one unpadded sequence."""
    ids = torch.tensor([seq])
    logits, _ = test_coconut.naive_logits(model, ids, torch.ones_like(ids), torch.arange(len(seq))[None],
                                          latent=tok.latent_id)
    return logits[0]


def test_thought_labels_are_cots_labels(tok):
    # --thought_labels 1: at every stage the labels are CoT's, token for token; only the input changes, each
    # removed step's token becoming a thought
    t = tokenize(RECORD, tok)
    q, L = t.question, tok.latent_id
    cot = C.make_example(t, 0, "cot", tok=tok)["labels"]
    for stage in range(5):
        e = C.make_example(t, stage, "coconut", max_latent_stage=3, tok=tok, markers=False, thought_labels=True)
        k = min(stage, 3)
        assert e["input_ids"] == q + [L] * k + [x for s in t.steps[k:] for x in s] + t.answer
        assert e["labels"] == cot
    with_markers = C.make_example(t, 2, "coconut", max_latent_stage=3, tok=tok, thought_labels=True)
    assert with_markers["labels"] == [-100] * (len(q) + 1) + t.steps[0] + t.steps[1] + [-100] + t.steps[2] + t.answer
    plain = C.make_example(t, 2, "coconut", max_latent_stage=3, tok=tok, markers=False)
    assert plain["labels"] == [-100] * (len(q) + 2) + t.steps[2] + t.answer  # the paper's: none on thoughts

    # the loss on a thought's label is read where that thought is made: the hidden state before it
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size, dropout=0.0))
    model = Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval()
    e = C.make_example(t, 3, "coconut", max_latent_stage=3, tok=tok, markers=False, thought_labels=True)
    b = C.collate([e], pad_id=tok.pad_id, latent_id=tok.latent_id)
    with torch.no_grad():
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"])
        ref = torch.nn.functional.cross_entropy(naive_logits(model, e["input_ids"], tok)[:-1], torch.tensor(e["labels"][1:]))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    assert len(t.steps) == 3 and all(len(s) == 1 for s in t.steps)  # every step a thought, every thought a label
