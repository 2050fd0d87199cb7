"""
The curriculum of Coconut (Section 3 of the paper), read top to bottom:

  - the modes: Coconut and the baselines of Table 1, as shapings of one record;
  - the stage rules: which stage an epoch trains (stage_for_epoch) and how many steps a stage replaces
    with continuous thoughts (removed_steps);
  - the training sequence at a stage (make_example) and the prompt to answer from (make_question, prompt);
  - the answer rule (extract_answer, is_correct);
  - the batch (collate), which lines up every sequence's first thought in one column.

With c = c_thought continuous thoughts per removed step and M = max_latent_stage, a record (records.py:
question, steps, answer as token ids) becomes

    stage 0      question <start> <end> step1 step2 step3 answer                  (plain CoT, with markers)
    stage 1      question <start> [c latents] <end> step2 step3 answer
    stage 2      question <start> [2c latents] <end> step3 answer
    stage k      the first k steps become k*c latents (k of them even when the record has fewer steps)
    stage > M    every step is removed; M*c latents (or min(#steps, M)*c without pad_latent_to_max)

The loss is never on the question, the two markers or the latents (label -100), only on the
language that follows them (with thought_labels, an addition to the paper, each latent keeps the label
of the step it replaced). Everything here follows the official implementation token for token
(dataset.py: get_cot_latent_dataset, get_question_latent_dataset, MyCollator). The tokenizers live in
tokenizer.py, the data files in records.py, and the iCoT baseline's removal schedule in icot.py.
"""
import random

import numpy as np
import torch

from machinery.icot import make_icot_example
from machinery.records import check_length
from machinery.tokenizer import gpt2_tokenizer


# The paper's Table 1 rows, as shapings of a record:
#   coconut           the curriculum above
#   cot               question + steps + answer, no markers (every stage)
#   nocot             question + answer, no markers
#   no_thought        "w/o thought": the curriculum's removed steps, but no latents (c = 0) and no markers
#   pause_as_thought  the same data as coconut; the model keeps <|latent|> an ordinary token
#   no_curriculum     "w/o curriculum": coconut's final stage (M+1) from the first epoch
#   pause             "pause token": question + M*c pause tokens (<|latent|>) + answer, no steps, no markers
#   icot              iCoT (Deng et al. 2024): the chain's first tokens removed, a growing number per step;
#                     its "stage" is that number (icot.py)
#   frontier          the curriculum of "Reasoning by Superposition" (graph records): at stage k < n the
#                     question, k thoughts (bare, no markers) and one node k+1 hops along a shortest path
#                     to the target; at stage n and after, n thoughts and the answer (n: the hops, at most M)
MODES = ("coconut", "cot", "nocot", "no_thought", "pause_as_thought", "no_curriculum", "pause", "icot", "frontier")
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
                 pad_latent_to_max=True, uniform_prob=0.0, rng=None, tok=None, markers=True, thought_labels=False):
    """
    One training sequence: {"input_ids": [...], "labels": [...]} with -100 on the question, the
    markers and the latents (with set labels also "label_sets": {column: [token ids]}). With uniform_prob p
    (curriculum modes only), a record trains at a stage drawn uniformly from 0..len(steps) with probability p:
    like the official code, one rng.random() per record and a choice() only when it fires (rng defaults to the
    random module itself).
    markers=False leaves out <start> and <end> around the thoughts (as "Reasoning by Superposition"
    does): then thought 1 is the hidden state of the question's last token, the one that at stage 0
    was trained to name the first step. thought_labels=True (coconut, pause_as_thought, no_curriculum) keeps,
    at the first of each removed step's c thoughts, the label of that step's first token: the position whose
    hidden state becomes the thought is trained to name the step, as CoT's is. A model that cannot yet tell
    which branch leads to the answer lowers that loss by spreading its guess over every candidate, as with the
    frontier curriculum of "Reasoning by Superposition". With one-token steps and c = 1 (the demo's data),
    Coconut's labels are then exactly CoT's, and the two differ only in what comes next: the step's token
    (the gold one in training, the model's own pick when it answers), or the whole hidden state.
    thought_labels "frontier" and "within" (SET_LABELS, graph records) label those
    columns with a set of nodes instead (thought_sets), every thought's (also past the steps, with
    --max_latent_stage above them); their "labels" stay -100, and coconut.set_cross_entropy is their loss.
    """
    _check_mode(mode)
    if mode == "icot":
        return make_icot_example(tokenized, stage)
    if mode == "frontier":
        return make_frontier_example(tokenized, stage, max_latent_stage, uniform_prob, rng, tok)
    tok = tok or gpt2_tokenizer()
    q, steps, a = tokenized[:3]  # a Tokenized, or any (question, steps, answer)
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
            thought = [tok.latent_id] * (n * c)
            if markers:
                thought = [tok.start_id] + thought + [tok.end_id]

    rest = [t for s in kept for t in s] + a  # the language the loss is on
    labels = [-100] * len(thought)
    label_sets = None
    if thought_labels and mode in ("coconut", "pause_as_thought", "no_curriculum") and c > 0:
        first = 1 if markers else 0
        if thought_labels in SET_LABELS:  # the first of thought j's c columns: the set search reached at j+1
            sets = thought_sets(tokenized, thought_labels, n)
            label_sets = {len(q) + first + j * c: ids for j, ids in enumerate(sets) if ids}
        else:
            for j, step in enumerate(steps[:min(skip, n)]):  # step j's first c thought names its first token
                if step:
                    labels[first + j * c] = step[0]
    example = {"input_ids": q + thought + rest, "labels": [-100] * len(q) + labels + rest}
    if label_sets is not None:
        example["label_sets"] = label_sets
    return example


# --thought_labels: 0 (the paper: no loss on thoughts), 1 (the gold step's first token), or a set of nodes
# (Zhu et al. 2025, "Emergence of Superposition", arXiv 2509.23365, its Coconut-BFS loss, Appendix E.2):
#   frontier   thought k: the nodes exactly k edges from the root (the frontier of a breadth-first search)
#   within     thought k: every node at most k edges from the root, the root included (all it has reached)
# A set names how far the search has gone, never which branch leads to an option. A thought past the record's
# steps (--max_latent_stage above the hops) is labelled with the options the search has reached: the target.
# --set_loss says how a set is scored: "mass", -log of the set's softmax mass (Coconut-BFS), which one member
# alone can satisfy, or "spread", the cross-entropy against an even spread over the set (the mean of -log p over
# its members), which only a thought holding every member evenly minimises (what the frontier curriculum's one
# member drawn at random asks for, in expectation). On the demo's data only "spread" learns (docs/search.md, 7).
SET_LABELS = ("frontier", "within")
SET_LOSSES = ("mass", "spread")


def thought_sets(tokenized, kind, n_thoughts):
    """
    The set labels of thoughts 1..n_thoughts of a graph record, kind one of SET_LABELS:
    -> a list of n_thoughts sorted lists of distinct token ids (each node's first token). Thought k up to the
    record's steps: ring k of Tokenized.from_root (within: rings 0..k); past them, the target (the last of
    Tokenized.hops; [] without one). Raises ValueError for a record without graph fields. Called for every
    record every epoch: the rings come ready-made from tokenize.
    """
    if tokenized.from_root is None:
        raise ValueError(f"--thought_labels {kind} needs graph records (idx_to_symbol, edges, root: data/reach, "
                         f"prosqa_graph, ProsQA): this data has none; use --thought_labels 0 or 1")
    rings = tokenized.from_root
    sets = []
    for k in range(1, n_thoughts + 1):
        if k > len(tokenized.steps):
            sets.append(sorted({name[0] for name in tokenized.hops[-1] if name}) if tokenized.hops else [])
            continue
        ring = rings[k] if k < len(rings) else []
        sets.append(sorted({t for r in rings[:k + 1] for t in r}) if kind == "within" and ring else ring)
    return sets


def make_frontier_example(tokenized, stage, max_latent_stage=6, uniform_prob=0.0, rng=None, tok=None):
    """
    The frontier curriculum of "Reasoning by Superposition" (Zhu et al. 2025, Section 5; the authors'
    dataset.py): every thought gets a signal of its own. With n = min(hops to the target, M) thoughts in
    the end, stage k < n trains the question + k thoughts to name one node k+1 hops from the root on a
    shortest path to the target, drawn at random among them: a model that cannot yet tell which branch
    leads there lowers its loss by spreading its guess over the whole frontier. Stage n and later train
    the question + n thoughts + the answer. The loss is on that continuation alone; the thoughts carry no
    markers. With uniform_prob p a record trains at a stage drawn from 0..min(stage, n) instead.
    Raises ValueError for a record without graph fields (Tokenized.hops).
    """
    tok = tok or gpt2_tokenizer()
    if not tokenized.hops:
        raise ValueError("the frontier mode needs graph records (idx_to_symbol, edges, root, target) whose "
                         "target is reachable from the root")
    rng = rng or random
    n = min(len(tokenized.hops), max_latent_stage)
    k = min(stage, n)
    if uniform_prob > 0 and rng.random() < uniform_prob:
        k = rng.randint(0, k)
    rest = rng.choice(tokenized.hops[k]) if k < n else tokenized.answer
    thoughts = [tok.latent_id] * k
    return {"input_ids": tokenized.question + thoughts + rest,
            "labels": [-100] * (len(tokenized.question) + k) + rest}


def make_question(tokenized, stage, mode="coconut", c_thought=1, max_latent_stage=6,
                  pad_latent_to_max=True, tok=None, markers=True):
    """The prompt to generate from at a stage: question + <start> + k*c latents + <end>, k = min(M, stage)
    (frontier: question + n latents at every stage, since only the last stage answers)."""
    _check_mode(mode)
    tok = tok or gpt2_tokenizer()
    q, steps = tokenized[:2]
    if mode == "frontier":
        return q + [tok.latent_id] * min(len(tokenized.hops or steps), max_latent_stage)
    M, c = max_latent_stage, c_thought
    if mode in ("cot", "nocot", "no_thought", "icot"):
        return list(q)  # no markers, no thoughts: the model writes its steps (or not) itself
    if mode == "pause":
        return q + [tok.latent_id] * (M * c)
    if mode == "no_curriculum":
        stage = M + 1
    k = min(M, stage) if pad_latent_to_max else min(M, len(steps), stage)
    if not markers:
        return q + [tok.latent_id] * (k * c)
    return q + [tok.start_id] + [tok.latent_id] * (k * c) + [tok.end_id]


# Prompt shapes by training mode (MODES): which carry the markers, which carry bare pauses.
MARKED = ("coconut", "pause_as_thought", "no_curriculum")  # question <start> N x <latent> <end>
PAUSED = ("pause", "frontier")                             # question N x <latent>, no markers
PLAIN = ("cot", "nocot", "no_thought", "icot")             # the question alone: no thoughts at all


def final_stage(cfg, ckpt):
    """The stage whose prompts the checkpoint answers by default: the one it was saved at (train.py
    validated it with that stage's prompts), else the last one (every step removed)."""
    stage = ckpt.get("stage")
    return int(stage) if stage is not None else cfg.get("max_latent_stage", 6) + 1


def stage_name(stage, cfg):
    """
    A stage as printed (train.py's lines and tables, sample.py's first line): "stage k" up to max_latent_stage M;
    past it every stage trains alike (every step replaced, M x c thoughts: removed_steps), so stages M+1, M+2, ...
    all read "the last stage, n thoughts" ("up to n" with pad_latent_to_max 0). cfg: a checkpoint's config or
    train.py's vars(args). Checkpoints and metrics.jsonl keep the number stage_for_epoch gave.
    """
    M, c, mode = cfg.get("max_latent_stage", 6), cfg.get("c_thought", 1), cfg.get("mode", "coconut")
    if mode in ("cot", "nocot", "icot") or stage is None or stage <= M:  # icot's "stage" counts removed tokens
        return f"stage {stage}"
    if mode == "no_thought":
        return "the last stage, every step removed"
    n = M * c
    return f"the last stage, {'' if cfg.get('pad_latent_to_max', 1) else 'up to '}{n} thought{'s' * (n != 1)}"


def prompt(tokenized, cfg, stage, tok, n_latent=None):
    """
    The token ids to generate from. n_latent None: exactly what training's validation uses at `stage`
    (curriculum.make_question). Otherwise question + <start> + n_latent x <latent> + <end> (bare
    latents for the pause-token baseline; a mode without thoughts only takes n_latent 0).
    """
    mode = cfg.get("mode", "coconut")
    if n_latent is None:
        return make_question(tokenized, stage, mode, cfg.get("c_thought", 1), cfg.get("max_latent_stage", 6),
                             cfg.get("pad_latent_to_max", True), tok, bool(cfg.get("markers", 1)))
    q = list(tokenized.question)
    if mode in PLAIN:
        if n_latent:
            raise ValueError(f"a {mode} model has no continuous thoughts: --latent can only be 0")
        return q
    if mode in PAUSED or (mode in MARKED and not cfg.get("markers", 1)):
        return q + [tok.latent_id] * n_latent
    if mode in MARKED:
        return q + [tok.start_id] + [tok.latent_id] * n_latent + [tok.end_id]
    raise ValueError(f"unknown mode {mode!r} in the checkpoint")


ANSWER_MARKER = "### "  # what tokenize writes before every answer


def extract_answer(text):
    """
    The answer in a decoded text: what follows the last "### " (the marker this project writes before
    every answer), commas removed; in a text without the marker, the official rule: what follows the
    last '#'. The official rule alone cuts an answer that holds a '#' ("### C#" -> ""); on the paper's
    data sets the two give the same answer (tests/test_curriculum.py checks every record).
    """
    _, marker, tail = text.rpartition(ANSWER_MARKER)
    return (tail if marker else text.split("#")[-1]).replace(",", "").strip()


def is_correct(prompt_ids, new_ids, answer, tok):
    """Like the official code: the decoded prompt + new tokens, through extract_answer, against the
    record's answer without commas."""
    return extract_answer(tok.decode(list(prompt_ids) + list(new_ids))) == answer.replace(",", "").strip()

def build_examples(tokenized, stage, mode="coconut", c_thought=1, max_latent_stage=6,
                   pad_latent_to_max=True, uniform_prob=0.0, rng=None, tok=None,
                   block_size=None, skip_long=False, markers=True, thought_labels=False):
    """make_example over a data set (in order, so a seeded rng draws the official stages), length-checked."""
    examples = [make_example(t, stage, mode, c_thought, max_latent_stage, pad_latent_to_max,
                             uniform_prob, rng, tok, markers, thought_labels) for t in tokenized]
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
    mask 0 and position 0; real tokens keep positions 0..len-1 wherever they sit. Examples with set labels
    (make_example's "label_sets") add "label_sets" (B, L, K): collate_sets.
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

    # filled in numpy, then handed to torch without a copy: a few small tensor writes per row cost more than the
    # attention of the CPU demo's steps
    B = len(seqs)
    ids, mask, pos = np.full((B, width), pad_id, np.int64), np.zeros((B, width), np.int64), np.zeros((B, width), np.int64)
    lab = None if labels is None else np.full((B, width), -100, np.int64)
    for b, (p, s) in enumerate(zip(left, seqs)):
        cols = slice(p, p + len(s))
        ids[b, cols], mask[b, cols], pos[b, cols] = s, 1, np.arange(len(s))
        if lab is not None:
            lab[b, cols] = labels[b]
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "position_ids": torch.from_numpy(pos)}
    if lab is not None:
        batch["labels"] = torch.from_numpy(lab)
    if any(isinstance(e, dict) and "label_sets" in e for e in examples):
        batch["label_sets"] = collate_sets([e.get("label_sets", {}) for e in examples], left, width)
    return batch


def collate_sets(label_sets, left, width):
    """The set labels of a batch: {column: [token ids]} per sequence, shifted by its left padding -> a LongTensor
    (B, width, K), K the largest set, -1 wherever there is no member (and in every column without a set)."""
    K = max((len(ids) for s in label_sets for ids in s.values()), default=1)
    sets = np.full((len(label_sets), width, K), -1, np.int64)
    for b, (p, s) in enumerate(zip(left, label_sets)):
        for col, ids in s.items():
            sets[b, p + col, :len(ids)] = ids
    return torch.from_numpy(sets)
