"""Command line: `python -m evaluation.hf export ...` and `python -m evaluation.hf import ...`."""
from __future__ import annotations

import argparse
import sys

from rundir.safetensors_io import parse_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.hf", description=__doc__)
    cmd = p.add_subparsers(dest="command", required=True)
    e = cmd.add_parser("export", help="write a run's checkpoint as a Hugging Face directory")
    e.add_argument("run", help="run directory (its newest checkpoint) or a checkpoint directory")
    e.add_argument("out_dir")
    e.add_argument("--format", choices=("ecdlm", "llada-moe"), default="ecdlm",
                   help="ecdlm: every router, with remote code (default); llada-moe: LLaDA-MoE's own format")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    e.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 200MiB (default 5GB)")
    e.add_argument("--tokenizer", help="prepared data directory with the tokenizer (default: the run's data.path)")
    i = cmd.add_parser("import", help="turn a LLaDA-MoE-, ecdlm-, qwen3_moe- or olmoe-format directory into an ecdlm run")
    i.add_argument("hf_dir")
    i.add_argument("out_run")
    i.add_argument("--mask-id", type=int, help="mask token id (default: the tokenizer's --mask-token)")
    i.add_argument("--mask-token", default="<|mask|>",
                   help="mask token text to look up, or to name the added/spare row (default <|mask|>)")
    i.add_argument("--add-mask-token", action="store_true",
                   help="qwen3_moe/olmoe: add the mask as a new row of embedding and head (the mean row)")
    i.add_argument("--pad-id", type=int, help="qwen3_moe/olmoe: pad id (default pad_token_id, else eos_token_id)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .llada_moe import FormatError
    try:
        if args.command == "export":
            from .export import export
            res = export(args.run, args.out_dir, args.format, args.dtype, parse_size(args.max_shard_size),
                         args.tokenizer)
            print(f"wrote {res.tensors} tensors ({res.bytes / 1e6:,.1f} MB) in {len(res.files)} file(s) to "
                  f"{res.out_dir} from {res.checkpoint}; tokenizer: {', '.join(res.tokenizer) or 'none'}")
        else:
            from .run_writer import import_to_run
            ckpt = import_to_run(args.hf_dir, args.out_run, args.mask_id, args.mask_token,
                                 add_mask_token=args.add_mask_token, pad_id=args.pad_id)
            print(f"imported {args.hf_dir} as run {args.out_run} (checkpoint {ckpt})")
    except (FormatError, ValueError, OSError) as err:   # OSError: CheckpointError, FileExistsError, a full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
