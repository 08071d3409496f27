"""Data pipeline: a download-free default corpus, Megatron indexed datasets, GPT datasets, packing.

- :func:`default_corpus_files` / :func:`prepare_default_corpus`: the Python standard library's
  own sources (and its few .txt/.rst docs) as a corpus present on every machine; a tokenizer is
  trained on it and it is written as a Megatron ``.bin/.idx`` dataset, cached on disk.
- :func:`iter_documents`, :func:`tokenize_stream`, :func:`write_documents`: files -> texts ->
  ids -> ``.bin/.idx`` (tools/preprocess_data.py).
- :func:`build_gpt_datasets`: Megatron-Core ``GPTDataset`` train/valid/test splits.
- :func:`cu_seqlens_from_tokens`: document offsets for packing a micro-batch into one row.

Megatron-Core is imported lazily: importing it takes ~10 s.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sysconfig
import time
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_fox.training.tokenizer import SentencePieceTokenizer, read_text, train_sentencepiece

logger = logging.getLogger(__name__)

DEFAULT_CORPUS_BYTES = 8_000_000
DEFAULT_VOCAB_SIZE = 8192
_CORPUS_VERSION = 1  # bump when the corpus / tokenizer recipe changes (new cache key)
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SUFFIXES = (".py", ".txt", ".rst")


def default_cache_dir() -> str:
    """``$MEGATRON_FOX_CACHE``, else ``~/.cache/megatron_fox``."""
    return os.environ.get("MEGATRON_FOX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "megatron_fox")


def default_corpus_files(max_bytes: int = DEFAULT_CORPUS_BYTES, root: Optional[str] = None
                         ) -> List[str]:
    """The standard library's ``*.py`` sources and ``*.txt``/``*.rst`` docs, by relative path.

    Skips test suites, site-packages and caches. Files are taken in order, skipping any that
    would push the total past ``max_bytes``. Returns absolute paths (deterministic for a given
    Python installation).
    """
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(_SUFFIXES)]
    found.sort(key=lambda p: os.path.relpath(p, root))
    files, total = [], 0
    for path in found:
        size = os.path.getsize(path)
        if 0 < size and total + size <= max_bytes:
            files.append(path)
            total += size
    return files


class MissingKeyError(ValueError):
    """A JSON document lacks the requested key."""


def iter_documents(paths: Sequence[str], json_key: str = "text") -> Iterable[str]:
    """Document texts: each line of ``*.jsonl``/``*.json`` files (its ``json_key`` field), each
    other file whole. Raises FileNotFoundError, MissingKeyError or ValueError (bad JSON) naming
    the file and line."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path!r}")
        if not path.endswith((".jsonl", ".json")):
            yield read_text(path)
            continue
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise ValueError(f"{path}:{lineno} is not valid JSON ({err})") from None
                if not isinstance(record, dict) or json_key not in record:
                    keys = sorted(record)[:10] if isinstance(record, dict) else record
                    raise MissingKeyError(f"key {json_key!r} not in {path}:{lineno} "
                                          f"(that line has {keys!r:.200})")
                yield record[json_key]


def indexed_dtype(vocab_size: int):
    """Token dtype of the ``.bin`` file: uint16 when ids fit, as GPTDatasetConfig assumes."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def write_documents(output_prefix: str, documents: Iterable[Sequence[int]], vocab_size: int
                    ) -> Tuple[int, int]:
    """Write token-id documents to ``<output_prefix>.bin/.idx``; returns (documents, tokens).

    Each element of ``documents`` (list/array of ids, shape [n_i]) becomes one document of one
    sequence; empty ones are skipped. Written under a temporary name and renamed at the end.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = f"{output_prefix}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=indexed_dtype(vocab_size))
    n_docs = n_tokens = 0
    try:
        for doc in documents:
            if len(doc):
                builder.add_document(np.asarray(doc), [len(doc)])
                n_docs += 1
                n_tokens += len(doc)
        builder.finalize(tmp + ".idx")
        for ext in (".bin", ".idx"):  # complete files only: no partial dataset on errors
            os.replace(tmp + ext, output_prefix + ext)
    finally:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp + ext)
    return n_docs, n_tokens


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode(text: str) -> List[int]:
    return _worker_tokenizer.tokenize(text)


def tokenize_stream(texts: Iterable[str], tokenizer, workers: int = 1,
                    chunk_size: int = 64) -> Iterator[List[int]]:
    """Token ids of each text, in order; ``workers > 1`` tokenizes in a process pool (the
    tokenizer is pickled to each: `SentencePieceTokenizer` or `GPT2BPETokenizer`)."""
    if workers <= 1:
        yield from map(tokenizer.tokenize, texts)
        return
    with multiprocessing.Pool(workers, _init_worker, (tokenizer,)) as pool:
        yield from pool.imap(_encode, texts, chunk_size)


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive flock on ``path`` (no-op where flock is unsupported)."""
    with open(path, "a") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield  # closing the file releases the lock


def prepare_default_corpus(cache_dir: Optional[str] = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                           max_bytes: int = DEFAULT_CORPUS_BYTES) -> Tuple[str, str]:
    """Tokenizer + indexed dataset of :func:`default_corpus_files`, built once and cached.

    Everything lives in ``<cache_dir>/stdlib-<key>/`` (``tokenizer.model``, ``text_document.bin``
    /``.idx``, ``meta.json``), key = hash of (relative file list, sizes, vocab_size, recipe).
    Each file is one document with the EOD id appended. Safe for concurrent callers (several
    ranks, several jobs): one builds under an flock into a temp dir renamed into place
    atomically, the others wait and reuse it. ~4 s on 2 cores for 8 MB (plus ~5 s to import
    Megatron-Core if not yet imported); ~20 ms when cached.

    Returns:
        (data_prefix, tokenizer_model_path): prefix of the ``.bin/.idx`` pair, model path.
    """
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    root = sysconfig.get_paths()["stdlib"]
    files = default_corpus_files(max_bytes, root)
    if not files:
        raise RuntimeError(f"no corpus files found under the standard library {root!r}")
    listing = [(os.path.relpath(p, root), os.path.getsize(p)) for p in files]
    key_src = json.dumps([_CORPUS_VERSION, vocab_size, listing]).encode()
    final = os.path.join(cache_dir, "stdlib-" + hashlib.sha256(key_src).hexdigest()[:16])
    result = (os.path.join(final, "text_document"), os.path.join(final, "tokenizer.model"))
    if os.path.isdir(final):
        return result
    os.makedirs(cache_dir, exist_ok=True)
    with _file_lock(final + ".lock"):
        if os.path.isdir(final):  # built by another process while we waited
            return result
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build_default_corpus(tmp, files, listing, vocab_size)
            try:
                os.rename(tmp, final)
            except OSError:  # lost a race without working locks: the other copy is complete
                if not os.path.isdir(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _build_default_corpus(out_dir: str, files: List[str], listing, vocab_size: int) -> None:
    t0 = time.time()
    os.makedirs(out_dir)
    texts = [read_text(p) for p in files]
    model = train_sentencepiece(iter(texts), os.path.join(out_dir, "tokenizer"), vocab_size)
    t1 = time.time()
    tok = SentencePieceTokenizer(model)
    docs = (ids + [tok.eod] for ids in tok.tokenize_batch(texts))
    n_docs, n_tokens = write_documents(os.path.join(out_dir, "text_document"), docs, vocab_size)
    meta = dict(files=len(files), bytes=sum(s for _, s in listing), documents=n_docs,
                tokens=n_tokens, vocab_size=vocab_size, tokenizer_seconds=round(t1 - t0, 2),
                total_seconds=round(time.time() - t0, 2), listing=listing)
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    logger.info("default corpus: %d files, %d bytes -> %d tokens in %.1f s (%s)", len(files),
                meta["bytes"], n_tokens, meta["total_seconds"], out_dir)


def _split_doc_counts(data_prefix: str, split_matrix) -> List[int]:
    """Documents per split, computed as BlendedMegatronDatasetBuilder does."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    n = IndexedDataset(data_prefix).sequence_lengths.shape[0]
    return [0 if b is None else int(round(b[1] * n)) - int(round(b[0] * n)) for b in split_matrix]


def _token_counts(prefixes: Sequence[str]) -> List[float]:
    """Tokens in each indexed dataset (the weights of a blend given without weights)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = []
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)  # held while its memory-mapped lengths are read
        counts.append(float(dataset.sequence_lengths.sum()))
    return counts


def build_gpt_datasets(
    data_prefix: Union[str, Sequence[str]],
    tokenizer,
    seq_length: int,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]],
    seed: int = 1234,
    split: str = "98,1,1",
    cache_path: Optional[str] = None,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    weights: Optional[Sequence[float]] = None,
    **config_kwargs,
):
    """Megatron-Core GPTDataset (train, valid, test) over one ``.bin/.idx`` prefix, or a
    BlendedDataset of several.

    Args:
        data_prefix: path without ``.bin``/``.idx``, or a list of them: a blend, each split
            drawn from the prefixes in proportion to `weights` (default: their token counts),
            repeating any prefix as needed. Every prefix needs documents in every split that
            has a share; Megatron's BlendedDataset needs torch.distributed initialised.
        tokenizer: e.g. :class:`SentencePieceTokenizer` (vocab_size, eod, pad, unique_identifiers).
        seq_length: tokens per sample; item ``i`` is a dict of ``tokens``, ``labels`` (LongTensor
            [seq_length], the seq_length+1 drawn tokens shifted by one), ``loss_mask`` (float
            [seq_length]), ``position_ids`` [seq_length] (no attention mask by default).
        num_samples: minimum samples per split (train, valid, test); the data repeats (reshuffled
            per epoch) as needed. None = exactly one epoch of that split. A split with a share
            but no documents (few documents, small share) raises ValueError unless it asks for
            0 or None samples (then it is an empty dataset).
        split: document shares, e.g. "98,1,1" (contiguous document ranges, in file order); a 0
            share gives None for that split.
        cache_path: where the shuffle/sample indices go (default ``<data_prefix>/cache/...``).
        is_built_on_rank: with torch.distributed up, ranks where it returns False get None
            (default: every rank builds; rank 0 first, the others after a barrier, from cache).
        config_kwargs: any other GPTDatasetConfig field (e.g. ``eod_mask_loss=True``,
            ``inter_document_masking=True`` on megatron-core versions that have it).

    Returns:
        (train, valid, test): GPTDataset or None each.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes = [data_prefix] if isinstance(data_prefix, str) else list(data_prefix)
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"data_prefix: {prefix + ext!r} does not exist")
    if not prefixes or (weights is not None and len(weights) != len(prefixes)):
        raise ValueError(f"weights: one per prefix ({len(prefixes)}), got {weights!r}")
    if weights is not None and (any(not w > 0 for w in weights)):
        raise ValueError(f"weights must be > 0, got {list(weights)}")
    if len(prefixes) > 1 and weights is None:
        weights = _token_counts(prefixes)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples!r}")
    fields = {f.name for f in dataclasses.fields(GPTDatasetConfig) if f.init}
    unknown = sorted(set(config_kwargs) - fields)
    if unknown:
        raise TypeError(f"GPTDatasetConfig of this megatron-core has no field(s) {unknown}")
    kwargs = dict(random_seed=seed, sequence_length=seq_length,
                  blend=(prefixes, None if weights is None else [float(w) for w in weights]),
                  split=split, path_to_cache=cache_path, tokenizer=tokenizer,
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                  create_attention_mask=False)
    kwargs.update(config_kwargs)
    config = GPTDatasetConfig(**kwargs)
    sizes = list(num_samples)
    for prefix in prefixes:
        counts = _split_doc_counts(prefix, config.split_matrix)
        for i, (name, bookends, docs) in enumerate(zip(("train", "valid", "test"), config.split_matrix, counts)):
            if bookends is None or docs:
                continue
            # Megatron would loop forever looking for tokens in an empty split: ask for one
            # (empty) epoch when 0 samples are wanted (one prefix), else fail.
            if len(prefixes) == 1 and sizes[i] == 0:
                sizes[i] = None
            elif len(prefixes) > 1 or sizes[i] is not None:
                raise ValueError(f"split={split!r} leaves the {name} split of {prefix!r} no documents"
                                 + (" (in a blend every prefix needs some)" if len(prefixes) > 1 else
                                    f" but num_samples asks {sizes[i]} {name} samples")
                                 + ": give it a bigger share (or 0 share), use more documents, or pass None")
    builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, is_built_on_rank or (lambda: True),
                                            config)
    return tuple(builder.build())


def cu_seqlens_from_tokens(tokens: torch.Tensor, eod: int) -> Tuple[torch.Tensor, int]:
    """Document offsets of a micro-batch packed into one row of length b*s.

    A document starts at every sample start and right after every EOD token (an EOD belongs to
    the document it ends). Offsets index the flattened ``tokens.reshape(-1)`` (sample 0 first).

    Args:
        tokens: LongTensor [b, s].
        eod: end-of-document id.

    Returns:
        cu_seqlens: int32 [n + 1] on ``tokens.device``, strictly increasing, 0 ... b*s.
        max_seqlen: int, the longest document (host sync when ``tokens`` is on GPU: call it on
            CPU tokens before moving them).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, s], got shape {tuple(tokens.shape)}")
    b, s = tokens.shape
    flat = tokens.reshape(-1)
    starts = torch.zeros(b * s, dtype=torch.bool, device=tokens.device)
    starts[::s] = True
    starts[1:] |= flat[:-1] == eod
    end = torch.tensor([b * s], device=tokens.device)
    cu = torch.cat([starts.nonzero().squeeze(1), end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class MockGPTDataset(torch.utils.data.Dataset):
    """Megatron-LM's --mock-data: `num_samples` samples of seq_length tokens cut from
    documents of random ids in [0, eod) of random lengths (1 to seq_length), each followed by
    eod. Sample i of a split is the same on every call and rank (seeded by seed, split, i);
    items are dicts as GPTDataset's (tokens, labels, loss_mask, position_ids); eod_mask_loss:
    loss_mask 0 where the token is eod, as GPTDataset's option of that name."""

    def __init__(self, num_samples: int, seq_length: int, eod: int, seed: int, split: int = 0,
                 eod_mask_loss: bool = False):
        self.num_samples, self.seq_length, self.eod = int(num_samples), int(seq_length), int(eod)
        self.seed = (int(seed) * 3 + int(split)) * 1_000_003
        self.eod_mask_loss = bool(eod_mask_loss)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} of {self.num_samples}")
        g = torch.Generator().manual_seed(self.seed + int(i))
        need, parts = self.seq_length + 1, []
        while need > 0:
            n = int(torch.randint(1, self.seq_length + 1, (1,), generator=g))
            parts += [torch.randint(0, self.eod, (n,), generator=g), torch.tensor([self.eod])]
            need -= n + 1
        ids = torch.cat(parts)[:self.seq_length + 1]
        tokens = ids[:-1].clone()
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod] = 0.0
        return {"tokens": tokens, "labels": ids[1:].clone(), "loss_mask": loss_mask,
                "position_ids": torch.arange(self.seq_length)}
