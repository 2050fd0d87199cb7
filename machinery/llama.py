"""
Llama (the Llama 3 family: Llama-3.2-1B and 3B, Llama-3.1-8B, or any folder of that architecture) in one
file, beside gpt.py and with GPT's interface, so that Coconut (coconut.py), train.py, sample.py and the
analyses run on it unchanged: model.gpt may be either.

What the two families share, taken from gpt.py rather than written twice: the forward's interface (ids
or input embeddings, position ids, a padding mask over all keys, the KV cache plain or chunked, the
hidden states after the final norm, lm_head only where needed), the attention mask, chunked attention,
the safetensors reader, the hub download, generate. What differs:

                    GPT-2                              Llama 3
    positions       a learned table (wpe) added to     rotary embeddings: q and k of every layer turned by
                    the input                          an angle proportional to the position (RoPE), with
                                                       Llama 3's stretched low frequencies
    norm            LayerNorm (mean, variance, bias)   RMSNorm (root mean square only, no bias)
    MLP             GELU, 4x wide                      SwiGLU: down(silu(gate(x)) * up(x))
    attention       as many key/value heads as query   grouped-query: n_kv_head < n_head, each key/value
                    heads                              head serves n_head / n_kv_head query heads (a 4x
                                                       smaller cache for the 1B)
    biases          in every Linear and LayerNorm      none
    lm_head         tied to wte                        tied (1B, 3B) or its own matrix (8B): the config says
    dropout         0.1 in fine-tuning                 none (attention_dropout 0.0): only --dropout adds it
    vocabulary      50257, +3 new tokens for Coconut   128256, of which 256 are reserved special tokens:
                                                       Coconut's three markers take three of them

Hugging Face's files are read as they are, without copying either library: their names are kept inside
the blocks (self_attn.q_proj, mlp.gate_proj, input_layernorm, ...), and the outer ones are GPT's
(transformer.wte, transformer.h, transformer.ln_f) because that is what Coconut and the analyses touch.
The released weights are stored in bfloat16; they load into float32 parameters, which train.py trains
(with bfloat16 autocast on a GPU).
"""
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt import GPT, _chunks, chunked_attention, read_safetensors


@dataclass
class LlamaConfig:  # the defaults are Llama-3.2-1B's config.json
    block_size: int = 131072        # max_position_embeddings (RoPE has no table, so this is only a limit)
    vocab_size: int = 128256        # 128000 BPE tokens + 256 special ones
    n_layer: int = 16               # num_hidden_layers
    n_head: int = 32                # num_attention_heads
    n_kv_head: int = 8              # num_key_value_heads
    n_embd: int = 2048              # hidden_size
    intermediate_size: int = 8192   # the SwiGLU MLP's width
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Optional[dict] = field(default_factory=lambda: dict(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192))
    tie_word_embeddings: bool = True
    dropout: float = 0.0            # on the attention probabilities (HF's attention_dropout); Llama's is 0


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean and the bias. Computed in float32 (bf16 under autocast
    would lose the small differences the norm divides by), returned in the input's dtype."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(config):
    """
    (head_dim / 2,) float32: the angle per position of each pair of dimensions, theta^(-2i/d), with
    Llama 3's rescaling for long context (rope_scaling rope_type "llama3"): frequencies whose wavelength
    exceeds original_max_position_embeddings / low_freq_factor turn `factor` times slower, those shorter
    than original / high_freq_factor stay, and the ones between blend the two linearly in 1/wavelength.
    """
    d = config.n_embd // config.n_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if not s:
        return inv_freq
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    slow = torch.where(wavelen > old / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * slow / s["factor"] + smooth * slow
    between = (wavelen >= old / s["high_freq_factor"]) & (wavelen <= old / s["low_freq_factor"])
    return torch.where(between, blended, slow)


def apply_rope(x, cos, sin):
    """
    Rotate x (B, nh, T, hd) by each position's angles; cos, sin: (B, 1, T, hd/2). Dimension i pairs with
    i + hd/2 (not 2i with 2i+1 as in Meta's own code): Hugging Face's conversion permuted the rows of
    q_proj and k_proj so that this split gives the same attention scores, and we load its files.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout

    def rotated_qk(self, x, rope):
        """q (B, nh, T, hd) and k (B, n_kv, T, hd), each turned by its position (analysis.py reads them too)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return apply_rope(q, *rope), apply_rope(k, *rope)

    def forward(self, x, mask, past, rope, out_cols=None):
        B, T, _ = x.shape
        q, k = self.rotated_qk(x, rope)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        if out_cols is not None:  # queries only where the caller reads the output (GPT's out_cols)
            q, mask, T = q[:, :, out_cols], mask[:, :, out_cols], len(out_cols)
        dropout = self.dropout if self.training else 0.0
        g = self.n_head // self.n_kv_head  # query heads per key/value head: head h reads key/value head h // g
        if isinstance(past, list):  # the chunked cache of training (gpt.chunked_attention), kept at n_kv heads
            k, v = past[0] + [k], past[1] + [v]
            # The g query heads of a group read the same keys: stack them as g*T queries of one head,
            # instead of copying every cached chunk g times. The mask repeats to match.
            qg = q.reshape(B, self.n_kv_head, g * T, self.head_dim)
            y = chunked_attention(qg, k, v, mask.repeat(1, 1, g, 1), dropout).view(B, self.n_head, T, self.head_dim)
        else:
            if past is not None:
                k = torch.cat([past[0], k], dim=2)  # (B, n_kv, S, hd)
                v = torch.cat([past[1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                               enable_gqa=g > 1)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y), [k, v] if isinstance(past, list) else (k, v)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, mask, past, rope, out_cols=None):
        a, kv = self.self_attn(self.input_layernorm(x), mask, past, rope, out_cols)
        if out_cols is not None:
            x = x[:, out_cols]
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Llama(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # model.embed_tokens in HF's files
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),  # model.layers
            ln_f=RMSNorm(config.n_embd, config.rms_norm_eps),  # model.norm
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):  # a new model's weights (HF's initializer_range 0.02); norms start at 1
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, position_ids=None,
                attention_mask=None, past_kv=None, with_logits=True, out_cols=None):
        """
        The same call as GPT.forward (see there): idx (B, T) or inputs_embeds (B, T, C); targets (B, T);
        position_ids (B, T); attention_mask (B, past_len + T), 1 = real token; past_kv: the returned cache
        (per layer (k, v) of (B, n_kv_head, S, head_dim), or [ks, vs] chunk lists); out_cols: the columns
        whose outputs are read (the last block computes only those).
        Returns logits (B, T, V) or None, loss or None, hidden (B, T, C) after the final norm, the cache.
        """
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past_len = 0 if past_kv is None else sum(k.size(2) for k in _chunks(past_kv[0][0]))
        if past_len + T > self.config.block_size:
            raise ValueError(f"sequence of {past_len + T} positions is longer than block_size "
                             f"{self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        rope = self._rope(position_ids)  # instead of GPT's x + wpe(position_ids): positions enter every layer
        mask = self._attention_mask(attention_mask, B, T, past_len, x.device, fused=out_cols is None)
        present = []
        for i, block in enumerate(self.transformer.h):
            cols = out_cols if i == len(self.transformer.h) - 1 else None
            x, kv = block(x, mask, None if past_kv is None else past_kv[i], rope, cols)
            present.append(kv)
        hidden = self.transformer.ln_f(x)  # (B, T, C): what Coconut feeds back as a thought
        logits = self.lm_head(hidden) if with_logits or targets is not None else None  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss, hidden, present

    def _rope(self, position_ids):
        """cos, sin (B, 1, T, hd/2) of each position's angles, in float32 whatever the autocast (an angle of
        position 10^5 in bf16 would be off by whole turns)."""
        inv_freq = rope_frequencies(self.config).to(position_ids.device)  # (hd/2,): cheaper to recompute than to keep
        with torch.autocast(position_ids.device.type, enabled=False):
            angles = position_ids[:, None, :, None].float() * inv_freq  # (B, 1, T, hd/2)
            return angles.cos(), angles.sin()

    # What does not depend on the family: the same functions as GPT's
    chunk_cache = staticmethod(GPT.chunk_cache)
    _attention_mask = staticmethod(GPT._attention_mask)
    generate = GPT.generate

    def copy_rows(self, ids, copy_from):
        """Set the embedding (and an untied lm_head's) rows of ids to row copy_from: Coconut's three markers
        start as copies of "<<", as the official code initializes its new tokens; here they are reserved
        tokens that the released model never saw, so the vocabulary stays 128256."""
        with torch.no_grad():
            for w in {self.transformer.wte.weight, self.lm_head.weight}:
                w[ids] = w[copy_from].clone()

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0, cache_dir=None):
        """
        A folder holding config.json and model.safetensors (or the shards that model.safetensors.index.json
        lists), as save_pretrained writes it, or a hub repo such as 'meta-llama/Llama-3.2-1B' (downloaded
        once into cache_dir: hub_folder). Weights of any float dtype load into float32 parameters.
        """
        folder = hub_folder(name_or_path, cache_dir)
        config = config_from_json(os.path.join(folder, "config.json"), dropout)
        model = cls(config)
        _load_into(model, read_weights(folder), folder)
        return model


# ----------------------------------------------------------------------------------------------------------
# Hugging Face's files: config.json, the weights (one file or shards), the hub

# Other model_types that people try (facebookresearch/coconut issues 11 and 13) and why this file does not run them
OTHER_ARCHITECTURES = {
    "gpt2": "GPT-2 loads from its name (gpt2 ... gpt2-xl) or a folder, through gpt.py",
    "qwen2": "Qwen2 adds biases to q_proj, k_proj and v_proj, which Llama has not",
    "qwen3": "Qwen3 normalizes q and k per head (q_norm, k_norm), which Llama does not",
    "mistral": "Mistral's sliding-window attention is not Llama's",
    "mixtral": "Mixtral is a mixture of experts (its MLP is several experts and a router)",
    "qwen2_moe": "Qwen2-MoE is a mixture of experts",
    "gemma": "Gemma scales its embeddings and uses GeGLU and (1 + weight) norms",
    "gemma2": "Gemma 2 adds soft-capping and more norms",
    "phi3": "Phi-3 fuses q, k, v into one matrix",
}


def config_from_json(path, dropout=0.0):
    """A LlamaConfig from Hugging Face's config.json; one line that names what else it is otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a Llama folder holds config.json)")
    try:
        with open(path) as f:
            c = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    kind = c.get("model_type")
    if kind != "llama":
        why = OTHER_ARCHITECTURES.get(kind, "only GPT-2 (gpt.py) and Llama (llama.py) are implemented")
        raise ValueError(f"{path}: model_type {kind!r} ({', '.join(c.get('architectures') or []) or 'no architectures'}) "
                         f"is not Llama: {why}")
    if c.get("num_local_experts") or c.get("num_experts"):
        raise ValueError(f"{path}: a mixture of experts (num_local_experts), not a dense Llama")
    for k in ("attention_bias", "mlp_bias"):
        if c.get(k):
            raise ValueError(f"{path}: {k} is true; Llama's projections have no biases and llama.py has none")
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {c['hidden_act']!r}; Llama's SwiGLU uses silu")
    missing = [k for k in ("num_attention_heads", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
               if k not in c]
    if missing:
        raise ValueError(f"{path}: a Llama config without {', '.join(missing)}")
    n_head = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // n_head):
        raise ValueError(f"{path}: head_dim {c['head_dim']} is not hidden_size / num_attention_heads")
    # Hub files say rope_theta and rope_scaling; transformers 5 writes both inside rope_parameters.
    params = c.get("rope_parameters") or {}
    theta = c.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = c.get("rope_scaling") or params
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in ("default", None):
            scaling = None
        elif kind != "llama3":
            raise ValueError(f"{path}: rope_scaling of type {kind!r}; llama.py implements Llama 3's ('llama3')")
        else:
            scaling = {k: scaling[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings")}
    return LlamaConfig(block_size=c.get("max_position_embeddings", 131072), vocab_size=c["vocab_size"],
                       n_layer=c["num_hidden_layers"], n_head=n_head,
                       n_kv_head=c.get("num_key_value_heads", n_head), n_embd=c["hidden_size"],
                       intermediate_size=c["intermediate_size"], rms_norm_eps=c.get("rms_norm_eps", 1e-5),
                       rope_theta=theta, rope_scaling=scaling,
                       tie_word_embeddings=c.get("tie_word_embeddings", False), dropout=dropout)


def read_weights(folder):
    """Every tensor of a folder: model.safetensors, or each shard that model.safetensors.index.json names."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        path = os.path.join(folder, "model.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        return read_safetensors(path)
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        part = read_safetensors(os.path.join(folder, shard))
        missing = sorted(k for k, s in weight_map.items() if s == shard and k not in part)
        if missing:
            raise ValueError(f"{os.path.join(folder, shard)}: missing tensor {missing[0]} that the index puts there")
        tensors.update(part)
    return tensors


def _our_name(key):
    # HF: model.embed_tokens / model.layers.N / model.norm; ours: GPT's outer names, HF's inner ones
    for theirs, ours in (("model.embed_tokens.", "transformer.wte."), ("model.layers.", "transformer.h."),
                         ("model.norm.", "transformer.ln_f.")):
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def _load_into(model, tensors, path):
    sd = {_our_name(k): v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old files' buffer
    ours = model.state_dict()
    if model.config.tie_word_embeddings:
        ours.pop("lm_head.weight")  # the same matrix as wte; a file may still hold a copy of it
        sd.pop("lm_head.weight", None)
    for k in ours:
        if k not in sd:
            raise ValueError(f"{path}: missing tensor {k}")
        if sd[k].shape != ours[k].shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(ours[k].shape)}")
        with torch.no_grad():
            ours[k].copy_(sd[k])  # bf16 -> float32
    unexpected = sorted(set(sd) - set(ours))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]}")
    return model


def hub_folder(name_or_path, cache_dir=None):
    """
    A local folder as is; otherwise a hub repo id (owner/name) downloaded once into cache_dir with the
    project's careful download (streamed, atomic, size-checked): config.json, the weights (the shards of
    model.safetensors.index.json, or model.safetensors) and Meta's original/tokenizer.model. HF_ENDPOINT
    moves it to a mirror; HF_TOKEN is sent for gated repos such as meta-llama's.
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.count("/") != 1 or os.path.exists(name_or_path):
        raise FileNotFoundError(f"no such folder: {name_or_path!r} (expected a Llama folder or a hub repo "
                                f"such as meta-llama/Llama-3.2-1B)")
    from data.common import download
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    cache_dir = cache_dir or os.environ.get("COCONUT_CACHE", os.path.expanduser("~/.cache/coconut"))
    folder = os.path.join(cache_dir, name_or_path)
    headers = {"Authorization": f"Bearer {os.environ['HF_TOKEN']}"} if os.environ.get("HF_TOKEN") else None

    def get(name):
        return download(f"{endpoint}/{name_or_path}/resolve/main/{name}", os.path.join(folder, name), headers=headers)

    try:
        get("config.json")
        try:
            with open(get("model.safetensors.index.json")) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except RuntimeError as e:
            if "HTTP 404" not in str(e):
                raise
            shards = ["model.safetensors"]  # one file (Llama-3.2-1B's)
        for shard in shards:
            get(shard)
        get("original/tokenizer.model")
    except RuntimeError as e:
        raise RuntimeError(f"{e} (offline? set HF_ENDPOINT to a mirror, HF_TOKEN for a gated repo, or pass "
                           f"--init_from <a Llama folder>)") from None
    return folder
