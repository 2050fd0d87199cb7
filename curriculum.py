"""
The data side of Coconut: the tokenizer, the data files, the curriculum of training examples, batching.

A record is {"question": str, "steps": [str, ...], "answer": str}. It is tokenized in pieces,

    question = encode(question + "\n"),  step i = encode(step_i + "\n"),  answer = encode("### " + answer) + [eos]

and the curriculum turns it into a different training sequence at every stage. With c = c_thought
continuous thoughts per removed step and M = max_latent_stage:

    stage 0      question <start> <end> step1 step2 step3 answer                  (plain CoT, with markers)
    stage 1      question <start> [c latents] <end> step2 step3 answer
    stage 2      question <start> [2c latents] <end> step3 answer
    stage k      the first k steps become k*c latents (k of them even when the record has fewer steps)
    stage > M    every step is removed; M*c latents (or min(#steps, M)*c without pad_latent_to_max)

The loss is never on the question, the two markers or the latents (label -100), only on the
language that follows them. The baselines of the paper's Table 1 are other shapings of the same
record (see MODES). Everything here follows the official implementation token for token
(dataset.py: get_cot_latent_dataset, get_question_latent_dataset, MyCollator).
"""
import json
import os
import random
from collections import Counter
from functools import lru_cache
from typing import List, NamedTuple

import regex  # installed with tiktoken (its own dependency); Python's re has no \p{L}
import tiktoken
import torch

# -----------------------------------------------------------------------------
# Tokenizer

EOS, START, END, LATENT = "<|endoftext|>", "<|start-latent|>", "<|end-latent|>", "<|latent|>"
# GPT-2's pre-tokenizer: text is cut into these pieces (words with their leading space, numbers,
# punctuation runs, whitespace) before BPE, and no token ever spans two pieces.
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer:
    """A tiktoken Encoding plus the ids Coconut needs. Build it with gpt2_tokenizer() or compact_tokenizer()."""

    def __init__(self, enc, spec):
        self.enc = enc
        self.spec = spec  # the plain dict from which from_dict() rebuilds this tokenizer
        self.eos_id, self.start_id, self.end_id, self.latent_id = (
            enc.encode_single_token(t) for t in (EOS, START, END, LATENT))
        self.special_ids = {self.eos_id, self.start_id, self.end_id, self.latent_id}
        self.vocab_size = enc.n_vocab
        self.pad_id = self.eos_id  # like the official code: <|endoftext|> pads

    def encode(self, text):
        # Ordinary text only: a record that happens to contain "<|endoftext|>" is just characters.
        return self.enc.encode_ordinary(text)

    def decode(self, ids, skip_special=True):
        # The evaluation decodes with skip_special_tokens: eos/pad and the three latent tokens vanish.
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.enc.decode(ids)

    def to_dict(self):
        return dict(self.spec)  # str/int/list only: fits a torch.load(weights_only=True) checkpoint

    @staticmethod
    def from_dict(d):
        if d.get("kind") == "gpt2":
            return gpt2_tokenizer()
        if d.get("kind") == "compact":
            return _compact_from_words(d["words"], d["split"])
        raise ValueError(f"unknown tokenizer kind {d.get('kind')!r} (expected 'gpt2' or 'compact')")


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2's BPE with the three latent tokens appended: 50257 start, 50258 end, 50259 latent."""
    base = tiktoken.get_encoding("gpt2")  # offline through TIKTOKEN_CACHE_DIR
    enc = tiktoken.Encoding(
        name="gpt2-coconut", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
        special_tokens={EOS: 50256, START: 50257, END: 50258, LATENT: 50259})
    return Tokenizer(enc, {"kind": "gpt2"})


def compact_tokenizer(records, min_count=1):
    """
    A small vocabulary for models trained from scratch: the 256 bytes, then every GPT-2 piece (word
    with its leading space, number, punctuation run) of length >= 2 bytes seen at least min_count
    times in the records' text, most frequent first, then eos/pad, start, end, latent.
    tiktoken emits a whole piece as one token when the piece is in the vocabulary; any other piece
    falls back to bytes, so every text round-trips and nothing needs downloading.
    """
    counts = Counter()
    for r in records:
        for text in _texts(r):
            counts.update(p.encode("utf-8") for p in regex.findall(GPT2_SPLIT, text))
    words = sorted((w for w, n in counts.items() if len(w) >= 2 and n >= min_count),
                   key=lambda w: (-counts[w], w))
    # latin-1 maps each byte to one character and back: the pieces become plain strings
    return _compact_from_words([w.decode("latin-1") for w in words], GPT2_SPLIT)


def _compact_from_words(words, split):
    ranks = {bytes([b]): b for b in range(256)}
    for w in words:
        ranks[w.encode("latin-1")] = len(ranks)
    n = len(ranks)
    enc = tiktoken.Encoding(name="compact", pat_str=split, mergeable_ranks=ranks,
                            special_tokens={EOS: n, START: n + 1, END: n + 2, LATENT: n + 3})
    return Tokenizer(enc, {"kind": "compact", "split": split, "words": list(words)})


# -----------------------------------------------------------------------------
# Records

def load_records(path):
    """A data set file: a JSON list of {"question": str, "steps": [str, ...], "answer": str}, checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got a JSON {type(data).__name__}")
    for i, r in enumerate(data):
        _check_record(r, f"{path}: record {i}")
    return data


def _check_record(r, where):
    if not isinstance(r, dict):
        raise ValueError(f"{where}: expected an object with question/steps/answer, got {type(r).__name__}")
    for key in ("question", "steps", "answer"):
        if key not in r:
            raise ValueError(f"{where}: missing field '{key}'")
    for key in ("question", "answer"):
        if not isinstance(r[key], str):
            raise ValueError(f"{where}: field '{key}' should be a string, got {type(r[key]).__name__}")
    if not isinstance(r["steps"], list):
        raise ValueError(f"{where}: field 'steps' should be a list of strings, got {type(r['steps']).__name__}")
    for j, s in enumerate(r["steps"]):
        if not isinstance(s, str):
            raise ValueError(f"{where}: field 'steps' item {j} should be a string, got {type(s).__name__}")
    if not r["question"].strip():
        raise ValueError(f"{where}: field 'question' is empty")


class Tokenized(NamedTuple):
    question: List[int]     # encode(question + "\n")
    steps: List[List[int]]  # encode(step + "\n") for each step
    answer: List[int]       # encode("### " + answer) + [eos]


def _texts(record):
    # The strings a record is encoded as, in order; tokenize() and compact_tokenizer() share them.
    return [record["question"] + "\n"] + [s + "\n" for s in record["steps"]] + ["### " + record["answer"]]


def tokenize(record, tok=None):
    tok = tok or gpt2_tokenizer()
    q, *steps, a = (tok.encode(t) for t in _texts(record))
    return Tokenized(q, steps, a + [tok.eos_id])


# -----------------------------------------------------------------------------
# The curriculum

# The paper's Table 1 rows, as shapings of a record:
#   coconut           the curriculum above
#   cot               question + steps + answer, no markers (every stage)
#   nocot             question + answer, no markers
#   no_thought        "w/o thought": the curriculum's removed steps, but no latents (c = 0) and no markers
#   pause_as_thought  the same data as coconut; the model keeps <|latent|> an ordinary token
#   no_curriculum     "w/o curriculum": coconut's final stage (M+1) from the first epoch
#   pause             "pause token": question + M*c pause tokens (<|latent|>) + answer, no steps, no markers
MODES = ("coconut", "cot", "nocot", "no_thought", "pause_as_thought", "no_curriculum", "pause")
CURRICULUM_MODES = ("coconut", "no_thought", "pause_as_thought")  # those whose data follow the stage


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def stage_for_epoch(epoch, epochs_per_stage, mode, max_latent_stage=6):
    """The stage an epoch trains (official run.py); make_example/make_question then shape by mode."""
    _check_mode(mode)
    if mode in ("cot", "nocot"):
        return 0
    if mode == "no_curriculum":
        return max_latent_stage + 1
    return epoch // epochs_per_stage


def removed_steps(stage, n_steps, max_latent_stage, pad_latent_to_max):
    """(steps removed, thoughts per c) at a stage: the heart of the curriculum."""
    if stage > max_latent_stage:
        # the last stage: every step goes; the number of thoughts stops growing at M
        return n_steps, (max_latent_stage if pad_latent_to_max else min(n_steps, max_latent_stage))
    return stage, stage  # even when the record has fewer steps: its thoughts still number `stage`


def make_example(tokenized, stage, mode="coconut", c_thought=1, max_latent_stage=6,
                 pad_latent_to_max=True, uniform_prob=0.0, rng=None, tok=None):
    """
    One training sequence: {"input_ids": [...], "labels": [...]} with -100 on the question, the
    markers and the latents. With uniform_prob p (curriculum modes only), a record trains at a stage
    drawn uniformly from 0..len(steps) with probability p: like the official code, one rng.random()
    per record and a choice() only when it fires (rng defaults to the random module itself).
    """
    _check_mode(mode)
    tok = tok or gpt2_tokenizer()
    q, steps, a = tokenized
    M, c = max_latent_stage, c_thought
    if mode in CURRICULUM_MODES and uniform_prob > 0:
        rng = rng or random
        if rng.random() < uniform_prob:
            stage = rng.choice(range(len(steps) + 1))
    if mode == "no_curriculum":
        stage = M + 1

    if mode == "cot":
        thought, kept = [], steps
    elif mode == "nocot":
        thought, kept = [], []
    elif mode == "pause":
        thought, kept = [tok.latent_id] * (M * c), []
    else:
        skip, n = removed_steps(stage, len(steps), M, pad_latent_to_max)
        kept = steps[skip:]
        if mode == "no_thought":
            thought = []  # the steps are removed but nothing takes their place
        else:
            thought = [tok.start_id] + [tok.latent_id] * (n * c) + [tok.end_id]

    rest = [t for s in kept for t in s] + a  # the language the loss is on
    return {"input_ids": q + thought + rest, "labels": [-100] * (len(q) + len(thought)) + rest}


def make_question(tokenized, stage, mode="coconut", c_thought=1, max_latent_stage=6,
                  pad_latent_to_max=True, tok=None):
    """The prompt to generate from at a stage: question + <start> + k*c latents + <end>, k = min(M, stage)."""
    _check_mode(mode)
    tok = tok or gpt2_tokenizer()
    q, steps, _ = tokenized
    M, c = max_latent_stage, c_thought
    if mode in ("cot", "nocot", "no_thought"):
        return list(q)  # no markers, no thoughts: the model writes its steps (or not) itself
    if mode == "pause":
        return q + [tok.latent_id] * (M * c)
    if mode == "no_curriculum":
        stage = M + 1
    k = min(M, stage) if pad_latent_to_max else min(M, len(steps), stage)
    return q + [tok.start_id] + [tok.latent_id] * (k * c) + [tok.end_id]


def check_length(examples, block_size, skip_long=False):
    """
    The indices of the examples (dicts with input_ids, or id lists) that fit in block_size. A longer
    one is an error unless skip_long, which drops it and prints how many were dropped.
    (collate's left padding can still make a batch wider than its longest example.)
    """
    keep = []
    for i, e in enumerate(examples):
        n = len(e["input_ids"] if isinstance(e, dict) else e)
        if n <= block_size:
            keep.append(i)
        elif not skip_long:
            raise ValueError(f"example {i} is {n} tokens long, longer than block_size {block_size} "
                             f"(skip_long=True drops such records)")
    if len(keep) < len(examples):
        print(f"skipped {len(examples) - len(keep)} of {len(examples)} examples longer than block_size {block_size}")
    return keep


def build_examples(tokenized, stage, mode="coconut", c_thought=1, max_latent_stage=6,
                   pad_latent_to_max=True, uniform_prob=0.0, rng=None, tok=None,
                   block_size=None, skip_long=False):
    """make_example over a data set (in order, so a seeded rng draws the official stages), length-checked."""
    examples = [make_example(t, stage, mode, c_thought, max_latent_stage, pad_latent_to_max,
                             uniform_prob, rng, tok) for t in tokenized]
    if block_size is not None:
        examples = [examples[i] for i in check_length(examples, block_size, skip_long)]
    return examples


# -----------------------------------------------------------------------------
# Batching

def collate(examples, pad_id=50256, latent_id=50259):
    """
    A batch of LongTensors input_ids, attention_mask, position_ids (and labels if the examples have
    them). Each sequence that has a <|latent|> is first left-padded so that its first latent sits in
    the same column as the latest first latent in the batch: then the model fills thought i of every
    sequence in the same pass. Then all are right-padded to the longest. Pads get pad_id, label -100,
    mask 0 and position 0; real tokens keep positions 0..len-1 wherever they sit.
    """
    if not examples:
        raise ValueError("collate: empty batch")
    seqs = [list(e["input_ids"]) if isinstance(e, dict) else list(e) for e in examples]
    has_labels = [isinstance(e, dict) and "labels" in e for e in examples]
    if any(has_labels) and not all(has_labels):
        raise ValueError("collate: some examples have labels and some do not")
    labels = [list(e["labels"]) for e in examples] if all(has_labels) else None
    if labels is not None:
        for i, (s, l) in enumerate(zip(seqs, labels)):
            if len(s) != len(l):
                raise ValueError(f"collate: example {i} has {len(s)} input_ids but {len(l)} labels")

    firsts = [s.index(latent_id) if latent_id in s else None for s in seqs]
    align = max((f for f in firsts if f is not None), default=0)
    left = [0 if f is None else align - f for f in firsts]
    width = max(p + len(s) for p, s in zip(left, seqs))

    B = len(seqs)
    batch = {"input_ids": torch.full((B, width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((B, width), dtype=torch.long),
             "position_ids": torch.zeros((B, width), dtype=torch.long)}
    if labels is not None:
        batch["labels"] = torch.full((B, width), -100, dtype=torch.long)
    for b, (p, s) in enumerate(zip(left, seqs)):
        cols = slice(p, p + len(s))
        batch["input_ids"][b, cols] = torch.tensor(s, dtype=torch.long)
        batch["attention_mask"][b, cols] = 1
        batch["position_ids"][b, cols] = torch.arange(len(s))
        if labels is not None:
            batch["labels"][b, cols] = torch.tensor(labels[b], dtype=torch.long)
    return batch
