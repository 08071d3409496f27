"""SentencePiece tokenizer, usable as the ``tokenizer`` of Megatron-Core's GPTDataset.

Special ids of models made by :func:`train_sentencepiece`: ``unk=0, bos=1, eos=2, pad=3``.
``eod`` is the ``</s>`` (eos) id. SentencePiece never produces control ids (``<s>``, ``</s>``,
``<pad>``) from text, even when the text contains the string ``"</s>"``, so an EOD id in a
token stream always marks a real document end, and the pad id never occurs in data.
Models use identity normalisation, keep all whitespace, have ``"\\n"`` and ``"\\t"`` pieces and
byte fallback, so ``detokenize(tokenize(text)) == text`` for any text (source code included).
"""

import collections
import hashlib
import json
import os
from typing import Iterable, Iterator, List, Sequence, Union

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
USER_SYMBOLS = ("\n", "\t")

PathLike = Union[str, os.PathLike]


class SentencePieceTokenizer:
    """A SentencePiece model with the attributes Megatron-Core's GPTDataset reads.

    GPTDataset (megatron-core 0.16 and 0.19) uses ``vocab_size`` (token dtype), ``eod``
    (loss mask / position reset), ``pad`` (masked out of the loss; must differ from every id in
    ``special_tokens_dict`` other than the pad entry, else Megatron warns and uses -1 instead),
    ``special_tokens_dict`` / ``eos`` (that collision check) and ``unique_identifiers`` (JSON
    part of the dataset cache key; here a hash of the vocabulary, not the path).

    ``pad``: the model's ``<pad>`` id (3 for models of :func:`train_sentencepiece`), or ``eod`` for
    foreign models without a pad piece (Megatron then pads with -1 and warns).
    """

    def __init__(self, model_path: PathLike):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path!r}")
        with open(model_path, "rb") as f:
            self._setup(model_path, f.read())

    def _setup(self, model_path: str, proto: bytes) -> None:
        self.model_path = model_path
        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer_model: {model_path!r} has no </s> piece, needed as end-of-document")
        self.unique_identifiers = collections.OrderedDict(
            [
                ("class", type(self).__name__),
                ("vocab_sha256", self._vocab_hash()),
                ("vocab_size", self.vocab_size),
            ]
        )

    def _vocab_hash(self) -> str:
        """Hash of pieces, scores and types: equal for equal models trained anywhere (the model
        file itself also records its output path)."""
        sp, h = self._sp, hashlib.sha256()
        for i in range(sp.get_piece_size()):
            h.update(f"{sp.id_to_piece(i)}\0{sp.get_score(i)}\0{sp.is_control(i)}"
                     f"{sp.is_byte(i)}{sp.is_unknown(i)}\n".encode())
        return h.hexdigest()[:16]

    def __getstate__(self):  # picklable for DataLoader workers (spawn) and multiprocessing
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state):
        self._setup(state["model_path"], state["proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    @property
    def pad(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eod

    @property
    def special_tokens_dict(self) -> dict:
        ids = {"unk_token": self.unk, "bos_token": self.bos, "eos_token": self.eos,
               "pad_token": self.pad}
        return {k: v for k, v in ids.items() if v >= 0}

    @property
    def vocab(self) -> dict:
        """Piece -> id."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> List[int]:
        """Text -> ids, without bos/eod."""
        return self._sp.encode(text)

    def tokenize_batch(self, texts: Sequence[str], num_threads: int = -1) -> List[List[int]]:
        """Many texts -> ids (SentencePiece's own threads)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Ids (list, array or tensor; control ids such as eod are dropped) -> text."""
        return self._sp.decode([int(i) for i in ids])


class NullTokenizer:
    """Megatron-LM's NullTokenizer: text is whitespace-separated ids below vocab_size, and the
    end-of-document id is vocab_size itself (so vocab_size + 1 ids in all); for --mock-data
    and data that is already ids."""

    def __init__(self, vocab_size: int):
        if vocab_size is None or vocab_size < 1:
            raise ValueError(f"vocab_size: NullTokenizer needs a vocabulary size >= 1, got {vocab_size}")
        self._n = int(vocab_size)
        # what Megatron-Core's GPT dataset reads (as SentencePieceTokenizer's): its cache key,
        # and pad = eod (no pad id: Megatron pads with -1 and warns)
        self.unique_identifiers = collections.OrderedDict([("class", type(self).__name__),
                                                           ("vocab_size", self.vocab_size)])

    @property
    def vocab_size(self) -> int:
        return self._n + 1

    @property
    def eod(self) -> int:
        return self._n

    eos = pad = eod

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self.eod}

    def tokenize(self, text: str) -> List[int]:
        ids = [int(t) for t in text.split()]
        bad = [i for i in ids if not 0 <= i < self._n]
        if bad:
            raise ValueError(f"NullTokenizer: ids must lie in [0, {self._n}), got {bad[:5]}")
        return ids

    def detokenize(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids if int(i) != self._n)


class HuggingFaceTokenizer:
    """Megatron-LM's HuggingFaceTokenizer: `transformers.AutoTokenizer` of tokenizer_model (a
    local directory or a hub name); the end-of-document id is its eos token. Texts are
    tokenized without the model's special tokens (no BOS): documents are separated by eod,
    as with the other tokenizers here. Needs the transformers package."""

    def __init__(self, name_or_path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ValueError("tokenizer_type: HuggingFaceTokenizer needs the transformers package "
                             "(pip install transformers)") from None
        if not name_or_path:
            raise ValueError("tokenizer_model: HuggingFaceTokenizer needs a tokenizer directory or hub name")
        try:
            self._tok = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:  # no such directory or hub name, or no tokenizer files in it
            raise ValueError(f"tokenizer_model: transformers could not load {name_or_path!r}: {e}") from None
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer_model: {name_or_path} has no eos token to end documents with")
        self.name_or_path = name_or_path
        # the dataset cache key (Megatron-Core's GPTDataset writes it as JSON): the whole
        # tokenizer's serialisation where it has one (a fast tokenizer: vocabulary, merges,
        # normalisers), else its vocabulary; not the path
        backend = getattr(self._tok, "backend_tokenizer", None)
        text = backend.to_str() if backend is not None else json.dumps(self._tok.get_vocab(), sort_keys=True)
        self.unique_identifiers = collections.OrderedDict(
            [("class", type(self).__name__), ("vocab_sha256", hashlib.sha256(text.encode()).hexdigest()[:16]),
             ("vocab_size", self.vocab_size)])

    def __getstate__(self):  # picklable for DataLoader and tokenizer workers: reloaded there
        return {"name_or_path": self.name_or_path}

    def __setstate__(self, state):
        self.__init__(state["name_or_path"])

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # the base vocabulary and the added tokens, as Megatron-LM counts

    @property
    def eod(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def pad(self) -> int:
        """Its pad token, or eod where it has none (Megatron then pads with -1 and warns, as
        with GPT-2's vocabulary)."""
        return self.eod if self._tok.pad_token_id is None else int(self._tok.pad_token_id)

    @property
    def special_tokens_dict(self) -> dict:
        return {"eos_token": self.eod, "pad_token": self.pad}

    def tokenize(self, text: str) -> List[int]:
        return list(self._tok(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eod])


# Megatron-LM's names for a SentencePiece model: megatron-core's tokenizer library builds all
# three from the .model file with the end of document at its eos id, as SentencePieceTokenizer here
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TOKENIZER_TYPES = SENTENCEPIECE_TYPES + ("GPT2BPETokenizer", "NullTokenizer", "HuggingFaceTokenizer")


def build_tokenizer(tokenizer_type: str, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None):
    """The tokenizer of Megatron-LM's --tokenizer-type: SentencePieceTokenizer (a .model file;
    GPTSentencePieceTokenizer and Llama2Tokenizer the same),
    GPT2BPETokenizer (vocab.json + merges.txt, `bpe.GPT2BPETokenizer`), NullTokenizer
    (vocab_size ids, no text) or HuggingFaceTokenizer (transformers' AutoTokenizer)."""
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        from .bpe import GPT2BPETokenizer

        return GPT2BPETokenizer(vocab_file, merge_file)
    raise ValueError(f"tokenizer_type: {tokenizer_type!r}, expected one of {TOKENIZER_TYPES}")


def read_text(path: str) -> str:
    """A text file's contents (UTF-8, undecodable bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _iter_lines(inputs) -> Iterator[str]:
    """Training sentences: the non-blank lines of the files or texts in ``inputs``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)):
        paths = [os.fspath(p) for p in inputs]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"train_sentencepiece: input file(s) not found: {missing[:5]} "
                "(pass an iterator, e.g. iter(texts), to train on in-memory strings)")
        texts = (read_text(p) for p in paths)
    else:
        texts = iter(inputs)
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    inputs,
    model_prefix: PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    input_sentence_size: int = 300_000,
    character_coverage: float = 0.9995,
    num_threads: int = 2,
    seed: int = 1234,
    verbose: bool = False,
) -> str:
    """Train a SentencePiece model; returns the path ``<model_prefix>.model``.

    Args:
        inputs: a text file path or a list/tuple of paths, or any other iterable of strings
            (documents; wrap a list of texts in ``iter()``). Training uses their non-blank lines.
        model_prefix: output prefix; writes ``<prefix>.model`` and ``<prefix>.vocab``.
        vocab_size: exact vocabulary size, including 4 specials, 2 whitespace pieces and 256
            byte pieces (so at least a few hundred).
        model_type: ``"bpe"`` (seconds on ~8 MB) or ``"unigram"`` (about 10x slower).
        input_sentence_size: at most this many lines, sampled at random, are used.
    """
    model_prefix = os.fspath(model_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)  # line sampling is random otherwise
    lines, failure = _iter_lines(inputs), []

    def guarded():  # SentencePiece turns errors of the iterator into RuntimeError: keep ours
        try:
            yield from lines
        except Exception as err:
            failure.append(err)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=guarded(),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=list(USER_SYMBOLS),
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as err:
        if failure:
            raise failure[0] from None
        raise RuntimeError(
            f"SentencePiece training failed for vocab_size={vocab_size} (too small for the "
            f"characters plus 262 fixed pieces, or too large for the data?): {err}") from err
    return model_prefix + ".model"
