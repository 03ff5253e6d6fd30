"""Data pipeline of ecdlm.

`python -m trainer.data prepare` turns a corpus into token shards; `PackedLoader`
feeds them to the trainer as packed, deterministically shuffled micro-batches.
`prepare --format sft` turns prompt/response or chat records into fixed-length examples;
`SFTLoader` feeds them with their prompt masks. `data_format` tells the two apart.
"""

import importlib

# Exports resolve lazily: tokenizer worker processes import this package, and pulling
# torch (via the loader) into each of them would cost seconds and memory for nothing.
_EXPORTS = {
    "DataError": "rundir.errors",   # the run directory's: readers below the trainer raise it too
    "FORMAT_VERSION": "meta",
    "load_meta": "meta",
    "check_vocab": "meta",
    "TokenStore": "tokens",
    "PackedSequences": "packing",
    "MicroBatch": "loader",
    "PackedLoader": "loader",
    "fixed_eval_batches": "loader",
    "data_format": "meta",
    "SFTLoader": "sft_loader",
    "fixed_sft_eval_batches": "sft_loader",
    "MixtureLoader": "mixture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    value = getattr(importlib.import_module(where if "." in where else f"{__name__}.{where}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
