"""gpt.py: weights in both safetensors layouts, the KV cache, padding, embeddings in, downloads."""
import http.server
import json
import math
import os
import struct
import threading

import pytest
import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, download_hub_weights, read_safetensors

CONFIG = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=300)


def hf_state_dict(config, seed=0):
    """Random weights in the layout of OpenAI's GPT-2 on the hub: Conv1D weights stored (in, out)."""
    g = torch.Generator().manual_seed(seed)
    C, V = config["n_embd"], config["vocab_size"]
    r = lambda *s: torch.randn(*s, generator=g) * 0.2
    sd = {"wte.weight": r(V, C), "wpe.weight": r(config["block_size"], C),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(config["n_layer"]):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
                   p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
                   p + "attn.bias": torch.ones(1, 1, 8, 8)})  # the causal-mask buffer old files carry
    return sd


def write_safetensors(path, tensors):
    """An independent writer: 8-byte header length, JSON header, raw little-endian data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def reference_logits(sd, idx, n_head):
    """GPT-2's forward written from its definition, straight from the hub-layout tensors."""
    T = idx.size(1)
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    i = 0
    while f"h.{i}.ln_1.weight" in sd:
        p = f"h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).chunk(3, -1)
        heads = lambda t: t.view(*t.shape[:2], n_head, -1).transpose(1, 2)
        q, k, v = heads(q), heads(k), heads(v)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
        y = att.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        y = y.transpose(1, 2).reshape(x.shape)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
        i += 1
    return ln(x, "ln_f") @ sd["wte.weight"].t()


@pytest.fixture
def tiny(tmp_path):
    sd = hf_state_dict(CONFIG)
    hub = tmp_path / "hub.safetensors"  # the hub's layout: bare names, no lm_head
    write_safetensors(hub, sd)
    folder = tmp_path / "saved"          # save_pretrained's layout: transformer. prefix, lm_head, config.json
    folder.mkdir()
    write_safetensors(folder / "model.safetensors",
                      {**{"transformer." + k: v for k, v in sd.items()}, "lm_head.weight": sd["wte.weight"]})
    (folder / "config.json").write_text(json.dumps(dict(
        n_layer=CONFIG["n_layer"], n_head=CONFIG["n_head"], n_embd=CONFIG["n_embd"],
        n_positions=CONFIG["block_size"], vocab_size=CONFIG["vocab_size"], model_type="gpt2")))
    return sd, hub, folder


def test_both_layouts_load_every_tensor_in_place(tiny):
    sd, hub, folder = tiny
    idx = torch.randint(0, CONFIG["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(1))
    want = reference_logits(sd, idx, CONFIG["n_head"])
    model = GPT.from_pretrained(str(folder)).eval()
    assert model.config.vocab_size == 300 and model.config.block_size == 64
    with torch.no_grad():
        got = model(idx)[0]
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # the bare hub file: a width that is no GPT-2 size has no known head count, so it asks for a config
    with pytest.raises(ValueError, match="config.json"):
        GPT.from_pretrained(str(hub))
    folder2 = hub.parent / "hubfolder"
    folder2.mkdir()
    os.rename(hub, folder2 / "model.safetensors")
    (folder2 / "config.json").write_text((folder / "config.json").read_text())
    with torch.no_grad():
        got2 = GPT.from_pretrained(str(folder2)).eval()(idx)[0]
    assert torch.equal(got, got2)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_bare_file_of_a_gpt2_width_infers_its_sizes(tmp_path):
    cfg = dict(CONFIG, n_embd=768, n_head=12, n_layer=1, block_size=16)
    write_safetensors(tmp_path / "m.safetensors", hf_state_dict(cfg))
    m = GPT.from_pretrained(str(tmp_path / "m.safetensors"))
    assert (m.config.n_layer, m.config.n_head, m.config.n_embd, m.config.block_size, m.config.vocab_size) == (1, 12, 768, 16, 300)


def test_missing_misshapen_and_corrupt_tensors_are_named(tiny, tmp_path):
    sd, _, folder = tiny
    cfg = (folder / "config.json").read_text()
    for case, tensors in [("missing", {k: v for k, v in sd.items() if k != "h.1.mlp.c_fc.bias"}),
                          ("shape", {**sd, "h.0.ln_2.bias": torch.zeros(5)})]:
        d = tmp_path / case
        d.mkdir()
        write_safetensors(d / "model.safetensors", tensors)
        (d / "config.json").write_text(cfg)
        with pytest.raises(ValueError, match="h.1.mlp.c_fc.bias" if case == "missing" else r"h.0.ln_2.bias has shape \(5,\)"):
            GPT.from_pretrained(str(d))
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="corrupt"):
        read_safetensors(str(tmp_path / "cut.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        read_safetensors(str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such model"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))


def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG, **kw})).eval()


def test_kv_cache_decoding_equals_full_forward():
    model = random_model()
    idx = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        full = model(idx)[0]
        logits, _, _, past = model(idx[:, :7])
        parts = [logits]
        for t in range(7, 20, 4):  # chunks of 4, then 1, through the cache
            logits, _, _, past = model(idx[:, t:t + 4], past_kv=past)
            parts.append(logits)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_padded_batch_equals_each_sequence_alone():
    model = random_model()
    seqs = [torch.randint(0, 300, (n,)) for n in (9, 14, 5)]
    L = 17
    # row 0 left-padded, row 1 right-padded, row 2 padded on both sides
    pads = [(8, 0), (0, 3), (4, 8)]
    idx = torch.full((3, L), 7)
    mask = torch.zeros(3, L, dtype=torch.long)
    pos = torch.zeros(3, L, dtype=torch.long)
    for b, (s, (left, _)) in enumerate(zip(seqs, pads)):
        idx[b, left:left + len(s)] = s
        mask[b, left:left + len(s)] = 1
        pos[b, left:left + len(s)] = torch.arange(len(s))
    with torch.no_grad():
        batched = model(idx, attention_mask=mask, position_ids=pos)[0]
        for b, (s, (left, _)) in enumerate(zip(seqs, pads)):
            alone = model(s[None])[0][0]
            assert torch.allclose(batched[b, left:left + len(s)], alone, atol=1e-5, rtol=0)
        # the same batch decoded on through the cache: one more token per row
        _, _, _, past = model(idx, attention_mask=mask, position_ids=pos)
        nxt = torch.randint(0, 300, (3, 1))
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                     position_ids=mask.sum(1, keepdim=True), past_kv=past)[0]
        for b, s in enumerate(seqs):
            alone = model(torch.cat([s, nxt[b]])[None])[0][0, -1]
            assert torch.allclose(step[b, 0], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()  # padding rows too: no NaN from fully masked queries


def test_ids_in_equals_embeddings_in_and_gradients_reach_embeddings():
    model = random_model()
    idx = torch.randint(0, 300, (2, 11))
    targets = torch.randint(0, 300, (2, 11))
    targets[:, :4] = -100
    logits_a, loss_a, hidden_a, _ = model(idx, targets)
    emb = model.transformer.wte(idx).detach().requires_grad_()
    logits_b, loss_b, hidden_b, _ = model(inputs_embeds=emb, targets=targets)
    assert torch.equal(logits_a, logits_b) and torch.equal(hidden_a, hidden_b) and torch.equal(loss_a, loss_b)
    want = F.cross_entropy(logits_a[:, 4:].reshape(-1, 300), targets[:, 4:].reshape(-1))
    assert torch.allclose(loss_a, want)
    loss_b.backward()
    assert emb.grad.abs().sum() > 0
    # hidden is the output of ln_f: the logits are hidden @ wte^T
    assert torch.allclose(hidden_a @ model.transformer.wte.weight.t(), logits_a, atol=1e-5)


def test_grow_vocab_copies_rows_and_stays_tied():
    model = random_model()
    new = model.grow_vocab(3, copy_from=42)
    assert new == [300, 301, 302] and model.config.vocab_size == 303
    w = model.transformer.wte.weight
    assert model.lm_head.weight is w
    for i in new:
        assert torch.equal(w[i], w[42])
    assert model(torch.tensor([[300, 1, 302]]))[0].shape == (1, 3, 303)


def test_generate_with_cache_equals_greedy_recompute():
    model = random_model()
    idx = torch.randint(0, 300, (2, 5))
    out = model.generate(idx, 10, top_k=1)  # top_k=1 makes sampling greedy
    ref = idx
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


# ---- downloads, against a server on 127.0.0.1 ---------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    routes = {}  # path -> (declared length, body)

    def do_GET(self):
        if self.path not in self.routes:
            self.send_error(404)
            return
        length, body = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)  # a body shorter than the declared length is a cut connection

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    yield Handler.routes
    httpd.shutdown()
    Handler.routes.clear()


def test_download_from_hub(server, tiny, tmp_path):
    data = (tiny[2] / "model.safetensors").read_bytes()
    url = "/openai-community/gpt2/resolve/main/model.safetensors"
    server[url] = (len(data), data)
    path = download_hub_weights("gpt2", cache_dir=str(tmp_path / "cache"))
    assert open(path, "rb").read() == data
    assert set(read_safetensors(path)) == {"transformer." + k for k in tiny[0]} | {"lm_head.weight"}
    assert os.listdir(os.path.dirname(path)) == ["model.safetensors"]  # no temporary file left


@pytest.mark.parametrize("case", ["cut", "404", "offline"])
def test_failed_download_leaves_nothing(server, tmp_path, monkeypatch, case):
    if case == "cut":
        server["/openai-community/gpt2-medium/resolve/main/model.safetensors"] = (1000, b"x" * 400)
    if case == "offline":  # nothing listens there: the connection is refused, as on a machine without network
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="incomplete|failed") as e:
        GPT.from_pretrained("gpt2-medium", cache_dir=str(cache))
    assert "\n" not in str(e.value)
    if case == "404":
        assert "404" in str(e.value)
    assert "HF_ENDPOINT" in str(e.value) and "--init_from" in str(e.value)  # how to get past it offline
    assert not cache.exists()  # not even the empty folders it would have filled
