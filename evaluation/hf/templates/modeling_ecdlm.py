"""An ecdlm masked diffusion LM (expert-choice, token-choice or dense) for Hugging Face transformers.

Self-contained: imports only torch and transformers, so it runs where ecdlm is not installed. The
math is ecdlm's (model/transformer.py, model/moe/*.py), written out plainly here:
  - bidirectional pre-norm blocks: RMSNorm (fp32 statistics), RoPE (rotate-half), optional
    QK-norm before RoPE, SDPA with a key-padding mask, grouped-query attention, no biases;
  - FFN: dense SwiGLU, or a MoE layer of SwiGLU experts (plus optional shared experts);
  - expert choice: each expert takes its top-c tokens, per sequence (c_b = max(floor(L_b k_b / E), 1)
    over the L_b non-pad tokens) or over the batch (c = max(floor(sum_b L_b k_b / E), 1)); k_b comes
    from the capacity schedule at the sequence's mask ratio r_b; a token's gates are a softmax over
    the experts that took it, optionally times f(n) for n such experts (gate scaling);
  - token choice: softmax or sigmoid scores, top-k, optional renormalization, optional expert bias
    (selection only, or also in the gates), optional capacity factor (drops the lowest scores).

`forward(input_ids, attention_mask=None, prompt_mask=None)` returns `.logits` [B, L, V]. The mask
ratio that sets expert-choice capacity is derived from the input by the rule the model was trained
with, as ecdlm's sampler does (config ecdlm.diffusion.mask_ratio_over): mask tokens over non-pad
positions ("sequence", after pretraining), or over non-pad positions outside `prompt_mask`
("response", after supervised fine-tuning; no prompt_mask means no prompt). Pass `mask_ratio` [B]
to override it.

Legend: B batch, L length, D model dim, E experts, T = B*L tokens, V vocab.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_ecdlm import EcdlmConfig


# ---- capacity schedule: experts per token k_b from the mask ratio r_b ----------------------------
def schedule_shape(schedule, r, sigma, points):
    """s(r) in [0, 1] for the named schedule (r float64)."""
    if schedule == "linear":
        return r
    if schedule == "linear_reverse":
        return 1 - r
    if schedule == "cosine":
        return (1 - torch.cos(math.pi * r)) / 2
    if schedule == "cosine_reverse":
        return (1 + torch.cos(math.pi * r)) / 2
    if schedule == "bell":
        return 1 - 4 * (r - 0.5) ** 2
    if schedule in ("gaussian", "gaussian_reverse"):
        g0 = math.exp(-0.25 / (2 * sigma ** 2))   # shifted and scaled so s(0) = s(1) = 0, s(0.5) = 1
        g = (torch.exp(-(r - 0.5) ** 2 / (2 * sigma ** 2)) - g0) / (1 - g0)
        return g if schedule == "gaussian" else 1 - g
    if schedule == "piecewise":
        rs = torch.tensor([float(p[0]) for p in points], dtype=torch.float64, device=r.device)
        ss = torch.tensor([float(p[1]) for p in points], dtype=torch.float64, device=r.device)
        r = r.clamp(0, 1)
        hi = torch.searchsorted(rs, r, right=True).clamp(1, len(points) - 1)
        return ss[hi - 1] + (ss[hi] - ss[hi - 1]) * (r - rs[hi - 1]) / (rs[hi] - rs[hi - 1])
    raise ValueError(f"unknown capacity schedule {schedule!r}")


def experts_per_token(cap, r_B):
    """k_b: round (half up, or half to even for rounding=half_even) of k_min + (k_max - k_min) s(r_b),
    clamped to [ceil k_min, floor k_max]."""
    half_even = cap.get("rounding", "half_up") == "half_even"   # exports before the option: half up
    rnd = torch.round if half_even else (lambda x: torch.floor(x + 0.5))
    if cap["schedule"] == "static":
        k = float(rnd(torch.tensor(float(cap["k_target"]), dtype=torch.float64)))
        return torch.full(r_B.shape, k, dtype=torch.long, device=r_B.device)
    r = r_B.to(torch.float64)
    raw = cap["k_min"] + (cap["k_max"] - cap["k_min"]) * schedule_shape(cap["schedule"], r, cap["sigma"], cap["points"])
    return rnd(raw).clamp(math.ceil(cap["k_min"]), math.floor(cap["k_max"])).long()


# ---- routing: which experts process which token, with which gate (dense [T, E] gates) -------------
def expert_choice_gates(scores_BLE, valid_BL, k_B, scope, scale_table, batch_capacity="sum"):
    """Gates [T, E]: nonzero where expert e took token t."""
    B, L, E = scores_BLE.shape
    scores_BLE = scores_BLE.masked_fill(~valid_BL[..., None], float("-inf"))
    L_B = valid_BL.sum(1)
    taken_BLE = torch.zeros(B, L, E, dtype=torch.bool, device=scores_BLE.device)
    if scope == "sequence":
        c_B = torch.where(L_B > 0, torch.div(L_B * k_B, E, rounding_mode="floor").clamp_min(1), 0)
        for b in range(B):
            c = int(c_B[b])
            if c:
                top_cE = scores_BLE[b].topk(c, dim=0).indices                # each expert's c best tokens
                taken_BLE[b].scatter_(0, top_cE, True)
    else:   # one selection over the whole batch: c from sum_b L_b k_b, or EC-DLM's L_total * max_b k_b
        total = (L_B.sum() * k_B.max()) if batch_capacity == "reference_max" else (L_B * k_B).sum()
        c = max(int(total) // E, 1)
        top_cE = scores_BLE.reshape(B * L, E).topk(c, dim=0).indices
        taken_BLE.view(B * L, E).scatter_(0, top_cE, True)
    taken_TE = taken_BLE.reshape(B * L, E)
    gates_TE = torch.softmax(scores_BLE.reshape(B * L, E).masked_fill(~taken_TE, float("-inf")), dim=-1)
    gates_TE = torch.nan_to_num(gates_TE, nan=0.0) * taken_TE             # a token nobody took: no gates
    if scale_table is not None:
        gates_TE = gates_TE * scale_table.to(gates_TE)[taken_TE.sum(-1)][:, None]
    return gates_TE


def token_choice_gates(logits_TE, valid_T, moe, bias_E):
    T, E = logits_TE.shape
    k = moe["k"]
    probs_TE = torch.softmax(logits_TE, -1) if moe["score_fn"] == "softmax" else torch.sigmoid(logits_TE)
    select_TE = probs_TE if bias_E is None else probs_TE + bias_E.float()
    top_Tk = select_TE.topk(k, dim=-1).indices
    w_Tk = (select_TE if moe.get("expert_bias_in_gates") else probs_TE).gather(1, top_Tk)
    if moe["renormalize"]:
        w_Tk = w_Tk / w_Tk.sum(-1, keepdim=True).clamp_min(1e-20)
    keep_Tk = valid_T[:, None].expand(T, k).clone()                          # pads go nowhere
    if moe["capacity_factor"] is not None:
        C = math.ceil(T * k / E * moe["capacity_factor"])
        score_N, expert_N, keep_N = select_TE.gather(1, top_Tk).reshape(-1), top_Tk.reshape(-1), keep_Tk.view(-1)
        for e in range(E):   # expert e keeps its C highest-scoring assignments (earlier ones win ties)
            mine = torch.nonzero((expert_N == e) & keep_N).flatten()
            order = torch.argsort(score_N[mine], descending=True, stable=True)
            keep_N[mine[order[C:]]] = False
    gates_TE = torch.zeros(T, E, dtype=w_Tk.dtype, device=w_Tk.device)
    gates_TE.scatter_add_(1, top_Tk, w_Tk * keep_Tk)
    return gates_TE


# ---- modules, named as ecdlm names its state dict ------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def head_dim(m):
    return m.get("head_dim") or m["d_model"] // m["n_heads"]


def rotate(x_BHLd, cos_Lh, sin_Lh):
    x1, x2 = x_BHLd.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos_Lh - x2 * sin_Lh, x2 * cos_Lh + x1 * sin_Lh], dim=-1).to(x_BHLd.dtype)


class Attention(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.n_heads, self.n_kv = m["n_heads"], m.get("n_kv_heads") or m["n_heads"]
        self.head_dim = head_dim(m)
        self.wq = nn.Linear(m["d_model"], self.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(m["d_model"], 2 * self.n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, m["d_model"], bias=False)
        # qk_norm: true/"head" per head, "full" over the whole q and k projections, false none
        self.qk_norm = "head" if m["qk_norm"] is True else (m["qk_norm"] or None)
        self.causal = m.get("attention", "bidirectional") == "causal"
        if self.qk_norm:
            full = self.qk_norm == "full"
            dq, dk = (self.n_heads * self.head_dim, self.n_kv * self.head_dim) if full else (self.head_dim,) * 2
            self.q_norm, self.k_norm = RMSNorm(dq, m["norm_eps"]), RMSNorm(dk, m["norm_eps"])
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BLD, rope, attn_mask):
        B, L, _ = x_BLD.shape
        q, kv = self.wq(x_BLD), self.wkv(x_BLD)
        if self.qk_norm == "full":
            k_flat, v_flat = kv.chunk(2, dim=-1)
            q, kv = self.q_norm(q), torch.cat([self.k_norm(k_flat), v_flat], dim=-1)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = kv.view(B, L, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)   # rows [k; v]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, *rope), rotate(k, *rope)
        if self.causal:   # an imported autoregressive model before conversion; a query always sees itself
            tril = torch.ones(L, L, dtype=torch.bool, device=x_BLD.device).tril()
            attn_mask = tril if attn_mask is None else (attn_mask & tril) | torch.eye(L, dtype=torch.bool, device=x_BLD.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=self.n_kv != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model, hidden):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)    # rows [gate; up]
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Experts(nn.Module):
    def __init__(self, num, d_model, hidden):
        super().__init__()
        self.w_in_EDF = nn.Parameter(torch.empty(num, d_model, 2 * hidden))   # [gate | up] columns
        self.w_out_EHD = nn.Parameter(torch.empty(num, hidden, d_model))


class MoE(nn.Module):
    def __init__(self, d_model, moe):
        super().__init__()
        self.moe = moe
        E = moe["num_experts"]
        self.router = nn.Linear(d_model, E, bias=False)
        self.experts = Experts(E, d_model, moe["expert_hidden"])
        n_shared = moe["num_shared_experts"]
        self.shared = SwiGLU(d_model, n_shared * (moe["shared_expert_hidden"] or moe["expert_hidden"])) if n_shared else None
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)

    def forward(self, x_BLD, valid_BL, k_B, scale_table):
        B, L, D = x_BLD.shape
        moe = self.moe
        logits_BLE = F.linear(x_BLD.float(), self.router.weight.float())   # the router runs in fp32
        if moe["router"] == "expert_choice":
            gates_TE = expert_choice_gates(logits_BLE, valid_BL, k_B, moe["ec_scope"], scale_table,
                                           moe.get("ec_batch_capacity", "sum"))
        else:
            use_bias = moe["bias_update_rate"] > 0 or moe.get("expert_bias_in_gates", False)
            gates_TE = token_choice_gates(logits_BLE.reshape(B * L, -1), valid_BL.reshape(-1), moe,
                                          self.expert_bias if use_bias else None)
        x_TD = x_BLD.reshape(B * L, D)
        out_TD = torch.zeros_like(x_TD)
        w_in, w_out = self.experts.w_in_EDF, self.experts.w_out_EHD
        for e in range(gates_TE.shape[1]):
            rows = torch.nonzero(gates_TE[:, e] != 0).flatten()
            if rows.numel():
                gate, up = (x_TD[rows] @ w_in[e].to(x_TD.dtype)).chunk(2, dim=-1)
                y = (F.silu(gate) * up) @ w_out[e].to(x_TD.dtype)
                out_TD.index_add_(0, rows, y * gates_TE[rows, e, None].to(y.dtype))
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        return out_TD.view(B, L, D)


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        m, moe = cfg["model"], cfg["moe"]
        d = m["d_model"]
        self.attn_norm, self.ffn_norm = RMSNorm(d, m["norm_eps"]), RMSNorm(d, m["norm_eps"])
        self.attn = Attention(m)
        self.is_moe = moe["router"] != "dense" and (i + 1) % moe["moe_every"] == 0
        self.ffn = MoE(d, moe) if self.is_moe else SwiGLU(d, moe["dense_hidden"] or moe["k"] * moe["expert_hidden"])

    def forward(self, x, rope, attn_mask, valid_BL, k_B, scale_table):
        x = x + self.attn(self.attn_norm(x), rope, attn_mask)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, valid_BL, k_B, scale_table) if self.is_moe else self.ffn(h))


class EcdlmForMaskedLM(PreTrainedModel):
    config_class = EcdlmConfig
    base_model_prefix = "ecdlm"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        m = config.ecdlm["model"]
        self.embed = nn.Embedding(m["vocab_size"], m["d_model"])
        self.blocks = nn.ModuleList(Block(config.ecdlm, i) for i in range(m["n_layers"]))
        self.norm = RMSNorm(m["d_model"], m["norm_eps"])
        self.head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)   # untied
        self.post_init()

    def _init_weights(self, module):
        std = self.config.ecdlm["model"].get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, Experts):
            nn.init.normal_(module.w_in_EDF, std=std)
            nn.init.normal_(module.w_out_EHD, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MoE):
            nn.init.zeros_(module.expert_bias)

    def get_input_embeddings(self):
        return self.embed

    def mask_ratio(self, input_ids, valid_BL, prompt_mask=None):
        """Mask tokens over the positions the run's rule counts, per sequence (ecdlm's
        model/diffusion.py mask_ratio): non-pad ones, minus the prompt under "response"."""
        count_BL = valid_BL
        if self.config.ecdlm.get("diffusion", {}).get("mask_ratio_over", "sequence") == "response" \
                and prompt_mask is not None:
            count_BL = valid_BL & ~prompt_mask.bool()
        masked = ((input_ids == self.config.ecdlm["model"]["mask_id"]) & count_BL).sum(1).to(torch.float32)
        return masked / count_BL.sum(1).clamp_min(1).to(torch.float32)

    def forward(self, input_ids, attention_mask=None, mask_ratio=None, prompt_mask=None, return_dict=None,
                **kwargs):
        cfg = self.config.ecdlm
        m, moe = cfg["model"], cfg["moe"]
        B, L = input_ids.shape
        if L > m["max_seq_len"]:
            raise ValueError(f"sequence length {L} exceeds model.max_seq_len={m['max_seq_len']}")
        dev = input_ids.device
        valid_BL = (attention_mask.bool() if attention_mask is not None
                    else torch.ones(B, L, dtype=torch.bool, device=dev))
        r_B = (self.mask_ratio(input_ids, valid_BL, prompt_mask) if mask_ratio is None
               else mask_ratio.to(dev, torch.float32))
        k_B = experts_per_token(moe["capacity"], r_B) if moe["router"] == "expert_choice" else None
        table = self.config.gate_scale_table
        scale_table = (torch.tensor(table, dtype=torch.float32, device=dev)
                       if moe.get("gate_scaling") not in (None, False, "off") and table is not None else None)
        hd = head_dim(m)
        inv_freq = 1.0 / m["rope_theta"] ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd)
        angles = torch.outer(torch.arange(L, device=dev, dtype=torch.float32), inv_freq)
        rope = (angles.cos(), angles.sin())
        attn_mask = None if bool(valid_BL.all()) else valid_BL[:, None, None, :]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, rope, attn_mask, valid_BL, k_B, scale_table)
        logits = self.head(self.norm(x)).float()
        if m.get("logit_softcap"):
            logits = m["logit_softcap"] * torch.tanh(logits / m["logit_softcap"])
        return MaskedLMOutput(logits=logits)
