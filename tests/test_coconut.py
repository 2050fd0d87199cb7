"""coconut.py against a naive reference: fill one thought, re-run the whole sequence, repeat."""
import pytest
import torch

from coconut import Coconut
from gpt import GPT, GPTConfig
from machinery.llama import Llama, LlamaConfig

V, EOS, START, END, LATENT = 60, 56, 57, 58, 59
FAMILIES = ["gpt2", "llama"]  # Coconut is the same code on both


def model(seed=0, feedback=True, eos=EOS, family="gpt2"):
    torch.manual_seed(seed)
    if family == "llama":  # grouped-query attention and Llama 3's RoPE scaling, both in use at these lengths
        gpt = Llama(LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, block_size=96,
                                vocab_size=V, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                                                original_max_position_embeddings=16))).eval()
        with torch.no_grad():  # Llama's init (std 0.02, no scaled embeddings) writes one token over and over:
            for p in gpt.parameters():  # larger weights give generations that end at different lengths
                if p.dim() == 2:
                    p.mul_(8)
    else:
        gpt = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=V)).eval()
    return Coconut(gpt, LATENT, START, END, eos, feedback=feedback)


def sequences(n_thoughts, seed=1, answer=True):
    """question [start] latent*n [end] (steps + answer), random tokens of different lengths."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, n in enumerate(n_thoughts):
        q = torch.randint(0, 50, (5 + 3 * i,), generator=g).tolist()
        tail = torch.randint(0, 50, (4 + 2 * (i % 3),), generator=g).tolist() if answer else []
        seqs.append(q + ([START] + [LATENT] * n + [END] if n >= 0 else []) + tail)
    return seqs


def batch(seqs):
    """Left-pad so the first latents line up, then right-pad (what curriculum.collate does)."""
    first = [s.index(LATENT) for s in seqs if LATENT in s]
    rows = []
    for s in seqs:
        p = max(first) - s.index(LATENT) if first and LATENT in s else 0
        rows.append(([EOS] * p + s, [0] * p + [1] * len(s), [0] * p + list(range(len(s)))))
    L = max(len(r[0]) for r in rows)
    pad = lambda x, v: x + [v] * (L - len(x))
    ids, mask, pos = (torch.tensor([pad(r[k], v) for r in rows]) for k, v in ((0, EOS), (1, 0), (2, 0)))
    labels = torch.where(mask.bool() & (ids < 50), ids, torch.full_like(ids, -100))
    return ids, mask, labels, pos


def naive_logits(m, ids, mask, pos, latent=LATENT):
    """The method as written in the paper: one full pass per thought, no cache."""
    gpt = m.gpt
    emb = gpt.transformer.wte(ids).clone()
    latent_cols = [(ids[b] == latent).nonzero().flatten().tolist() for b in range(len(ids))]
    for i in range(max(map(len, latent_cols))):
        hidden = gpt(inputs_embeds=emb, attention_mask=mask, position_ids=pos)[2]
        for b, cols in enumerate(latent_cols):
            if len(cols) > i:
                emb[b, cols[i]] = hidden[b, cols[i] - 1]
    return gpt(inputs_embeds=emb, attention_mask=mask, position_ids=pos)[0], emb


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_thoughts", [[0, 0], [1, 1, 1], [6, 2, 0, 3], [3, 6]])
def test_forward_equals_naive_reference(n_thoughts, family):
    m = model(family=family)
    ids, mask, labels, pos = batch(sequences(n_thoughts))
    with torch.no_grad():
        loss, logits = m(ids, mask, labels, pos, with_logits=True)
        want, _ = naive_logits(m, ids, mask, pos)
    real = mask.bool()
    assert torch.allclose(logits[real], want[real], atol=1e-5, rtol=0), (logits - want)[real].abs().max()
    want_loss = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert abs(loss.item() - want_loss.item()) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_thoughts", [[0, 0], [1, 1, 1], [6, 2, 0, 3]])
def test_the_last_block_runs_only_where_a_label_is_read(n_thoughts, family):
    # training's forward runs the last block only in the columns that predict a label (gpt's out_cols): the loss
    # of the naive reference, and the gradients of the forward that runs every column
    m = model(family=family).train()
    ids, mask, labels, pos = batch(sequences(n_thoughts))
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, -4:] = True
    keep[0, 2] = keep[-1, 4] = True  # a label inside a question, in one row only
    labels = torch.where(keep, labels, torch.full_like(labels, -100))
    read = torch.nn.functional.pad((labels[:, 1:] != -100).any(0), (0, 1))
    assert read.sum() <= read.numel() // 2  # most columns are skipped
    grads = []
    for with_logits in (False, True):  # False: the pruned forward; True: every column (read=None)
        m.zero_grad()
        loss, _ = m(ids, mask, labels, pos, with_logits=with_logits)
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (pruned, g), (full, want) = grads
    assert abs(pruned - full) < 1e-6 and g.keys() == want.keys()
    assert all(torch.allclose(g[n], want[n], atol=1e-6, rtol=1e-5) for n in g), \
        max((g[n] - want[n]).abs().max().item() for n in g)
    with torch.no_grad():
        logits, _ = naive_logits(m.eval(), ids, mask, pos)
    naive = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert abs(pruned - naive.item()) < 1e-5
    # the hidden states that are read are the full forward's, the others zero
    with torch.no_grad():
        h_read, _ = m.think(ids, mask, pos, read)
        h_all, _ = m.think(ids, mask, pos)
    rows = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1))
    assert torch.allclose(h_read[rows], h_all[rows], atol=1e-5, rtol=0)
    assert (h_read.abs().amax((0, 2)) == 0).sum() >= read.numel() - read.sum() - max(n_thoughts) - 1


def test_thoughts_change_the_answer_and_pause_is_an_ordinary_token():
    ids, mask, labels, pos = batch(sequences([4, 2]))
    with torch.no_grad():
        with_feedback = model()(ids, mask, labels, pos, with_logits=True)[1]
        pause = model(feedback=False)(ids, mask, labels, pos, with_logits=True)[1]
        plain = model().gpt(ids, attention_mask=mask, position_ids=pos)[0]
    real = mask.bool()
    assert torch.allclose(pause[real], plain[real], atol=1e-6)
    assert not torch.allclose(with_feedback[real], plain[real], atol=1e-3)


def test_answer_loss_reaches_every_thought_and_the_question():
    m = model()
    m.train()
    ids, mask, labels, pos = batch(sequences([5, 3]))
    inputs = []

    def keep_input(module, args, kwargs):  # the input of each pass; in passes 1..n its first column is a thought
        x = kwargs["inputs_embeds"]
        x.retain_grad()
        inputs.append(x)

    handle = m.gpt.register_forward_pre_hook(keep_input, with_kwargs=True)
    loss, _ = m(ids, mask, labels, pos)
    handle.remove()
    loss.backward()
    assert len(inputs) == 5 + 1  # n_max + 1 passes
    for i, x in enumerate(inputs[1:], start=1):
        for b, n in enumerate([5, 3]):
            if i <= n:  # row b's thought i is the first input of pass i, and the answer's loss reaches it
                assert x.grad[b, 0].abs().sum() > 0, (i, b)
    q_rows = m.gpt.transformer.wte.weight.grad[ids[0, mask[0].bool()][:5]]
    assert q_rows.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_cache_gives_the_same_loss_and_gradients_as_the_plain_one(family):
    # Training keeps the cache as chunks (no copy per thought) and scores only labelled positions:
    # against the concatenating cache with logits at every position, the same loss and gradients.
    ids, mask, labels, pos = batch(sequences([6, 2, 0, 4]))
    grads = []
    for chunked in (True, False):
        m = model(family=family)
        if not chunked:  # the plain cache, concatenated (copied) at every thought, as generation keeps it
            m.gpt.chunk_cache = lambda past: past
        if chunked:
            loss, logits = m(ids, mask, labels, pos)
            assert logits is None
        else:
            hidden, _ = m.think(ids, mask, pos)
            full = m.gpt.lm_head(hidden)
            loss = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        loss.backward()
        grads.append((loss.item(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) < 1e-6
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-6, rtol=1e-4), (k, (g1[k] - g2[k]).abs().max())


def test_chunked_attention_equals_sdpa_over_the_concatenation():
    from gpt import chunked_attention
    torch.manual_seed(0)
    q = torch.randn(2, 3, 4, 8)
    ks = [torch.randn(2, 3, n, 8) for n in (5, 1, 4)]
    vs = [torch.randn(2, 3, n, 8) for n in (5, 1, 4)]
    mask = torch.rand(2, 1, 4, 10) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    want = torch.nn.functional.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=mask)
    assert torch.allclose(chunked_attention(q, ks, vs, mask, 0.0), want, atol=1e-6)


def test_misaligned_latents_are_rejected():
    m = model()
    ids, mask, labels, pos = batch(sequences([2, 2]))
    ids[1] = ids[1].roll(1)  # move row 1's thoughts one column right
    with pytest.raises(ValueError, match="collate"):
        m(ids, mask, labels, pos)


def naive_generate(m, question, max_new_tokens):
    """Batch 1, the whole sequence re-run for every new token, as the official generate does."""
    ids = torch.tensor([question])
    ones = torch.ones_like(ids)
    _, emb = naive_logits(m, ids, ones, torch.arange(len(question))[None])
    out = []
    for step in range(max_new_tokens):
        logits = m.gpt(inputs_embeds=emb)[0]
        tok = int(logits[0, -1].argmax())
        if step > 0 and tok == m.eos_id:
            break
        out.append(tok)
        emb = torch.cat([emb, m.gpt.transformer.wte(torch.tensor([[tok]]))], 1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_thoughts", [[3, 3, 3], [0, 2, 6, 1]])
def test_batched_cached_generation_equals_one_at_a_time_uncached(n_thoughts, family):
    questions = sequences(n_thoughts, answer=False)
    m = model(family=family)
    with torch.no_grad():
        # make generation stop at different lengths: call "eos" a token some rows generate late or never
        for eos in sorted(set(sum((naive_generate(m, q, 12) for q in questions), []))):
            m.eos_id = eos
            want = [naive_generate(m, q, 12) for q in questions]
            if len({len(w) for w in want}) > 1:
                break
        ids, mask, _, _ = batch(questions)
        got, thoughts = m.generate(ids, mask, 12, return_thoughts=True)
        assert got == want
        assert any(len(w) < 12 for w in want) and len({len(w) for w in want}) > 1, [len(w) for w in want]
        for q in questions:  # one at a time through the batched path too
            assert m.generate(torch.tensor([q]), torch.ones(1, len(q)), 12) == [naive_generate(m, q, 12)]
        # the returned thoughts are the vectors the naive loop fed back
        for q, th in zip(questions, thoughts):
            _, emb = naive_logits(m, torch.tensor([q]), torch.ones(1, len(q)), torch.arange(len(q))[None])
            cols = [i for i, t in enumerate(q) if t == LATENT]
            assert th.shape == (len(cols), 32)
            assert torch.allclose(th, emb[0, cols], atol=1e-5)


def test_endoftext_as_the_first_answer_token_does_not_stop_generation():
    # The official generate stops at <|endoftext|> only from the second new token on: a first token
    # that is <|endoftext|> is kept. Make the model's first greedy token the eos id and check both rules.
    q = sequences([2], answer=False)[0]
    ids, mask = torch.tensor([q]), torch.ones(1, len(q))
    first = model().generate(ids, mask, 6)[0]
    m = model(eos=first[0])  # the same weights, with the first token it writes declared eos
    out = m.generate(ids, mask, 6)[0]
    assert out[0] == first[0]  # kept, not a stop
    later = [i for i, t in enumerate(first) if i > 0 and t == first[0]]
    assert out == (first[:later[0]] if later else first)  # a later eos stops (and is not returned)
