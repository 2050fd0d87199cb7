"""--thought_labels frontier / within (issue 30): thought k labelled with a set of nodes, scored as --set_loss says
(mass: -log of the set's softmax mass, Coconut-BFS; spread: the cross-entropy against an even spread over it). The sets by hand on test_frontier's graph, the loss against the formula on
unpadded sequences run one pass per thought, batching and padding, --losses, exact resume, and the errors."""
import json
import os

import pytest
import torch
from torch.nn import functional as F

import curriculum as C
import data.reach.prepare as reach_prepare
import data.tiny.prepare as tiny_prepare
from coconut import Coconut, set_cross_entropy
from gpt import GPT, GPTConfig
from machinery.analysis import piece_losses
from machinery.interrupt import SIGNAL_HOOK
from machinery.records import rings_from_root, tokenize
from machinery.tokenizer import symbol_tokenizer
from test_frontier import GRAPH, RECORD, naive_logits
from test_train import TINY, assert_same_weights, one_error_line, run_cli, weights

# GRAPH: r -> a, b; a -> c; b -> c, d; c -> t; d -> x; y -> n. From the root r: [r], [a, b], [c, d], [t, x].
# RECORD's steps are the gold chain a, c, t.


@pytest.fixture(scope="module")
def tok():
    return symbol_tokenizer([RECORD])


def names(tok, ids):
    return {tok.decode([i]) for i in ids}


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=tok.vocab_size, dropout=0.0))
    return Coconut(gpt, tok.latent_id, tok.start_id, tok.end_id, tok.eos_id).eval()


def test_rings_from_root():
    assert rings_from_root(GRAPH) == [[0], [1, 2], [3, 4], [5, 6]]
    # shortest distances: a node reached by a long and a short road sits in the short one's ring
    assert rings_from_root(dict(idx_to_symbol=list("abcd"), edges=[[0, 1], [1, 2], [2, 3], [0, 3]], root=0)) == \
        [[0], [1, 3], [2]]


@pytest.mark.parametrize("markers", [False, True])
def test_the_sets_stage_by_stage(tok, markers):
    t = tokenize(RECORD, tok)
    q, first = t.question, len(t.question) + int(markers)
    frontier = [{"a", "b"}, {"c", "d"}, {"t", "x"}]
    within = [{"r", "a", "b"}, {"r", "a", "b", "c", "d"}, {"r", "a", "b", "c", "d", "t", "x"}]
    for stage in range(5):
        gold = C.make_example(t, stage, "coconut", max_latent_stage=3, tok=tok, markers=markers, thought_labels=1)
        k = min(stage, 3)
        for kind, want in (("frontier", frontier), ("within", within)):
            e = C.make_example(t, stage, "coconut", max_latent_stage=3, tok=tok, markers=markers, thought_labels=kind)
            assert e["input_ids"] == gold["input_ids"]  # the same sequence; only the thoughts' labels differ
            assert sorted(e["label_sets"]) == [first + j for j in range(k)]
            assert [names(tok, e["label_sets"][first + j]) for j in range(k)] == want[:k]
            # no single label on a thought: the words after them (stage < 3) and the answer keep theirs
            plain = C.make_example(t, stage, "coconut", max_latent_stage=3, tok=tok, markers=markers)
            assert e["labels"] == plain["labels"]
    # the other modes that label thoughts; none for the modes without thoughts
    for mode in ("pause_as_thought", "no_curriculum"):
        e = C.make_example(t, 2, mode, max_latent_stage=3, tok=tok, markers=False, thought_labels="frontier")
        assert names(tok, e["label_sets"][len(q) + 1]) == {"c", "d"}
    for mode in ("cot", "nocot"):
        assert "label_sets" not in C.make_example(t, 2, mode, max_latent_stage=3, tok=tok, thought_labels="frontier")
    # the thoughts past the steps (M = 5 thoughts, 3 steps): the options the search has reached, the target
    for stage in (5, 6):
        for kind in ("frontier", "within"):
            e = C.make_example(t, stage, "coconut", max_latent_stage=5, tok=tok, markers=False, thought_labels=kind)
            assert sorted(e["label_sets"]) == [len(q) + j for j in range(5)]
            assert [names(tok, e["label_sets"][len(q) + j]) for j in (2, 3, 4)] == \
                [(frontier if kind == "frontier" else within)[2], {"t"}, {"t"}]


def hand_loss(model, tok, examples, spread=False):
    """The formula, written out: every labelled column j of every unpadded sequence, run one pass per thought
    (test_coconut's reference); -log softmax(logits[j-1])[label], or -log sum over the set (spread: the mean
    of -log p over the set); the mean of all."""
    terms = []
    for e in examples:
        p = F.softmax(naive_logits(model, e["input_ids"], tok).double(), dim=-1)  # (T, V)
        for j in range(1, len(e["input_ids"])):
            if e["labels"][j] != -100:
                terms.append(-torch.log(p[j - 1, e["labels"][j]]))
            if j in e.get("label_sets", {}):
                members = e["label_sets"][j]
                terms.append(-sum(torch.log(p[j - 1, v]) for v in members) / len(members) if spread else
                             -torch.log(sum(p[j - 1, v] for v in members)))
    return torch.stack(terms).mean(), len(terms)


@pytest.mark.parametrize("kind", ["frontier", "within"])
@pytest.mark.parametrize("set_loss", ["mass", "spread"])
def test_the_loss_is_minus_log_of_the_sets_mass(tok, kind, set_loss):
    model = tiny_model(tok)
    t = tokenize(RECORD, tok)
    # stages 1, 3 and 0: different numbers of thoughts and lengths, so collate pads left and right
    exs = [C.make_example(t, s, "coconut", max_latent_stage=3, tok=tok, markers=False, thought_labels=kind)
           for s in (1, 3, 0)]
    b = C.collate(exs, pad_id=tok.pad_id, latent_id=tok.latent_id)
    assert b["label_sets"].shape[:2] == b["input_ids"].shape and (b["label_sets"] >= 0).any(-1).sum() == 1 + 3
    spread = set_loss == "spread"
    with torch.no_grad():
        loss, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"],
                        label_sets=b["label_sets"], spread=spread)
        ref, _ = hand_loss(model, tok, exs, spread)
        torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
        # batching: the batch's loss is the mean of every sequence's labels, each sequence alone weighted by them
        alone = []
        for e in exs:
            one = C.collate([e], pad_id=tok.pad_id, latent_id=tok.latent_id)
            x, _ = model(one["input_ids"], one["attention_mask"], one["labels"], one["position_ids"],
                         label_sets=one.get("label_sets"), spread=spread)
            alone.append((x, hand_loss(model, tok, [e])[1]))
        torch.testing.assert_close(loss, sum(x * n for x, n in alone) / sum(n for _, n in alone), atol=1e-6, rtol=1e-6)
        # padding the sets: more -1 columns change nothing, bit for bit
        wider = F.pad(b["label_sets"], (0, 4), value=-1)
        again, _ = model(b["input_ids"], b["attention_mask"], b["labels"], b["position_ids"], label_sets=wider,
                         spread=spread)
        assert torch.equal(again, loss)


def test_one_member_satisfies_the_mass_but_not_the_spread():
    # a set of three: all the mass on one member costs nothing under -log(mass); only an even spread minimises
    # the spread loss, at log 3
    sets, targets = torch.tensor([[0, 1, 2]]), torch.tensor([-100])
    one, even = torch.tensor([[30.0, 0, 0, 0]]), torch.tensor([[30.0, 30, 30, 0]])
    assert set_cross_entropy(one, targets, sets) < 1e-9 and set_cross_entropy(even, targets, sets) < 1e-9
    assert set_cross_entropy(one, targets, sets, spread=True) > 19
    torch.testing.assert_close(set_cross_entropy(even, targets, sets, spread=True), torch.tensor(3.0).log())


def test_a_set_of_one_is_the_ordinary_label(tok):
    # on a chain (one road from each node) the frontier is the gold node: the loss is --thought_labels 1's
    chain = dict(idx_to_symbol=list("racty"), edges=[[0, 1], [1, 2], [2, 3], [4, 3]], root=0, target=3,
                 neg_target=4, question="r a | a c | c t | y t [Q] t y [R] r", steps=["a", "c", "t"], answer="t")
    ctok = symbol_tokenizer([chain])
    model = tiny_model(ctok)
    t = tokenize(chain, ctok)
    b1, bf = (C.collate([C.make_example(t, s, "coconut", max_latent_stage=3, tok=ctok, markers=False,
                                        thought_labels=kind) for s in (2, 3)],
                        pad_id=ctok.pad_id, latent_id=ctok.latent_id) for kind in (1, "frontier"))
    assert "label_sets" not in b1 and torch.equal(b1["input_ids"], bf["input_ids"])
    with torch.no_grad():
        gold, _ = model(b1["input_ids"], b1["attention_mask"], b1["labels"], b1["position_ids"])
        sets, _ = model(bf["input_ids"], bf["attention_mask"], bf["labels"], bf["position_ids"],
                        label_sets=bf["label_sets"])
    torch.testing.assert_close(sets, gold, atol=1e-6, rtol=1e-6)
    # and set_cross_entropy on one-token labels is F.cross_entropy
    logits, targets = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    torch.testing.assert_close(set_cross_entropy(logits, targets, torch.full((5, 2), -1)),
                               F.cross_entropy(logits, targets))


@pytest.mark.parametrize("set_loss", ["mass", "spread"])
def test_losses_by_piece_add_up_to_the_loss(tok, set_loss):
    model = tiny_model(tok)
    t = tokenize(RECORD, tok)
    cfg = dict(mode="coconut", c_thought=1, max_latent_stage=3, markers=0, thought_labels="frontier", set_loss=set_loss)
    rows = piece_losses(model, tok, [t, t], cfg, stage=3)
    assert [r[0] for r in rows] == ["thought 1", "thought 2", "thought 3", "###", "answer", "end"]
    e = C.make_example(t, 3, "coconut", max_latent_stage=3, tok=tok, markers=False, thought_labels="frontier")
    ref, n = hand_loss(model, tok, [e], set_loss == "spread")
    assert sum(r[3] for r in rows) == 2 * n
    torch.testing.assert_close(torch.tensor(sum(r[1] * r[3] for r in rows) / (2 * n), dtype=torch.float64), ref,
                               atol=1e-5, rtol=1e-5)
    p = F.softmax(naive_logits(model, e["input_ids"], tok), dim=-1)
    j = len(t.question)  # thought 1's set {a, b}: a hit when the argmax is either
    hit = int(p[j - 1].argmax()) in e["label_sets"][j]
    assert rows[0][2] == float(hit)


def test_data_without_a_graph_is_one_line(tok, tmp_path, capsys):
    bare = tokenize({k: RECORD[k] for k in ("question", "steps", "answer")}, tok)
    with pytest.raises(ValueError, match="needs graph records"):
        C.make_example(bare, 2, "coconut", tok=tok, thought_labels="frontier")
    C.make_example(bare, 2, "cot", tok=tok, thought_labels="frontier")  # no thoughts, no sets: no error
    d = tmp_path / "data"
    assert tiny_prepare.main(["--out_dir", str(d / "tiny"), "--n_train", "8", "--n_valid", "2", "--n_test", "2",
                              "--steps", "2", "--width", "4"]) == 0
    for split in ("train", "valid"):  # tiny's records without their graph fields
        with open(d / "tiny" / f"{split}.json") as f:
            records = [{k: r[k] for k in ("question", "steps", "answer")} for r in json.load(f)]
        with open(d / "tiny" / f"{split}.json", "w") as f:
            json.dump(records, f)
    r = run_cli(TINY + ["--data_dir", str(d), "--out_dir", str(tmp_path / "run"), "--thought_labels", "frontier"])
    one_error_line(r, 1, "--thought_labels frontier needs graph records")
    # the flags' own errors, from the parser in-process (a subprocess each would cost the suite seconds)
    import train
    for flag, value, words in (("--thought_labels", "2", ["expected 0, 1, frontier, within"]),
                               ("--set_loss", "even", ["mass", "spread"])):
        with pytest.raises(SystemExit) as stop:
            train.parse_args(TINY + ["--data_dir", str(d), flag, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and all(w in err[-1] for w in [flag] + words), err


REACH = ["--dataset", "reach", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "4",
         "--stage_epochs", "1", "--epochs", "3", "--threads", "1", "--log_every", "0", "--save_every", "4"]


def test_a_frontier_run_resumes_exactly(tmp_path):
    d = tmp_path / "data"
    assert reach_prepare.main(["--out_dir", str(d / "reach"), "--n_train", "40", "--n_valid", "4",
                               "--n_test", "2"]) == 0
    common = REACH + ["--data_dir", str(d), "--thought_labels", "frontier"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_cli(common + ["--out_dir", a])
    assert r.returncode == 0, r.stderr
    # the first lines say what the thoughts learn from, and why the loss stays above ln 3 a thought
    assert "thought k's label: the frontier" in r.stdout and "--set_loss spread" in r.stdout, r.stdout[:2000]
    # killed in stage 1's epoch (step 13: saved at 12), resumed, interrupted in stage 2 (step 25), resumed
    r = run_cli(common + ["--out_dir", b], env={SIGNAL_HOOK: "13:KILL,25:INT"})
    assert r.returncode == -9, r.stderr
    r = run_cli(["--out_dir", b, "--resume"], env={SIGNAL_HOOK: "25:INT"})
    assert r.returncode == 130, (r.stdout, r.stderr)
    r = run_cli(["--out_dir", b, "--resume"])
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(os.path.join(a, "ckpt.pt")), weights(os.path.join(b, "ckpt.pt")))
    ca = torch.load(os.path.join(a, "ckpt.pt"), weights_only=False)
    assert ca["config"]["thought_labels"] == "frontier" and ca["step"] == 30
    assert ca["config"]["set_loss"] == "spread"  # the reach preset's: the demo's Coconut
    # the set labels did train the thoughts: the run differs from one with the gold labels
    r = run_cli(REACH + ["--data_dir", str(d), "--thought_labels", "1", "--out_dir", str(tmp_path / "gold")])
    assert r.returncode == 0, r.stderr
    gold = weights(str(tmp_path / "gold" / "ckpt.pt"))
    assert any(not torch.equal(gold[k], v) for k, v in weights(os.path.join(a, "ckpt.pt")).items())
