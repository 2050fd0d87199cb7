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
import math
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
        if d.get("kind") == "symbols":
            return Tokenizer(Symbols(d["symbols"]), dict(d))
        raise ValueError(f"unknown tokenizer kind {d.get('kind')!r} (expected 'gpt2', 'compact' or 'symbols')")


@lru_cache(maxsize=1)
def gpt2_tokenizer():
    """GPT-2's BPE with the three latent tokens appended: 50257 start, 50258 end, 50259 latent."""
    try:
        base = tiktoken.get_encoding("gpt2")  # offline through TIKTOKEN_CACHE_DIR
    except Exception as e:  # tiktoken downloads its two files once; offline that is a requests error
        raise RuntimeError(f"tiktoken could not load GPT-2's BPE files ({type(e).__name__}): offline, set "
                           f"TIKTOKEN_CACHE_DIR to a folder holding them (README: Install)") from None
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


class Symbols:
    """
    A word-level vocabulary with tiktoken's interface (what Tokenizer uses of it): one token per
    whitespace-separated symbol, for data written in symbols, such as data/prosqa_graph's
    "3 7 | 0 2 [Q] 16 13 [R] 1". Text is split on whitespace, and decode joins the symbols with one
    space: the layout of the whitespace is not kept, the symbols are. ids: the symbols in order, then
    eos/pad, start, end, latent (like compact_tokenizer).
    """

    def __init__(self, symbols):
        self.symbols = list(symbols) + [EOS, START, END, LATENT]
        self.ids = {s: i for i, s in enumerate(self.symbols)}
        self.n_vocab = len(self.symbols)

    def encode_ordinary(self, text):
        try:
            return [self.ids[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"symbol {e.args[0]!r} is not in the vocabulary of this model") from None

    def encode_single_token(self, symbol):
        return self.ids[symbol]

    def decode(self, ids):
        return " ".join(self.symbols[i] for i in ids)


def symbol_tokenizer(records):
    """One token per symbol of the records (in order of first appearance), then eos, start, end, latent."""
    seen = {}
    for r in records:
        for text in _texts(r):
            for w in text.split():
                seen.setdefault(w, None)
    return Tokenizer(Symbols(seen), {"kind": "symbols", "symbols": list(seen)})


def looks_symbolic(records, max_symbols=1000):
    """Is the data written in symbols (fewer than max_symbols distinct whitespace-separated words, none of
    them ending in punctuation like "wumpus.")? Then symbol_tokenizer suits a model trained from scratch."""
    seen = set()
    for r in records:
        for text in _texts(r):
            seen.update(text.split())
            if len(seen) > max_symbols:
                return False
    return not any(len(w) > 1 and w[-1] in ".,;:?!" for w in seen)


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


def load_split(data_dir, dataset, split):
    """<data_dir>/<dataset>/<split>.json: a prepared data set of this project, or any folder of the user's."""
    path = os.path.join(data_dir, dataset, f"{split}.json")
    if not os.path.isfile(path):
        ours = os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset, "prepare.py"))
        how = (f"make it with `python data/{dataset}/prepare.py`" if ours else
               'put a JSON list of {"question", "steps", "answer"} records there')
        raise FileNotFoundError(f"{path} not found: {how}")
    records = load_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


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


def graph_question(record, rng=None):
    """
    The symbolic ProsQA question of "Reasoning by Superposition" (data/prosqa_graph), from a record's
    graph fields: every edge as "parent child", joined by " | ", then "[Q]" and the two options,
    then "[R]" and the root, all in node names (idx_to_symbol):  "3 7 | 0 2 | ... [Q] 16 13 [R] 1".
    With rng (a random.Random), the edges and the two options are shuffled first: the recipe reshuffles
    them every epoch, so that no position in the question gives an answer away.
    """
    names, edges = record["idx_to_symbol"], list(record["edges"])
    options = [record["target"], record["neg_target"]]
    if rng is not None:
        rng.shuffle(edges)
        rng.shuffle(options)
    return (" | ".join(f"{names[a]} {names[b]}" for a, b in edges) +
            f" [Q] {names[options[0]]} {names[options[1]]} [R] {names[record['root']]}")


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
#   icot              iCoT (Deng et al. 2024): the chain's first tokens removed, a growing number per step;
#                     its "stage" is that number (see the iCoT section at the end)
MODES = ("coconut", "cot", "nocot", "no_thought", "pause_as_thought", "no_curriculum", "pause", "icot")
CURRICULUM_MODES = ("coconut", "no_thought", "pause_as_thought")  # those whose data follow the stage


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


def stage_for_epoch(epoch, epochs_per_stage, mode, max_latent_stage=6):
    """The stage an epoch trains (official run.py); make_example/make_question then shape by mode."""
    _check_mode(mode)
    if mode in ("cot", "nocot", "icot"):  # icot's count follows the optimizer step: removal_schedule
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
    if mode == "icot":
        return make_icot_example(tokenized, stage)
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
    if mode in ("cot", "nocot", "no_thought", "icot"):
        return list(q)  # no markers, no thoughts: the model writes its steps (or not) itself
    if mode == "pause":
        return q + [tok.latent_id] * (M * c)
    if mode == "no_curriculum":
        stage = M + 1
    k = min(M, stage) if pad_latent_to_max else min(M, len(steps), stage)
    return q + [tok.start_id] + [tok.latent_id] * (k * c) + [tok.end_id]


# Prompt shapes by training mode (MODES): which carry the markers, which carry bare pauses.
MARKED = ("coconut", "pause_as_thought", "no_curriculum")  # question <start> N x <latent> <end>
PAUSED = ("pause",)                                        # question N x <latent>, no markers
PLAIN = ("cot", "nocot", "no_thought", "icot")             # the question alone: no thoughts at all


def final_stage(cfg, ckpt):
    """The stage whose prompts the checkpoint answers by default: the one it was saved at (train.py
    validated it with that stage's prompts), else the last one (every step removed)."""
    stage = ckpt.get("stage")
    return int(stage) if stage is not None else cfg.get("max_latent_stage", 6) + 1


def prompt(tokenized, cfg, stage, tok, n_latent=None):
    """
    The token ids to generate from. n_latent None: exactly what training's validation uses at `stage`
    (curriculum.make_question). Otherwise question + <start> + n_latent x <latent> + <end> (bare
    latents for the pause-token baseline; a mode without thoughts only takes n_latent 0).
    """
    mode = cfg.get("mode", "coconut")
    if n_latent is None:
        return make_question(tokenized, stage, mode, cfg.get("c_thought", 1), cfg.get("max_latent_stage", 6),
                             cfg.get("pad_latent_to_max", True), tok)
    q = list(tokenized.question)
    if mode in PLAIN:
        if n_latent:
            raise ValueError(f"a {mode} model has no continuous thoughts: --latent can only be 0")
        return q
    if mode in PAUSED:
        return q + [tok.latent_id] * n_latent
    if mode in MARKED:
        return q + [tok.start_id] + [tok.latent_id] * n_latent + [tok.end_id]
    raise ValueError(f"unknown mode {mode!r} in the checkpoint")


def extract_answer(text):
    """The official rule: what follows the last '#', commas removed."""
    return text.split("#")[-1].replace(",", "").strip()


def is_correct(prompt_ids, new_ids, answer, tok):
    """Like the official code: the decoded prompt + new tokens, through extract_answer, against the
    record's answer without commas."""
    return extract_answer(tok.decode(list(prompt_ids) + list(new_ids))) == answer.replace(",", "").strip()


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
                             f"(train.py --skip_long drops such examples)")
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


# -----------------------------------------------------------------------------
# iCoT (Deng et al. 2024, "From Explicit CoT to Implicit CoT: Learning to Internalize CoT Step by
# Step"): the Table 1 row "iCoT". No latents: the chain of thought is cut away token by token from
# its start while the model trains on question + what is left of the chain + answer, until none is
# left. The rules follow the authors' src/train.py (github.com/da03/Internalize_CoT_Step_by_Step,
# commit c2e3891); line numbers below refer to that file.
#
# Their sequence is  question <eos> chain <eos> answer <eos>,  and they remove the tokens from
# first_sep+1 up to first_sep+1+to_remove, clamped at the second <eos> (l. 290-291, 301-304): the
# first to_remove tokens of the chain, never a separator, all of it once to_remove >= its length.
# Here the chain is the steps' tokens concatenated (the question's "\n" and the answer's "###" play
# the separators' part), and make_icot_example removes the same: its first n tokens.
#
# Training needs, per batch: to_remove = the scheduled count (removal_schedule) + each sequence's own
# random offset (removal_offsets) (l. 283-284); the optimizer is reset before a batch whose count grew
# (l. 262-268), unless every chain of the previous batch was already gone (see all_chains_removed).
# Generation and evaluation start from the question alone (their generate cuts each sequence at its
# first <eos>, model.py l. 85-86); their validation uses the scheduled count with no offset (l. 336).
ICOT = "icot"  # the mode's name; make_question for it is the question alone, like nocot

# The paper's GSM8k settings (their README's GSM8k command). The same command also trains with
# batch 16 x accumulate 2, lr 1e-5, 80 epochs, bf16, max_len_train 150 (a batch wider than 150
# tokens after removal is skipped, its step still counted), removal from the left, pretrain_epochs 0.
ICOT_GSM8K = dict(remove_per_epoch=8, removal_smoothing_lambda=4, remove_all_when_remove_beyond=39,
                  remove_start_from=0, reset_optimizer=True)


def removal_distribution(lam, truncate=100):
    """
    The "removal smoothing" distribution of the extra tokens a sequence loses on top of the schedule:
    P(k) = (1 - e^-lam) e^(-lam k) for k = 0..truncate-1, the last bin taking the rest of the
    geometric tail (their compute_lambda_distribution, l. 25-35). lam = inf: no offset (mass 1 at 0).
    Float32 like theirs, so a generator draws the same offsets from it.
    """
    p = torch.zeros(truncate)
    if lam == math.inf:
        p[0] = 1.0
        return p
    if not lam > 0:
        raise ValueError(f"removal_smoothing_lambda must be > 0 (or inf), got {lam}")
    p = (1 - math.exp(-lam)) * torch.arange(truncate).mul(-lam).exp()
    # Theirs asserts p.sum() <= 1 and crashes for some lam (0.17, 0.21, ...) where float32 rounding
    # pushes the sum just above 1; we clamp the last bin at 0 instead (torch.multinomial normalizes).
    p[-1] = (p[-1] + (1 - p.sum())).clamp(min=0)
    return p


def removal_schedule(epochs, steps_per_epoch, remove_per_epoch=8, remove_all_when_remove_beyond=math.inf,
                     remove_start_from=0):
    """
    The number of chain tokens every training step removes, [epoch][step] -> (to_remove, grew):
    to_remove an int or math.inf (the whole chain), grew True when the count went up at that step
    (reset the optimizer before it). A function of its arguments only: a resumed run recomputes it.

    Their loop (l. 242-270), one step per batch of the training loop:
      - every = int(round(steps_per_epoch / remove_per_epoch)) (Python's round: 2.5 -> 2);
      - a counter, never reset at epoch boundaries, is checked BEFORE it counts the step: the count
        grows at global steps every, 2*every, ... (not at step 0), or at every step from step 0 on
        when every == 0 (more removals per epoch than steps);
      - once the count reaches remove_all_when_remove_beyond, the whole chain goes (inf) from that
        very step on; a count that is already inf never "grows" again (inf + 1 == inf);
      - at each epoch's start they round the count to an int: a no-op for int counts (ours are).
    Differences: their counter counts batches, so with --accumulate 2 (their GSM8k command) a step
    here is a batch, not an optimizer step: pass steps_per_epoch in the unit the trainer steps in.
    Their --pretrain_epochs (0 in their recipes; it freezes the counter) is not supported.
    """
    if not remove_per_epoch > 0:
        raise ValueError(f"remove_per_epoch must be > 0, got {remove_per_epoch}")  # theirs divides by it
    every = int(round(steps_per_epoch / remove_per_epoch))
    beyond = remove_all_when_remove_beyond

    def grown(t):  # how often the count has grown by the end of global step t (t = -1: before the run)
        return t + 1 if every == 0 else max(t, 0) // every

    schedule, t, entry = [], 0, None
    for _ in range(epochs):
        steps = []
        for _ in range(steps_per_epoch):
            before, now = remove_start_from + grown(t - 1), remove_start_from + grown(t)
            to_remove = math.inf if now >= beyond else now
            grew = now > before and before < beyond  # growth from inf is no growth
            if entry != (to_remove, grew):
                entry = (to_remove, grew)  # consecutive steps share one tuple: 1M steps stay small
            steps.append(entry)
            t += 1
        schedule.append(steps)
    return schedule


def removal_offsets(n, distribution, generator=None):
    """
    n random extra removals, one per sequence of a batch: torch.multinomial(distribution, n,
    replacement=True) like theirs (l. 283), drawn from `generator` (a seeded torch.Generator; theirs
    uses the global one). A point mass at 0 (lambda inf) gives zeros without drawing.
    """
    if n == 0 or (distribution[0] == 1 and distribution[1:].sum() == 0):
        return [0] * n
    return torch.multinomial(distribution, n, replacement=True, generator=generator).tolist()


def make_icot_example(tokenized, n_remove, tok=None):
    """
    question + the chain without its first n_remove tokens + answer; labels -100 on the question
    only (theirs: labels -100 up to and including the first <eos>, data.py l. 82-83). n_remove is
    the scheduled count plus the sequence's offset, math.inf to drop the whole chain. (tok is unused:
    the same signature as make_example.)
    """
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got {n_remove}")
    q, steps, a = tokenized
    chain = [t for s in steps for t in s]
    kept = chain[int(n_remove):] if n_remove < len(chain) else []
    rest = kept + a
    return {"input_ids": q + rest, "labels": [-100] * len(q) + rest}


def all_chains_removed(tokenized_batch, n_removes):
    """
    Was every chain of this batch removed whole? Their optimizer reset (l. 264) is skipped when the
    PREVIOUS batch's chains were all gone (all_cot_removed_in_prev_batch, l. 296-304, 314): reset
    before a step iff grew and not all_chains_removed(previous batch). Theirs also says False for a
    batch they did not cut at all (count 0 and lambda inf, l. 279-280); that differs from this only
    for a batch made entirely of records without steps.
    """
    return all(n >= sum(len(s) for s in t.steps) for t, n in zip(tokenized_batch, n_removes))


ICOT_ALL = 10**6  # iCoT's "stage" once the whole chain is removed (an int, so that metrics.jsonl stays JSON)


def icot_epoch(tokenized, steps, epoch, epochs, remove_per_epoch, lam, remove_all_when_remove_beyond, seed,
               block_size=None):
    """
    iCoT's training examples for one epoch, whose optimizer steps are `steps` (lists of micro-batches of
    record indices, train.py's plan_steps): each sequence loses the first (its step's scheduled count +
    a random offset) tokens of its chain, one offset draw per micro-batch like the authors' per batch.
    -> (examples, the count at the epoch's last step (ICOT_ALL: the whole chain), which validation uses
    without offsets as theirs does, the steps before which the optimizer is reset). A function of its
    arguments alone: a resumed run rebuilds the same.
    """
    schedule = removal_schedule(epochs, len(steps), remove_per_epoch, remove_all_when_remove_beyond)[epoch]
    offsets = removal_distribution(lam)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
    examples, resets, previous = [None] * len(tokenized), set(), None
    for k, micro_batches in enumerate(steps):
        count, grew = schedule[k]
        if grew and not (previous and all_chains_removed(*previous)):
            resets.add(k)
        for mb in micro_batches:
            n = [count + o for o in removal_offsets(len(mb), offsets, g)]
            for i, n_i in zip(mb, n):
                examples[i] = make_icot_example(tokenized[i], n_i)
            previous = ([tokenized[i] for i in mb], n)
    if block_size is not None:
        check_length(examples, block_size)  # no skipping here: the steps were planned over every record
    last = schedule[-1][0]
    return examples, (ICOT_ALL if last == math.inf else last), resets
