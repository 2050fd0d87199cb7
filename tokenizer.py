"""
The tokenizers: text <-> token ids, with the three tokens Coconut adds (<|start-latent|>, <|end-latent|>,
<|latent|>) and <|endoftext|>, which ends an answer and pads a batch.

    gpt2_tokenizer()          GPT-2's BPE (tiktoken) + the three: the paper's, for a pretrained GPT-2
    compact_tokenizer(recs)   bytes + the data's frequent GPT-2 pieces: a small vocabulary for a model from scratch
    symbol_tokenizer(recs)    one token per whitespace-separated symbol, for data written in symbols

A checkpoint stores Tokenizer.to_dict() and rebuilds the same tokenizer with Tokenizer.from_dict().
"""
from collections import Counter
from functools import lru_cache

import regex  # installed with tiktoken (its own dependency); Python's re has no \p{L}
import tiktoken


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


def _texts(record):
    # The strings a record is encoded as, in order; tokenize() and compact_tokenizer() share them.
    return [record["question"] + "\n"] + [s + "\n" for s in record["steps"]] + ["### " + record["answer"]]

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
