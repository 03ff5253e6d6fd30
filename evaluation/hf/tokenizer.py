"""Tokenizer files of a Hugging Face directory: finding a special token's id (LLaDA-MoE's mask id
is in its tokenizer, not its config.json), and writing an ecdlm run's tokenizer as `tokenizer.json`
so that `AutoTokenizer.from_pretrained(OUT_DIR)` encodes text to the same ids as ecdlm does."""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def token_id_in_dir(path: str, token: str) -> Optional[int]:
    """The id of `token` in the directory's tokenizer files, or None if none of them has it."""
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        data = _read_json(tj)
        for added in data.get("added_tokens") or []:
            if added.get("content") == token:
                return int(added["id"])
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(tc):
        for i, entry in (_read_json(tc).get("added_tokens_decoder") or {}).items():
            if (entry or {}).get("content") == token:
                return int(i)
    at = os.path.join(path, "added_tokens.json")
    if os.path.exists(at) and token in _read_json(at):
        return int(_read_json(at)[token])
    return None


def mask_id_from_dir(path: str, token: str) -> int:
    from .llada_moe import FormatError
    found = token_id_in_dir(path, token)
    if found is None:
        raise FormatError(f"{path}: no {token!r} token in tokenizer.json, tokenizer_config.json or "
                          f"added_tokens.json; name the mask with --mask-id ID or --mask-token TEXT")
    return found


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list:
    """Copy whichever Hugging Face tokenizer files `src_dir` has (JSON only); returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


# ---- sentencepiece (ecdlm's BPE) -> tokenizer.json ---------------------------------------------
def sentencepiece_to_tokenizer_json(sp) -> str:
    """A `tokenizers` BPE equivalent to ecdlm's sentencepiece model (trainer/data/tokenizer.py:
    BPE, byte fallback, identity normalization, no dummy prefix, whitespace-only pieces allowed).

    sentencepiece's BPE merges, at each step, the adjacent pair whose concatenation is the vocab
    piece with the highest score; `tokenizers` merges by rank. Ranking every split (a, b) of a
    piece p by p's score gives the same order. Words are split as sentencepiece splits them: a run
    of "▁" starts a word and stays with the characters after it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    special = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))}
    merges = []
    for i in sorted(mergeable, key=lambda i: (-sp.get_score(i), i)):
        p = pieces[i]
        for cut in range(1, len(p)):
            a, b = p[:cut], p[cut:]
            if vocab.get(a) in mergeable and vocab.get(b) in mergeable:
                merges.append((a, b))
    unk = pieces[sp.unk_id()] if sp.unk_id() >= 0 else None
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\u2581+[^\u2581]*|[^\u2581]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    return tok.to_str()


def export_tokenizer(data_dir: str, out_dir: str, mc) -> list:
    """Write the run's tokenizer into an export directory: HF tokenizer files are copied, a
    sentencepiece model is converted (and its ids checked against sentencepiece on sample text).
    Returns the files written, [] when the run's tokenizer is not on this machine."""
    from rundir.state import resolve_path
    src = resolve_path(data_dir)
    if os.path.exists(os.path.join(src, "tokenizer.json")):
        return copy_tokenizer_files(src, out_dir)
    model_file = os.path.join(src, "tokenizer.model")
    if not os.path.exists(model_file):
        return []
    from rundir.tokenizer import load_tokenizer
    sp, info = load_tokenizer(model_file)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(sentencepiece_to_tokenizer_json(sp))
    names = {i: sp.id_to_piece(i) for i in (info.pad_id, info.eod_id, info.mask_id, info.unk_id) if i >= 0}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": mc.model.max_seq_len,
              "pad_token": names[info.pad_id], "eos_token": names[info.eod_id], "mask_token": names[info.mask_id],
              "unk_token": names.get(info.unk_id), "bos_token": None,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]
