"""
iCoT (Deng et al. 2024, "From Explicit CoT to Implicit CoT: Learning to Internalize CoT Step by
Step"): the Table 1 row "iCoT". No latents: the chain of thought is cut away token by token from
its start while the model trains on question + what is left of the chain + answer, until none is
left. The rules follow the authors' src/train.py (github.com/da03/Internalize_CoT_Step_by_Step,
commit c2e3891); line numbers below refer to that file.

Their sequence is  question <eos> chain <eos> answer <eos>,  and they remove the tokens from
first_sep+1 up to first_sep+1+to_remove, clamped at the second <eos> (l. 290-291, 301-304): the
first to_remove tokens of the chain, never a separator, all of it once to_remove >= its length.
Here the chain is the steps' tokens concatenated (the question's "\n" and the answer's "###" play
the separators' part), and make_icot_example removes the same: its first n tokens.

Training needs, per batch: to_remove = the scheduled count (removal_schedule) + each sequence's own
random offset (removal_offsets) (l. 283-284); the optimizer is reset before a batch whose count grew
(l. 262-268), unless every chain of the previous batch was already gone (see all_chains_removed).
Generation and evaluation start from the question alone (their generate cuts each sequence at its
first <eos>, model.py l. 85-86); their validation uses the scheduled count with no offset (l. 336).
"""
import math

import torch

from machinery.records import check_length

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
    q, steps, a = tokenized[:3]  # a Tokenized, or any (question, steps, answer)
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
