"""Train a SentencePiece tokenizer for megatron_fox.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text \\
        --vocab-size 32000 --model-prefix out/tok        # writes out/tok.model, out/tok.vocab

Inputs: ``*.jsonl``/``*.json`` (one JSON document per line, field from --json-keys) or any other
file as plain text. Ids: unk=0, bos=1, eos=eod=2, pad=3 (megatron_fox.training.tokenizer).
"""

import argparse
import os
import sys
import time

from megatron_fox.training.data import MissingKeyError, iter_documents
from megatron_fox.training.tokenizer import SentencePieceTokenizer, train_sentencepiece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    p.add_argument("--json-keys", default="text", help="JSON field holding the text")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-prefix", required=True, help="writes <prefix>.model/.vocab")
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="at most this many lines (sampled) are used")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    missing = [f for f in args.input if not os.path.isfile(f)]
    if missing:
        p.error(f"--input: file(s) not found: {', '.join(missing)}")
    return p, args


def main(argv=None):
    parser, args = parse_args(argv)
    t0 = time.time()
    docs = iter_documents(args.input, args.json_keys)
    try:
        model = train_sentencepiece(docs, args.model_prefix, args.vocab_size,
                                    model_type=args.model_type,
                                    input_sentence_size=args.input_sentence_size,
                                    num_threads=args.num_threads)
    except MissingKeyError as err:
        parser.error(f"--json-keys: {err}")
    except ValueError as err:  # a line that is not JSON
        parser.error(f"--input: {err}")
    tok = SentencePieceTokenizer(model)
    print(f"trained {model} ({args.model_type}, vocab {tok.vocab_size}; eod={tok.eod} "
          f"bos={tok.bos} pad={tok.pad}) from {len(args.input)} file(s) in "
          f"{time.time() - t0:.1f} s")
    return model


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
