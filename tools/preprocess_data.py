"""Tokenize documents into a Megatron indexed dataset, like Megatron-LM's tools/preprocess_data.py.

    python tools/preprocess_data.py --input data.jsonl --json-keys text \\
        --tokenizer-model tok.model --output-prefix out/my --append-eod --workers 8
    # writes out/my_text_document.bin and out/my_text_document.idx (one per --json-keys key)

Inputs: ``*.jsonl``/``*.json`` files hold one JSON document per line; any other file is one
plain-text document. Train with ``--data-path out/my_text_document``.
"""

import argparse
import os
import sys
import time

from tqdm import tqdm

from megatron_fox.training.data import (MissingKeyError, iter_documents, tokenize_stream,
                                        write_documents)
from megatron_fox.training.tokenizer import SentencePieceTokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL or plain-text files")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields to tokenize, one output dataset each")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--append-eod", action="store_true", help="append the EOD id to each document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    args = p.parse_args(argv)
    missing = [f for f in args.input if not os.path.isfile(f)]
    if missing:
        p.error(f"--input: file(s) not found: {', '.join(missing)}")
    if not os.path.isfile(args.tokenizer_model):
        p.error(f"--tokenizer-model: file not found: {args.tokenizer_model}")
    if args.workers < 1 or args.chunk_size < 1:
        p.error("--workers and --chunk-size must be >= 1")
    return p, args


def _tokenized(args, key, eod):
    texts = iter_documents(args.input, key)
    stream = tokenize_stream(texts, args.tokenizer_model, args.workers, args.chunk_size)
    for ids in tqdm(stream, desc=key, unit="doc", mininterval=1.0):
        yield ids + [eod] if args.append_eod else ids


def main(argv=None):
    parser, args = parse_args(argv)
    tok = SentencePieceTokenizer(args.tokenizer_model)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (slow import, outside the timing)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    outputs = []
    for key in args.json_keys:
        t0 = time.time()
        prefix = f"{args.output_prefix}_{key}_document"
        try:
            n_docs, n_tokens = write_documents(prefix, _tokenized(args, key, tok.eod),
                                               tok.vocab_size)
        except MissingKeyError as err:
            parser.error(f"--json-keys: {err}")
        except ValueError as err:  # a line that is not JSON
            parser.error(f"--input: {err}")
        print(f"wrote {prefix}.bin/.idx: {n_docs} documents, {n_tokens} tokens in "
              f"{time.time() - t0:.1f} s")
        outputs.append(prefix)
    return outputs


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
