"""Data pipeline: tokenizer, preprocessing tools, GPT datasets, packing offsets, default corpus."""

import importlib.util
import json
import multiprocessing
import os
import pickle
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_fox.training.data import (build_gpt_datasets, cu_seqlens_from_tokens,
                                        default_corpus_files, prepare_default_corpus)
from megatron_fox.training.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[2]
SMALL_BYTES, SMALL_VOCAB = 300_000, 512


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The default corpus capped at 300 KB, built once: (prefix, model, cache_dir, seconds)."""
    cache = tmp_path_factory.mktemp("cache")
    t0 = time.time()
    prefix, model = prepare_default_corpus(str(cache), vocab_size=SMALL_VOCAB,
                                           max_bytes=SMALL_BYTES)
    return prefix, model, cache, time.time() - t0


@pytest.fixture(scope="module")
def tok(corpus):
    return SentencePieceTokenizer(corpus[1])


@pytest.fixture(scope="module")
def docs():
    """~150 real documents: paragraphs of stdlib files beyond the 300 KB training subset."""
    files = default_corpus_files(2_000_000)[-12:]
    paras = [p for f in files for p in Path(f).read_text().split("\n\n") if p.strip()]
    out = paras[:150] + ["tabs\tand  spaces\n\n  </s> <pad> <s> é ü 中文 🙂\n"]
    assert len(out) > 100
    return out


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory, tok, corpus, docs):
    d = tmp_path_factory.mktemp("pre")
    path = d / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    tool = _load_tool("preprocess_data")
    out = tool.main(["--input", str(path), "--output-prefix", str(d / "my"), "--append-eod",
                     "--tokenizer-model", corpus[1], "--workers", "2"])
    assert out == [str(d / "my_text_document")]
    return out[0]


def test_tokenizer_round_trip_and_specials(tok, docs):
    assert (tok.vocab_size, tok.unk, tok.bos, tok.eod, tok.eos, tok.pad) == (SMALL_VOCAB, 0, 1,
                                                                             2, 2, 3)
    assert tok.special_tokens_dict["pad_token"] == 3 and tok.pad not in (tok.eod, tok.bos)
    for text in docs:
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text
        assert tok.detokenize(torch.tensor(ids + [tok.eod])) == text  # eod is dropped
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids and tok.pad not in ids and tok.bos not in ids  # even "</s>"
    code = "def f(x):\n\tif x:\n        return  x\n"
    assert len(tok.tokenize(code)) < len(code)  # real merges, not bytes
    assert tok.tokenize_batch(docs[:5]) == [tok.tokenize(t) for t in docs[:5]]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(docs[0]) == tok.tokenize(docs[0])
    assert json.loads(json.dumps(tok.unique_identifiers))["vocab_size"] == SMALL_VOCAB


@pytest.mark.parametrize("name", ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_megatron_sentencepiece_type_names(name, corpus, tok, docs, tmp_path):
    """Megatron-LM's other names for a SentencePiece model give the same ids and end of
    document (its eos), in the trainer and in preprocess_data; without a model they name
    tokenizer_model."""
    from megatron_fox.training.arguments import ConfigError, parse_args
    from megatron_fox.training.tokenizer import build_tokenizer

    other = build_tokenizer(name, corpus[1])
    assert (other.eod, other.vocab_size) == (tok.eod, tok.vocab_size)
    assert [other.tokenize(t) for t in docs[:5]] == [tok.tokenize(t) for t in docs[:5]]
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n")
    out = _load_tool("preprocess_data").main(["--input", str(tmp_path / "d.jsonl"), "--output-prefix",
                                              str(tmp_path / "d"), "--append-eod", "--tokenizer-type", name,
                                              "--tokenizer-model", corpus[1]])
    assert os.path.isfile(out[0] + ".bin")
    with pytest.raises(ConfigError, match="'tokenizer_model'"):
        parse_args(["--tokenizer-type", name, "--data-path", out[0]])


def test_preprocess_jsonl_reads_back(jsonl_dataset, tok, docs):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(jsonl_dataset)
    assert len(ds) == len(docs)
    assert ds[0].dtype == np.uint16
    for i, text in enumerate(docs):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]
    assert ds.document_indices.tolist() == list(range(len(docs) + 1))


def test_preprocess_plain_text_files(tmp_path, tok, corpus, docs):
    files = []
    for i, text in enumerate(docs[:3]):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text)
    tool = _load_tool("preprocess_data")
    (prefix,) = tool.main(["--input", *map(str, files), "--output-prefix", str(tmp_path / "t"),
                           "--tokenizer-model", corpus[1]])
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize(t) for t in docs[:3]]


def _segments_in(sample, docs_ids, eod):
    """Every EOD-delimited piece of ``sample`` occurs contiguously in some document."""
    hay = [",".join(map(str, d)) for d in docs_ids]
    cuts = [0] + [i + 1 for i, t in enumerate(sample) if t == eod] + [len(sample)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            needle = ",".join(map(str, sample[a:b]))
            assert any(needle in h for h in hay), f"piece {sample[a:b]} not in the documents"


def test_build_gpt_datasets_samples_come_from_split_docs(jsonl_dataset, tok, docs, tmp_path):
    seq = 32
    train, valid, test = build_gpt_datasets(jsonl_dataset, tok, seq, (60, 8, 8), seed=5,
                                            split="80,10,10", cache_path=str(tmp_path / "idx"))
    ids = [tok.tokenize(t) + [tok.eod] for t in docs]
    n = len(ids)
    bounds = {"train": (0, round(0.8 * n)), "valid": (round(0.8 * n), round(0.9 * n)),
              "test": (round(0.9 * n), n)}
    assert len(train) >= 60 and len(valid) >= 8 and len(test) >= 8
    for name, ds in (("train", train), ("valid", valid), ("test", test)):
        lo, hi = bounds[name]
        for i in range(min(len(ds), 20)):
            item = ds[i]
            assert item["tokens"].shape == (seq,) and item["labels"].shape == (seq,)
            assert torch.equal(item["tokens"][1:], item["labels"][:-1])
            assert item["loss_mask"].sum() == seq
            sample = item["tokens"].tolist() + [int(item["labels"][-1])]  # seq + 1 tokens
            _segments_in(sample, ids[lo:hi], tok.eod)
    again = build_gpt_datasets(jsonl_dataset, tok, seq, (60, 8, 8), seed=5, split="80,10,10",
                               cache_path=str(tmp_path / "idx"))[0]
    assert torch.equal(again[3]["tokens"], train[3]["tokens"])  # cached indices, same order


def test_eod_mask_loss_leaves_out_the_eod_positions(jsonl_dataset, tok, tmp_path):
    """GPTDatasetConfig's eod_mask_loss through build_gpt_datasets (--eod-mask-loss): the loss
    mask is 0 exactly where the input token is the end of a document."""
    plain, _, _ = build_gpt_datasets(jsonl_dataset, tok, 32, (20, 0, 0), seed=3, split="100,0,0",
                                     cache_path=str(tmp_path / "a"))
    masked, _, _ = build_gpt_datasets(jsonl_dataset, tok, 32, (20, 0, 0), seed=3, split="100,0,0",
                                      cache_path=str(tmp_path / "b"), eod_mask_loss=True)
    eods = 0
    for i in range(20):
        tokens = masked[i]["tokens"]
        assert torch.equal(tokens, plain[i]["tokens"]) and bool((plain[i]["loss_mask"] == 1).all())
        assert torch.equal(masked[i]["loss_mask"], (tokens != tok.eod).float())
        eods += int((tokens == tok.eod).sum())
    assert eods > 0  # the samples hold document ends


def test_build_gpt_datasets_errors(jsonl_dataset, tok, tmp_path):
    with pytest.raises(ValueError, match="valid split"):
        build_gpt_datasets(jsonl_dataset, tok, 16, (10, 5, 0), split="99.9,0.1,0",
                           cache_path=str(tmp_path))
    _, valid, _ = build_gpt_datasets(jsonl_dataset, tok, 16, (10, 0, 0), split="99.9,0.1,0",
                                     cache_path=str(tmp_path))
    assert len(valid) == 0  # an empty split is fine when no samples are asked of it
    with pytest.raises(FileNotFoundError, match="data_prefix"):
        build_gpt_datasets(str(tmp_path / "nope"), tok, 16, (10, 1, 1))
    with pytest.raises(TypeError, match="no_such_field"):
        build_gpt_datasets(jsonl_dataset, tok, 16, (10, 1, 1), no_such_field=1)
    _, valid, test = build_gpt_datasets(jsonl_dataset, tok, 16, (10, None, 0), split="9,1,0",
                                        cache_path=str(tmp_path))
    assert test is None and len(valid) > 0


@pytest.fixture
def one_rank():
    """A one-process gloo group for this test only (Megatron's BlendedDataset asks for the
    rank; a module-wide group would break the forked workers of the gloo test below)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _blend_sources(ds, n):
    """Which prefix each of the first n samples of a BlendedDataset came from, checked
    against that prefix's own dataset."""
    src = [int(ds.dataset_index[i]) for i in range(n)]
    for i in range(0, n, 7):
        own = ds.datasets[src[i]][int(ds.dataset_sample_index[i])]
        assert torch.equal(ds[i]["tokens"], own["tokens"])
    return np.array(src)


def test_blend_of_two_prefixes(one_rank, jsonl_dataset, corpus, tok, docs, tmp_path):
    n = 400
    a, b = jsonl_dataset, corpus[0]
    train, _, _ = build_gpt_datasets([a, b], tok, 32, (n, 0, 0), split="100,0,0", weights=[1, 3],
                                     cache_path=str(tmp_path))
    src = _blend_sources(train, n)
    assert abs((src == 0).mean() - 0.25) < 0.02
    ids = [tok.tokenize(t) + [tok.eod] for t in docs]
    for i in np.flatnonzero(src == 0)[:10]:  # samples of prefix a hold pieces of its documents
        _segments_in(train[int(i)]["tokens"].tolist(), ids, tok.eod)
    # no weights: the prefixes weigh by their tokens (uint16 ids in the .bin files)
    tokens = [os.path.getsize(p + ".bin") / 2 for p in (a, b)]
    by_size, _, _ = build_gpt_datasets([a, b], tok, 32, (n, 0, 0), split="100,0,0", cache_path=str(tmp_path))
    assert abs((_blend_sources(by_size, n) == 0).mean() - tokens[0] / sum(tokens)) < 0.02
    with pytest.raises(ValueError, match="weights"):
        build_gpt_datasets([a, b], tok, 32, (n, 0, 0), weights=[1.0])
    with pytest.raises(ValueError, match="every prefix"):
        build_gpt_datasets([a, b], tok, 16, (10, 0, 0), split="99.9,0.1,0", weights=[1, 1],
                           cache_path=str(tmp_path))


def test_data_path_blend_from_the_command_line(one_rank, jsonl_dataset, corpus, tmp_path):
    from megatron_fox.train import build_data
    from megatron_fox.training.arguments import ConfigError, parse_args, parse_data_blend

    assert parse_data_blend(["p"]) == (["p"], None)
    assert parse_data_blend(["p", "q"]) == (["p", "q"], None)
    assert parse_data_blend(["0.3", "p", "7", "q"]) == (["p", "q"], [0.3, 7.0])
    for bad in (["0.3", "p", "q"], ["p", "0.3"], ["0", "p", "1", "q"], ["0.5", "p", "0.5"]):
        with pytest.raises(ConfigError, match="data_path"):
            parse_data_blend(bad)
    flags = ["--data-path", "1", jsonl_dataset, "3", corpus[0], "--tokenizer-model", corpus[1], "--seq-length", "32",
             "--train-iters", "50", "--global-batch-size", "8", "--micro-batch-size", "8", "--split", "100,0,0",
             "--data-cache-path", str(tmp_path)]
    train, _, _, _ = build_data(parse_args(flags))
    assert abs((_blend_sources(train, 400) == 0).mean() - 0.25) < 0.02
    # Megatron-LM's --num-dataset-builder-threads builds the blend's parts in threads: the same samples
    threaded, _, _, _ = build_data(parse_args(flags + ["--num-dataset-builder-threads", "2"]))
    for i in (0, 1, 7, 399):
        assert torch.equal(torch.as_tensor(threaded[i]["tokens"]), torch.as_tensor(train[i]["tokens"])), i


def _gloo_worker(rank, port, prefix, model, cache, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tok = SentencePieceTokenizer(model)
        train, _, _ = build_gpt_datasets(prefix, tok, 24, (40, 4, 4), split="80,10,10",
                                         cache_path=cache)
        only0 = build_gpt_datasets(prefix, tok, 24, (40, 4, 4), split="80,10,10",
                                   cache_path=cache, is_built_on_rank=lambda: rank == 0)
        queue.put((rank, train[7]["tokens"].tolist(), [d is None for d in only0]))
    finally:
        torch.distributed.destroy_process_group()


def test_build_gpt_datasets_in_gloo_group(jsonl_dataset, corpus, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker,
                         args=(r, port, jsonl_dataset, corpus[1], str(tmp_path), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (t, n)) for r, t, n in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results[0][0] == results[1][0] and len(results[0][0]) == 24
    assert results[0][1] == [False] * 3 and results[1][1] == [True] * 3


def _slow_cu_seqlens(tokens, eod):
    b, s = tokens.shape
    cu, flat = [0], tokens.reshape(-1).tolist()
    for p in range(1, b * s):
        if p % s == 0 or flat[p - 1] == eod:
            cu.append(p)
    return cu + [b * s]


@pytest.mark.parametrize("b,s", [(1, 1), (1, 9), (3, 1), (2, 17), (4, 64)])
def test_cu_seqlens_from_tokens_matches_loop(b, s):
    eod = 3
    for _ in range(20):
        tokens = torch.randint(0, 6, (b, s))
        tokens[0, 0] = eod  # EOD first: a 1-token document
        tokens[-1, -1] = eod  # and last
        if s > 2:
            tokens[0, s - 1] = eod  # at the end of a sample (no extra boundary)
        cu, max_len = cu_seqlens_from_tokens(tokens, eod)
        expected = _slow_cu_seqlens(tokens, eod)
        assert cu.dtype == torch.int32 and cu.tolist() == expected
        assert max_len == max(b - a for a, b in zip(expected[:-1], expected[1:]))
    hand = torch.tensor([[5, 3, 5, 5], [3, 3, 5, 3]])
    assert cu_seqlens_from_tokens(hand, 3)[0].tolist() == [0, 2, 4, 5, 6, 8]


def test_prepare_default_corpus_builds_then_hits_cache(corpus, tok):
    prefix, model, cache, first_seconds = corpus
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    files = default_corpus_files(SMALL_BYTES)
    assert 0 < sum(map(os.path.getsize, files)) <= SMALL_BYTES
    assert all("site-packages" not in f and "/test/" not in f for f in files)
    meta = json.loads(Path(prefix).with_name("meta.json").read_text())
    ds = IndexedDataset(prefix)
    assert len(ds) == meta["documents"] == len(files)
    assert ds[0].tolist() == tok.tokenize(Path(files[0]).read_text()) + [tok.eod]
    assert int(ds.sequence_lengths.sum()) == meta["tokens"]
    from megatron_fox.training import data as data_module

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache hit expected: no tokenizer training, no tokenizing")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_module, "_build_default_corpus", no_rebuild)
        assert prepare_default_corpus(str(cache), vocab_size=SMALL_VOCAB, max_bytes=SMALL_BYTES) == (
            prefix, model)
    assert 0 < meta["tokenizer_seconds"] <= meta["total_seconds"] <= first_seconds
    assert sorted(os.listdir(cache)) == sorted([Path(prefix).parent.name,
                                                Path(prefix).parent.name + ".lock"])


def _prepare_in_child(cache, queue):
    queue.put(prepare_default_corpus(cache, vocab_size=400, max_bytes=60_000))


def test_prepare_default_corpus_concurrent_callers(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert [n for n in os.listdir(tmp_path) if not n.endswith(".lock")] == [
        Path(results[0][0]).parent.name]  # one build, no temp dirs left
    prefix, model = prepare_default_corpus(str(tmp_path / "elsewhere"), vocab_size=400,
                                           max_bytes=60_000)  # another machine's cache
    assert Path(prefix + ".bin").read_bytes() == Path(results[0][0] + ".bin").read_bytes()
    assert (SentencePieceTokenizer(model).unique_identifiers
            == SentencePieceTokenizer(results[0][1]).unique_identifiers)


def test_cli_errors_name_the_argument(tmp_path, corpus, capsys):
    pre, train = _load_tool("preprocess_data"), _load_tool("train_tokenizer")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n{"body": "world"}\n')
    out = ["--output-prefix", str(tmp_path / "o"), "--tokenizer-model", corpus[1]]
    cases = [
        (pre, ["--input", str(tmp_path / "missing.jsonl"), *out], "--input", "missing.jsonl"),
        (pre, ["--input", str(data), "--json-keys", "body", *out], "--json-keys",
         "'body' not in " + str(data) + ":1"),
        (pre, ["--input", str(data), "--output-prefix", "x", "--tokenizer-model", "no.model"],
         "--tokenizer-model", "no.model"),
        (train, ["--input", str(tmp_path / "missing.txt"), "--model-prefix", "m"], "--input",
         "missing.txt"),
        (train, ["--input", str(data), "--json-keys", "body", "--vocab-size", "300",
                 "--model-prefix", str(tmp_path / "m")], "--json-keys", "'body' not in"),
    ]
    for tool, argv, flag, detail in cases:
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"error: {flag}:" in err and detail in err, err
    assert not list(tmp_path.glob("o_*"))  # no partial dataset left behind


def test_train_tokenizer_cli(tmp_path, docs, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"body": t}) + "\n" for t in docs))
    model = _load_tool("train_tokenizer").main(
        ["--input", str(data), "--json-keys", "body", "--vocab-size", "400",
         "--model-prefix", str(tmp_path / "tok")])
    tok = SentencePieceTokenizer(model)
    assert tok.vocab_size == 400 and tok.detokenize(tok.tokenize(docs[7])) == docs[7]
    assert "vocab 400" in capsys.readouterr().out


def test_per_split_data_paths(one_rank, jsonl_dataset, corpus, tok, docs, tmp_path):
    """--train-data-path / --valid-data-path / --test-data-path: each split is the whole of its
    own files (--split ignored); the config errors name their key."""
    from megatron_fox.train import build_data
    from megatron_fox.training.arguments import ConfigError, parse_args

    common = ["--tokenizer-model", corpus[1], "--seq-length", "32", "--train-iters", "20", "--global-batch-size",
              "4", "--micro-batch-size", "4", "--eval-interval", "10", "--eval-iters", "2",
              "--data-cache-path", str(tmp_path)]
    args = parse_args(["--train-data-path", corpus[0], "--valid-data-path", jsonl_dataset, "--test-data-path",
                       jsonl_dataset, "--split", "1,1,98"] + common)
    train, valid, test, tokenizer = build_data(args)
    ids = [tok.tokenize(t) + [tok.eod] for t in docs]
    for split in (valid, test):
        for i in range(0, len(split), 3):  # validation and test samples hold pieces of the JSONL documents only
            _segments_in(split[i]["tokens"].tolist(), ids, tok.eod)
    assert len(valid) >= 3 * 2 * 4 and len(train) >= 20 * 4 and len(test) >= 2 * 4
    # the training split is the whole corpus prefix: its samples are that prefix's own, split "100,0,0"
    whole, _, _ = build_gpt_datasets(corpus[0], tokenizer, 32, (80, 0, 0), split="100,0,0", cache_path=str(tmp_path))
    assert torch.equal(train[5]["tokens"], whole[5]["tokens"])
    for flags, key in ((["--valid-data-path", jsonl_dataset], "train_data_path"),
                       (["--test-data-path", jsonl_dataset], "train_data_path"),
                       (["--data-path", corpus[0], "--train-data-path", corpus[0]], "train_data_path"),
                       (["--train-data-path", corpus[0]], "eval_interval"),
                       (["--train-data-path", "1", corpus[0], "2"], "train_data_path"),
                       (["--train-data-path", corpus[0], "--valid-data-path", str(tmp_path / "none")],
                        "valid_data_path")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            parse_args(flags + common)


def test_data_args_files_equal_the_command_line(jsonl_dataset, corpus, tmp_path):
    """--data-args-path (data_path's words in a file) and --per-split-data-args-path (a JSON
    object of the per-split paths) give the blends their command-line forms give; bad files
    stop naming the key."""
    from megatron_fox.training.arguments import ConfigError, parse_args

    common = ["--tokenizer-model", corpus[1], "--seq-length", "32", "--train-iters", "20", "--global-batch-size", "4",
              "--micro-batch-size", "4", "--eval-interval", "10", "--eval-iters", "2"]
    words = tmp_path / "blend.txt"
    words.write_text(f"1 {jsonl_dataset}\n3 {corpus[0]}\n")
    from_file = parse_args(["--data-args-path", str(words)] + common)
    assert from_file.data_blends == parse_args(["--data-path", "1", jsonl_dataset, "3", corpus[0]] + common).data_blends
    table = tmp_path / "splits.json"
    table.write_text(json.dumps({"train": [corpus[0]], "valid": f"1 {jsonl_dataset}", "test": [jsonl_dataset]}))
    per_split = parse_args(["--per-split-data-args-path", str(table)] + common)
    assert per_split.data_blends == parse_args(["--train-data-path", corpus[0], "--valid-data-path", "1",
                                                jsonl_dataset, "--test-data-path", jsonl_dataset] + common).data_blends
    empty, bad, odd = tmp_path / "empty.txt", tmp_path / "bad.json", tmp_path / "odd.json"
    empty.write_text("\n")
    bad.write_text("{train: x}")
    odd.write_text(json.dumps({"training": [corpus[0]]}))
    for flags, key, says in ((["--data-args-path", str(words), "--data-path", corpus[0]], "data_args_path", "not both"),
                             (["--data-args-path", str(empty)], "data_args_path", "is empty"),
                             (["--data-args-path", str(tmp_path / "none.txt")], "data_args_path", "cannot read"),
                             (["--per-split-data-args-path", str(bad)], "per_split_data_args_path", "is not JSON"),
                             (["--per-split-data-args-path", str(odd)], "per_split_data_args_path", "train / valid"),
                             (["--per-split-data-args-path", str(table), "--train-data-path", corpus[0]],
                              "per_split_data_args_path", "not both")):
        with pytest.raises(ConfigError, match=f"'{key}': .*{says}"):
            parse_args(flags + common)


FAKE_TRANSFORMERS = '''"""A stand-in for transformers (tests): AutoTokenizer of a directory holding
fake_tokenizer.json; byte-level ids (byte + 3), 0 bos, 1 eos, 2 pad."""


class AutoTokenizer:
    eos_token_id, pad_token_id = 1, 2

    @classmethod
    def from_pretrained(cls, path):
        import os
        if not os.path.isfile(os.path.join(path, "fake_tokenizer.json")):
            raise OSError(f"Can't load tokenizer for '{path}'")
        return cls()

    def __len__(self):
        return 259

    def get_vocab(self):
        return {**{f"<{b}>": b + 3 for b in range(256)}, "<s>": 0, "</s>": 1, "<pad>": 2}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([0] if add_special_tokens else []) + [b + 3 for b in text.encode()]}

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i > 2).decode(errors="replace")
'''


def test_huggingface_tokenizer_through_transformers(monkeypatch, tmp_path):
    """--tokenizer-type HuggingFaceTokenizer: transformers' AutoTokenizer (here a stand-in
    module) of --tokenizer-model, eod = its eos id, texts without special tokens; without
    transformers the flag stops naming the key."""
    import types

    from megatron_fox.training.arguments import ConfigError, parse_args
    from megatron_fox.training.tokenizer import build_tokenizer

    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ConfigError, match="'tokenizer_type': HuggingFaceTokenizer needs the transformers"):
            parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "x"])
        with pytest.raises(ValueError, match="transformers"):
            build_tokenizer("HuggingFaceTokenizer", "x")

    fake = types.ModuleType("transformers")
    exec(FAKE_TRANSFORMERS, fake.__dict__)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "fake_tokenizer.json").write_text("{}")
    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.eod, tok.pad, tok.special_tokens_dict) == (259, 1, 2, {"eos_token": 1, "pad_token": 2})
    again = pickle.loads(pickle.dumps(tok))  # workers reload it from the directory
    assert again.unique_identifiers == tok.unique_identifiers and json.dumps(tok.unique_identifiers)
    assert tok.tokenize("hé") == [b + 3 for b in "hé".encode()]
    assert tok.detokenize(tok.tokenize("hé") + [tok.eod]) == "hé"


def test_preprocess_and_train_with_a_huggingface_tokenizer_directory(tmp_path):
    """--tokenizer-type HuggingFaceTokenizer with a tokenizer directory, through a transformers
    stand-in on PYTHONPATH (the real package is not a dependency): preprocess_data.py with 2
    workers (the tokenizer pickled and reloaded there) writes its ids; the trainer builds
    Megatron-Core's GPT datasets with it (their cache key is the tokenizer's
    unique_identifiers) and its loss falls; a directory without a tokenizer stops naming
    tokenizer_model; a SentencePiece type given a directory says which type takes one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_fox.training.arguments import ConfigError, parse_args

    sys.path.insert(0, str(Path(__file__).parent))
    from workers import run_python, tool_env

    fake, tok_dir = tmp_path / "fake" / "transformers", tmp_path / "hf_tok"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_TRANSFORMERS)
    tok_dir.mkdir()
    (tok_dir / "fake_tokenizer.json").write_text("{}")
    env = dict(tool_env(), TRITON_INTERPRET="0")
    env["PYTHONPATH"] = str(tmp_path / "fake") + os.pathsep + env["PYTHONPATH"]
    docs = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 5) for i in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir)]
    pre = run_python([str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "d.jsonl"),
                      "--output-prefix", str(tmp_path / "hf"), "--append-eod", "--workers", "2", *flags], env=env)
    assert pre.returncode == 0, pre.stderr[-2000:]
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    for i in (0, 17, 199):
        assert ds[i].tolist() == [b + 3 for b in docs[i].encode()] + [1]
    model = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
             "--micro-batch-size", "4", "--global-batch-size", "8", "--lr", "3e-3", "--device", "cpu",
             "--no-progress-bar", "--split", "100,0,0", "--data-path", str(tmp_path / "hf_text_document")]
    train = run_python(["-m", "megatron_fox.train", *model, "--train-iters", "30", "--log-interval", "30", *flags],
                       cwd=tmp_path, timeout=600, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| loss ([\d.]+)", train.stdout)]
    assert losses and losses[-1] < np.log(259) - 1.0, train.stdout[-2000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = run_python(["-m", "megatron_fox.train", *model, "--train-iters", "1", "--tokenizer-type",
                      "HuggingFaceTokenizer", "--tokenizer-model", str(empty)], cwd=tmp_path, timeout=300, env=env)
    assert bad.returncode == 2 and "config key 'tokenizer_model': transformers could not load" in bad.stderr, \
        bad.stderr[-2000:]
    with pytest.raises(ConfigError, match="'tokenizer_model'.*use --tokenizer-type HuggingFaceTokenizer"):
        parse_args(model + ["--tokenizer-model", str(tok_dir)])


def test_preprocess_and_train_with_null_tokenizer_ids(tmp_path):
    """--tokenizer-type NullTokenizer on data that is already ids (Megatron-LM's use):
    preprocess_data.py --vocab-size V writes the ids and eod = V; the trainer builds
    Megatron-Core's GPT datasets with the tokenizer (their cache key) and learns the uniform
    ids' entropy, ln 50; without --vocab-size the tool stops naming it."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sys.path.insert(0, str(Path(__file__).parent))
    from workers import run_python, tool_env

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, int(rng.integers(30, 200))).tolist() for _ in range(200)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": " ".join(map(str, d))}) for d in docs))
    tool = [str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "d.jsonl"), "--output-prefix",
            str(tmp_path / "ids"), "--tokenizer-type", "NullTokenizer", "--append-eod"]
    missing = run_python(tool)
    assert missing.returncode == 2 and "--vocab-size" in missing.stderr, missing.stderr[-2000:]
    pre = run_python(tool + ["--vocab-size", "50"])
    assert pre.returncode == 0, pre.stderr[-2000:]
    ds = IndexedDataset(str(tmp_path / "ids_text_document"))
    assert ds[0].tolist() == docs[0] + [50] and ds[199].tolist() == docs[199] + [50]
    train = run_python(["-m", "megatron_fox.train", "--num-layers", "2", "--hidden-size", "64",
                        "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "4",
                        "--global-batch-size", "8", "--train-iters", "40", "--lr", "3e-3", "--device", "cpu",
                        "--no-progress-bar", "--log-interval", "40", "--split", "100,0,0", "--data-path",
                        str(tmp_path / "ids_text_document"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "50"],
                       cwd=tmp_path, timeout=600, env=dict(tool_env(), TRITON_INTERPRET="0"))
    assert train.returncode == 0, train.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| loss ([\d.]+)", train.stdout)]
    assert losses and abs(losses[-1] - np.log(50)) < 0.25, train.stdout[-2000:]
