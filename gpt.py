"""
GPT-2 in one file, in the spirit of nanoGPT's model.py, with what Coconut needs on top:
- the input can be token ids (B, T) or input embeddings (B, T, C): a continuous thought is an embedding
  that no token has;
- position ids and an attention mask over all keys (1 = real token, 0 = padding), for padded batches;
- a KV cache: pass the keys/values of earlier positions and get them back extended;
- the final hidden states (after ln_f) are returned beside the logits: they are the thoughts;
- OpenAI's released weights load from Hugging Face's safetensors files, parsed here, never unpickled.
"""
import json
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence (rows of wpe)
    vocab_size: int = 50257  # GPT-2's BPE; Coconut grows it to 50260
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # Hugging Face's GPT-2 config trains with 0.1; train.py sets it
    bias: bool = True        # GPT-2 has biases in every Linear and LayerNorm


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, mask, past, out_cols=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if out_cols is not None:  # queries only where the caller reads the output; keys and values everywhere
            q, mask, T = q[:, :, out_cols], mask[:, :, out_cols], len(out_cols)
        dropout = self.dropout if self.training else 0.0
        if isinstance(past, list):  # a chunked cache (see chunked_attention): extended, never copied
            k, v = past[0] + [k], past[1] + [v]
            y = chunked_attention(q, k, v, mask, dropout)
        else:
            if past is not None:  # the cached keys/values of the positions before these T
                k = torch.cat([past[0], k], dim=2)  # (B, nh, S, hs), S = past length + T
                v = torch.cat([past[1], v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y)), [k, v] if isinstance(past, list) else (k, v)


def chunked_attention(q, ks, vs, mask, dropout):
    """
    Attention over keys and values held as a list of chunks along the sequence, without concatenating
    them. Coconut's training forward extends its cache by one column per thought: concatenated, every
    pass would make (and keep for the backward pass) a new copy of the whole cache, n copies for n
    thoughts. Here each pass only refers to the chunks that exist already; what it keeps is the
    (B, nh, T, S) attention matrix of its few queries. Same result as SDPA over the concatenation.
    q: (B, nh, T, hs); ks, vs: lists of (B, nh, S_i, hs); mask: (B or 1, 1, T, sum S_i), True = attend.
    """
    att = torch.cat([q @ k.transpose(-2, -1) for k in ks], dim=-1) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
    att = F.dropout(F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1), dropout)
    y, start = 0, 0
    for v in vs:  # the weighted sum, chunk by chunk
        y = y + att[..., start:start + v.size(2)] @ v
        start += v.size(2)
    return y  # (B, nh, T, hs)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, past, out_cols=None):
        a, kv = self.attn(self.ln_1(x), mask, past, out_cols)
        if out_cols is not None:
            x = x[:, out_cols]  # (B, K, C): the residual stream goes on only where it is read
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, kv


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx=None, targets=None, *, inputs_embeds=None, position_ids=None,
                attention_mask=None, past_kv=None, with_logits=True, out_cols=None):
        """
        idx (B, T) token ids, or inputs_embeds (B, T, C).
        targets (B, T): the token each position should predict (already shifted, -100 = no loss).
        position_ids (B, T): default past_len .. past_len+T-1.
        attention_mask (B, past_len + T): 1 for real tokens, 0 for padding; None = no padding.
        past_kv: the list returned by an earlier call (one (k, v) per layer), or None; a layer's [ks, vs]
            (lists of chunks, see chunked_attention) is extended without copying, and returned so.
        Returns logits (B, T, V), loss (or None), hidden (B, T, C) after ln_f, and the extended cache.
        with_logits=False skips lm_head (logits None): a caller that needs few positions' logits
        applies lm_head to those hidden states itself, instead of paying (B, T, V) for all of them.
        out_cols (K,) LongTensor, ascending: the columns (of these T) whose outputs the caller reads; the last
        block then computes its queries, attention output and MLP only there (its keys and values for all T,
        which the cache keeps), and logits and hidden are (B, K, ...). A loss on a few positions of a 2-layer
        model costs a third less (the CPU demo); in a deep model, 1/n_layer of the work.
        """
        if out_cols is not None and targets is not None:
            raise ValueError("out_cols and targets: the loss needs every column's logits (pass only out_cols)")
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past_len = 0 if past_kv is None else sum(k.size(2) for k in _chunks(past_kv[0][0]))
        if past_len + T > self.config.block_size:
            raise ValueError(f"sequence of {past_len + T} positions is longer than block_size "
                             f"{self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        x = self.transformer.drop(x + self.transformer.wpe(position_ids))
        mask = self._attention_mask(attention_mask, B, T, past_len, x.device, fused=out_cols is None)
        present = []
        for i, block in enumerate(self.transformer.h):
            cols = out_cols if i == len(self.transformer.h) - 1 else None
            x, kv = block(x, mask, None if past_kv is None else past_kv[i], cols)
            present.append(kv)
        hidden = self.transformer.ln_f(x)  # (B, T, C): what Coconut feeds back as a thought
        logits = self.lm_head(hidden) if with_logits or targets is not None else None  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss, hidden, present

    @staticmethod
    def chunk_cache(past_kv):
        """
        The same cache as chunks: later calls extend it without copying it (chunked_attention). Made
        contiguous once here: a transposed view would be copied by every matmul that reads it.
        """
        return [[[c.contiguous() for c in _chunks(k)], [c.contiguous() for c in _chunks(v)]] for k, v in past_kv]

    @staticmethod
    def _attention_mask(attention_mask, B, T, past_len, device, fused=True):
        """The (B, 1, T, S) boolean mask SDPA takes, or None when plain causal attention will do (and fused:
        no rows of it are to be picked out)."""
        if attention_mask is None and past_len == 0 and fused:
            return None  # lets SDPA take its fused causal path
        S = past_len + T
        q_pos = torch.arange(past_len, S, device=device)[:, None]  # (T, 1) absolute column of each query
        k_pos = torch.arange(S, device=device)[None, :]            # (1, S)
        mask = (k_pos <= q_pos)[None, None]                        # (1, 1, T, S) causal
        if attention_mask is not None:
            assert attention_mask.shape == (B, S), f"attention_mask must be (B, {S}), got {tuple(attention_mask.shape)}"
            # A padding query would see no key at all and softmax would give NaN; letting every query
            # see itself keeps it finite. Real tokens never attend to padding, so this changes nothing.
            mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
        return mask

    def grow_vocab(self, n_new, copy_from):
        """Append n_new token rows, each a copy of row copy_from (Coconut: 3 latent tokens, copies of "<<")."""
        old = self.transformer.wte.weight.data  # (V, C)
        new = torch.cat([old, old[copy_from].expand(n_new, -1)], dim=0).clone()
        self.lm_head = nn.Linear(self.config.n_embd, new.size(0), bias=False).to(old.device, old.dtype)
        self.lm_head.weight.data.copy_(new)
        self.transformer.wte = nn.Embedding(new.size(0), self.config.n_embd).to(old.device, old.dtype)
        self.transformer.wte.weight = self.lm_head.weight  # still tied
        self.config.vocab_size = new.size(0)
        return list(range(old.size(0), new.size(0)))  # the new ids

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx (B, T); the KV cache makes each new token one short pass."""
        logits, _, _, past = self(idx)
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :] / max(temperature, 1e-8)  # (B, V)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if idx.size(1) >= self.config.block_size:
                break
            logits, _, _, past = self(idx_next, past_kv=past)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0, cache_dir=None):
        """
        'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl': OpenAI's weights from the Hugging Face hub
        (downloaded once into cache_dir); or a local .safetensors file, or a folder holding
        model.safetensors (and config.json for the sizes, as save_pretrained writes it).
        """
        if name_or_path in HUB_SIZES:
            path = download_hub_weights(name_or_path, cache_dir)
            config = GPTConfig(**HUB_SIZES[name_or_path], vocab_size=50257, block_size=1024, dropout=dropout)
            return _load_into(cls(config), read_safetensors(path), path)
        if os.path.isdir(name_or_path):
            path = os.path.join(name_or_path, "model.safetensors")
            cfg_path = os.path.join(name_or_path, "config.json")
            # the config first: another architecture's folder is named as such, whatever its weight files
            config = _config_from_json(cfg_path, dropout) if os.path.exists(cfg_path) else None
            if not os.path.exists(path):
                raise FileNotFoundError(f"{name_or_path} has no model.safetensors")
            tensors = read_safetensors(path)
            config = config or _config_from_tensors(tensors, path, dropout)
            return _load_into(cls(config), tensors, path)
        if not os.path.exists(name_or_path):
            raise FileNotFoundError(f"no such model: {name_or_path!r} (expected {', '.join(HUB_SIZES)}, "
                                    f"a .safetensors file or a folder with model.safetensors)")
        tensors = read_safetensors(name_or_path)
        return _load_into(cls(_config_from_tensors(tensors, name_or_path, dropout)), tensors, name_or_path)


def _chunks(k):
    return k if isinstance(k, list) else [k]


# ----------------------------------------------------------------------------------------------------------
# OpenAI's weights: the hub's files, the safetensors format, and the mapping onto our module names

HUB_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}
HEADS_BY_WIDTH = {v["n_embd"]: v["n_head"] for v in HUB_SIZES.values()}


def download_hub_weights(name, cache_dir=None):
    from data.common import download  # the project's one careful (streamed, atomic, size-checked) download
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    cache_dir = cache_dir or os.environ.get("COCONUT_CACHE", os.path.expanduser("~/.cache/coconut"))
    dest = os.path.join(cache_dir, name, "model.safetensors")
    try:
        return download(f"{endpoint}/openai-community/{name}/resolve/main/model.safetensors", dest)
    except RuntimeError as e:
        raise RuntimeError(f"{e} (offline? set HF_ENDPOINT to a mirror, or pass --init_from <a model.safetensors "
                           f"file or a folder holding one>)") from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A safetensors file is an 8-byte little-endian header length, a JSON header, then raw tensors."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors file (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = info["shape"]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes or end > len(buf):
            raise ValueError(f"{path}: tensor {name} is corrupt (shape {shape} needs {nbytes} bytes, "
                             f"the file gives {end - begin} at offset {begin})")
        raw = torch.from_numpy(np.array(buf[begin:end]))  # copy out of the memory map
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


GPT2_JSON_KEYS = ("n_layer", "n_head", "n_embd")  # what save_pretrained's config.json of a GPT-2 must give


def _config_from_json(path, dropout):
    """
    A GPTConfig from the config.json that transformers' save_pretrained writes beside the weights.
    Only GPT-2 loads here: another model_type (llama, gpt_neox, ...), a missing or misspelled size, or a
    file that is not a JSON object is a ValueError of one line that says so (this is where another
    architecture would be dispatched).
    """
    try:
        with open(path) as f:
            c = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(c).__name__}")
    model_type = c.get("model_type", "gpt2")  # older GPT-2 configs may not name it
    if model_type != "gpt2":
        raise ValueError(f"{path}: model_type {model_type!r} is not supported: only GPT-2 (model_type 'gpt2') "
                         f"loads here")
    bad = [k for k in GPT2_JSON_KEYS if not (isinstance(c.get(k), int) and c[k] > 0)]
    if bad:
        raise ValueError(f"{path}: not a GPT-2 config: {', '.join(bad)} missing or not a positive whole number "
                         f"(a GPT-2 config.json gives {', '.join(GPT2_JSON_KEYS)}; only GPT-2 loads here)")
    return GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                     block_size=c.get("n_positions", 1024), vocab_size=c.get("vocab_size", 50257), dropout=dropout)


def _config_from_tensors(tensors, path, dropout):
    """The sizes of a bare .safetensors file: all but the head count are in the shapes."""
    sd = {_our_name(k): v for k, v in tensors.items()}
    for need in ("transformer.wte.weight", "transformer.wpe.weight"):
        if need not in sd:
            raise ValueError(f"{path}: missing tensor {need}")
    V, C = sd["transformer.wte.weight"].shape
    n_layer = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.h\.(\d+)\.", k)))
    if C not in HEADS_BY_WIDTH:
        raise ValueError(f"{path}: width {C} is not a GPT-2 size, so the head count is unknown: "
                         f"put the file in a folder with a config.json")
    return GPTConfig(n_layer=n_layer, n_head=HEADS_BY_WIDTH[C], n_embd=C, block_size=sd["transformer.wpe.weight"].shape[0],
                     vocab_size=V, dropout=dropout)


def _our_name(key):
    # The hub's file says "h.0.attn.c_attn.weight"; save_pretrained's says "transformer.h.0.attn.c_attn.weight".
    return key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key


def _load_into(model, tensors, path):
    # HF's GPT-2 keeps attention/MLP weights in Conv1D modules, stored (in, out): nn.Linear wants (out, in).
    transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ignored = (".attn.bias", ".attn.masked_bias", "lm_head.weight")  # causal-mask buffers; the head is tied to wte
    sd = {_our_name(k): v for k, v in tensors.items() if not k.endswith(ignored)}
    ours = model.state_dict()
    ours.pop("lm_head.weight")
    for k in ours:
        if k not in sd:
            raise ValueError(f"{path}: missing tensor {k}")
        w = sd[k].t() if k.endswith(transposed) else sd[k]
        if w.shape != ours[k].shape:
            raise ValueError(f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, expected {tuple(ours[k].shape)}")
        with torch.no_grad():
            ours[k].copy_(w)
    unexpected = sorted(set(sd) - set(ours))
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]}")
    return model
