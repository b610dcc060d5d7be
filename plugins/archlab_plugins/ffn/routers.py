"""Routers of the ``moe`` FFN: which experts see which token, and with what gate (group ``archlab.router``).

    softmax_topk   p = softmax(x W_r);  top-k of p;  g = p_topk (/ Σ p_topk if renormalize)
                   L_aux = N Σ_i f_i P_i,  f_i = count_i / (k T) (pre-drop top-k),  P_i = mean_t p_i
                   L_z = mean_t (logsumexp x W_r)²
                   (Switch, arXiv 2101.03961; GShard, 2006.16668; z-loss: ST-MoE, 2202.08906)
    aux_free       s = sigmoid(x W_r);  top-k of s + b selects;  g = s_topk (/ Σ s_topk)  (b never gates)
                   after each optimizer step  b_i += γ · sign(mean_j c_j − c_i),  c_i = tokens to i that step
                   L_seq = mean_b Σ_i f_i P_i,  f_i = N/(k t) · count_i,  P_i = mean_t s_i / Σ_j s_j
                   (DeepSeek-V3, arXiv 2412.19437 §2.1.2; Wang et al. 2024, arXiv 2408.15664)
    expert_choice  p = softmax(x W_r);  expert e takes the top-C tokens of p[:, e] in each sequence,
                   C = min(t, ceil(capacity_factor · k · t / N)),  g = p  (Zhou et al. 2022, arXiv 2202.09368)
Every gate is multiplied by ``route_scale`` (V3 uses 2.5); logits are computed in fp32, outside autocast.
NOTE: top_k = 1 with ``renormalize`` makes every gate 1, so the router learns from its losses only; Switch
keeps g = p (``renormalize=false``).
Capacity (``capacity_factor``, token-choice routers): per sequence an expert keeps at most
ceil(capacity_factor · k · t / N) assignments, first come first served in position order, so dropping never
reads a later token; a dropped assignment contributes exactly 0 (the residual carries the token). One token
at a time (KV-cache decoding) never drops, so it can differ from a teacher-forced forward that did.
Departures: balance statistics are per micro-batch (L_aux, L_z) or per sequence (L_seq); the aux_free bias
sees the whole optimizer step (all micro-batches). archlab batches hold no padding, so every token counts;
``load_balance_loss`` takes a ``mask`` for callers that have padding. No node-limited (group) routing.
Shapes: b batch, t tokens, n = b·t, d d_model, e experts (N), k top_k, m assignments.

Router contract (for a router of your own):
- A class announced in ``[project.entry-points."archlab.router"]``, chosen with ``ffn.router=NAME``.
- ``Config``: a dataclass of the settings it reads. The ``moe`` layer fills it from its own config's fields
  of the same names (``top_k``, ``capacity_factor``, ``route_scale``, ``aux_loss_weight``, ...) and then
  from ``ffn.router_options`` (``+ffn.router_options.NAME=VALUE``) for settings the MoE config lacks.
  An optional ``Config.validate(n_experts)`` raises ``ConfigError`` before training.
- ``__init__(cfg, *, d_model, n_experts, linear)``: make projections with ``linear(.., role="ffn.router")``.
- ``forward(x)``: x (b, t, d) -> ``Routing`` (below); the layer dispatches it and reports its losses.
- ``experts_per_token(cfg)`` (static): routed experts one token uses, on average, for ``num_active_params``.
- ``is_causal = False`` if a token's routing reads later tokens: generation then refuses the model.
- Optional ``on_step_end()``: called by the trainer after every optimizer step (state outside the optimizer
  goes in buffers, never parameters).
- Optional ``rank_summed_buffers``: names of buffers tallied from the router's own batch, summed over the
  ranks of a data-parallel run before ``on_step_end`` (``archlab.api.SumsAcrossRanks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.api import HFPart, NotExportable, linear_tensors


@dataclass
class Routing:
    """Assignments of one forward, flat over the n = b·t tokens: token[j] goes to expert[j] with gate[j]."""

    token: Tensor  # m, long: index into the flattened (b t) tokens
    expert: Tensor  # m, long
    gate: Tensor  # m, float32
    probs: Tensor  # n e: the router's distribution over experts per token (router entropy)
    requested: int  # assignments asked for before capacity dropping (n·k for token choice)
    losses: dict[str, tuple[Tensor, float]] = field(default_factory=dict)  # name -> (value, weight)


def load_balance_loss(probs: Tensor, topk_idx: Tensor, mask: Tensor | None = None) -> Tensor:
    """N Σ_i f_i P_i over tokens (n e), (n k) [, mask (n,) True = real token]; 1 when balanced."""
    n_experts, k = probs.shape[-1], topk_idx.shape[-1]
    weight = torch.ones_like(probs[:, 0]) if mask is None else mask.to(probs.dtype)
    counts = torch.zeros_like(probs).scatter_add_(1, topk_idx, weight[:, None].expand_as(topk_idx))
    total = weight.sum().clamp_min(1.0)
    f = counts.sum(0) / (k * total)  # pre-drop assignment share, Σ f = 1
    p = (probs * weight[:, None]).sum(0) / total
    return n_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """mean_t (logsumexp_j logits_tj)² over (..., e) logits."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """ceil(factor · k · t / N): assignments one expert takes from one sequence of t tokens."""
    return math.ceil(factor * top_k * tokens / n_experts)


def within_capacity(idx_btk: Tensor, n_experts: int, capacity: int) -> Tensor:
    """(b, t, k) bool: True where the assignment is among the first ``capacity`` of its expert in its
    sequence, counting in position order (then slot order)."""
    b, t, k = idx_btk.shape
    flat = idx_btk.reshape(b, t * k)  # b (t k): position-major, so earlier tokens come first
    rank = F.one_hot(flat, n_experts).cumsum(1).gather(-1, flat[..., None]).squeeze(-1) - 1
    return (rank < capacity).view(b, t, k)


def router_logits(gate: nn.Module, x: Tensor) -> Tensor:
    """x W_r in fp32 whatever autocast says (routing decisions are precision-sensitive; Switch §2.4)."""
    with torch.autocast(x.device.type, enabled=False):
        return gate(x.to(torch.promote_types(x.dtype, torch.float32)))


class TokenChoice(nn.Module):
    """What softmax_topk and aux_free share: the gate projection, capacity and flattening."""

    def __init__(self, cfg, *, d_model: int, n_experts: int, linear) -> None:
        super().__init__()
        self.cfg, self.n_experts = cfg, n_experts
        self.gate = linear(d_model, n_experts, role="ffn.router")  # W_r

    @staticmethod
    def experts_per_token(cfg) -> float:
        return cfg.top_k

    def hf_part(self, model_type: str, fields: dict, tensors: dict) -> HFPart:
        """The part of a token-choice router in ``model_type``'s MoE block (tensors relative to the block);
        capacity dropping has no transformers counterpart."""
        if self.cfg.capacity_factor is not None:
            why = f"capacity dropping (capacity_factor={self.cfg.capacity_factor}) is not in {model_type}"
            raise NotExportable("router", self, why)
        return HFPart({model_type: fields}, linear_tensors(self.gate, "gate") | tensors)

    def assign(self, idx_btk: Tensor, gate_btk: Tensor, probs_bte: Tensor, losses: dict) -> Routing:
        """Drop over capacity, then flatten to (token, expert, gate)."""
        b, t, k = idx_btk.shape
        token = torch.arange(b * t, device=idx_btk.device).repeat_interleave(k)
        expert, gate = idx_btk.flatten(), gate_btk.flatten() * self.cfg.route_scale
        if self.cfg.capacity_factor is not None:
            capacity = expert_capacity(t, k, self.n_experts, self.cfg.capacity_factor)
            keep = within_capacity(idx_btk, self.n_experts, capacity).flatten()
            token, expert, gate = token[keep], expert[keep], gate[keep]
        return Routing(token, expert, gate, probs_bte.flatten(0, 1), b * t * k, losses)


class SoftmaxTopK(TokenChoice):
    @dataclass
    class Config:
        top_k: int = 2
        renormalize: bool = True
        route_scale: float = 1.0
        aux_loss_weight: float = 1e-2  # α (Switch)
        z_loss_weight: float = 1e-3  # c_z (ST-MoE)
        capacity_factor: float | None = None  # None: dropless

    def forward(self, x: Tensor) -> Routing:
        """x: (b, t, d) -> Routing"""
        logits = router_logits(self.gate, x)  # b t e
        probs = logits.softmax(-1)
        top_p, idx = probs.topk(self.cfg.top_k, dim=-1)  # b t k
        gates = top_p / top_p.sum(-1, keepdim=True) if self.cfg.renormalize else top_p
        losses = {}
        if self.cfg.aux_loss_weight > 0:
            aux = load_balance_loss(probs.flatten(0, 1), idx.flatten(0, 1))
            losses["load_balance"] = (aux, self.cfg.aux_loss_weight)
        if self.cfg.z_loss_weight > 0:
            losses["router_z"] = (router_z_loss(logits), self.cfg.z_loss_weight)
        return self.assign(idx, gates, probs, losses)

    def hf_export(self) -> HFPart:
        """Mixtral's router: softmax, top-k, gates renormalised, no scale."""
        if not self.cfg.renormalize or self.cfg.route_scale != 1:
            why = (
                f"renormalize={self.cfg.renormalize}, route_scale={self.cfg.route_scale}: Mixtral has True, 1"
            )
            raise NotExportable("router", self, why)
        return self.hf_part("mixtral", {"num_experts_per_tok": self.cfg.top_k}, {})


class AuxLossFree(TokenChoice):
    rank_summed_buffers = ("step_load",)  # under DDP, c_i counts the tokens of the global batch

    @dataclass
    class Config:
        top_k: int = 2
        renormalize: bool = True
        route_scale: float = 1.0
        bias_update_rate: float = 1e-3  # γ
        seq_aux_loss_weight: float = 1e-4  # α of L_seq; 0 = off
        capacity_factor: float | None = None

    def __init__(self, cfg, *, d_model: int, n_experts: int, linear) -> None:
        super().__init__(cfg, d_model=d_model, n_experts=n_experts, linear=linear)
        # NOTE: buffers, not parameters: no gradient, no optimizer, no weight decay; fp32 so that
        # γ = 1e-3 steps are not rounded away (vLLM #23640). The bias is checkpointed, the tally is not.
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))  # b
        self.register_buffer("step_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)

    def forward(self, x: Tensor) -> Routing:
        """x: (b, t, d) -> Routing"""
        s = router_logits(self.gate, x).sigmoid()  # b t e
        idx = (s.detach() + self.expert_bias).topk(self.cfg.top_k, dim=-1).indices  # b selects, only
        top_s = s.gather(-1, idx)  # gates from the unbiased scores (V3 gathers original_scores)
        gates = top_s / top_s.sum(-1, keepdim=True) if self.cfg.renormalize else top_s
        if self.training:
            self.step_load += torch.bincount(idx.flatten(), minlength=self.n_experts).float()
        s_norm = s / s.sum(-1, keepdim=True)  # s'
        losses = {}
        if self.cfg.seq_aux_loss_weight > 0:
            b, t, k = idx.shape
            counts = torch.zeros_like(s).scatter_add_(-1, idx, torch.ones_like(top_s)).sum(1)  # b e
            f = counts * self.n_experts / (k * t)
            seq = (f * s_norm.mean(1)).sum(-1).mean()
            losses["seq_balance"] = (seq, self.cfg.seq_aux_loss_weight)
        return self.assign(idx, gates, s_norm, losses)

    def hf_export(self) -> HFPart:
        """DeepseekV3TopkRouter with one group (n_group = topk_group = 1): its e_score_correction_bias is the
        selection bias b."""
        fields = {"num_experts_per_tok": self.cfg.top_k, "norm_topk_prob": self.cfg.renormalize}
        fields |= {"routed_scaling_factor": self.cfg.route_scale, "n_group": 1, "topk_group": 1}
        return self.hf_part("deepseek_v3", fields, {"gate.e_score_correction_bias": self.expert_bias})

    @torch.no_grad()
    def on_step_end(self) -> None:
        """b_i += γ · sign(mean_j c_j − c_i) over the tokens routed since the last optimizer step."""
        if self.step_load.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(self.step_load.mean() - self.step_load)
        self.step_load.zero_()


class ExpertChoice(nn.Module):
    is_causal = False  # an expert's top-C tokens of a sequence include later ones

    @dataclass
    class Config:
        top_k: int = 2  # with capacity_factor c: each token gets c·k experts on average
        capacity_factor: float | None = None  # None: 1.0
        route_scale: float = 1.0
        z_loss_weight: float = 1e-3

    def __init__(self, cfg, *, d_model: int, n_experts: int, linear) -> None:
        super().__init__()
        self.cfg, self.n_experts = cfg, n_experts
        self.factor = 1.0 if cfg.capacity_factor is None else cfg.capacity_factor
        self.gate = linear(d_model, n_experts, role="ffn.router")  # W_g

    @staticmethod
    def experts_per_token(cfg) -> float:
        return (1.0 if cfg.capacity_factor is None else cfg.capacity_factor) * cfg.top_k

    def forward(self, x: Tensor) -> Routing:
        """x: (b, t, d) -> Routing"""
        b, t, _ = x.shape
        logits = router_logits(self.gate, x)  # b t e
        probs = logits.softmax(-1)
        capacity = min(t, expert_capacity(t, self.cfg.top_k, self.n_experts, self.factor))
        gates, idx = probs.transpose(1, 2).topk(capacity, dim=-1)  # b e C: tokens per expert
        token = (idx + t * torch.arange(b, device=x.device)[:, None, None]).flatten()
        expert = torch.arange(self.n_experts, device=x.device)[None, :, None].expand_as(idx).flatten()
        losses = {}
        if self.cfg.z_loss_weight > 0:
            losses["router_z"] = (router_z_loss(logits), self.cfg.z_loss_weight)
        gate = gates.flatten() * self.cfg.route_scale
        return Routing(token, expert, gate, probs.flatten(0, 1), token.numel(), losses)
