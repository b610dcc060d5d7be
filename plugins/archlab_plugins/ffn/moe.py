"""FFN slot ``moe``: Mixture-of-Experts, routed SwiGLU experts plus always-on shared ones (DeepSeekMoE,
arXiv 2401.06066, §3), with a router chosen from the ``archlab.router`` entry points (routers.py).

    y = FFN_shared(x) + Σ_j gate_j · FFN_{expert_j}(x_{token_j})       over the router's assignments j
    FFN_e(x) = (SiLU(x W_gate_e) ⊙ x W_up_e) W_down_e                  expert width f
    f = ceil(width / granularity / multiple_of) · multiple_of,  width = hidden_dim or 8/3·d  (dense SwiGLU)
Fine-grained experts (DeepSeekMoE §3.1): splitting N experts of the dense width into m gives
``granularity=m, n_experts=m·N, top_k=m·K``. The defaults (16 experts of width 88, top-3, one shared) touch
4·88 = 352 hidden units per token, about the dense tiny student's 344.
Dispatch: assignments are sorted by expert, x is gathered into contiguous per-expert slices, the experts
run as one ``torch._grouped_mm`` where it works for the device and dtype (``grouped_mm``), else one
matmul per expert, and the gated outputs are index-added back to their tokens. No per-token loop.
Departures:
- Routed experts are two parameters shaped (e, ...), not ``linear`` modules: a grouped matmul needs all
  experts in one tensor, and a linear plugin defines one matrix's forward. So ``model.linear_overrides`` for
  ``ffn`` reach the router and the shared experts, not the routed ones; their init copies the factory's
  (std 0.02, and 0.02/sqrt(2L) for W_down, which writes into the residual stream).
- The n_shared_experts shared experts are one SwiGLU of width n_shared_experts·f (the same function as
  their sum).
Reference: deepseek-ai/DeepSeek-V3 inference/model.py ``Gate``/``MoE`` (gates gathered from the unbiased
scores, shared experts added); dispatch checked against a per-token sum in test_moe.py.
Shapes: b batch, t tokens, n = b·t, d d_model, e experts, f expert width, m assignments (token, expert).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.api import (
    ConfigError,
    ForwardContext,
    HFPart,
    ModelDims,
    NotExportable,
    get_plugin,
    installed_plugins,
    linear_tensors,
    part_of,
    split_rows,
)


def expert_width(cfg, d_model: int) -> int:
    width = cfg.hidden_dim or 8 / 3 * d_model
    return cfg.multiple_of * math.ceil(width / cfg.granularity / cfg.multiple_of)


def router_config(router: type, cfg) -> Any:
    """The router's Config from the MoE config's fields of the same names, then ``router_options``."""
    names = {f.name for f in fields(router.Config)}
    unknown = sorted(set(cfg.router_options) - names)
    if unknown:
        key, allowed = unknown[0], ", ".join(sorted(names))
        raise ConfigError(
            f"ffn.router_options.{key}",
            cfg.router_options[key],
            f"a setting of router {cfg.router}: {allowed}",
        )
    values = {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}
    return router.Config(**{**values, **cfg.router_options})


@cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (CPU fp32/bf16, CUDA sm90+ bf16)."""
    try:
        x = torch.ones(16, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        out = torch._grouped_mm(x, w, offs=offs)
        out.backward(torch.ones_like(out))  # NOTE: a stride-0 gradient (from .sum()) is refused
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class MixtureOfExperts(nn.Module):
    @dataclass
    class Config:
        router: str = "softmax_topk"  # an `archlab.router`: softmax_topk | aux_free | expert_choice
        n_experts: int = 16  # routed experts
        top_k: int = 3  # routed experts per token (expert_choice: per token on average, × capacity_factor)
        n_shared_experts: int = 1  # always on
        granularity: int = 4  # expert width = dense width / granularity
        hidden_dim: int | None = None  # the dense width being split; None: 8/3·d
        multiple_of: int = 8  # expert width rounded up to this
        renormalize: bool = True  # top-k gates sum to 1 (× route_scale)
        route_scale: float = 1.0  # gate multiplier (DeepSeek-V3: 2.5)
        aux_loss_weight: float = 1e-2  # softmax_topk: α of N Σ f_i P_i
        z_loss_weight: float = 1e-3  # softmax_topk, expert_choice: router z-loss
        bias_update_rate: float = 1e-3  # aux_free: γ per optimizer step (V3; short runs want ~1e-2)
        seq_aux_loss_weight: float = 1e-4  # aux_free: sequence-wise balance loss
        capacity_factor: float | None = None  # token choice: None = dropless; expert_choice: None = 1.0
        grouped_mm: bool = True  # torch._grouped_mm where it runs and rows align, else a matmul per expert
        router_options: dict[str, Any] = field(default_factory=dict)  # settings of third-party routers

        def validate(self, dims: ModelDims) -> None:
            for key in ("n_experts", "top_k", "granularity", "multiple_of"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"ffn.{key}", getattr(self, key), "a positive integer")
            if self.top_k > self.n_experts:
                raise ConfigError("ffn.top_k", self.top_k, f"at most ffn.n_experts={self.n_experts}")
            if self.n_shared_experts < 0:
                raise ConfigError("ffn.n_shared_experts", self.n_shared_experts, "0 or more")
            if self.hidden_dim is not None and self.hidden_dim < 1:
                raise ConfigError("ffn.hidden_dim", self.hidden_dim, "a positive integer or null")
            for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate", "seq_aux_loss_weight"):
                if not getattr(self, key) >= 0:
                    raise ConfigError(f"ffn.{key}", getattr(self, key), "a number >= 0 (0 = off)")
            for key in ("route_scale", "capacity_factor"):
                if getattr(self, key) is not None and not getattr(self, key) > 0:
                    raise ConfigError(f"ffn.{key}", getattr(self, key), "a positive number")
            routers = installed_plugins("router")
            if self.router not in routers:
                names = ", ".join(sorted(routers)) or "none installed"
                raise ConfigError("ffn.router", self.router, f"an installed router, one of: {names}")
            router_cfg = router_config(routers[self.router].load(), self)
            if hasattr(router_cfg, "validate"):
                router_cfg.validate(self.n_experts)

        def num_params(self, dims: ModelDims) -> int:
            """Router d·e (the built-in routers), shared 3·d·(n_s·f), routed e·3·d·f."""
            d, f = dims.d_model, expert_width(self, dims.d_model)
            return d * self.n_experts + 3 * d * f * (self.n_shared_experts + self.n_experts)

        def num_active_params(self, dims: ModelDims) -> int:
            """What one token touches: the router (d·e, built-in routers), the shared experts and the
            router's ``experts_per_token`` routed experts (top_k; expert_choice: capacity_factor · top_k)."""
            d, f = dims.d_model, expert_width(self, dims.d_model)
            router = get_plugin("router", self.router)
            routed = router.experts_per_token(router_config(router, self))
            return d * self.n_experts + 3 * d * f * self.n_shared_experts + round(routed * 3 * d * f)

    def __init__(self, cfg: Config, dims: ModelDims, *, linear) -> None:
        super().__init__()
        d, f, e = dims.d_model, expert_width(cfg, dims.d_model), cfg.n_experts
        self.n_experts, self.expert_dim, self.n_layers = e, f, dims.n_layers
        self.n_shared_experts = cfg.n_shared_experts
        self.use_grouped_mm = cfg.grouped_mm
        router_cls = get_plugin("router", cfg.router)
        router_cfg = router_config(router_cls, cfg)
        self.router = router_cls(router_cfg, d_model=d, n_experts=e, linear=linear)
        self.experts_per_token = router_cls.experts_per_token(router_cfg)
        self.is_causal = getattr(router_cls, "is_causal", True)  # generate() refuses a non-causal layer
        self.w_gate_up = nn.Parameter(torch.empty(e, d, 2 * f))  # [W_gate_e | W_up_e]
        self.w_down = nn.Parameter(torch.empty(e, f, d))  # W_down_e
        if cfg.n_shared_experts:
            self.shared_up = linear(d, 2 * cfg.n_shared_experts * f, role="ffn.shared.up")
            self.shared_down = linear(cfg.n_shared_experts * f, d, role="ffn.shared.down")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Only the routed experts; the ``linear`` factory inits the router and the shared experts.

        | tensor    | init                          | why                                              |
        |-----------|-------------------------------|--------------------------------------------------|
        | w_gate_up | N(0, 0.02²)                   | as the factory's non-residual projections        |
        | w_down    | N(0, (0.02 / sqrt(2 L))²)     | writes into the residual stream (GPT-2, factory) |
        """
        nn.init.normal_(self.w_gate_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02 / math.sqrt(2 * self.n_layers))

    def forward(self, x: Tensor, ctx: ForwardContext | None) -> Tensor:
        """x: (b, t, d) -> (b, t, d)"""
        b, t, d = x.shape
        routing = self.router(x)
        x_nd = x.reshape(b * t, d)
        order = routing.expert.argsort(stable=True)  # contiguous slices, one per expert
        token = routing.token[order]  # m
        counts = torch.bincount(routing.expert, minlength=self.n_experts)  # e
        h_md = self.experts(x_nd.index_select(0, token), counts)
        h_md = h_md * routing.gate[order].to(h_md.dtype)[:, None]
        y_nd = torch.zeros(b * t, d, dtype=h_md.dtype, device=x.device).index_add(0, token, h_md)
        if hasattr(self, "shared_up"):
            y_nd = y_nd + self.shared_down(swiglu(self.shared_up(x_nd)))
        if ctx is not None:
            self.report(ctx, routing, counts, b * t)
        return y_nd.view(b, t, d)

    def experts(self, x_md: Tensor, counts: Tensor) -> Tensor:
        """Rows sorted by expert, counts (e,) -> FFN_{expert(row)}(row) (m, d)."""
        device = x_md.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_md.dtype
        x_md, w_gate_up, w_down = x_md.to(dtype), self.w_gate_up.to(dtype), self.w_down.to(dtype)
        # on CPU, torch runs _grouped_mm as a C++ loop of mm: 0-2 % faster a step (benchmarks/moe.py)
        if self.use_grouped_mm and self.grouped_mm_fits(device, dtype):
            offs = counts.cumsum(0).to(torch.int32)  # end row of each expert's slice
            h_mf = swiglu(torch._grouped_mm(x_md, w_gate_up, offs=offs))
            return torch._grouped_mm(h_mf, w_down, offs=offs)
        # unbind, not w[e]: one backward stack instead of e full-size zero-filled gradients
        slices = zip(x_md.split(counts.tolist()), w_gate_up.unbind(0), w_down.unbind(0), strict=True)
        return torch.cat([swiglu(xs @ wgu) @ wd for xs, wgu, wd in slices])

    def grouped_mm_fits(self, device_type: str, dtype: torch.dtype) -> bool:
        """``torch._grouped_mm`` runs here, and rows of d and of f elements are 16-byte aligned (it asks)."""
        aligned = all(n * dtype.itemsize % 16 == 0 for n in self.w_down.shape[1:])
        return aligned and grouped_mm_works(device_type, dtype)

    @torch.no_grad()
    def routing_metrics(self, routing, counts: Tensor, n_tokens: int) -> dict[str, Tensor]:
        """Load max/mean (assignments each expert processed, after dropping), dropped share of the requested
        assignments, share of tokens left without a routed expert, router entropy (nats, mean over tokens)."""
        routed = torch.bincount(routing.token, minlength=n_tokens)
        return {
            "load_max_over_mean": counts.max() / counts.float().mean().clamp_min(1e-9),
            "drop_rate": torch.tensor(1.0 - routing.token.numel() / max(1, routing.requested)),
            "unrouted": (routed == 0).float().mean(),
            "router_entropy": torch.special.entr(routing.probs.float()).sum(-1).mean(),
        }

    def report(self, ctx: ForwardContext, routing, counts: Tensor, n_tokens: int) -> None:
        """Losses to the objective (``train/aux/moe/NAME``, summed over layers); metrics averaged over layers
        as ``train/moe/NAME`` and per layer as ``train/moe/layer<i>/NAME``."""
        values = self.routing_metrics(routing, counts, n_tokens)
        for name, (value, weight) in routing.losses.items():
            ctx.add_loss(f"moe/{name}", value, weight)
            values[name] = value
        for name, value in values.items():
            ctx.add_metric(f"moe/{name}", value)
            ctx.add_metric(f"moe/layer{ctx.layer}/{name}", value)

    def hf_export(self) -> HFPart:
        """DeepseekV3MoE (shared experts; router aux_free) or Mixtral's sparse block (no shared experts;
        router softmax_topk): routed experts as ``experts.gate_up_proj`` (e, 2f, d) = w_gate_upᵀ and
        ``experts.down_proj`` (e, d, f) = w_downᵀ; the router's part names its own tensors (``gate.*``)."""
        router = part_of("router", self.router)
        d, f, e = self.w_down.shape[-1], self.expert_dim, self.n_experts
        tensors = {"experts.gate_up_proj": self.w_gate_up.transpose(1, 2), **router.tensors}
        tensors["experts.down_proj"] = self.w_down.transpose(1, 2)
        n_shared = self.n_shared_experts
        if n_shared:
            shared = linear_tensors(self.shared_up, "up") | linear_tensors(self.shared_down, "down_proj")
            split = {"gate_proj": n_shared * f, "up_proj": n_shared * f}
            tensors |= {f"shared_experts.{k}": v for k, v in split_rows(shared, "up", split).items()}
            tensors["shared_experts.down_proj.weight"] = shared["down_proj.weight"]
        deepseek = {"n_routed_experts": e, "moe_intermediate_size": f, "n_shared_experts": n_shared}
        config = {"deepseek_v3": deepseek | {"first_k_dense_replace": 0, "hidden_act": "silu"}}
        if not n_shared:
            config["mixtral"] = {"num_local_experts": e, "intermediate_size": f, "hidden_act": "silu"}
        fits = {t: fields | router.config[t] for t, fields in config.items() if t in router.config}
        if not fits:
            why = (
                f"its block is {', '.join(router.config)}'s; this layer (n_shared_experts={n_shared}) maps to"
            )
            raise NotExportable("router", self.router, f"{why} {', '.join(config)}")
        if "deepseek_v3" in fits and not n_shared:  # V3 always builds the shared MLP: width 0 adds exactly 0
            for name, shape in (("gate_proj", (0, d)), ("up_proj", (0, d)), ("down_proj", (d, 0))):
                tensors[f"shared_experts.{name}.weight"] = torch.zeros(shape)
        return HFPart(fits, tensors)

    def num_active_params(self) -> int:
        """Parameters one token touches: router + shared experts + experts_per_token routed experts."""
        per_expert = (self.w_gate_up.numel() + self.w_down.numel()) // self.n_experts
        fixed = [p for name, p in self.named_parameters() if name not in ("w_gate_up", "w_down")]
        return sum(p.numel() for p in fixed) + round(self.experts_per_token * per_expert)
