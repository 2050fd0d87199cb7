"""tokenizer.py, records.py and curriculum.py: the tokenizers, the records, the per-stage shaping of every mode, and batching. Offline."""
import io
import json
import os
import random

import pytest
import tiktoken
import torch

import curriculum as C
import data.prosqa.prepare as prosqa_data
from machinery.records import Tokenized, check_length, load_records, tokenize
from machinery.tokenizer import GPT2_SPLIT, Tokenizer, compact_tokenizer, gpt2_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSQA_VALID = os.path.join(ROOT, "..", "shared", "data", "prosqa_valid.json")
GSM_VALID = os.path.join(ROOT, "..", "shared", "data", "gsm8k_aug_valid.txt")

S, E, L, EOS = 50257, 50258, 50259, 50256  # <|start-latent|>, <|end-latent|>, <|latent|>, <|endoftext|>
X = -100

# A hand-made record and its GPT-2 ids, piece by piece (read off tiktoken's gpt2 encoding once).
R = {"question": "Is Tom a cat?", "steps": ["Tom is a dog.", "Every dog is a cat."], "answer": "Tom is a cat."}
Q = [3792, 4186, 257, 3797, 30, 198]             # "Is Tom a cat?\n"
S1 = [13787, 318, 257, 3290, 13, 198]            # "Tom is a dog.\n"
S2 = [6109, 3290, 318, 257, 3797, 13, 198]       # "Every dog is a cat.\n"
A = [21017, 4186, 318, 257, 3797, 13, EOS]       # "### Tom is a cat." + eos


def needs(path):
    if not os.path.exists(path):
        pytest.skip(f"{os.path.basename(path)} not found at {path}")
    return path


@pytest.fixture(scope="module")
def prosqa():
    recs = load_records(needs(PROSQA_VALID))
    return recs, [tokenize(r) for r in recs]


def gsm_record(line):
    # REFERENCE.md: question before "||"; steps between "||" and "##", split on spaces; answer after the last "##"
    question, rest = line.split("||")[0], line.split("||")[1]
    return {"question": question, "steps": rest.split("##")[0].strip().split(" "),
            "answer": line.split("##")[-1].strip()}


# ----------------------------------------------------------------------------- tokenizer

@pytest.mark.gpt2_bpe
def test_gpt2_tokenizer_ids_and_decoding():
    tok = gpt2_tokenizer()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.start_id, tok.end_id, tok.latent_id) == \
        (50260, EOS, EOS, S, E, L)
    # special-looking text is ordinary text: no error, no special id
    ids = tok.encode("a <|endoftext|> <|latent|>")
    assert not set(ids) & {EOS, S, E, L} and tok.decode(ids) == "a <|endoftext|> <|latent|>"
    assert tok.decode(Q + [S, L, L, E] + A) == "Is Tom a cat?\n### Tom is a cat."  # specials skipped
    assert tok.decode([S, L, E, EOS], skip_special=False) == "<|start-latent|><|latent|><|end-latent|><|endoftext|>"
    assert Tokenizer.from_dict(tok.to_dict()) is tok
    assert GPT2_SPLIT == tiktoken.get_encoding("gpt2")._pat_str


@pytest.mark.gpt2_bpe
def test_tokenize_handmade():
    q, steps, a, hops, from_root = tokenize(R)
    assert hops is None and from_root is None  # no graph fields
    assert (q, steps, a) == (Q, [S1, S2], A)
    assert tokenize(R) == Tokenized(Q, [S1, S2], A)


@pytest.mark.gpt2_bpe
def test_tokenize_equals_whole_text_on_prosqa(prosqa):
    # the official code asserts this on its first record; here on every one
    recs, toks = prosqa
    enc = tiktoken.get_encoding("gpt2")
    for r, (q, steps, a, *_) in zip(recs, toks):
        whole = r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"]
        assert q + [t for s in steps for t in s] + a == enc.encode_ordinary(whole) + [EOS]


def test_compact_tokenizer_roundtrip_and_checkpoint():
    recs = prosqa_data.generate(300, random.Random(0))  # ProsQA-format records made here: no file, no BPE needed
    tok = compact_tokenizer(recs)
    n = tok.vocab_size
    assert n < 1000  # 256 bytes + a few hundred words, against GPT-2's 50k
    assert (tok.eos_id, tok.start_id, tok.end_id, tok.latent_id) == (n - 4, n - 3, n - 2, n - 1)
    assert tok.pad_id == tok.eos_id
    for r in recs:
        for text in [r["question"] + "\n", "### " + r["answer"]] + [s + "\n" for s in r["steps"]]:
            ids = tok.encode(text)
            assert tok.decode(ids) == text and max(ids) < tok.eos_id
    every = next(s for s in recs[0]["steps"] if s.startswith("Every "))  # "Every lempus is a wumpus."
    assert len(tok.encode(" " + every)) <= 6  # whole words are single tokens: " Every", " lempus", ..., "."
    unseen = "Zoë's café: 日本語 <|endoftext|> <|latent|>\n\n\t  42,000 ☃\n"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert not set(tok.encode(unseen)) & {tok.eos_id, tok.start_id, tok.end_id, tok.latent_id}
    # a checkpoint holds it as plain data and gives it back exactly
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.to_dict()}, buf)
    buf.seek(0)
    back = Tokenizer.from_dict(torch.load(buf, weights_only=True)["tokenizer"])
    assert back.vocab_size == n and back.latent_id == tok.latent_id
    for r in recs[:50]:
        assert tokenize(r, back) == tokenize(r, tok)
    assert back.encode(unseen) == tok.encode(unseen)
    # shaping uses the tokenizer's own ids
    t = tokenize(recs[0], tok)
    ex = C.make_example(t, 1, tok=tok)
    assert ex["input_ids"][len(t.question):len(t.question) + 3] == [tok.start_id, tok.latent_id, tok.end_id]
    # min_count keeps only the pieces seen that often (as latin-1 strings in the plain dict)
    words = compact_tokenizer([{"question": "zork zork zork blip", "steps": [], "answer": "a"}], min_count=2).to_dict()["words"]
    assert " zork" in words and " blip" not in words and "zork" not in words
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        Tokenizer.from_dict({"kind": "sentencepiece"})


# ----------------------------------------------------------------------------- records

def _write(tmp_path, content, name="data.json"):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(p)


GOOD = {"question": "q?", "steps": ["a", "b"], "answer": "x"}


@pytest.mark.parametrize("content, needles", [
    ('[{"question": "q",', ["not valid JSON", "line 1 column"]),
    ('[{"question": "a\tb\n\n', ["not valid JSON: Invalid control character at line 1 column"]),  # one "at"
    ("", ["the file is empty", "JSON list"]),
    (" \n\n", ["the file is empty"]),
    ({"question": "q"}, ["expected a JSON list", "dict"]),
    ([GOOD, ["q", [], "a"]], ["record 1", "expected an object"]),
    ([GOOD, {"steps": [], "answer": "a"}], ["record 1", "'question'", "missing"]),
    ([{"question": "q", "answer": "a"}], ["record 0", "'steps'", "missing"]),
    ([GOOD, GOOD, {"question": "q", "steps": []}], ["record 2", "'answer'", "missing"]),
    ([{"question": 3, "steps": [], "answer": "a"}], ["record 0", "'question'", "string", "int"]),
    ([{"question": "q", "steps": "a b", "answer": "a"}], ["record 0", "'steps'", "list of strings", "str"]),
    ([{"question": "q", "steps": ["a", 7], "answer": "a"}], ["record 0", "'steps' item 1", "int"]),
    ([{"question": "q", "steps": [], "answer": 300}], ["record 0", "'answer'", "string", "int"]),
    ([GOOD, {"question": "  ", "steps": [], "answer": "a"}], ["record 1", "'question'", "empty"]),
])
def test_load_records_errors(tmp_path, content, needles):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError) as e:
        load_records(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg
    for needle in needles:
        assert needle in msg, msg


def test_load_records_missing_file_and_good_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_records(str(tmp_path / "nope.json"))
    assert load_records(_write(tmp_path, [GOOD, {**GOOD, "extra": 1}])) == [GOOD, {**GOOD, "extra": 1}]
    # questions that only need an answer (sample.py --file): steps may be left out there
    path = _write(tmp_path, [{"question": "q?", "answer": "x"}, GOOD])
    with pytest.raises(ValueError, match="record 0: missing field 'steps'"):
        load_records(path)
    assert load_records(path, steps_optional=True) == [{"question": "q?", "steps": [], "answer": "x"}, GOOD]


def test_json_lines(tmp_path):
    # issue 29: JSON Lines are read (a .jsonl file, or a .json file holding one record per line), and a file
    # that is neither says what is expected in one line; a split may be <split>.jsonl
    from machinery.records import load_split
    other = {**GOOD, "question": "r?"}
    lines = json.dumps(GOOD) + "\n\n" + json.dumps(other) + "\n"
    assert load_records(_write(tmp_path, lines, "my.jsonl")) == [GOOD, other]
    assert load_records(_write(tmp_path, lines, "my.json")) == [GOOD, other]
    assert load_records(_write(tmp_path, json.dumps(GOOD) + "\n", "one.jsonl")) == [GOOD]
    for name in ("bad.jsonl", "bad.json"):
        with pytest.raises(ValueError) as e:
            load_records(_write(tmp_path, json.dumps(GOOD) + "\n{'question': 'q'}\n", name))
        msg = str(e.value)
        assert "line 2 column 2" in msg and "JSON Lines" in msg and 'a JSON list of {"question"' in msg, msg
        assert len(msg.splitlines()) == 1
    (tmp_path / "mine").mkdir()
    _write(tmp_path / "mine", lines, "train.jsonl")
    assert load_split(str(tmp_path), "mine", "train") == [GOOD, other]


# ----------------------------------------------------------------------------- the modes, by hand

def ex(ids, labels):
    return {"input_ids": ids, "labels": labels}


@pytest.mark.gpt2_bpe
def test_coconut_stages_handmade():
    m = C.make_example
    t = tokenize(R)
    rest = S1 + S2 + A
    assert m(t, 0) == ex(Q + [S, E] + rest, [X] * 8 + rest)
    assert m(t, 1) == ex(Q + [S, L, E] + S2 + A, [X] * 9 + S2 + A)
    assert m(t, 1, c_thought=2) == ex(Q + [S, L, L, E] + S2 + A, [X] * 10 + S2 + A)
    assert m(t, 2, c_thought=2) == ex(Q + [S, L, L, L, L, E] + A, [X] * 12 + A)
    # stage 3 <= M: still 3 thoughts although the record has only 2 steps
    assert m(t, 3) == ex(Q + [S, L, L, L, E] + A, [X] * 11 + A)
    # past M: all steps gone; M thoughts, or min(#steps, M) without padding
    assert m(t, 7) == ex(Q + [S] + [L] * 6 + [E] + A, [X] * 14 + A)
    assert m(t, 7, pad_latent_to_max=False) == ex(Q + [S, L, L, E] + A, [X] * 10 + A)
    assert m(t, 2, max_latent_stage=1) == ex(Q + [S, L, E] + A, [X] * 9 + A)
    assert m(t, 2, c_thought=3, max_latent_stage=1, pad_latent_to_max=False) == ex(Q + [S, L, L, L, E] + A, [X] * 11 + A)
    # stage <= M ignores pad_latent_to_max
    assert m(t, 1, pad_latent_to_max=False) == m(t, 1)


@pytest.mark.gpt2_bpe
def test_baseline_modes_handmade():
    m = C.make_example
    t = tokenize(R)
    for stage in (0, 1, 7):
        assert m(t, stage, "cot") == ex(Q + S1 + S2 + A, [X] * 6 + S1 + S2 + A)
        assert m(t, stage, "nocot") == ex(Q + A, [X] * 6 + A)
        assert m(t, stage, "pause_as_thought", c_thought=2) == m(t, stage, "coconut", c_thought=2)
        assert m(t, stage, "no_curriculum") == ex(Q + [S] + [L] * 6 + [E] + A, [X] * 14 + A)
        assert m(t, stage, "pause") == ex(Q + [L] * 6 + A, [X] * 12 + A)
        assert m(t, stage, "pause", c_thought=2, max_latent_stage=3) == ex(Q + [L] * 6 + A, [X] * 12 + A)
    assert m(t, 0, "no_thought") == ex(Q + S1 + S2 + A, [X] * 6 + S1 + S2 + A)
    assert m(t, 1, "no_thought", c_thought=2) == ex(Q + S2 + A, [X] * 6 + S2 + A)
    assert m(t, 7, "no_thought") == ex(Q + A, [X] * 6 + A)
    assert m(t, 2, "no_curriculum", max_latent_stage=3, pad_latent_to_max=False) == ex(Q + [S, L, L, E] + A, [X] * 10 + A)
    with pytest.raises(ValueError, match="unknown mode 'magic'"):
        m(t, 0, "magic")


@pytest.mark.gpt2_bpe
def test_make_question_handmade():
    mq = C.make_question
    t = tokenize(R)
    assert mq(t, 0) == Q + [S, E]
    assert mq(t, 2, c_thought=2) == Q + [S, L, L, L, L, E]
    assert mq(t, 5) == Q + [S] + [L] * 5 + [E]
    assert mq(t, 5, pad_latent_to_max=False) == Q + [S, L, L, E]       # k = min(M, #steps, stage)
    assert mq(t, 9) == Q + [S] + [L] * 6 + [E]                         # k = min(M, stage)
    assert mq(t, 1, "pause_as_thought") == Q + [S, L, E]
    assert mq(t, 0, "no_curriculum") == Q + [S] + [L] * 6 + [E]
    for mode in ("cot", "nocot", "no_thought"):
        assert mq(t, 3, mode) == Q
    assert mq(t, 0, "pause", c_thought=2, max_latent_stage=3) == Q + [L] * 6


def test_stage_for_epoch():
    f = C.stage_for_epoch
    assert [f(e, 5, "coconut") for e in (0, 4, 5, 34, 35, 49)] == [0, 0, 1, 6, 7, 9]
    assert [f(e, 3, "no_thought") for e in (0, 3, 9)] == [0, 1, 3]
    assert f(12, 5, "cot") == f(12, 5, "nocot") == 0
    assert f(0, 5, "no_curriculum") == 7 and f(0, 3, "no_curriculum", max_latent_stage=3) == 4
    assert set(C.MODES) == {"coconut", "cot", "nocot", "no_thought", "pause_as_thought", "no_curriculum", "pause", "icot",
                          "frontier"}
    assert f(12, 5, "icot") == 0  # iCoT's count follows the step (removal_schedule), not the epoch


@pytest.mark.gpt2_bpe
def test_uniform_prob():
    t = tokenize(R)
    n_q = len(Q)

    def stage_of(e):  # read the stage back from the shaping: one latent per removed step (c = 1)
        return e["input_ids"].count(L)

    draws = [stage_of(C.make_example(t, 5, uniform_prob=1.0, rng=random.Random(s))) for s in range(40)]
    assert set(draws) == {0, 1, 2}  # 0..len(steps), all reached
    assert draws == [stage_of(C.make_example(t, 5, uniform_prob=1.0, rng=random.Random(s))) for s in range(40)]
    # the official order of calls: random() for every record, choice(range(n+1)) only when it fires
    rng, mirror = random.Random(3), random.Random(3)
    for _ in range(50):
        e = C.make_example(t, 5, uniform_prob=0.4, rng=rng)
        expected = mirror.choice(range(3)) if mirror.random() < 0.4 else 5
        assert stage_of(e) == expected and e["input_ids"][n_q] == S
    # p = 0: the rng is not touched and the scheduled stage is used
    rng = random.Random(7)
    state = rng.getstate()
    assert C.make_example(t, 1, uniform_prob=0.0, rng=rng) == C.make_example(t, 1)
    assert rng.getstate() == state


# ----------------------------------------------------------------------------- batching, by hand

def test_collate_handmade():
    a = {"input_ids": [1, 2, S, L, L, E, 5], "labels": [X, X, X, X, X, X, 5]}
    b = {"input_ids": [1, S, L, E, 6, 7, 8, 9], "labels": [X, X, X, X, 6, 7, 8, 9]}
    c = {"input_ids": [1, 2, 3], "labels": [X, 2, 3]}  # no latent: not left-padded
    out = C.collate([a, b, c])
    P = EOS
    # first latents at columns 3 and 2 -> b gets one pad on the left; width = max(7, 1 + 8, 3) = 9
    assert out["input_ids"].tolist() == [[1, 2, S, L, L, E, 5, P, P],
                                         [P, 1, S, L, E, 6, 7, 8, 9],
                                         [1, 2, 3, P, P, P, P, P, P]]
    assert out["labels"].tolist() == [[X, X, X, X, X, X, 5, X, X],
                                      [X, X, X, X, X, 6, 7, 8, 9],
                                      [X, 2, 3, X, X, X, X, X, X]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 1, 0, 0],
                                              [0, 1, 1, 1, 1, 1, 1, 1, 1],
                                              [1, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 0],
                                            [0, 0, 1, 2, 3, 4, 5, 6, 7],
                                            [0, 1, 2, 0, 0, 0, 0, 0, 0]]
    assert all(v.dtype == torch.long for v in out.values())
    # questions for generation: no labels; plain id lists are accepted too
    out = C.collate([{"input_ids": [7, S, L, E]}, [7, 8, 9, S, L, E]])
    assert set(out) == {"input_ids", "attention_mask", "position_ids"}
    assert out["input_ids"].tolist() == [[P, P, 7, S, L, E], [7, 8, 9, S, L, E]]
    assert out["position_ids"].tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    # other ids for other tokenizers
    out = C.collate([[1, 9], [1, 2, 9]], pad_id=0, latent_id=9)
    assert out["input_ids"].tolist() == [[0, 1, 9], [1, 2, 9]]
    with pytest.raises(ValueError, match="some examples have labels"):
        C.collate([a, {"input_ids": [1]}])
    with pytest.raises(ValueError, match="example 0 has 2 input_ids but 1 labels"):
        C.collate([{"input_ids": [1, 2], "labels": [1]}])


@pytest.mark.gpt2_bpe
def test_check_length_and_build_examples(capsys):
    t = tokenize(R)
    long_t = Tokenized(Q * 4, [S1, S2], A)  # 24 + 13 + 7 = 44 tokens at stage 0 with the markers: 46
    with pytest.raises(ValueError, match=r"example 1 is 46 tokens long, longer than block_size 40"):
        C.build_examples([t, long_t], 0, block_size=40)
    kept = C.build_examples([t, long_t, t], 0, block_size=40, skip_long=True)
    assert kept == [C.make_example(t, 0)] * 2
    assert "skipped 1 of 3 examples longer than block_size 40" in capsys.readouterr().out
    assert check_length([[1] * 5, {"input_ids": [1] * 6}], 5, skip_long=True) == [0]
    assert C.build_examples([t, long_t], 7, "nocot") == [C.make_example(t, 7, "nocot"), C.make_example(long_t, 7, "nocot")]


# ----------------------------------------------------------------------------- real data against the rules

def reference_example(q, steps, a, stage, c, M, pad):
    """REFERENCE.md's rules, spelled out step by step."""
    if stage > M:
        skip = len(steps)
        n = M if pad else min(len(steps), M)
    else:
        skip = stage
        n = stage
    ids, labels = [], []
    for tkn in q:
        ids.append(tkn); labels.append(-100)
    ids.append(S); labels.append(-100)
    for _ in range(n * c):
        ids.append(L); labels.append(-100)
    ids.append(E); labels.append(-100)
    for step in steps[skip:]:
        for tkn in step:
            ids.append(tkn); labels.append(tkn)
    for tkn in a:
        ids.append(tkn); labels.append(tkn)
    return ids, labels


def reference_collate(seqs, labels):
    firsts = [s.index(L) for s in seqs if L in s]
    rows = []
    for i, s in enumerate(seqs):
        pad = max(firsts) - s.index(L) if (firsts and L in s) else 0
        rows.append(([EOS] * pad + s, [-100] * pad + labels[i], [0] * pad + [1] * len(s),
                     [0] * pad + list(range(len(s)))))
    width = max(len(r[0]) for r in rows)
    out = {"input_ids": [], "labels": [], "attention_mask": [], "position_ids": []}
    for ids, lab, mask, pos in rows:
        extra = width - len(ids)
        out["input_ids"].append(ids + [EOS] * extra)
        out["labels"].append(lab + [-100] * extra)
        out["attention_mask"].append(mask + [0] * extra)
        out["position_ids"].append(pos + [0] * extra)
    return out


@pytest.mark.gpt2_bpe
def test_coconut_on_prosqa_against_reference(prosqa):
    _, toks = prosqa
    M = 6
    assert max(len(t.steps) for t in toks) <= M  # so stage > M and pad on/off really differ only past M
    for c in (1, 2):
        for pad in (True, False):
            for stage in range(M + 2):
                exs = [C.make_example(t, stage, "coconut", c, M, pad) for t in toks]
                for t, e in zip(toks, exs):
                    ids, labels = reference_example(*t[:3], stage, c, M, pad)
                    assert e == {"input_ids": ids, "labels": labels}
                    k = min(M, stage) if pad else min(M, len(t.steps), stage)
                    assert C.make_question(t, stage, "coconut", c, M, pad) == t.question + [S] + [L] * (k * c) + [E]
                for j in range(0, len(exs), 16):
                    batch = exs[j:j + 16]
                    got = C.collate(batch)
                    want = reference_collate([e["input_ids"] for e in batch], [e["labels"] for e in batch])
                    for key in want:
                        assert got[key].tolist() == want[key], (c, pad, stage, j, key)
                    # the thoughts of every row start in one column
                    firsts = {row.index(L) for row in got["input_ids"].tolist() if L in row}
                    assert len(firsts) <= 1


@pytest.mark.gpt2_bpe
def test_gsm8k_records(tmp_path):
    with open(needs(GSM_VALID), encoding="utf-8") as f:
        lines = [next(f) for _ in range(20)]
    recs = [gsm_record(line) for line in lines]
    assert recs[0]["steps"] == ["<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>"]
    assert recs[0]["answer"] == "300" and recs[0]["question"].endswith("How much does he pay per year?")
    assert load_records(_write(tmp_path, recs)) == recs
    enc = tiktoken.get_encoding("gpt2")
    for r in recs:
        q, steps, a, *_ = tokenize(r)
        whole = r["question"] + "\n" + "\n".join(r["steps"]) + "\n### " + r["answer"]
        assert q + [t for s in steps for t in s] + a == enc.encode_ordinary(whole) + [EOS]
    q, steps, a, *_ = tokenize(recs[0])
    assert steps == [[16791, 19, 12, 17, 28, 17, 4211, 198],      # "<<4-2=2>>\n"
                     [16791, 17, 11757, 20, 28, 19, 4211, 198],   # "<<2/.5=4>>\n"
                     [16791, 1065, 14, 19, 28, 18, 4211, 198],    # "<<12/4=3>>\n"
                     [16791, 3064, 9, 18, 28, 6200, 4211, 198]]   # "<<100*3=300>>\n"
    assert a == [21017, 5867, EOS]                                # "### 300"
    # GSM8k settings: c = 2, M = 3. Stage 2: two steps become four thoughts.
    e = C.make_example((q, steps, a), 2, c_thought=2, max_latent_stage=3)
    n = len(q)
    assert e["input_ids"][n:] == [S, L, L, L, L, E] + steps[2] + steps[3] + [21017, 5867, EOS]
    assert e["labels"] == [X] * (n + 6) + steps[2] + steps[3] + [21017, 5867, EOS]
    # the last stage: all four steps removed, M*c = 6 thoughts
    e = C.make_example((q, steps, a), 4, c_thought=2, max_latent_stage=3)
    assert e["input_ids"][n:] == [S] + [L] * 6 + [E, 21017, 5867, EOS]
    assert C.make_question((q, steps, a), 4, c_thought=2, max_latent_stage=3) == q + [S] + [L] * 6 + [E]


# ----------------------------------------------------------------------------- the answer rule

def official_answer(text):
    # the official evaluation's rule (run.py), written here again: what follows the last '#', commas removed
    return text.split("#")[-1].replace(",", "").strip()


def decoded_outputs(r, other_answer):
    """What the evaluation decodes for record r (its prompt's text + the new tokens): its own training
    targets in every mode's shape and outputs a model plausibly writes (wrong, cut short, repeated...)."""
    q, steps, a = r["question"] + "\n", [s + "\n" for s in r["steps"]], r["answer"]
    chain = "".join(steps)
    yield q + chain + "### " + a                            # CoT's target (and stage 0's)
    for k in range(len(steps) + 1):                          # Coconut at stage k: the thoughts decode to nothing
        yield q + "".join(steps[k:]) + "### " + a
    yield q + "### " + other_answer                          # a wrong answer
    yield q + chain + "### " + a + "\n### " + other_answer   # an answer written twice: the last one counts
    yield q + chain[:len(chain) // 2]                        # cut short by max_new_tokens: no marker at all
    yield q + "### "                                         # the marker, then <eos> at once
    yield q + "###" + a                                      # a marker without its space
    yield q + "#### " + a                                    # GSM8k's original "####"
    yield q + "## " + a
    yield q + "### " + a.replace("0", ",0")                  # commas do not count


def real_records():
    """ProsQA's validation file and GSM8k-Aug's (converted as data/gsm8k/prepare.py does), where present."""
    out = {}
    if os.path.exists(PROSQA_VALID):
        out["prosqa"] = load_records(PROSQA_VALID)
    if os.path.exists(GSM_VALID):
        import data.gsm8k.prepare as gsm8k
        out["gsm8k"] = gsm8k.convert_lines(gsm8k.read_lines(GSM_VALID))
    return out


@pytest.mark.parametrize("name", ["prosqa", "gsm8k", "prontoqa (generated)", "prosqa (generated)"])
def test_answer_rule_equals_the_official_one_on_every_record(name):
    if name == "prontoqa (generated)":  # ProntoQA's files are generated (data/prontoqa/prepare.py)
        import data.prontoqa.prepare as prontoqa
        rng = random.Random(0)
        records = [prontoqa.make_example(rng) for _ in range(800)]
    elif name == "prosqa (generated)":
        records = prosqa_data.generate(300, random.Random(2))
    else:
        records = real_records().get(name)
        if records is None:
            pytest.skip(f"the real {name} validation file is not in {os.path.dirname(PROSQA_VALID)}")
        assert len(records) == {"prosqa": 300, "gsm8k": 500}[name]
    n = 0
    for i, r in enumerate(records):
        for text in decoded_outputs(r, records[i - 1]["answer"]):
            assert C.extract_answer(text) == official_answer(text), (i, text[-80:])
            n += 1
        # and the record's own target is right by both rules
        assert official_answer(r["question"] + "\n### " + r["answer"]) == r["answer"].replace(",", "").strip()
    assert n >= 10 * len(records)


def test_answer_rule_reads_an_answer_that_holds_a_hash():
    # a user's record whose answer holds '#': its own target "### C#" scores, which the official rule alone cuts
    recs = [{"question": "Which language?", "steps": ["It is C#."], "answer": "C#"},
            {"question": "Which tag?", "steps": ["Tags start with #."], "answer": "#coconut, #ai"}]
    tok = compact_tokenizer(recs)
    for r in recs:
        t = tokenize(r, tok)
        for new in (t.answer, [i for s in t.steps for i in s] + t.answer):  # No-CoT's and CoT's targets
            assert C.is_correct(t.question, new, r["answer"], tok)
        assert not C.is_correct(t.question, tok.encode("### C"), r["answer"], tok)
    assert official_answer("Which language?\n### C#") == "" and C.extract_answer("Which language?\n### C#") == "C#"
    assert C.extract_answer("x\n### #coconut, #ai") == "#coconut #ai"
