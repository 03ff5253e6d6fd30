"""Autoregressive MoE import (issue 23): tiny random Qwen3MoeForCausalLM and OlmoeForCausalLM built
by transformers' own classes and saved by save_pretrained (safetensors) load into ecdlm as causal
models whose logits equal transformers' (fp32, 1e-5) and whose top-k expert sets agree for every
token and layer; what ecdlm cannot represent is refused by field name before anything is written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from evaluation.hf.importer import load_hf_dir
from evaluation.hf.llada_moe import FormatError
from model import DiffusionTransformer
from model.moe.routing import token_choice
from tests.trainer.launch import ROOT

VOCAB, PAD, SPARE = 96, 1, 95   # SPARE: a row no token uses, the mask in most tests


def qwen3(**over) -> Qwen3MoeConfig:
    """head_dim 16 != hidden/heads 8 (Qwen3's projections are wider than the model), GQA."""
    c = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             max_position_embeddings=64, norm_topk_prob=True, pad_token_id=PAD, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    return Qwen3MoeConfig(**{**c, **over})


def olmoe(**over) -> OlmoeConfig:
    c = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, max_position_embeddings=64,
             pad_token_id=PAD, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    return OlmoeConfig(**{**c, **over})


def save_random(cls, config, path, seed: int = 0):
    """Weights large enough that attention, norms and routing all decide the output (the default
    init's 0.02 would make every router near-uniform and every norm weight exactly 1)."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    return model


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (3, 12), generator=g)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :4] = False                         # left padding, as batched AR inputs are
    return ids.masked_fill(~valid, PAD), valid


def ecdlm_topk(model: DiffusionTransformer, ids, valid) -> tuple[torch.Tensor, list]:
    """Logits and, per MoE layer, the [T, E] top-k mask ecdlm's own router picked."""
    masks, hooks = [], []
    for layer in model.moe_layers():
        def grab(mod, args, mods=masks):
            x = args[0]
            logits = torch.nn.functional.linear(x.float(), mod.router.weight.float()).reshape(-1, mod.cfg.num_experts)
            mods.append(token_choice(logits, mod.cfg.k, renormalize=mod.cfg.renormalize).mask)
        hooks.append(layer.register_forward_pre_hook(grab))
    with torch.no_grad():
        logits = model(ids, valid_BL=valid).logits
    for h in hooks:
        h.remove()
    return logits, masks


def compare(hf_model, path, ids, valid, **import_kw) -> tuple[float, int]:
    """(max |logit difference| over valid positions, MoE layers compared); asserts the top-k sets."""
    cfg, state = load_hf_dir(str(path), **import_kw)
    assert cfg.model.attention == "causal" and cfg.moe.router in ("token_choice", "dense")
    model = DiffusionTransformer(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=valid.long(), output_router_logits=True)
    got, masks = ecdlm_topk(model, ids, valid)
    V = ref.logits.shape[-1]
    diff = float((got[..., :V] - ref.logits)[valid].abs().max())
    k = cfg.moe.k
    assert len(masks) == len(ref.router_logits)
    for layer, (mine, theirs) in enumerate(zip(masks, ref.router_logits)):
        top = torch.zeros_like(mine).scatter_(1, theirs.topk(k, dim=-1).indices, True)
        rows = valid.reshape(-1)
        assert torch.equal(mine.reshape(-1, mine.shape[-1])[rows], top[rows]), f"layer {layer}: top-{k} sets differ"
    assert float(ref.logits[valid].std()) > 0.5   # not a flat output that anything would match
    return diff, len(masks)


@pytest.mark.parametrize("variant", ["qwen3_renorm", "qwen3_sparse_step_tied", "olmoe", "olmoe_renorm_mha"])
def test_import_reproduces_transformers_logits_and_expert_sets(tmp_path, variant):
    if variant == "qwen3_renorm":
        cls, cfg = Qwen3MoeForCausalLM, qwen3()
    elif variant == "qwen3_sparse_step_tied":   # layer 1 MoE, layers 0 and 2 dense; no renormalization
        cls, cfg = Qwen3MoeForCausalLM, qwen3(decoder_sparse_step=2, tie_word_embeddings=True, norm_topk_prob=False,
                                              head_dim=8)
    elif variant == "olmoe":
        cls, cfg = OlmoeForCausalLM, olmoe()
    else:
        cls, cfg = OlmoeForCausalLM, olmoe(norm_topk_prob=True, num_key_value_heads=4)
    hf = save_random(cls, cfg, tmp_path / "hf")
    for seed in (0, 1):
        ids, valid = batch(seed)
        diff, layers = compare(hf, tmp_path / "hf", ids, valid, mask_id=SPARE)
        assert diff < 1e-5, (variant, diff)
    assert layers == (1 if variant == "qwen3_sparse_step_tied" else cfg.num_hidden_layers)


def test_swapped_q_and_k_norms_are_caught(tmp_path):
    """The check above must be able to fail: swap the q and k norm weights of one layer (a broken
    mapping that keeps every shape) and the logits no longer match."""
    hf = save_random(Qwen3MoeForCausalLM, qwen3(), tmp_path / "hf")
    cfg, state = load_hf_dir(str(tmp_path / "hf"), mask_id=SPARE)
    q, k = "blocks.1.attn.q_norm.weight", "blocks.1.attn.k_norm.weight"
    state[q], state[k] = state[k], state[q]
    model = DiffusionTransformer(cfg).eval()
    model.load_state_dict(state)
    ids, valid = batch(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long()).logits
        got = model(ids, valid_BL=valid).logits
    assert float((got - ref)[valid].abs().max()) > 1e-2


def test_added_mask_row_is_the_mean_and_leaves_the_other_logits(tmp_path):
    hf = save_random(OlmoeForCausalLM, olmoe(), tmp_path / "hf")
    ids, valid = batch(2)
    diff, _ = compare(hf, tmp_path / "hf", ids, valid, add_mask_token=True)
    assert diff < 1e-5
    cfg, state = load_hf_dir(str(tmp_path / "hf"), add_mask_token=True)
    assert cfg.model.vocab_size == VOCAB + 1 and cfg.model.mask_id == VOCAB
    emb = hf.model.embed_tokens.weight.detach()
    assert torch.allclose(state["embed.weight"][VOCAB], emb.mean(0)) and torch.equal(state["embed.weight"][:VOCAB], emb)
    assert torch.allclose(state["head.weight"][VOCAB], hf.lm_head.weight.detach().mean(0))
    write_tokenizer(tmp_path / "hf")   # the CLI: the added row is named in the run's tokenizer
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "import", str(tmp_path / "hf"), str(tmp_path / "run"),
                           "--add-mask-token", "--mask-token", "<|mdm_mask|>"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    added = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text())["added_tokens"]
    assert {"id": VOCAB, "content": "<|mdm_mask|>"}.items() <= next(a for a in added if a["id"] == VOCAB).items()
    assert json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_config.json").read_text())["mask_token"] == "<|mdm_mask|>"


def _write_config(path, **changes):
    data = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None and key.startswith("-"):
            data.pop(key[1:], None)
        else:
            data[key] = value
    (path / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("cls,cfg,field,value", [
    ("qwen3", {}, "use_sliding_window", True),
    ("qwen3", {}, "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}),
    ("qwen3", {}, "rope_scaling", {"type": "linear", "factor": 2.0}),
    ("qwen3", {}, "mlp_only_layers", [0]),
    ("qwen3", {}, "attention_bias", True),
    ("qwen3", {}, "hidden_act", "gelu"),
    ("olmoe", {}, "clip_qkv", 8.0),
    ("olmoe", {}, "head_dim", 16),
])
def test_unrepresentable_fields_are_refused_by_name_before_writing(tmp_path, cls, cfg, field, value):
    model_cls, config = (Qwen3MoeForCausalLM, qwen3()) if cls == "qwen3" else (OlmoeForCausalLM, olmoe())
    save_random(model_cls, config, tmp_path / "hf")
    _write_config(tmp_path / "hf", **{field: value})
    with pytest.raises(FormatError, match=field):
        load_hf_dir(str(tmp_path / "hf"), mask_id=SPARE)
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "import", str(tmp_path / "hf"), str(tmp_path / "run"),
                           "--mask-id", str(SPARE)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}) if field == "use_sliding_window" else None
    if proc is not None:
        assert proc.returncode == 2 and "use_sliding_window" in proc.stderr and not (tmp_path / "run").exists()


def test_a_bare_weight_folder_needs_a_mask_and_the_error_names_the_options(tmp_path):
    save_random(Qwen3MoeForCausalLM, qwen3(), tmp_path / "hf")
    with pytest.raises(FormatError, match="--mask-id ID .*--add-mask-token"):
        load_hf_dir(str(tmp_path / "hf"))
    with pytest.raises(FormatError, match="not both"):
        load_hf_dir(str(tmp_path / "hf"), mask_id=SPARE, add_mask_token=True)


def write_tokenizer(path, vocab: int = VOCAB - 1):
    """A word-level tokenizer.json over ids 0..vocab-1 (ids beyond it are spare rows, as in Qwen3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {"<pad>": 0, "<unk>": 1, "<|endoftext|>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "pad_token": "<pad>", "eos_token": "<|endoftext|>"}))


def test_import_cli_writes_a_training_config_and_a_tokenizer_that_knows_the_mask(tmp_path):
    """`python -m evaluation.hf import DIR OUT --mask-id SPARE`: the run's tokenizer gains <|mask|>
    at the spare row, its config.yaml is the trainer's (causal, token choice), and the conversion is
    an override of it that trains (validated here; tests/trainer/test_convert_ar_moe.py runs it)."""
    hf = save_random(Qwen3MoeForCausalLM, qwen3(pad_token_id=0), tmp_path / "hf")
    write_tokenizer(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "-m", "evaluation.hf", "import", str(tmp_path / "hf"), str(tmp_path / "run"),
                           "--mask-id", str(SPARE)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    assert tok.mask_token == "<|mask|>" and tok.convert_tokens_to_ids("<|mask|>") == SPARE
    from rundir.config import load_config
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    assert (cfg.model.attention, cfg.model.qk_norm, cfg.model.head_dim, cfg.moe.router) == ("causal", "head", 16,
                                                                                            "token_choice")
    assert cfg.run_dir == str(tmp_path / "run-converted")   # a run trained from it never writes into it
    conv = load_config(str(tmp_path / "run" / "config.yaml"),
                       (f"init.from={tmp_path / 'run'}", "model.attention=bidirectional", "moe.router=expert_choice"))
    assert conv.model_config.capacity is not None and conv.moe.k == 2
    # init.from=HF_DIR reads the directory itself (through the reader train.py hands the trainer);
    # its tokenizer has no mask: the configured id is it
    from train import run_hooks
    from trainer.init_weights import load_initial_weights
    direct = load_config(str(tmp_path / "run" / "config.yaml"),
                         (f"init.from={tmp_path / 'hf'}", "model.attention=bidirectional", "moe.router=expert_choice"))
    converted = DiffusionTransformer(direct.model_config, seed=5)
    report = load_initial_weights(converted, direct, str(tmp_path / "hf"), run_hooks(direct))
    assert report["source_router"] == "token_choice" and report["dropped"] == []
    _, imported = load_hf_dir(str(tmp_path / "hf"), mask_id=SPARE)
    assert all(torch.equal(t, imported[n]) for n, t in converted.state_dict().items())
    from evaluation.loading import load_run
    model, _, tokenizer = load_run(str(tmp_path / "run"))
    assert tokenizer.mask_id == SPARE
    ids, valid = batch(3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long()).logits
        assert float((model(ids, valid_BL=valid).logits - ref)[valid].abs().max()) < 1e-5


def test_qwen3_30b_a3b_conversion_preset_counts_and_builds_on_meta():
    """configs/convert_qwen3_moe.yaml is Qwen3-30B-A3B's architecture: 30.5B total, 3.3B active
    parameters (its model card), counted from the config alone, and the model builds on the meta device."""
    from model.config import ModelConfig
    from rundir.config import load_config
    cfg = load_config(os.path.join(ROOT, "configs", "convert_qwen3_moe.yaml"))
    mc = ModelConfig(model=cfg.model, moe=cfg.moe, diffusion=cfg.diffusion)
    counts = mc.param_counts()
    assert counts["total"] == 30_532_122_624           # the released safetensors' parameter count
    assert round(counts["total"] / 1e9, 1) == 30.5
    assert 3.3e9 <= counts["active"] < 3.4e9            # "3.3B activated": 3.35B, both embedding tables counted
    assert (cfg.model.attention, cfg.moe.router, cfg.model.head_dim) == ("bidirectional", "expert_choice", 128)
    with torch.device("meta"):
        model = DiffusionTransformer(mc)
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert model.blocks[0].attn.wq.weight.shape == (32 * 128, 2048)
    assert model.blocks[0].attn.wkv.weight.shape == (2 * 4 * 128, 2048)
    assert model.blocks[0].attn.q_norm.weight.shape == (128,)


def test_an_imported_olmoe_exports_and_its_remote_code_gives_olmoes_logits(tmp_path):
    """transformers' OLMoE -> ecdlm (causal, q/k norm over the whole projection) -> ecdlm-format
    export -> transformers' remote code, in a process without ecdlm: OLMoE's own logits."""
    from safetensors.torch import save_file
    from evaluation.hf.export import write_hf_dir
    from tests.evaluation.test_hf import read_safetensors_file, run_without_repo
    hf = save_random(OlmoeForCausalLM, olmoe(), tmp_path / "hf")
    cfg, state = load_hf_dir(str(tmp_path / "hf"), mask_id=SPARE)
    write_hf_dir(cfg, state.items(), str(tmp_path / "export"))
    ids, valid = batch(4)
    save_file({"ids": ids, "valid": valid}, str(tmp_path / "in.safetensors"))
    run_without_repo(tmp_path, [{"dir": str(tmp_path / "export"), "inputs": str(tmp_path / "in.safetensors"),
                                 "out": str(tmp_path / "out.safetensors")}])
    got = read_safetensors_file(tmp_path / "out.safetensors")["logits"]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long()).logits
    assert float((got - ref)[valid].abs().max()) < 1e-5
