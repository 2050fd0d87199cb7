"""
The tokenizers: text <-> token ids, with the three tokens Coconut adds (<|start-latent|>, <|end-latent|>,
<|latent|>) and <|endoftext|>, which ends an answer and pads a batch.

    gpt2_tokenizer()          GPT-2's BPE (tiktoken) + the three: the paper's, for a pretrained GPT-2
    compact_tokenizer(recs)   bytes + the data's frequent GPT-2 pieces: a small vocabulary for a model from scratch
    symbol_tokenizer(recs)    one token per whitespace-separated symbol, for data written in symbols
    llama3_tokenizer(path)    Llama 3's BPE from its tokenizer.model; the three take reserved special tokens

A checkpoint stores Tokenizer.to_dict() and rebuilds the same tokenizer with Tokenizer.from_dict().
"""
import base64
import binascii
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

    def __init__(self, enc, spec, eos=EOS, bos=None):
        self.enc = enc
        self.spec = spec  # the plain dict from which from_dict() rebuilds this tokenizer
        self.eos_id, self.start_id, self.end_id, self.latent_id = (
            enc.encode_single_token(t) for t in (eos, START, END, LATENT))
        # Llama starts every question with <|begin_of_text|> (the official code encodes the question with
        # add_special_tokens=True); GPT-2 has no such token.
        self.bos_id = None if bos is None else enc.encode_single_token(bos)
        self.special_ids = {self.eos_id, self.start_id, self.end_id, self.latent_id} | (
            set() if bos is None else {self.bos_id})
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
        if d.get("kind") == "llama3":
            return _llama3_from_ranks(d["ranks"], "checkpoint")
        raise ValueError(f"unknown tokenizer kind {d.get('kind')!r} (expected 'gpt2', 'compact', 'symbols' or 'llama3')")


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

# Llama 3's tokenizer: tiktoken's BPE over Meta's rank file, Llama 3's pre-tokenizer pattern (numbers in
# pieces of at most 3 digits, a letter run may take one leading non-letter), and 256 special tokens after
# the 128000 ranks. The names are those of Hugging Face's Llama 3.1 / 3.2 tokenizer.json.
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(LLAMA3_SPECIAL) + 3)]
# Coconut's markers take the first three reserved tokens after <|python_tag|> (ids 128011-128013; reserved
# in Llama 3.0, 3.1 and 3.2 alike): the vocabulary, the embedding and lm_head keep their 128256 rows.
LLAMA3_MARKERS = {11: START, 12: END, 13: LATENT}


def llama3_tokenizer(path):
    """Llama 3's tokenizer from its tokenizer.model (lines "<base64 of the token's bytes> <rank>"), with
    <|end_of_text|> as eos and pad, <|begin_of_text|> before each question, and the markers on reserved
    tokens. The checkpoint keeps the rank file's text, so that it loads without the original folder."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a tiktoken rank file (binary; Llama 1 and 2 ship a SentencePiece model, "
                         f"which this project does not read)") from None
    return _llama3_from_ranks(text, path)


def _llama3_from_ranks(text, where):
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(f"{where}: line {n} is not '<base64 token> <rank>': not a tiktoken rank file") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{where}: the ranks are not 0..{len(ranks) - 1} with every single byte among them")
    n = len(ranks)
    names = [LLAMA3_MARKERS.get(i, t) for i, t in enumerate(LLAMA3_SPECIAL)]
    enc = tiktoken.Encoding(name="llama3-coconut", pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks,
                            special_tokens={t: n + i for i, t in enumerate(names)})
    return Tokenizer(enc, {"kind": "llama3", "ranks": text}, eos="<|end_of_text|>", bos="<|begin_of_text|>")


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
    """One token per symbol of the records (in order of first appearance), then the graph records' node names
    that their text never shows (the analyses embed every node), then eos, start, end, latent."""
    seen = {}
    for r in records:
        for text in _texts(r):
            for w in text.split():
                seen.setdefault(w, None)
    for r in records:
        for name in r.get("idx_to_symbol") or []:
            if " " not in name:
                seen.setdefault(name, None)
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
