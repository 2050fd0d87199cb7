"""
Coconut: Chain of Continuous Thought (Hao et al., 2024, arXiv 2412.06769), around the GPT of gpt.py.

The whole method is one change to a language model's input. A sequence looks like

    question <|start-latent|> <|latent|> <|latent|> <|latent|> <|end-latent|> remaining steps, answer

and the input embedding at every <|latent|> is not a token embedding: it is the last hidden state (the
output of ln_f, before lm_head) at the position just before it. That vector is a "continuous thought".
Thought i+1 is computed from thought i, so they cannot all be computed in one parallel pass the way
ordinary tokens are: with n thoughts, the model runs n+1 passes, each extending a KV cache

    pass 0:    the question and <|start-latent|>     -> hidden state h0, which becomes thought 1
    pass 1:    thought 1 (one column)                -> h1, thought 2
    ...
    pass n:    thought n, <|end-latent|>, the rest    -> the hidden states of the rest

so the total work is about one forward pass over the sequence (lm_head then runs only where the loss
needs it). Gradients flow back through every thought into the question, which is what the curriculum
trains (the loss is on the language after the thoughts).

Batches come from curriculum.collate, which left-pads each sequence so that its first <|latent|>
falls at the same column: then pass i handles thought i of every sequence at once, and a sequence
with fewer thoughts simply has ordinary tokens in the columns where others still think.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F


class Coconut(nn.Module):

    def __init__(self, gpt, latent_id, start_id, end_id, eos_id, feedback=True):
        super().__init__()
        self.gpt = gpt
        self.latent_id, self.start_id, self.end_id, self.eos_id = latent_id, start_id, end_id, eos_id
        # feedback=False is the "pause as thought" baseline: <|latent|> stays an ordinary token.
        self.feedback = feedback

    def forward(self, input_ids, attention_mask, labels, position_ids, with_logits=False, label_sets=None,
                spread=False):
        """
        input_ids, attention_mask, labels, position_ids: (B, L) from curriculum.collate.
        label_sets: (B, L, K) token ids, -1 padding, or None: columns labelled with a set of tokens
        (--thought_labels frontier; their labels are -100); spread: their loss (--set_loss; set_cross_entropy).
        -> (loss, logits (B, L, V) if with_logits else None)
        """
        # Position t predicts token t+1; -100 marks the question, the markers and the thoughts. lm_head
        # runs only where a label follows: most of a ProsQA sequence is its question, and logits over
        # 50k tokens at every position (with their softmax and gradient) would take several GB. The
        # last block, too, runs only in the columns that predict a label (gpt's out_cols).
        targets = labels[:, 1:]                                             # (B, L-1)
        scored = targets != -100
        if label_sets is not None:  # a thought labelled with a set is scored too
            sets = label_sets[:, 1:]                                        # (B, L-1, K)
            scored = scored | (sets >= 0).any(-1)
        read = None if with_logits else F.pad(scored.any(0), (0, 1))  # (L,)
        hidden, _ = self.think(input_ids, attention_mask, position_ids, read)  # (B, L, C)
        logits = self.gpt.lm_head(hidden[:, :-1][scored])                   # (N, V)
        if label_sets is None:
            loss = F.cross_entropy(logits, targets[scored])                 # mean over the N labels
        else:
            loss = set_cross_entropy(logits, targets[scored], sets[scored], spread)
        return loss, (self.gpt.lm_head(hidden) if with_logits else None)

    def think(self, input_ids, attention_mask, position_ids, read=None):
        """
        Run the sequence with its continuous thoughts filled in: the feedback loop, n+1 passes.
        Returns the final hidden states (B, L, C) and {"thoughts": (B, n_max, C), "n_thoughts": (B,), "past": the KV cache}.
        read: (L,) bool, the columns whose hidden states the caller reads (None: all); the others come back
        as zeros, and the last block skips them (gpt's out_cols): the same numbers, a third less work in a
        2-layer model. With dropout > 0 in training (GPT-2's 0.1) the numbers differ: the last block draws its
        dropout masks over fewer columns, so the random stream, and every mask drawn after it, differ from a
        run over every column, and training takes another random path (of the same distribution).
        """
        B, L = input_ids.shape
        embeds = self.gpt.transformer.wte(input_ids)  # (B, L, C): token embeddings; thoughts replace some
        is_latent = input_ids == self.latent_id        # (B, L)
        n_thoughts = is_latent.sum(1) if self.feedback else torch.zeros_like(input_ids[:, 0])  # (B,)
        n_max = int(n_thoughts.max())
        first = int(is_latent.float().argmax(1)[n_thoughts > 0].min()) if n_max else L  # the first thought's column
        if read is not None:  # each pass's last column is read too (the next thought), so no pass reads nothing
            read = read.clone()
            read[first - 1:first + n_max - 1] = True
            read[-1] = True
        if n_max == 0:  # no thoughts: an ordinary language-model pass
            _, _, hidden, past = self.gpt(inputs_embeds=embeds, position_ids=position_ids,
                                          attention_mask=attention_mask, with_logits=False, out_cols=_cols(read, 0, L))
            return _spread(hidden, read), dict(thoughts=embeds[:, :0], n_thoughts=n_thoughts, past=past)
        self._check_aligned(is_latent, n_thoughts, first)

        # The passes' inputs, cut from embeds in one split (B, first, C), n_max x (B, 1, C), (B, the rest, C): its
        # backward is one cat, where a slice per pass would add a zero-filled (B, L, C) gradient each.
        question, *columns, rest = embeds.split([first] + [1] * n_max + [L - first - n_max], dim=1)
        hiddens, thoughts, past = [], [], None
        start, end, x = 0, first, question  # pass 0 runs up to the first thought
        for i in range(n_max):
            _, _, hidden, past = self.gpt(inputs_embeds=x, position_ids=position_ids[:, start:end],
                                          attention_mask=attention_mask[:, :end], past_kv=past, with_logits=False,
                                          out_cols=_cols(read, start, end))
            hiddens.append(hidden)
            if i == 0 and torch.is_grad_enabled():
                # Training: keep the cache as chunks that each pass extends, so that the backward pass
                # does not hold a fresh copy of the whole cache for every thought (gpt.chunked_attention).
                past = self.gpt.chunk_cache(past)
            # The feedback: the last hidden state becomes the input at column `end`, in the rows whose
            # i-th thought sits there; rows with fewer thoughts keep their token there.
            thought = hidden[:, -1:]  # (B, 1, C)
            thoughts.append(thought)
            start, end = end, (end + 1 if i + 1 < n_max else L)  # one column per thought, then the rest
            x = torch.where(is_latent[:, start, None, None], thought, columns[i])  # (B, 1, C)
        x = torch.cat([x, rest], dim=1)  # the last pass: thought n_max's column, then the rest
        _, _, hidden, past = self.gpt(inputs_embeds=x, position_ids=position_ids[:, start:end],
                                      attention_mask=attention_mask, past_kv=past, with_logits=False,
                                      out_cols=_cols(read, start, end))
        hiddens.append(hidden)
        return _spread(torch.cat(hiddens, dim=1), read), dict(thoughts=torch.cat(thoughts, dim=1), n_thoughts=n_thoughts,
                                                             past=past)

    @staticmethod
    def _check_aligned(is_latent, n_thoughts, first):
        # Pass i fills column first+i in every row: each row's thoughts must start there, contiguous.
        cols = torch.arange(is_latent.size(1), device=is_latent.device)[None, :]
        expected = (cols >= first) & (cols < first + n_thoughts[:, None])
        if not torch.equal(expected, is_latent):
            raise ValueError("each sequence's <|latent|> tokens must be contiguous and start at the same "
                             "column: batch them with curriculum.collate")

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, max_new_tokens, return_thoughts=False):
        """
        Greedy answers for a batch of padded questions (each ending in <|end-latent|> in Coconut mode).
        input_ids, attention_mask: (B, L), padded by curriculum.collate (left, right or both).
        Returns one list of new token ids per question (without the final <|endoftext|>) and, with
        return_thoughts, one (n_thoughts, C) tensor per question: the vectors fed back as thoughts.
        """
        B, L = input_ids.shape
        attention_mask = attention_mask.long()
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0) * attention_mask  # 0 on padding
        last = L - 1 - attention_mask.flip(1).argmax(1)                    # (B,) each question's last real column
        read = torch.zeros(L, dtype=torch.bool, device=input_ids.device).index_fill(0, last, True)
        hidden, state = self.think(input_ids, attention_mask, position_ids, read)
        past = state["past"]
        next_logits = self.gpt.lm_head(hidden[torch.arange(B), last])       # (B, V): only where it is needed
        next_pos = attention_mask.sum(1)                             # (B,) the position of each first new token
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = next_logits.argmax(-1)  # (B,)
            for b in (~done).nonzero().flatten().tolist():
                # Like the official generate, <|endoftext|> ends an answer from the second token on; a
                # first token that is <|endoftext|> is kept (and decodes to nothing).
                if step > 0 and token[b] == self.eos_id:
                    done[b] = True
                else:
                    out[b].append(int(token[b]))
            if done.all() or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            lg, _, _, past = self.gpt(token[:, None], position_ids=(next_pos + step)[:, None],
                                      attention_mask=attention_mask, past_kv=past)
            next_logits = lg[:, -1]
        if not return_thoughts:
            return out
        return out, [state["thoughts"][b, :int(state["n_thoughts"][b])] for b in range(B)]


def set_cross_entropy(logits, targets, sets, spread=False, reduction="mean"):
    """
    The mean over N labels of -log(the softmax mass on the label's tokens): a label is one token (targets,
    the ordinary cross-entropy) or, where targets is -100, a set (sets). The loss of "Coconut-BFS" (Zhu et al.
    2025, "Emergence of Superposition", arXiv 2509.23365, Appendix E.2): a thought may spread its guess over
    the whole set at no cost, but not outside it; all of it on one member costs nothing either.
    spread=True: a set's loss is instead the mean of -log p over its members (the cross-entropy against an
    even spread over the set), whose minimum holds every member.
    logits: (N, V); targets: (N,); sets: (N, K) token ids, -1 padding. -> a scalar, in nats (reduction="none":
    the N losses, (N,), as --losses reads them piece by piece).
    """
    one = F.pad(targets[:, None], (0, sets.size(1) - 1), value=-1)         # (N, K): the target alone
    members = torch.where(targets[:, None] != -100, one, sets)             # (N, K)
    logp = F.log_softmax(logits.float(), dim=-1)                           # (N, V)
    picked = logp.gather(1, members.clamp(min=0))                          # (N, K)
    inside = members >= 0
    if spread:
        losses = -(picked * inside).sum(1) / inside.sum(1)
    else:
        losses = -torch.logsumexp(picked.masked_fill(~inside, float("-inf")), dim=1)
    return losses.mean() if reduction == "mean" else losses


def _cols(read, start, end):
    """gpt's out_cols for the pass over columns start..end-1: those of them that are read, counted from start;
    None (no picking out: the same numbers, fewer ops) when all of them are, as in a thought's one-column pass."""
    if read is None:
        return None
    cols = read[start:end].nonzero().flatten()
    return None if start > 0 and len(cols) == end - start else cols


def _spread(hidden, read):
    """(B, K, C) hidden states of the K read columns, in order -> (B, L, C), zeros in the columns not read."""
    if read is None:
        return hidden
    B, _, C = hidden.shape
    return hidden.new_zeros(B, read.numel(), C).index_copy(1, read.nonzero().flatten(), hidden)
