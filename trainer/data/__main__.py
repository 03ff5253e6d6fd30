"""Command line: `python -m trainer.data prepare --out DIR [source] [options]`."""

import argparse
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser(
        "prepare",
        help="tokenize a corpus into train/val token shards",
        description="Tokenize a corpus into train/val token shards. Without --dataset or --files "
        "the running Python's standard library sources are used (no download). --format sft turns "
        "prompt/response or chat records into fixed-length examples (see trainer/data/sft_prepare.py).",
    )
    p.add_argument("--out", required=True, help="output directory: new or empty (see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the prepared dataset already in --out (train/, val/, tokenizer, meta.json)")
    p.add_argument(
        "--format", choices=("pretrain", "sft"), default="pretrain",
        help="pretrain (default): token shards packed at load time; sft: JSON-lines prompt/response or "
        "chat records -> fixed-length examples with a prompt mask (needs --seq-len)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="Hugging Face hub dataset name (streamed)")
    source.add_argument("--files", nargs="+", metavar="PATH", help="local .txt/.json/.jsonl/.parquet files or globs")
    p.add_argument("--dataset-config", help="hub dataset configuration name")
    p.add_argument("--split", default="train", help="hub dataset split to read (default: train)")
    p.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    p.add_argument("--max-docs", type=int, help="use at most this many (non-skipped) documents")
    p.add_argument(
        "--max-bytes", type=int,
        help="stop after this many bytes of text (default: 16000000 for the embedded corpus, else no cap)",
    )
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default: 0.02)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size to train (default: 4096)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece model type")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="use this sentencepiece model (.model) or Hugging Face tokenizer.json instead of training one; "
                   "for --format sft normally the pretrained model's tokenizer (a tokenizer.json, or its folder, "
                   "whose sibling tokenizer_config.json may hold the chat_template used for messages)")
    p.add_argument(
        "--tokenizer-sample-bytes", type=int, default=32_000_000,
        help="train the tokenizer on this much train text (default: 32000000)",
    )
    p.add_argument(
        "--num-workers", type=int, default=os.cpu_count() or 1,
        help="tokenizer processes (default: cpu count; 0 or 1 = in this process)",
    )
    p.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard file (default: 2**26)")
    sft = p.add_argument_group("--format sft")
    sft.add_argument("--seq-len", type=int,
                     help="tokens per example: prompt + response + EOS fill (longer examples are dropped and counted)")
    sft.add_argument("--prompt-field", default="prompt", help="prompt text field (default: prompt)")
    sft.add_argument("--response-field", default="response", help="response text field (default: response)")
    sft.add_argument("--messages-field", default="messages",
                     help="chat field, a list of {role, content}; the last assistant message is the response "
                     "(default: messages)")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Imported here, not at the top: tokenizer worker processes re-import this module
    # and must not pay for importing datasets.
    from rundir.errors import DataError
    from .prepare import PrepareConfig, prepare

    config = PrepareConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    try:
        prepare(config)
    except DataError as exc:
        logging.getLogger("trainer.data").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
