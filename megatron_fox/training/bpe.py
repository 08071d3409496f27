"""GPT-2's byte-level BPE (Megatron-LM's ``--tokenizer-type GPT2BPETokenizer --vocab-file
vocab.json --merge-file merges.txt``), the tokenizer of the FoX papers' LongCrawl64 models
(vocabulary 50257, ``<|endoftext|>`` the document end), without a dependency beyond Python.

Encoding (Radford et al. 2019): the text is cut into pieces by GPT-2's pattern
    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
(matched here by a scanner over Unicode categories, as Python's ``re`` has no \\p{...});
each piece's UTF-8 bytes become printable characters (one per byte), which are merged
pairwise, lowest merge rank first, and looked up in the vocabulary. Every byte has a
symbol, so ``detokenize(tokenize(text)) == text`` for any text.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import unicodedata
from typing import Iterable, List, Sequence

EOD_TOKEN = "<|endoftext|>"
_CONTRACTIONS = ("re", "ve", "ll", "s", "t", "m", "d")  # after an apostrophe; two letters first


@functools.lru_cache(maxsize=1)
def byte_symbols() -> list[str]:
    """The printable character standing for each byte value 0..255: printable Latin-1 bytes
    stand for themselves, the others for chr(256 + k) in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, 'S' whitespace, 'O' anything else (GPT-2's three runs)."""
    if ch.isspace():
        return "S"
    major = unicodedata.category(ch)[0]
    return major if major in ("L", "N") else "O"


def pretokenize(text: str) -> List[str]:
    """Cut text as GPT-2's pattern does (module docstring); the pieces concatenate to text."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "'":
            tail = next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None)
            if tail is not None:
                pieces.append("'" + tail)
                i += 1 + len(tail)
                continue
        start = i + 1 if ch == " " and i + 1 < n and _kind(text[i + 1]) != "S" else i
        kind = _kind(text[start])
        if kind != "S":  # ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
            j = start + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            pieces.append(text[i:j])
            i = j
            continue
        j = i + 1
        while j < n and text[j].isspace():
            j += 1
        # '\s+(?!\S)': a run that is followed by more text leaves its last character to start
        # the next piece; a lone whitespace character before text is '\s+' on its own
        end = j if j == n or j - i == 1 else j - 1
        pieces.append(text[i:end])
        i = end
    return pieces


class GPT2BPETokenizer:
    """vocab.json (symbol string -> id) and merges.txt (one "a b" pair a line, rank order,
    an optional "#version" first line), with the attributes Megatron-Core's GPTDataset reads
    (as `SentencePieceTokenizer`): vocab_size, eod = <|endoftext|>, pad = eod (GPT-2 has
    none), special_tokens_dict, unique_identifiers."""

    def __init__(self, vocab_file: str, merge_file: str):
        for name, path in (("vocab_file", vocab_file), ("merge_file", merge_file)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name}: {path!r} not found")
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        bad = [p for p in pairs if len(p) != 2]
        if bad:
            raise ValueError(f"merge_file: {merge_file!r} has lines that are not one pair: {bad[:3]}")
        if EOD_TOKEN not in self.encoder:
            raise ValueError(f"vocab_file: {vocab_file!r} has no {EOD_TOKEN} entry (the document end)")
        missing = [s for s in byte_symbols() if s not in self.encoder]
        if missing:
            raise ValueError(f"vocab_file: {vocab_file!r} lacks {len(missing)} of the 256 byte symbols")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        self.ranks = {p: r for r, p in enumerate(pairs)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self._byte_of = {s: b for b, s in enumerate(byte_symbols())}
        self._cache: dict[str, list[int]] = {}
        digest = hashlib.sha256(json.dumps(self.encoder, sort_keys=True).encode() + "\n".join(lines).encode())
        self.unique_identifiers = collections.OrderedDict(
            [("class", type(self).__name__), ("vocab_sha256", digest.hexdigest()[:16]),
             ("vocab_size", self.vocab_size)])

    def __repr__(self) -> str:
        return f"GPT2BPETokenizer({self.vocab_file!r}, vocab_size={self.vocab_size})"

    def __getstate__(self):
        return {"vocab_file": self.vocab_file, "merge_file": self.merge_file}

    def __setstate__(self, state):
        self.__init__(state["vocab_file"], state["merge_file"])

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod(self) -> int:
        return self.encoder[EOD_TOKEN]

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        return self.eod

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self.eod}

    @property
    def vocab(self) -> dict:
        return dict(self.encoder)

    def _merge(self, piece: str) -> list[int]:
        """One piece's ids: its byte symbols merged, lowest-ranked adjacent pair first."""
        word = [byte_symbols()[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(range(len(word) - 1), key=lambda k: self.ranks.get((word[k], word[k + 1]), float("inf")))
            pair = (word[best], word[best + 1])
            if pair not in self.ranks:
                break
            merged, k = [], 0
            while k < len(word):  # every occurrence of the pair, left to right
                if k + 1 < len(word) and (word[k], word[k + 1]) == pair:
                    merged.append(word[k] + word[k + 1])
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = merged
        try:
            return [self.encoder[s] for s in word]
        except KeyError as e:
            raise ValueError(f"vocab_file: the merged symbol {e.args[0]!r} has no id") from None

    def tokenize(self, text: str) -> List[int]:
        """Text -> ids (no document end appended)."""
        ids = []
        for piece in pretokenize(text):
            cached = self._cache.get(piece)
            if cached is None:
                cached = self._merge(piece)
                if len(self._cache) < 200_000:
                    self._cache[piece] = cached
            ids.extend(cached)
        return ids

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = -1) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids -> text (<|endoftext|> dropped; bytes that do not form UTF-8 become U+FFFD)."""
        symbols = "".join(self.decoder[int(i)] for i in ids if int(i) != self.eod)
        return bytes(self._byte_of[c] for c in symbols).decode("utf-8", errors="replace")
