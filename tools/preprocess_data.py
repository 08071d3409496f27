"""Tokenize documents into a Megatron indexed dataset, like Megatron-LM's tools/preprocess_data.py.

    python tools/preprocess_data.py --input data.jsonl --json-keys text \\
        --tokenizer-model tok.model --output-prefix out/my --append-eod --workers 8
    # GPT-2's BPE (the FoX papers' LongCrawl64 models), as Megatron-LM's flags:
    python tools/preprocess_data.py --input data.jsonl --tokenizer-type GPT2BPETokenizer \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --output-prefix out/my --append-eod
    # already ids (whitespace-separated, below 50304; eod = 50304), as Megatron-LM's NullTokenizer:
    python tools/preprocess_data.py --input ids.jsonl --tokenizer-type NullTokenizer --vocab-size 50304 \\
        --output-prefix out/ids --append-eod
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
from megatron_fox.training.tokenizer import SENTENCEPIECE_TYPES, TOKENIZER_TYPES, build_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL or plain-text files")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields to tokenize, one output dataset each")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>_<key>_document.bin/.idx")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer", choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model", help="SentencePiece .model file (SentencePieceTokenizer)")
    p.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    p.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    p.add_argument("--vocab-size", type=int,
                   help="NullTokenizer: documents are whitespace-separated ids below this; eod = vocab_size")
    p.add_argument("--append-eod", action="store_true", help="append the EOD id to each document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    args = p.parse_args(argv)
    missing = [f for f in args.input if not os.path.isfile(f)]
    if missing:
        p.error(f"--input: file(s) not found: {', '.join(missing)}")
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        p.error("--tokenizer-model: needed by --tokenizer-type HuggingFaceTokenizer (a directory or hub name)")
    if args.tokenizer_type == "NullTokenizer" and (args.vocab_size is None or args.vocab_size < 1):
        p.error(f"--vocab-size: needed by --tokenizer-type NullTokenizer (>= 1), got {args.vocab_size}")
    needed = (("tokenizer_model",) if args.tokenizer_type in SENTENCEPIECE_TYPES
              else ("vocab_file", "merge_file") if args.tokenizer_type == "GPT2BPETokenizer" else ())
    for key in needed:
        path = getattr(args, key)
        if path is None or not os.path.isfile(path):
            p.error(f"--{key.replace('_', '-')}: file not found: {path} (needed by --tokenizer-type "
                    f"{args.tokenizer_type})")
    if args.workers < 1 or args.chunk_size < 1:
        p.error("--workers and --chunk-size must be >= 1")
    return p, args


def _tokenized(args, key, tok):
    texts = iter_documents(args.input, key)
    stream = tokenize_stream(texts, tok, args.workers, args.chunk_size)
    for ids in tqdm(stream, desc=key, unit="doc", mininterval=1.0):
        yield ids + [tok.eod] if args.append_eod else ids


def main(argv=None):
    parser, args = parse_args(argv)
    try:
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                              args.vocab_size)
    except ValueError as err:  # a vocabulary or merges file that is not GPT-2's format, a tokenizer directory
        parser.error(str(err))
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (slow import, outside the timing)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    outputs = []
    for key in args.json_keys:
        t0 = time.time()
        prefix = f"{args.output_prefix}_{key}_document"
        try:
            n_docs, n_tokens = write_documents(prefix, _tokenized(args, key, tok),
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
