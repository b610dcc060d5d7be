"""Attention slot ``mha``: causal multi-head self-attention with grouped KV heads.

    q = x W_q,  k = x W_k,  v = x W_v          (W_k, W_v have n_kv_heads heads)
    v ← λ_1 v + λ_2 v_first                    with model.value_residual (ResFormer, ctx.value_residual)
    y = softmax(rotate(q) rotate(k)ᵀ / sqrt(k) + causal) v,   out = y W_o
Vaswani et al. 2017 (arXiv 1706.03762); n_kv_heads < n_heads is GQA (Ainslie et al.
2023, arXiv 2305.13245), n_kv_heads = 1 is MQA (Shazeer 2019, arXiv 1911.02150).
Shapes: b batch, t tokens, d d_model, h heads, g kv heads, k head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

from einops import rearrange
from torch import Tensor, nn

from archlab.context import ForwardContext, ModelDims
from archlab.errors import ConfigError
from archlab.hf_export import HFPart, linear_tensors, split_rows


class MultiHeadAttention(nn.Module):
    supports_kv_cache = True
    supports_tree_mask = True  # attends only through ctx.attend, which applies ctx.attn_mask
    supports_value_residual = True  # v = ctx.value_residual(v) on the new tokens' values, before caching

    @dataclass
    class Config:
        n_kv_heads: int | None = None  # None: one KV head per query head (plain MHA)
        bias: bool = False

        def validate(self, dims: ModelDims) -> None:
            g = self.n_kv_heads
            if g is not None and (g < 1 or dims.n_heads % g):
                raise ConfigError("attention.n_kv_heads", g, f"a divisor of model.n_heads={dims.n_heads}")

    def __init__(self, cfg: Config, dims: ModelDims, *, linear) -> None:
        super().__init__()
        self.n_heads, self.head_dim = dims.n_heads, dims.head_dim
        self.n_kv_heads = cfg.n_kv_heads or dims.n_heads
        width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = linear(dims.d_model, width, bias=cfg.bias, role="attention.qkv")
        self.out = linear(dims.d_model, dims.d_model, bias=cfg.bias, role="attention.out")

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """x: (b, t, d) -> (b, t, d)"""
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split((q_width, kv_width, kv_width), dim=-1)
        q = rearrange(q, "b t (h k) -> b h t k", h=self.n_heads)
        k = rearrange(k, "b t (g k) -> b g t k", g=self.n_kv_heads)
        v = ctx.value_residual(rearrange(v, "b t (g k) -> b g t k", g=self.n_kv_heads))
        q, k = ctx.rotate(q, ctx.positions), ctx.rotate(k, ctx.positions)
        if ctx.cache is not None:
            k, v = ctx.cache.append(self, k, v)  # b g (cached + t) k
        y = ctx.attend(q, k, v)
        return self.out(rearrange(y, "b h t k -> b t (h k)"))

    def hf_export(self) -> HFPart:
        """Llama's attention (also Arcee's, and Mixtral's without bias): qkv split into q/k/v_proj. When
        ``out`` normalises its own input, BitNet's instead, whose attn_sub_norm is that norm."""
        rows = {"q_proj": self.n_heads * self.head_dim, "k_proj": self.n_kv_heads * self.head_dim}
        fused = linear_tensors(self.qkv, "qkv")
        tensors = split_rows(fused, "qkv", {**rows, "v_proj": rows["k_proj"]})
        tensors |= linear_tensors(self.out, "o_proj")
        fields = {"num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim}
        fields["attention_bias"] = "qkv.bias" in fused
        if "o_proj.rms_norm.weight" in tensors:
            tensors["attn_sub_norm.weight"] = tensors.pop("o_proj.rms_norm.weight")
            return HFPart({"bitnet": fields}, tensors, reads_position=True)
        types = ("llama", "arcee") if fields["attention_bias"] else ("llama", "arcee", "mixtral")
        return HFPart({t: fields for t in types}, tensors, reads_position=True)

    def kv_cache_elems_per_token(self) -> int:
        """K and V for every KV head: 2 · n_kv_heads · head_dim."""
        return 2 * self.n_kv_heads * self.head_dim

    def attention_flops_per_token(self, context: int) -> int:
        """Forward FLOPs of q kᵀ and (softmax) v per token at full context: 2 · 2 · t · h · k."""
        return 4 * context * self.n_heads * self.head_dim
