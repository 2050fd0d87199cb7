"""icot.py's iCoT rules (Deng et al. 2024) against the authors' src/train.py, re-derived here. Offline."""
import math
import os

import pytest
import tiktoken
import torch

from machinery.icot import (ICOT, ICOT_GSM8K, all_chains_removed, make_icot_example, removal_distribution, removal_offsets,
                  removal_schedule)
from machinery.records import Tokenized, tokenize
from machinery.tokenizer import gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM_VALID = os.path.join(ROOT, "..", "shared", "data", "gsm8k_aug_valid.txt")
EOS = 50256
INF = math.inf

# The hand-made record of test_curriculum.py, as GPT-2 ids.
Q = [3792, 4186, 257, 3797, 30, 198]             # "Is Tom a cat?\n"
S1 = [13787, 318, 257, 3290, 13, 198]            # "Tom is a dog.\n"
S2 = [6109, 3290, 318, 257, 3797, 13, 198]       # "Every dog is a cat.\n"
A = [21017, 4186, 318, 257, 3797, 13, EOS]       # "### Tom is a cat." + eos
R = Tokenized(Q, [S1, S2], A)


def gsm_record(line):
    # as in test_curriculum.py: question before "||"; steps before "##", split on spaces; answer after the last "##"
    question, rest = line.split("||")[0], line.split("||")[1]
    return {"question": question, "steps": rest.split("##")[0].strip().split(" "),
            "answer": line.split("##")[-1].strip()}


# ----------------------------------------------------------------------------- the schedule

def their_loop(epochs, steps_per_epoch, remove_per_epoch, beyond, start):
    """Their train.py (l. 234-270, pretrain_epochs 0) run step by step: (count the step trains with, grew)."""
    scheduled = start
    per_token = int(round(steps_per_epoch / remove_per_epoch))
    counter = 0
    out = []
    for epoch in range(epochs):
        if scheduled < float("inf"):
            scheduled = int(round(scheduled))
        if scheduled >= beyond:
            scheduled = float("inf")
        row = []
        for _batch in range(steps_per_epoch):
            prev = scheduled
            if counter == per_token or per_token == 0:
                scheduled += 1
                counter = 0
            counter += 1
            grew = scheduled > prev  # their optimizer reset fires here (with --reset_optimizer)
            if scheduled >= beyond:
                scheduled = float("inf")
            row.append((scheduled, grew))
        out.append(row)
    return out


@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7, 8, 10, 100, 1234])
def test_schedule_equals_their_loop(steps_per_epoch):
    epochs = 6 if steps_per_epoch > 100 else 12
    n = 0
    for remove_per_epoch in (8, 3, 0.5, 4, 2.5, 16, 1000):
        for beyond in (INF, 39, 5):
            for start in (0, 2, 40):
                got = removal_schedule(epochs, steps_per_epoch, remove_per_epoch, beyond, start)
                want = their_loop(epochs, steps_per_epoch, remove_per_epoch, beyond, start)
                assert got == want, (steps_per_epoch, remove_per_epoch, beyond, start)
                assert all(isinstance(c, int) for row in got for c, _ in row if c != INF)
                n += any(g for row in got for _, g in row)
    assert n > 0  # some of these schedules do grow


def test_schedule_by_hand():
    # 10 steps, 4 per epoch: every = int(round(2.5)) = 2 (half to even); the first growth at step 2
    s = removal_schedule(2, 10, 4)
    assert [c for c, _ in s[0]] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [g for _, g in s[0]] == [False, False] + [True, False] * 4
    assert [c for c, _ in s[1]] == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]  # the counter runs across the epoch boundary
    # 7 steps, 3 per epoch: every = 2; 7 is odd, so epoch 1 grows at its odd steps
    assert [c for c, _ in removal_schedule(2, 7, 3)[1]] == [3, 4, 4, 5, 5, 6, 6]
    # more removals than steps (every = 0): the count grows at every step, the first one included
    assert removal_schedule(1, 3, 8, remove_start_from=2) == [[(3, True), (4, True), (5, True)]]
    # the step that reaches remove_all_when_remove_beyond trains with inf, and it grew; then no more growth
    assert removal_schedule(1, 5, 8, 3) == [[(0, False), (1, True), (2, True), (INF, True), (INF, False)]]
    # starting at or beyond it: inf from the first step, never a reset
    assert removal_schedule(1, 2, 8, 39, 39) == [[(INF, False), (INF, False)]]


def test_schedule_gsm8k_scale():
    # their GSM8k data: 385,620 records, batch 32 -> 12,051 steps/epoch; every = round(12051/8) = 1506
    spe, every = 12051, 1506
    s = removal_schedule(6, spe, **{k: ICOT_GSM8K[k] for k in
                                      ("remove_per_epoch", "remove_all_when_remove_beyond", "remove_start_from")})
    flat = [x for row in s for x in row]
    assert len(s) == 6 and len(flat) == 6 * spe
    assert flat[every - 1] == (0, False) and flat[every] == (1, True) and flat[2 * every] == (2, True)
    t = 39 * every  # count 39 reached: inf from here
    assert flat[t - 1] == (38, False) and flat[t] == (INF, True)
    assert s[t // spe][t % spe] == (INF, True) and (t // spe, t % spe) == (4, 10530)
    assert all(x == (INF, False) for x in flat[t + 1:])
    assert sum(g for _, g in flat) == 39  # 39 optimizer resets in all
    # a resumed run recomputes the same schedule; a longer run starts with the shorter one
    assert removal_schedule(3, spe, 8, 39) == s[:3]


def test_schedule_rejects_no_removal():
    with pytest.raises(ValueError):
        removal_schedule(1, 10, 0)


# ----------------------------------------------------------------------------- the removal offsets

def test_distribution_closed_form():
    for lam in (4, 1, 0.5, 0.17, 10, 0.01):
        p = removal_distribution(lam)
        assert p.shape == (100,) and p.dtype == torch.float32 and (p >= 0).all()
        assert abs(p.sum().item() - 1) < 1e-6
        q = 1 - math.exp(-lam)
        want = [q * math.exp(-lam * k) for k in range(99)] + [math.exp(-lam * 99)]  # the tail in the last bin
        assert torch.allclose(p.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    p = removal_distribution(4)
    assert abs(p[0].item() - (1 - math.exp(-4))) < 1e-7 and abs(p[1].item() - 0.017980) < 1e-6
    # bit for bit what their float32 formula gives (so a generator draws the same offsets)
    pos = torch.arange(100)
    theirs = (1 - math.exp(-4)) * pos.mul(-4).exp()
    theirs[-1] = theirs[-1] + (1 - theirs.sum())
    assert torch.equal(p, theirs)
    assert removal_distribution(2, truncate=5).shape == (5,)
    with pytest.raises(ValueError):
        removal_distribution(0)


def test_distribution_inf_is_point_mass():
    p = removal_distribution(INF)
    assert p[0].item() == 1 and p[1:].sum().item() == 0 and p.shape == (100,)


def test_offsets_equal_multinomial_on_the_same_seed():
    p = removal_distribution(0.5)
    got = removal_offsets(64, p, torch.Generator().manual_seed(7))
    want = torch.multinomial(p, 64, replacement=True, generator=torch.Generator().manual_seed(7)).tolist()
    assert got == want and all(isinstance(x, int) for x in got) and len(set(got)) > 1
    assert removal_offsets(64, p, torch.Generator().manual_seed(8)) != got
    # lambda 4: P(0) = 1 - e^-4 = 0.9817; the mean is e^-4 / (1 - e^-4) = 0.0187
    big = removal_offsets(100000, removal_distribution(4), torch.Generator().manual_seed(0))
    assert abs(big.count(0) / len(big) - (1 - math.exp(-4))) < 0.003
    assert abs(sum(big) / len(big) - math.exp(-4) / (1 - math.exp(-4))) < 0.003
    assert removal_offsets(5, removal_distribution(INF), torch.Generator().manual_seed(0)) == [0] * 5
    assert removal_offsets(0, p, torch.Generator()) == []


# ----------------------------------------------------------------------------- the examples

def their_cut(q, chain, a, n):
    """Their removal (train.py l. 289-308) on their layout  q <eos> chain <eos> a ; returns what is left of the chain."""
    ids = torch.tensor(q + [EOS] + chain + [EOS] + a)
    where = ids.eq(EOS).nonzero().view(-1).tolist()
    first, second = where[0], where[1]
    start = first + 1
    stop = min(first + 1 + n, second)
    left = torch.cat((ids[:start], ids[stop:])).tolist()
    return left[len(q) + 1:len(left) - len(a) - 1]


def test_make_icot_example_handmade():
    chain = S1 + S2  # 13 tokens
    for n, kept in [(0, chain), (1, chain[1:]), (3, S1[3:] + S2), (6, S2), (8, S2[2:]), (12, S2[-1:]),
                    (13, []), (14, []), (100, []), (INF, []), (float("inf"), [])]:
        ex = make_icot_example(R, n)
        assert ex["input_ids"] == Q + kept + A, n
        assert ex["labels"] == [-100] * len(Q) + kept + A, n
        assert kept == their_cut(Q, chain, A[:-1], n if n != INF else 10 ** 9)
    assert make_icot_example(R, torch.tensor(3)) == make_icot_example(R, 3)  # a drawn count is fine
    with pytest.raises(ValueError):
        make_icot_example(R, -1)
    # a record without steps: only the question and the answer, at any count
    assert make_icot_example(Tokenized(Q, [], A), 5)["input_ids"] == Q + A


@pytest.mark.gpt2_bpe
def test_make_icot_example_gsm8k():
    if not os.path.exists(GSM_VALID):
        pytest.skip(f"gsm8k_aug_valid.txt not found at {GSM_VALID}")
    with open(GSM_VALID, encoding="utf-8") as f:
        recs = [gsm_record(line.strip()) for line in f if line.strip()]
    assert len(recs) == 500
    enc = tiktoken.get_encoding("gpt2")
    tok = gpt2_tokenizer()
    for r in recs:
        t = tokenize(r, tok)
        # the same record encoded in one piece: the chain is what lies between question and answer
        whole = enc.encode_ordinary(r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"]) + [EOS]
        nq, na = len(t.question), len(t.answer)
        chain = whole[nq:len(whole) - na]
        L, first = len(chain), len(t.steps[0])
        assert L == sum(len(s) for s in t.steps) and L > 0
        for n in sorted({0, 1, first // 2, first - 1, first, first + 1, L - 1, L, L + 3}) + [INF]:
            ex = make_icot_example(t, n, tok)
            kept = chain[n:] if n < L else []
            assert ex["input_ids"] == whole[:nq] + kept + whole[len(whole) - na:]
            assert ex["labels"] == [-100] * nq + ex["input_ids"][nq:]
            assert kept == their_cut(t.question, chain, t.answer, n if n != INF else 10 ** 9)
        assert make_icot_example(t, 0)["input_ids"] == whole  # nothing removed: plain CoT


def test_all_chains_removed():
    short = Tokenized(Q, [S1], A)  # 6 chain tokens; R has 13
    assert all_chains_removed([R, short], [13, 6])
    assert all_chains_removed([R, short], [INF, 100])
    assert not all_chains_removed([R, short], [12, 6])
    assert not all_chains_removed([R, short], [13, 5])


def test_mode_and_recipe_constants():
    assert ICOT == "icot"
    assert ICOT_GSM8K["remove_per_epoch"] == 8 and ICOT_GSM8K["removal_smoothing_lambda"] == 4
    assert ICOT_GSM8K["remove_all_when_remove_beyond"] == 39 and ICOT_GSM8K["reset_optimizer"] is True
