"""
Answering many questions with a Coconut model: what validation (train.py), sample.py and the tools share.

    prompts (token ids, curriculum.make_question) -> padded batches (curriculum.collate) -> Coconut.generate
    -> answers -> the answer rule (curriculum.is_correct) -> a score

It sits beside the model rather than inside coconut.py because it knows prompts and answers: the model
itself takes only token ids.
"""
import time

import torch

from curriculum import collate, extract_answer, is_correct


@torch.no_grad()
def generate_batched(model, prompts, max_new_tokens, batch_size=32, progress=None):
    """
    Greedy answers to prompts (token id lists) in batches -> (new token ids, thoughts) per prompt, in
    the prompts' order; thoughts are the (n, C) vectors fed back. Prompts of similar length share a batch
    (less padding); batching changes no answer (tests/test_sample.py). progress(done, total) is called
    after each batch.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs, thoughts = [None] * len(prompts), [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = collate([prompts[i] for i in idx], pad_id=model.eos_id, latent_id=model.latent_id)
        o, t = model.generate(b["input_ids"].to(device), b["attention_mask"].to(device), max_new_tokens,
                              return_thoughts=True)
        for i, oi, ti in zip(idx, o, t):
            outs[i], thoughts[i] = oi, ti.float().cpu()
        if progress is not None:
            progress(s + len(idx), len(order))
    return outs, thoughts


@torch.no_grad()
def evaluate(model, tok, questions, answers, max_new_tokens, batch_size=32, progress=None):
    """
    Greedy answers to question prompts (token id lists, as curriculum.make_question builds them), in
    batches, scored as the official code does (curriculum.is_correct).
    -> dict(acc, correct, total, mean_new_tokens, mean_thoughts, seconds_per_question, outputs), outputs
    one dict per question: text (the new tokens decoded), prediction, correct, new_tokens, thoughts.
    mean_thoughts counts the continuous thoughts fed back (not pause tokens), as the paper's "# tokens".
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    was_training = model.training
    model.eval()
    t0 = time.time()
    new, _ = generate_batched(model, questions, max_new_tokens, batch_size, progress)
    seconds = time.time() - t0
    model.train(was_training)
    outputs = []
    for q, a, out in zip(questions, answers, new):
        outputs.append(dict(text=tok.decode(out), prediction=extract_answer(tok.decode(list(q) + out)),
                            correct=is_correct(q, out, a, tok), new_tokens=len(out),
                            thoughts=list(q).count(tok.latent_id) if model.feedback else 0))
    return summarize_outputs(outputs, seconds)


def summarize_outputs(outputs, seconds):
    n = len(outputs)
    correct = sum(o["correct"] for o in outputs)
    return dict(acc=correct / n if n else 0.0, correct=correct, total=n,
                mean_new_tokens=sum(o["new_tokens"] for o in outputs) / max(n, 1),
                mean_thoughts=sum(o["thoughts"] for o in outputs) / max(n, 1),
                seconds_per_question=seconds / max(n, 1), outputs=outputs)
