"""GPT-2 byte-level BPE (training/bpe.py): the piece scanner against Python's regex engine
running GPT-2's pattern (its \\p{L} / \\p{N} spelled out as classes of the characters at
hand), the merges against a second algorithm (every merge applied in rank order), byte-exact
round trips, file errors, and a Megatron dataset built and trained on with it."""

import collections
import json
import os
import random
import re
import unicodedata

import pytest
import torch

from megatron_fox.training.bpe import EOD_TOKEN, GPT2BPETokenizer, byte_symbols, pretokenize

from .workers import ROOT, run_python, tool_env

ALPHABET = list("abcXYZ019 .,!?-'_") + ["  ", "\n", "\t", "'s", "'re", "'ll", " 's", "é", "ß", "中文", "٣",
                                          "²", "Ⅻ", "🙂", "\u00a0", "\u3000", "\r\n", "$"]


def _gpt2_regex(text):
    """GPT-2's pattern for Python's re, \\p{L} and \\p{N} replaced by classes listing the
    letters and numbers that occur in text (by their Unicode category)."""
    def cls(major):
        chars = sorted({c for c in text if unicodedata.category(c)[0] == major and not c.isspace()})
        return "".join(re.escape(c) for c in chars) or "(?!)"

    L, N = cls("L"), cls("N")
    letters = f"[{L}]" if L != "(?!)" else L
    numbers = f"[{N}]" if N != "(?!)" else N
    other = rf"[^\s{L if L != '(?!)' else ''}{N if N != '(?!)' else ''}]"
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?{letters}+| ?{numbers}+| ?{other}+|\s+(?!\S)|\s+")


def test_pieces_match_gpt2_pattern():
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    for _ in range(400):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 30)))
        assert pretokenize(text) == _gpt2_regex(text).findall(text), repr(text)
    assert pretokenize("I'm here  \n\n  ok's") == ["I", "'m", " here", "  \n\n ", " ok", "'s"]


def _apply(word, a, b):
    """word (a sequence of symbols) with every adjacent (a, b) merged, left to right."""
    out, k = [], 0
    while k < len(word):
        if k + 1 < len(word) and word[k] == a and word[k + 1] == b:
            out.append(a + b)
            k += 2
        else:
            out.append(word[k])
            k += 1
    return out


def _train_merges(corpus, n_merges):
    """A small BPE vocabulary learned from corpus (most frequent adjacent pair first), so
    every merge's parts exist before it, as in GPT-2's."""
    sym = byte_symbols()
    words = collections.Counter(tuple(sym[b] for b in p.encode()) for t in corpus for p in pretokenize(t))
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for w, c in words.items():
            new[tuple(_apply(w, *best))] += c
        words = new
    vocab = {s: i for i, s in enumerate(sym)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[EOD_TOKEN] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    corpus = ["the cat sat on the mat, the end", "def the_function(x): return x + 1\n", "théorie über 中文 🙂",
              "it's the cat's hat"] * 3
    vocab, merges = _train_merges(corpus, 60)
    d = tmp_path_factory.mktemp("bpe")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                  encoding="utf-8")
    return str(d / "vocab.json"), str(d / "merges.txt"), vocab, merges


def _reference_ids(text, vocab, merges):
    """Every merge applied in rank order over each piece (left to right), then looked up."""
    ids = []
    for piece in pretokenize(text):
        word = [byte_symbols()[b] for b in piece.encode()]
        for a, b in merges:
            word = _apply(word, a, b)
        ids += [vocab[s] for s in word]
    return ids


def test_merges_match_rank_order_reference_and_round_trip(toy_files):
    vocab_file, merge_file, vocab, merges = toy_files
    tok = GPT2BPETokenizer(vocab_file, merge_file)
    assert tok.vocab_size == len(vocab) and tok.eod == vocab[EOD_TOKEN] == tok.pad
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    words = ["the", " cat", " sat", "hat", "'s", " über", "中文", "🙂", "\n", "  ", "x", "1", "(", "é"]
    for _ in range(200):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        ids = tok.tokenize(text)
        assert ids == _reference_ids(text, vocab, merges), repr(text)
        assert tok.detokenize(ids) == text
    assert len(tok.tokenize("the cat sat on the mat")) < len("the cat sat on the mat")  # merges applied
    weird = "".join(chr(c) for c in (0, 7, 0x85, 0x2028, 0x1F600, 0xE9, 0x10FFFF))
    assert tok.detokenize(tok.tokenize(weird)) == weird
    assert tok.detokenize(tok.tokenize("a") + [tok.eod] + tok.tokenize("b")) == "ab"


def test_bad_files_name_the_argument(tmp_path, toy_files):
    vocab_file, merge_file, vocab, _ = toy_files
    with pytest.raises(FileNotFoundError, match="vocab_file"):
        GPT2BPETokenizer(str(tmp_path / "none.json"), merge_file)
    no_eod = tmp_path / "v.json"
    no_eod.write_text(json.dumps({k: v for k, v in vocab.items() if k != EOD_TOKEN}))
    with pytest.raises(ValueError, match="vocab_file.*endoftext"):
        GPT2BPETokenizer(str(no_eod), merge_file)
    bad = tmp_path / "m.txt"
    bad.write_text("a b c\n")
    with pytest.raises(ValueError, match="merge_file"):
        GPT2BPETokenizer(vocab_file, str(bad))


def test_preprocess_and_train_with_gpt2_bpe(toy_files, tmp_path):
    """tools/preprocess_data.py --tokenizer-type GPT2BPETokenizer (2 worker processes: the
    tokenizer is pickled) writes the ids of the tokenizer; the trainer reads them with the
    same flags and its loss falls."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    vocab_file, merge_file, _, _ = toy_files
    tok = GPT2BPETokenizer(vocab_file, merge_file)
    rng = random.Random(0)
    docs = [" ".join(rng.choice(["the cat", "sat on", "the mat", "it's", "def f(x):", "return x"]) for _ in
                     range(rng.randint(20, 60))) for _ in range(300)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab_file, "--merge-file", merge_file]
    pre = run_python([os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", str(tmp_path / "d.jsonl"),
                      "--output-prefix", str(tmp_path / "bpe"), "--append-eod", "--workers", "2", *flags])
    assert pre.returncode == 0, pre.stderr[-2000:]
    ds = IndexedDataset(str(tmp_path / "bpe_text_document"))
    for i in (0, 17, 299):
        assert ds[i].tolist() == tok.tokenize(docs[i]) + [tok.eod]
    train = run_python(["-m", "megatron_fox.train", "--num-layers", "2", "--hidden-size", "64",
                        "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "4",
                        "--global-batch-size", "8", "--train-iters", "30", "--lr", "3e-3", "--device", "cpu",
                        "--no-progress-bar", "--log-interval", "30", "--split", "100,0,0",
                        "--data-path", str(tmp_path / "bpe_text_document"), *flags],
                       cwd=tmp_path, timeout=600, env=dict(tool_env(), TRITON_INTERPRET="0"))  # plain attention
    assert train.returncode == 0, train.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| loss ([\d.]+)", train.stdout)]
    assert losses and losses[-1] < torch.log(torch.tensor(float(tok.vocab_size))).item() - 1.0, train.stdout[-2000:]
    no_files = run_python(["-m", "megatron_fox.train", "--tokenizer-type", "GPT2BPETokenizer", "--data-path",
                           str(tmp_path / "bpe_text_document")], cwd=tmp_path, timeout=120)
    assert no_files.returncode == 2 and "'vocab_file'" in no_files.stderr
