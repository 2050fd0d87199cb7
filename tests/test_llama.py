"""llama.py against a Llama forward written here from the architecture's definition (logits with padding,
position ids, the cache plain and chunked), Hugging Face's file layouts (one file, shards, bf16), the hub
download from a server on 127.0.0.1, other architectures' configs, Llama 3's tokenizer from a rank file made
here, and (when transformers is installed) Hugging Face's own LlamaForCausalLM."""
import base64
import http.server
import json
import math
import os
import struct
import threading

import pytest
import torch

from machinery.llama import Llama, LlamaConfig, hub_folder
from machinery.records import tokenize
from machinery.tokenizer import LLAMA3_SPECIAL, Tokenizer, llama3_tokenizer

# head_dim 8: four frequencies; with original_max_position_embeddings 16 the fastest one (wavelength 6.3)
# lies in Llama 3's blended band and the three slower ones are divided by `factor`: every branch is used.
SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=16)
CONFIG = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, vocab_size=64, block_size=96,
              rope_theta=500000.0, rope_scaling=SCALING, rms_norm_eps=1e-5)


def random_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**CONFIG, **kw})).eval()
    with torch.no_grad():  # norms away from 1, so that a wrong norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("ln_f.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model


# ---- the reference: Llama written out, one head and one frequency at a time -------------------------------------

def reference_inv_freq(c):
    """Llama 3's frequencies, with the scaling rule spelled out per frequency."""
    d = c["n_embd"] // c["n_head"]
    s = c["rope_scaling"]
    out = []
    for i in range(0, d, 2):
        f = 1.0 / torch.tensor(c["rope_theta"]).float() ** (torch.tensor(i).float() / d)
        wavelength = 2 * math.pi / f
        low, high = s["original_max_position_embeddings"] / s["low_freq_factor"], s["original_max_position_embeddings"] / s["high_freq_factor"]
        if wavelength < high:
            out.append(f)
        elif wavelength > low:
            out.append(f / s["factor"])
        else:
            a = (s["original_max_position_embeddings"] / wavelength - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            out.append((1 - a) * f / s["factor"] + a * f)
    return torch.stack(out)


def reference_logits(sd, c, x_embeds, positions, keys, probs=None):
    """
    sd: HF-layout tensors; x_embeds (T, C) one sequence; positions (T,); keys (T,) bool: which of the T
    columns are real (a query sees the real columns at or before it). -> logits (T, V); probs, a list,
    receives each layer's attention probabilities (n_head, T, T).
    Rotation as complex numbers: dimension j pairs with j + d/2 (HF's layout), turned by position * freq.
    """
    T, C = x_embeds.shape
    H, KV = c["n_head"], c["n_kv_head"]
    d = C // H
    freqs = reference_inv_freq(c)
    turn = torch.polar(torch.ones(T, d // 2), positions[:, None].float() * freqs[None])  # (T, d/2) complex

    def rms(x, w):
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    def rotate(v):  # (T, d)
        z = torch.complex(v[:, :d // 2], v[:, d // 2:]) * turn
        return torch.cat([z.real, z.imag], -1)

    x = x_embeds
    for layer in range(c["n_layer"]):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].t() for n in "qkv")
        heads, layer_probs = [], []
        for head in range(H):
            kv = head // (H // KV)
            qh, kh = rotate(q[:, head * d:(head + 1) * d]), rotate(k[:, kv * d:(kv + 1) * d])
            vh = v[:, kv * d:(kv + 1) * d]
            scores = qh @ kh.t() / math.sqrt(d)
            allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & keys[None, :]
            allowed |= torch.eye(T, dtype=torch.bool)
            layer_probs.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1))
            heads.append(layer_probs[-1] @ vh)
        if probs is not None:
            probs.append(torch.stack(layer_probs))
        x = x + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].t()
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].t(), h @ sd[p + "mlp.up_proj.weight"].t()
        x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].t()
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return rms(x, sd["model.norm.weight"]) @ head.t()


def hf_tensors(model):
    """Our model's weights under Hugging Face's names (what save_pretrained writes)."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("transformer.wte.", "model.embed_tokens.").replace("transformer.h.", "model.layers.")
        k = k.replace("transformer.ln_f.", "model.norm.")
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[k] = v.clone()
    return out


def padded_batch(seqs, pads, L, fill=3):
    idx = torch.full((len(seqs), L), fill)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    pos = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, (s, left) in enumerate(zip(seqs, pads)):
        idx[b, left:left + len(s)] = s
        mask[b, left:left + len(s)] = 1
        pos[b, left:left + len(s)] = torch.arange(len(s)) + 5 * b  # rows start at different positions
    return idx, mask, pos


@pytest.mark.parametrize("tied", [True, False])
def test_logits_equal_the_reference_with_padding_positions_and_cache(tied):
    model = random_model(tie_word_embeddings=tied)
    sd = hf_tensors(model)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 64, (n,), generator=g) for n in (30, 21, 12)]
    idx, mask, pos = padded_batch(seqs, [0, 6, 3], 33)  # right-, left- and both-padded rows
    with torch.no_grad():
        logits = model(idx, attention_mask=mask, position_ids=pos)[0]
        want = [reference_logits(sd, CONFIG, model.transformer.wte(idx[b]), pos[b], mask[b].bool()) for b in range(3)]
        for b in range(3):
            real = mask[b].bool()
            assert torch.allclose(logits[b, real], want[b][real], atol=1e-5, rtol=0), (logits[b, real] - want[b][real]).abs().max()
        # the same batch through the cache: 20 columns, then 9, then 4; and through the chunked cache
        for chunked in (False, True):
            parts, past = [], None
            for a, z in ((0, 20), (20, 29), (29, 33)):
                out, _, _, past = model(idx[:, a:z], attention_mask=mask[:, :z], position_ids=pos[:, a:z], past_kv=past)
                parts.append(out)
                if chunked and a == 0:
                    past = model.chunk_cache(past)
                    assert isinstance(past[0][0], list) and past[0][0][0].shape == (3, 2, 20, 8)  # n_kv_head keys
            cached = torch.cat(parts, 1)
            assert torch.allclose(cached[mask.bool()], logits[mask.bool()], atol=1e-5, rtol=0), chunked
    assert torch.isfinite(logits).all()  # padding queries too


@torch.no_grad()
def test_attention_probs_of_the_analyses_on_llama():
    from machinery.analysis import attention_probs
    model = random_model()
    sd = hf_tensors(model)
    seqs = [torch.randint(0, 64, (n,)) for n in (12, 8)]
    idx, mask, pos = padded_batch(seqs, [0, 4], 12)
    embeds = model.transformer.wte(idx)
    got = attention_probs(model, embeds, pos, mask)
    assert len(got) == 2 and got[0].shape == (2, 4, 12, 12)
    for b in range(2):
        want = []
        reference_logits(sd, CONFIG, embeds[b], pos[b], mask[b].bool(), probs=want)
        real = mask[b].bool()
        for g, w in zip(got, want):
            assert torch.allclose(g[b][:, real][:, :, real], w[:, real][:, :, real], atol=1e-5)
    assert all(not blk.self_attn._forward_pre_hooks for blk in model.transformer.h)


def test_rope_scaling_is_llama3s_and_positions_matter():
    from machinery.llama import rope_frequencies
    c = LlamaConfig(**CONFIG)
    assert torch.allclose(rope_frequencies(c), reference_inv_freq(CONFIG), rtol=1e-6, atol=0)
    plain = LlamaConfig(**{**CONFIG, "rope_scaling": None})
    f, f0 = rope_frequencies(c), rope_frequencies(plain)
    assert f[0] != f0[0] and f[0] != f0[0] / 8 and torch.allclose(f[1:], f0[1:] / 8)  # blended, then slowed
    model = random_model()
    idx = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        a = model(idx)[0]
        shifted = model(idx, position_ids=torch.arange(40, 46)[None])[0]
        spread = model(idx, position_ids=torch.arange(0, 12, 2)[None])[0]
    # RoPE: attention sees only distances, so shifting every position changes nothing, spreading them does
    assert torch.allclose(a, shifted, atol=1e-5) and not torch.allclose(a, spread, atol=1e-3)


def test_ids_or_embeddings_hidden_after_the_norm_and_gradients():
    model = random_model(tie_word_embeddings=False)
    idx = torch.randint(0, 64, (2, 9))
    targets = torch.randint(0, 64, (2, 9))
    logits_a, loss_a, hidden_a, _ = model(idx, targets)
    emb = model.transformer.wte(idx).detach().requires_grad_()
    logits_b, loss_b, hidden_b, _ = model(inputs_embeds=emb, targets=targets)
    assert torch.equal(logits_a, logits_b) and torch.equal(loss_a, loss_b)
    assert torch.allclose(model.lm_head(hidden_a), logits_a, atol=1e-6)
    assert model(idx, with_logits=False)[0] is None
    loss_b.backward()
    assert emb.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 97, dtype=torch.long))


def test_copy_rows_keeps_the_vocabulary():
    for tied in (True, False):
        model = random_model(tie_word_embeddings=tied)
        model.copy_rows([60, 61, 62], 5)
        assert model.config.vocab_size == 64
        for i in (60, 61, 62):
            assert torch.equal(model.transformer.wte.weight[i], model.transformer.wte.weight[5])
            assert torch.equal(model.lm_head.weight[i], model.lm_head.weight[5])


# ---- Hugging Face's files ----------------------------------------------------------------------------------

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.contiguous().numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def hf_config(c, **kw):
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c["n_embd"],
                intermediate_size=c["intermediate_size"], num_hidden_layers=c["n_layer"],
                num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"], vocab_size=c["vocab_size"],
                max_position_embeddings=c["block_size"], rms_norm_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"],
                rope_scaling=c["rope_scaling"], tie_word_embeddings=c.get("tie_word_embeddings", True),
                hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="bfloat16", **kw)


def write_llama_folder(folder, model, shards=1, dtype=torch.bfloat16, ranks=None):
    """model's weights as save_pretrained writes them: config.json, then model.safetensors, or `shards`
    files and their index; ranks: a tokenizer.model text to put beside them (under original/)."""
    os.makedirs(folder, exist_ok=True)
    c = {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size",
                                               "vocab_size", "block_size", "rms_norm_eps", "rope_theta",
                                               "rope_scaling", "tie_word_embeddings")}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(c), f)
    tensors = {k: v.to(dtype) for k, v in hf_tensors(model).items()}
    if shards == 1:
        write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::shards]}
            write_safetensors(os.path.join(folder, file), part)
            weight_map.update({k: file for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    if ranks is not None:
        os.makedirs(os.path.join(folder, "original"), exist_ok=True)
        with open(os.path.join(folder, "original", "tokenizer.model"), "w") as f:
            f.write(ranks)
    return tensors


@pytest.mark.parametrize("shards,tied", [(1, True), (3, False)])
def test_one_file_and_shards_in_bf16_load_every_tensor(tmp_path, shards, tied):
    model = random_model(tie_word_embeddings=tied)
    tensors = write_llama_folder(str(tmp_path), model, shards=shards)
    loaded = Llama.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == LlamaConfig(**{**CONFIG, "tie_word_embeddings": tied})
    mine = hf_tensors(loaded)
    assert set(mine) == set(tensors)
    for k, v in tensors.items():
        assert mine[k].dtype == torch.float32 and torch.equal(mine[k], v.float()), k  # bf16 -> float32, exactly
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tied
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref = reference_logits({k: v.float() for k, v in tensors.items()}, CONFIG, loaded.transformer.wte(idx[1]),
                               torch.arange(10), torch.ones(10, dtype=torch.bool))
        assert torch.allclose(loaded(idx)[0][1], ref, atol=1e-5, rtol=0)


def test_bad_folders_and_other_architectures_get_one_line(tmp_path):
    model = random_model()
    good = str(tmp_path / "good")
    tensors = write_llama_folder(good, model, shards=2)
    cfg = json.load(open(os.path.join(good, "config.json")))

    def fails(config=None, drop=None, words=()):
        d = tmp_path / f"case{len(os.listdir(tmp_path))}"
        d.mkdir()
        json.dump(config or cfg, open(d / "config.json", "w"))
        t = {k: v for k, v in tensors.items() if k != drop}
        write_safetensors(str(d / "model.safetensors"), t)
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            Llama.from_pretrained(str(d))
        assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)

    fails(dict(cfg, model_type="qwen2", architectures=["Qwen2ForCausalLM"]), words=("qwen2", "Qwen2ForCausalLM", "biases"))
    fails(dict(cfg, model_type="mixtral", architectures=["MixtralForCausalLM"]), words=("mixture of experts",))
    fails(dict(cfg, num_local_experts=8), words=("mixture of experts",))
    fails(dict(cfg, attention_bias=True), words=("attention_bias",))
    fails(dict(cfg, rope_scaling=dict(rope_type="yarn", factor=4.0)), words=("yarn",))
    fails(drop="model.layers.1.mlp.up_proj.weight", words=("missing", "transformer.h.1.mlp.up_proj.weight"))
    fails(dict(cfg, intermediate_size=50), words=("shape", "gate_proj"))
    # an index that names a tensor its shard lacks
    idx_path = os.path.join(good, "model.safetensors.index.json")
    index = json.load(open(idx_path))
    index["weight_map"]["model.layers.9.extra"] = next(iter(index["weight_map"].values()))
    json.dump(index, open(idx_path, "w"))
    with pytest.raises(ValueError, match="missing tensor model.layers.9.extra"):
        Llama.from_pretrained(good)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        Llama.from_pretrained(str(tmp_path / "nope"))


# ---- the tokenizer -----------------------------------------------------------------------------------------

def rank_file(words=("the", " the", " cat", "ing", " is", "\n\n", "###", "123")):
    """A tiktoken rank file: the 256 bytes, then some whole pieces, as "base64 rank" lines."""
    tokens = [bytes([b]) for b in range(256)] + [w.encode() for w in words]
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens))


def test_llama3_tokenizer_from_a_rank_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text(rank_file())
    tok = llama3_tokenizer(str(path))
    n = 256 + 8
    assert tok.vocab_size == n + 256  # 256 special tokens, the markers among them: nothing added
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 1)
    assert (tok.start_id, tok.end_id, tok.latent_id) == (n + 11, n + 12, n + 13)
    assert LLAMA3_SPECIAL[11:14] == [f"<|reserved_special_token_{i}|>" for i in (3, 4, 5)]
    assert LLAMA3_SPECIAL[-1] == "<|reserved_special_token_247|>" and len(LLAMA3_SPECIAL) == 256
    text = "the cat is purring\n### 1234 été <|end_of_text|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and n + 1 not in ids  # special tokens in text are plain characters
    assert tok.encode(" the cat is") == [256 + 1, 256 + 2, 256 + 4]
    assert tok.encode(" 1234") == [ord(" "), 256 + 7, ord("4")]  # Llama 3: digits alone, in runs of at most 3
    # a question starts with <|begin_of_text|>; the answer ends with <|end_of_text|>; decode skips them all
    t = tokenize({"question": "the cat", "steps": ["is"], "answer": "123"}, tok)
    assert t.question[0] == tok.bos_id and t.answer[-1] == tok.eos_id
    assert tok.decode(t.question + [tok.latent_id] + t.answer) == "the cat\n### 123"
    # the checkpoint keeps the whole rank file: the same tokenizer without the file
    again = Tokenizer.from_dict(tok.to_dict())
    assert again.encode(text) == ids and again.latent_id == tok.latent_id
    # not a rank file: one line
    (tmp_path / "bad.model").write_text("this is not base64!! 3\n")
    with pytest.raises(ValueError, match="line 1 .* not a tiktoken rank file"):
        llama3_tokenizer(str(tmp_path / "bad.model"))
    (tmp_path / "spm.model").write_bytes(b"\n\x0e\x00\xff\xfe sentencepiece")
    with pytest.raises(ValueError, match="SentencePiece"):
        llama3_tokenizer(str(tmp_path / "spm.model"))


# ---- the hub: a server on 127.0.0.1 ------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    routes, seen = {}, []

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Authorization")))
        if self.path not in self.routes:
            self.send_error(404)
            return
        body = self.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_from_the_hub_sharded(tmp_path, monkeypatch):
    src = tmp_path / "src"
    model = random_model()
    write_llama_folder(str(src), model, shards=2, ranks=rank_file())
    repo = "meta-llama/Tiny-Llama-Test"
    for root, _, files in os.walk(src):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), src).replace(os.sep, "/")
            Handler.routes[f"/{repo}/resolve/main/{rel}"] = open(os.path.join(root, f), "rb").read()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        cache = tmp_path / "cache"
        folder = hub_folder(repo, cache_dir=str(cache))
        loaded = Llama.from_pretrained(folder)
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16).float()), k
        got = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
        assert got == sorted(["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors", os.path.join("original", "tokenizer.model")])
        assert all(auth == "Bearer hf_test" for _, auth in Handler.seen)  # a gated repo needs the token
        # a repo that is not there: one line that says how to get past it
        with pytest.raises(RuntimeError) as e:
            hub_folder("meta-llama/Absent", cache_dir=str(cache))
        assert "404" in str(e.value) and "HF_ENDPOINT" in str(e.value) and "\n" not in str(e.value)
        assert not os.path.exists(cache / "meta-llama" / "Absent" / "config.json")
    finally:
        httpd.shutdown()
        Handler.routes.clear()
        Handler.seen.clear()


# ---- Hugging Face's LlamaForCausalLM, when installed --------------------------------------------------------

def test_equals_hugging_face_llama(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not a dependency of this project; "
                                       "pip install transformers to compare with Hugging Face's LlamaForCausalLM")
    from coconut import Coconut
    c = {**CONFIG, "tie_word_embeddings": False}
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(c).items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF's init (std 0.02) gives logits below 1: larger weights make differences show
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(8)
    hf.save_pretrained(str(tmp_path))  # safetensors, as the hub holds them
    ours = Llama.from_pretrained(str(tmp_path)).eval()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 60, (n,), generator=g) for n in (18, 11)]
    idx, mask, pos = padded_batch(seqs, [0, 7], 18)
    with torch.no_grad():
        want = hf(input_ids=idx, attention_mask=mask, position_ids=pos).logits
        got = ours(idx, attention_mask=mask, position_ids=pos)[0]
        real = mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0), (got - want)[real].abs().max()
        # Coconut: thoughts fed back through HF's model, one full pass per thought, against ours
        LATENT, START, END = 61, 62, 63
        ids = torch.tensor([[5, 9, 2, 7, START, LATENT, LATENT, LATENT, END, 4, 8]])
        m = torch.ones_like(ids)
        p = torch.arange(ids.size(1))[None]
        emb = hf.model.embed_tokens(ids).clone()
        for col in (5, 6, 7):
            out = hf(inputs_embeds=emb, attention_mask=m, position_ids=p, output_hidden_states=True)
            emb[0, col] = out.hidden_states[-1][0, col - 1]  # the last hidden state is after the final norm
        want = hf(inputs_embeds=emb, attention_mask=m, position_ids=p).logits
        coconut = Coconut(ours, LATENT, START, END, 0)
        _, got = coconut(ids, m, torch.full_like(ids, -100).index_fill(1, torch.tensor([9, 10]), 1), p, with_logits=True)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


# ---- train.py and sample.py on a tiny random Llama ----------------------------------------------------------

def tiny_llama_folder(folder, records, seed=0):
    """A random 1-layer Llama with a rank file of the records' own words (GPT-2-like pieces), as a folder."""
    import regex
    from machinery.tokenizer import LLAMA3_SPLIT, _texts
    words = sorted({p for r in records for t in _texts(r) for p in regex.findall(LLAMA3_SPLIT, t) if len(p.encode()) > 1})
    ranks = rank_file(words)
    n = 256 + len(words) + 256
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, vocab_size=n,
                              block_size=256, rope_scaling=SCALING))
    write_llama_folder(folder, model, shards=2, ranks=ranks)
    return model


def test_train_resume_and_sample_on_a_tiny_llama(tmp_path, capsys):
    import sample
    import train
    from machinery.checkpoint import init_model, load_checkpoint
    from machinery.interrupt import SIGNAL_HOOK
    import data.tiny.prepare as tiny_prepare
    from test_train import assert_same_weights, run_cli, weights

    data = tmp_path / "data"
    assert tiny_prepare.main(["--out_dir", str(data / "tiny"), "--n_train", "24", "--n_valid", "6", "--n_test", "2",
                                "--steps", "2", "--width", "4"]) == 0
    records = json.load(open(data / "tiny" / "train.json")) + json.load(open(data / "tiny" / "valid.json"))
    folder = str(tmp_path / "llama")
    tiny_llama_folder(folder, records)

    # the recipe's defaults from a Llama: lr 1e-5 (CODI), CoT then Coconut epochs on GSM8k; float32 on a CPU
    args = train.parse_args(["--init_from", folder, "--device", "cpu"])
    assert args.lr == 1e-5 and args.dtype == "float32"
    assert train.parse_args(["--init_from", folder, "--dataset", "gsm8k", "--mode", "cot"]).epochs == 5
    gsm = train.parse_args(["--init_from", folder, "--dataset", "gsm8k", "--start_epoch", "1"])
    assert (gsm.stage_epochs, gsm.epochs, gsm.c_thought, gsm.max_latent_stage) == (1, 6, 2, 3)
    gpt, tok = init_model(args, [])
    assert isinstance(gpt, Llama) and gpt.config.vocab_size == tok.vocab_size  # the markers added no row
    for i in (tok.start_id, tok.end_id, tok.latent_id):  # "<<" is two tokens here: the rows start as eos's
        assert torch.equal(gpt.transformer.wte.weight[i], gpt.transformer.wte.weight[tok.eos_id])

    common = ["--dataset", "tiny", "--data_dir", str(data), "--init_from", folder, "--batch_size", "2", "--grad_accum", "2",
              "--lr", "1e-2", "--stage_epochs", "1", "--max_latent_stage", "2", "--epochs", "3", "--max_new_tokens", "24",
              "--threads", "1", "--log_every", "0", "--save_every", "4", "--dropout", "0.1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_cli(common + ["--out_dir", a])
    assert r.returncode == 0, r.stderr
    r = run_cli(common + ["--out_dir", b], env={SIGNAL_HOOK: "5:KILL"})
    assert r.returncode == -9, r.stderr
    r = run_cli(["--out_dir", b, "--resume"], env={SIGNAL_HOOK: "13:KILL"})
    assert r.returncode == -9, r.stderr
    r = run_cli(["--out_dir", b, "--resume"])
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(os.path.join(a, "ckpt.pt")), weights(os.path.join(b, "ckpt.pt")))
    metrics = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [m["stage"] for m in metrics] == [0, 1, 2] and metrics[-1]["train_loss"] < 0.6 * metrics[0]["train_loss"]

    # from a Llama run's checkpoint (the GSM8k recipe's second run) the Llama defaults hold too
    again = train.parse_args(["--init_from", os.path.join(a, "best.pt"), "--dataset", "gsm8k", "--start_epoch", "1"])
    assert (again.lr, again.stage_epochs, again.epochs) == (1e-5, 1, 6)
    model, tok, ck = load_checkpoint(os.path.join(a, "ckpt.pt"))
    assert ck["arch"] == "llama" and ck["tokenizer"]["kind"] == "llama3" and isinstance(model.gpt, Llama)
    assert ck["model_args"]["vocab_size"] == tok.vocab_size and ck["config"]["dropout"] == 0.1
    # sample.py: --eval gives the run's last validation, --show_thoughts decodes thoughts through lm_head
    assert sample.main(["--ckpt", os.path.join(a, "ckpt.pt"), "--eval", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"{metrics[-1]['val_correct']}/{metrics[-1]['val_total']}" in out
    assert sample.main(["--ckpt", os.path.join(a, "ckpt.pt"), "--split", "valid", "--n", "2", "--show_thoughts"]) == 0
    out = capsys.readouterr().out
    assert sum(l.startswith("  thought ") for l in out.splitlines()) == 2 * 2
    assert sample.main(["--ckpt", os.path.join(a, "ckpt.pt"), "--analyze", "--n", "4"]) == 0
    assert "by height" in capsys.readouterr().out
