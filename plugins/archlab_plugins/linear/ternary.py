"""Linear slot ``ternary``: BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764): ternary weights, int8 inputs.

    x̂  = RMSNorm(x) · g                                  own norm on the input (see "Pre-norm")
    γ  = mean|W|                                         per tensor (absmean)
    W̃  = RoundClip(W / (γ + eps), −1, 1) ∈ {−1, 0, +1}    W_q = W̃ · γ
    s  = Q / max(max_i |x̂_i|, eps),  Q = 2^(bits−1) − 1   per token (absmax; Q = 127 for 8 bits)
    x̃  = clamp(round(x̂ · s), −Q − 1, Q)                  x_q = x̃ / s
    y  = x_q W_qᵀ (+ b)  =  (x̃ W̃ᵀ) · γ / s (+ b)          the right side is ``integer_forward`` (int32 matmul)
Training keeps latent float weights W and uses the straight-through estimator, x_q ← x̂ + (x_q − x̂).detach()
and W_q ← W + (W_q − W).detach(), so W gets the gradient of a plain linear whose weight is W_q.
Quantisation runs in float32 even under bf16 autocast (round() of bf16 differs near .5); only the final
matmul follows autocast.

Pre-norm. ``subln=false`` (the paper's BitLinear): every projection normalises its own input and sets
``normalizes_input``; the student then builds the block pre-norm of a sublayer made only of such projections
as an identity, so the stream is normalised once (double normalisation: techniques.md §4d).
``subln=true`` is b1.58-2B4T's layout (arXiv 2504.12285): the block pre-norm stays before qkv/up and only
projections that read a sublayer's hidden state (roles ending in out/down: attn_sub_norm, ffn_sub_norm) carry
a norm.
Inference. ``packed_state()`` stores W̃ at 2 bits per weight plus γ (packing.py); ``load_packed_state`` puts
W̃ back and freezes γ (recomputing mean|W| from W̃·γ would change it). ``weight_bytes()`` always reports the
packed size, so density per weight byte judges a ternary student by what it ships.
Export (``archlab export --hf``, subln=true only): transformers' ``bitnet`` quantizer in its offline
``autobitlinear`` form, y = ActQuant(x) weightᵀ · weight_scale (+ bias · weight_scale), so weight = W̃,
weight_scale = γ, bias = b / γ; an out/down projection's norm gain is ``rms_norm.weight``, which the mha and
mlp hooks place as BitNet's attn_sub_norm / ffn_sub_norm. subln=false is refused: BitNet keeps its block
norms, and normalising twice scales each token by ≈ 1 + eps / (2 · mean(x²)). Checked in
plugins/tests/test_hf_export_ternary.py.
Departures: an optional full-precision bias; the norm has a learnable gain g (initialised to 1).
Reference: "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (microsoft/unilm, bitnet/); checked in
plugins/tests/test_ternary.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.api import RESIDUAL_OUTPUT_ROLES, ConfigError, HFPart, NotExportable, RMSNorm
from archlab_plugins.linear.packing import pack_ternary, packed_nbytes, unpack_ternary

#: Bytes of the per-tensor scale γ in the packed format (float32).
SCALE_BYTES = 4
#: transformers' ``BitNetQuantConfig`` whose ``AutoBitLinear`` computes this layer from W̃ and γ as stored.
BITNET_QUANTIZATION = {
    "quant_method": "bitnet",
    "linear_class": "autobitlinear",
    "quantization_mode": "offline",
}
#: What BitNet's ActQuant hard-codes: 8-bit activations, max|x| floored at 1e-5.
BITNET_ACTIVATION_BITS, BITNET_EPS = 8, 1e-5


def ternarize(w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """W -> (W̃ in {−1, 0, +1}, γ = mean|W|): absmean quantisation, one scale per tensor."""
    gamma = w.abs().mean()
    return (w / (gamma + eps)).round().clamp(-1, 1), gamma


def quantize_activations(x: Tensor, q_max: int, eps: float) -> tuple[Tensor, Tensor]:
    """x (..., n) -> (x̃ integers in [−q_max − 1, q_max], s (..., 1)): absmax per token, x ≈ x̃ / s."""
    s = q_max / x.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    return (x * s).round().clamp(-q_max - 1, q_max), s


def ste(x: Tensor, x_q: Tensor) -> Tensor:
    """Forward x_q, backward identity to x (straight-through estimator)."""
    return x + (x_q - x).detach()


class TernaryLinear(nn.Module):
    @dataclass
    class Config:
        subln: bool = False  # true: norms only before out/down projections, the block pre-norm stays
        activation_bits: int = 8
        eps: float = 1e-5  # added to γ, floor of max|x|
        norm_eps: float = 1e-6

        def validate(self, dims=None) -> None:
            if not 2 <= self.activation_bits <= 8:
                raise ConfigError("linear.activation_bits", self.activation_bits, "an integer in [2, 8]")
            for key in ("eps", "norm_eps"):
                if not getattr(self, key) > 0:
                    raise ConfigError(f"linear.{key}", getattr(self, key), "a number > 0")

    def __init__(
        self, cfg: Config, in_features: int, out_features: int, *, bias: bool, init_std: float, role: str
    ) -> None:
        super().__init__()
        cfg.validate()
        self.in_features, self.out_features, self.init_std = in_features, out_features, init_std
        self.cfg, self.role = cfg, role
        self.eps, self.q_max = cfg.eps, 2 ** (cfg.activation_bits - 1) - 1
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.normalizes_input = not cfg.subln or role.rsplit(".", 1)[-1] in RESIDUAL_OUTPUT_ROLES
        self.norm = RMSNorm(RMSNorm.Config(cfg.norm_eps), in_features) if self.normalizes_input else None
        self.register_buffer("frozen_scale", None)  # γ, set by load_packed_state
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight ~ N(0, init_std²) (latent; the factory scales residual outputs), bias = 0, norm gain = 1."""
        nn.init.normal_(self.weight, std=self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def ternary_weight(self) -> tuple[Tensor, Tensor]:
        """(W̃, γ): from the latent weight, or as loaded from a packed file (frozen)."""
        if self.frozen_scale is not None:
            return self.weight, self.frozen_scale
        return ternarize(self.weight.float(), self.eps)

    def normalized(self, x: Tensor) -> Tensor:
        """x̂ = RMSNorm(x)·g in float32 (x itself when this projection has no norm)."""
        x = x.float()
        return self.norm(x) if self.norm is not None else x

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in) -> (..., out); fake quantisation with straight-through gradients."""
        with torch.autocast(x.device.type, enabled=False):
            x_hat = self.normalized(x)
            x_int, s = quantize_activations(x_hat, self.q_max, self.eps)
            w_tern, gamma = self.ternary_weight()
            w_q = w_tern * gamma
            if self.frozen_scale is None:  # training: gradients reach the latent weight
                w_q = ste(self.weight.float(), w_q)
            x_q = ste(x_hat, x_int / s)
        return F.linear(x_q, w_q, self.bias)

    def integer_forward(self, x: Tensor) -> Tensor:
        """x: (..., in) -> (..., out) as (x̃ W̃ᵀ)·γ/s: int8 activations × ternary weights, int32 matmul."""
        x_int, s = quantize_activations(self.normalized(x), self.q_max, self.eps)
        w_tern, gamma = self.ternary_weight()
        acc = F.linear(x_int.to(torch.int8).int(), w_tern.to(torch.int8).int())
        y = acc.float() * (gamma / s)
        return y + self.bias if self.bias is not None else y

    def packed_state(self) -> dict[str, Tensor]:
        """W̃ packed 2 bits per weight, γ (float32) and W's shape; the norm gain and bias as they are."""
        w_tern, gamma = self.ternary_weight()
        own = {k: v for k, v in self.state_dict().items() if k not in ("weight", "frozen_scale")}
        return {
            **own,
            "weight.packed": pack_ternary(w_tern),
            "weight.scale": gamma.detach().float().reshape(1),
            "weight.shape": torch.tensor(self.weight.shape),
        }

    def load_packed_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of ``packed_state``: W̃ becomes the weight and γ is frozen (inference only)."""
        shape = torch.Size(state["weight.shape"].tolist())
        w_tern = unpack_ternary(state["weight.packed"], shape.numel()).view(shape)
        self.frozen_scale = state["weight.scale"].reshape(()).float()
        own = {k: v for k, v in state.items() if not k.startswith("weight.")}
        self.load_state_dict({**own, "weight": w_tern.float(), "frozen_scale": self.frozen_scale})

    def weight_bytes(self) -> int:
        """Packed bytes: ceil(n/4) for W̃, 4 for γ, plus the norm gain and bias at their own precision."""
        others = [p for name, p in self.named_parameters() if name != "weight"]
        rest = sum(p.numel() * p.element_size() for p in others)
        return packed_nbytes(self.weight.numel()) + SCALE_BYTES + rest

    def hf_export(self) -> HFPart:
        """An ``AutoBitLinear`` of ``BitNetForCausalLM`` (see "Export"); ``NotExportable`` says why not."""
        cfg, why = self.cfg, ""
        if not cfg.subln:
            why = "linear.subln=false: BitNet normalises each sublayer input in its block norm and again in "
            why += "every projection (use_rms_norm), which scales tokens by about 1 + eps/(2 mean(x²))"
        elif cfg.activation_bits != BITNET_ACTIVATION_BITS:
            why = f"linear.activation_bits={cfg.activation_bits}: BitNet's ActQuant is 8-bit only"
        elif cfg.eps != BITNET_EPS:
            why = f"linear.eps={cfg.eps:g}: BitNet's ActQuant floors max|x| at {BITNET_EPS:g}"
        elif self.role == "head":
            why = "role head: BitNet's quantizer keeps lm_head full precision (modules_to_not_convert)"
        if why:
            raise NotExportable("linear", self, why)
        w_tern, gamma = self.ternary_weight()
        tensors = {"weight": w_tern, "weight_scale": gamma.reshape(1)}
        if self.bias is not None:  # AutoBitLinear scales the bias with the output: (x W̃ᵀ + b/γ)·γ
            tensors["bias"] = self.bias / gamma
        if self.norm is None:
            return HFPart({"bitnet": {"quantization_config": dict(BITNET_QUANTIZATION)}}, tensors)
        fields = {"quantization_config": dict(BITNET_QUANTIZATION), "rms_norm_eps": self.norm.eps}
        return HFPart({"bitnet": fields}, tensors | {"rms_norm.weight": self.norm.weight})

    def extra_repr(self) -> str:
        frozen = ", frozen" if self.frozen_scale is not None else ""
        return f"{self.in_features} -> {self.out_features}, a{self.q_max.bit_length() + 1}{frozen}"
