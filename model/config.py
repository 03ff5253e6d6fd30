"""Typed, nested configuration for the model: `model`, `moe` (with `moe.capacity`) and `diffusion`.

Config is data: plain dataclasses, built from dicts (YAML) by `from_dict`, validated once by
`validate()`. Every error names the dotted field and what would be right, so a bad value is
caught before any expensive work starts.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union


from .errors import ConfigError, require as _require
from .moe.capacity import CapacityConfig, check_capacity_ranges, resolve_capacity, validate_capacity


@dataclass
class MoEConfig:
    router: Literal["expert_choice", "token_choice", "dense"] = "expert_choice"
    num_experts: int = 64
    expert_hidden: int = 256
    k: int = 8                          # experts per token: TC top-k, EC static k, capacity target
    num_shared_experts: int = 0
    shared_expert_hidden: Optional[int] = None  # defaults to expert_hidden
    moe_every: int = 1                  # MoE in every n-th layer, dense SwiGLU in the others
    dense_hidden: Optional[int] = None  # width of dense FFN layers; defaults to k * expert_hidden
    ep_size: int = 1                    # expert-parallel degree (the trainer wires the group)
    z_loss_coef: float = 1e-3
    # expert choice
    ec_scope: Literal["sequence", "batch"] = "sequence"
    # scale routed output by f(n_i), see moe/routing.py: off, rms (ecdlm's), reference (EC-DLM's,
    # sqrt(S) E[1/||g||]); false/true are read as off/rms (configs saved before the names)
    gate_scaling: Union[Literal["off", "rms", "reference"], bool] = "off"
    # batch scope with per-sequence k: sum = floor(sum_b L_b k_b / E) (FLOP-matched);
    # reference_max = floor(sum_b L_b max_b k_b / E), EC-DLM's floor(B L max_b k_b / E)
    ec_batch_capacity: Literal["sum", "reference_max"] = "sum"
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    # token choice
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True
    capacity_factor: Optional[float] = None   # None = dropless
    aux_loss_coef: float = 1e-2
    bias_update_rate: float = 0.0       # aux-loss-free expert bias; 0 disables it
    # LLaDA-MoE's router: expert_bias is added to the probabilities and the sums are the gates
    # (not selection-only); the bias is used even when bias_update_rate is 0 (an imported model)
    expert_bias_in_gates: bool = False
    # the router matmul's precision (moe/layer.py router_logits): fp32 (exact), tf32 (CUDA's
    # TF32 tensor cores for that matmul; fp32 elsewhere) or bf16 (inputs rounded to bf16, fp32 out)
    router_precision: Literal["fp32", "tf32", "bf16"] = "fp32"


@dataclass
class ModelArchConfig:
    vocab_size: int = 4096
    pad_id: int = 0
    mask_id: int = 3
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None    # grouped-query attention; defaults to n_heads
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    # RMSNorm on q and k before RoPE: true/head per head (over head_dim, Qwen3, LLaDA-MoE), full over
    # the whole projection (OLMoE: q over n_heads*head_dim, k over n_kv_heads*head_dim), false none
    qk_norm: Union[Literal["head", "full"], bool] = True
    head_dim: Optional[int] = None      # defaults to d_model / n_heads (Qwen3 sets it apart)
    # causal reproduces an imported autoregressive model; a diffusion LM is bidirectional
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    norm_eps: float = 1e-6
    logit_softcap: Optional[float] = None
    init_std: float = 0.02
    activation_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    eps: float = 1e-3
    low_discrepancy: bool = True
    # stable: sum of CE over masked tokens / maskable tokens (EC-DLM's --difflm-stable-training)
    loss_weighting: Literal["elbo", "uniform", "stable"] = "elbo"
    # What the mask ratio r_b (capacity schedule and ELBO weight) counts masked tokens over:
    # "sequence": every non-pad position (pretraining, where nothing is a prompt); "response":
    # the non-pad positions outside the prompt (train.mode=sft sets it; the sampler and the HF
    # model then use the same rule). Identical when there is no prompt.
    mask_ratio_over: Literal["sequence", "response"] = "sequence"
    # the output head and the loss over every position, weighted by the mask, instead of over the
    # masked rows found on the host: the same objective, no host sync (docs/speed.md)
    sync_free: bool = False


@dataclass
class ModelConfig:
    """The model's whole config. Construction resolves it once (fills defaults, solves k_max for
    `flop_match: solve`, builds the capacity schedule) and then validates it, which changes
    nothing. `capacity` is that one schedule, handed to every expert-choice layer."""
    model: ModelArchConfig = field(default_factory=ModelArchConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def __post_init__(self) -> None:
        validate_model(self.model)
        validate_diffusion(self.diffusion)
        self.moe, capacity = resolve_moe(self.moe)
        validate_moe(self.moe, capacity)
        self._capacity = capacity   # not a dataclass field: it is derived, and never saved

    @property
    def capacity(self):
        """The expert-choice TimestepCapacity (None for token choice and dense)."""
        return self._capacity

    # ---- parameter counts, from the config alone -------------------------------------------
    def param_counts(self) -> dict:
        """Total parameters and parameters active per token (routed experts counted k times).

        `active` counts both embedding tables; `active_compute` leaves out the input embedding (a
        lookup, not a matmul) but keeps the output head, the convention model cards quote (e.g.
        LLaDA-MoE-7B-A1B's "1.4B active")."""
        m, e = self.model, self.moe
        d, h_kv = m.d_model, (m.n_kv_heads or m.n_heads)
        hd = head_dim(m)
        attn = 2 * d * m.n_heads * hd + 2 * d * h_kv * hd + sum(qk_norm_dims(m))
        norms = 2 * d
        per_layer_dense = 3 * d * dense_hidden(e)
        moe_layers = num_moe_layers(m.n_layers, e)
        routed_total = e.num_experts * 3 * d * e.expert_hidden
        routed_active = e.k * 3 * d * e.expert_hidden
        shared = e.num_shared_experts * 3 * d * shared_hidden(e)
        router = e.num_experts * d
        base = 2 * m.vocab_size * d + d + m.n_layers * (attn + norms) \
            + (m.n_layers - moe_layers) * per_layer_dense + moe_layers * (shared + router)
        return {"total": base + moe_layers * routed_total,
                "active": base + moe_layers * routed_active,
                "active_compute": base + moe_layers * routed_active - m.vocab_size * d,
                "embedding": 2 * m.vocab_size * d}


def head_dim(m: ModelArchConfig) -> int:
    return m.head_dim or m.d_model // m.n_heads


def qk_norm_kind(m: ModelArchConfig) -> Optional[str]:
    """None, "head" or "full" (the boolean reads true as head, false as none)."""
    return ("head" if m.qk_norm else None) if isinstance(m.qk_norm, bool) else m.qk_norm


def qk_norm_dims(m: ModelArchConfig) -> tuple:
    """Widths of the q and k norm weights: () without QK-norm."""
    kind, hd = qk_norm_kind(m), head_dim(m)
    if kind is None:
        return ()
    return (hd, hd) if kind == "head" else (m.n_heads * hd, (m.n_kv_heads or m.n_heads) * hd)


def dense_hidden(e: MoEConfig) -> int:
    return e.dense_hidden or e.k * e.expert_hidden


def shared_hidden(e: MoEConfig) -> int:
    return e.shared_expert_hidden or e.expert_hidden


def num_moe_layers(n_layers: int, e: MoEConfig) -> int:
    """Layer i is MoE when (i + 1) % moe_every == 0 (the last layer of each group of n)."""
    if e.router == "dense":
        return 0
    return sum(1 for i in range(n_layers) if is_moe_layer(i, e))


def uses_expert_bias(e: MoEConfig) -> bool:
    """Token choice with aux-loss-free balancing: the expert bias is used and updated."""
    return e.router == "token_choice" and e.bias_update_rate > 0


def is_moe_layer(i: int, e: MoEConfig) -> bool:
    return e.router != "dense" and (i + 1) % e.moe_every == 0


# ---- validation ------------------------------------------------------------------------------
def validate_model(m: ModelArchConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        _require(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
    if m.head_dim is None:
        _require(m.d_model % m.n_heads == 0,
                 f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} (or set model.head_dim)")
        _require((m.d_model // m.n_heads) % 2 == 0,
                 f"head dim model.d_model/model.n_heads={m.d_model // m.n_heads} must be even for RoPE")
    else:
        _require(m.head_dim >= 2 and m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even and >= 2 for RoPE")
    _require(isinstance(m.qk_norm, bool) or m.qk_norm in ("head", "full"),
             f"model.qk_norm={m.qk_norm!r} must be head, full or true/false (true = head)")
    _require(m.attention in ("bidirectional", "causal"),
             f"model.attention={m.attention!r} must be bidirectional or causal")
    kv = m.n_kv_heads or m.n_heads
    _require(1 <= kv <= m.n_heads and m.n_heads % kv == 0,
             f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads}")
    for name in ("pad_id", "mask_id"):
        v = getattr(m, name)
        _require(0 <= v < m.vocab_size, f"model.{name}={v} must be in [0, model.vocab_size={m.vocab_size})")
    _require(m.pad_id != m.mask_id, f"model.pad_id and model.mask_id must differ (both {m.pad_id})")
    _require(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0")
    _require(m.logit_softcap is None or m.logit_softcap > 0,
             f"model.logit_softcap={m.logit_softcap} must be > 0 or null (off)")


GATE_SCALING_ALIASES = {False: "off", True: "rms"}


def resolve_moe(e: MoEConfig):
    """(resolved copy of `e`, its TimestepCapacity or None): capacity defaults filled from moe.k,
    and for `flop_match: solve` the solved k_max written in, so the saved config reproduces it.
    The input is not changed. Range errors found while resolving name the field."""
    c = dataclasses.replace(e.capacity)
    if isinstance(e.gate_scaling, bool):   # the old boolean: false/true mean off/rms
        e = dataclasses.replace(e, gate_scaling=GATE_SCALING_ALIASES[e.gate_scaling])
    if c.k_target is None:
        c.k_target = float(e.k)
    if c.schedule == "static":   # k_b = k_target for every sequence; bounds are just that value
        c.k_min = c.k_max = c.k_target
    e = dataclasses.replace(e, capacity=c)
    if e.router != "expert_choice":
        return e, None
    check_moe_fields(e)        # the schedule cannot be built from out-of-range values
    cap = resolve_capacity(e)
    c.k_max = cap.k_max
    return e, cap


def validate_moe(e: MoEConfig, capacity=None) -> None:
    """Checks a resolved MoEConfig (and, for expert choice, its schedule); changes nothing."""
    check_moe_fields(e)
    check_capacity_ranges(e)
    if e.router == "expert_choice":
        validate_capacity(capacity, e.capacity)


def check_moe_fields(e: MoEConfig) -> None:
    """The moe section's own values, before capacity (whose defaults come from moe.k)."""
    _require(e.router in ("expert_choice", "token_choice", "dense"),
             f"moe.router={e.router!r} must be one of expert_choice, token_choice, dense")
    for name in ("num_experts", "expert_hidden", "k", "moe_every", "ep_size"):
        _require(getattr(e, name) >= 1, f"moe.{name}={getattr(e, name)} must be >= 1")
    _require(e.k <= e.num_experts, f"moe.k={e.k} exceeds moe.num_experts={e.num_experts}")
    _require(e.num_shared_experts >= 0, f"moe.num_shared_experts={e.num_shared_experts} must be >= 0")
    _require(e.num_experts % e.ep_size == 0,
             f"moe.ep_size={e.ep_size} must divide moe.num_experts={e.num_experts}")
    _require(e.ec_scope in ("sequence", "batch"), f"moe.ec_scope={e.ec_scope!r} must be sequence or batch")
    _require(e.score_fn in ("softmax", "sigmoid"), f"moe.score_fn={e.score_fn!r} must be softmax or sigmoid")
    _require(isinstance(e.gate_scaling, bool) or e.gate_scaling in ("off", "rms", "reference"),
             f"moe.gate_scaling={e.gate_scaling!r} must be off, rms or reference (or false/true = off/rms)")
    _require(e.gate_scaling != "reference" or e.router != "expert_choice" or e.num_shared_experts >= 1,
             "moe.gate_scaling=reference needs moe.num_shared_experts >= 1: its f(n) = sqrt(S) E[1/||g||] "
             "is 0 with S=0 shared experts (use rms)")
    _require(e.ec_batch_capacity in ("sum", "reference_max"),
             f"moe.ec_batch_capacity={e.ec_batch_capacity!r} must be sum or reference_max")
    _require(e.capacity_factor is None or e.capacity_factor > 0,
             f"moe.capacity_factor={e.capacity_factor} must be > 0 or null (dropless)")
    _require(e.z_loss_coef >= 0 and e.aux_loss_coef >= 0 and e.bias_update_rate >= 0,
             "moe.z_loss_coef, moe.aux_loss_coef and moe.bias_update_rate must be >= 0")
    _require(not e.expert_bias_in_gates or e.router == "token_choice",
             f"moe.expert_bias_in_gates=true needs moe.router=token_choice, not {e.router}")
    _require(e.router_precision in ("fp32", "tf32", "bf16"),
             f"moe.router_precision={e.router_precision!r} must be fp32, tf32 or bf16")


def validate_diffusion(d: DiffusionConfig) -> None:
    _require(0 < d.eps < 1, f"diffusion.eps={d.eps} must be in (0, 1)")
    _require(d.loss_weighting in ("elbo", "uniform", "stable"),
             f"diffusion.loss_weighting={d.loss_weighting!r} must be elbo, uniform or stable")
    _require(d.mask_ratio_over in ("sequence", "response"),
             f"diffusion.mask_ratio_over={d.mask_ratio_over!r} must be sequence or response")
    _require(isinstance(d.sync_free, bool), f"diffusion.sync_free={d.sync_free!r} must be true or false")


# ---- building dataclasses from dicts, with type checks that name the key ---------------------
def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types name the key."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; known keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {k: coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check (and gently convert, e.g. int -> float) `value` against type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for member in inner:   # the first member that accepts the value; else the first's error
            try:
                return coerce(member, value, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} must be one of {', '.join(map(str, args))}")
        return value
    if origin in (list, typing.List) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list")
        return [coerce(args[0], v, f"{key}[{i}]") if args else v for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} must be a string")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}={value!r} must be a mapping")
    return value
