"""Attention slot ``mla``: Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, §2.1; V3, 2412.19437).

    c_kv, k_rope = split(x W_DKV)          one latent and ONE rope key per token, shared by all heads
    c_kv = RMSNorm(c_kv),  k_rope = RoPE(k_rope)                            (both cached)
    q_nope, q_rope = split(x W_Q)          or, with q_lora_rank > 0: c_q = RMSNorm(x W_DQ), q = c_q W_UQ
    q_rope = RoPE(q_rope)
    k_nope_i = c_kv W_UK_i,  v_i = c_kv W_UV_i                              (per head i)
    y_i = softmax([q_nope_i; q_rope_i] · [k_nope_i; k_rope]ᵀ / sqrt(n + r) + causal) v_i
    out = [y_1; …; y_h] W_O
Absorbed decoding (``absorb``, with a cache): q_nope_i · (W_UK_i c_kv) = (W_UK_iᵀ q_nope_i) · c_kv, so
    q_c_i = W_UK_iᵀ q_nope_i,   a_i = softmax((q_c_i · c_kv + q_rope_i · k_rope) / sqrt(n + r) + causal)
    y_i = W_UV_i (a_i c_kv)
and attention runs on the cached latent (MQA with key size c + r, value size c).
Cache: c_kv and k_rope, i.e. c + r elements per token per layer (MHA: 2 h k).
Shapes: b batch, t new tokens, s keys (cached + t), d d_model, h heads, n qk_nope_head_dim,
r qk_rope_head_dim, v v_head_dim, c kv_lora_rank (latent).

Departures:
- RoPE is MLA's own, on the rope part only, always, whatever ``position=`` says: the position plugin's
  tables are sized for d/h, and rotating k_nope would break absorption (V2 §2.1.3). Tables cover
  ``model.context`` positions; convention rotate-half as archlab's ``rope`` (the official code rotates
  interleaved pairs: the same up to a fixed permutation of the W_QR / W_KR rows). No YaRN (mscale = 1).
- W_KR is fused into W_DKV (``kv_down``) and W_QR into W_Q / W_UQ, as the reference's wkv_a / wq_b.
- Absorption reads W_UK and W_UV by applying ``k_up`` / ``v_up`` to the identity, not ``.weight``, so a
  ``linear`` plugin's own forward (ternary, LoRA, ...) is honoured; techniques.md §1(d).
- With ``absorb`` a cached prefill (t > 1) is absorbed too (vLLM / SGLang prefill naively, for FLOPs).
- No biases, as the reference.
- Value residual (``model.value_residual``, ResFormer arXiv 2410.17897) mixes the *value latent*:
  c_v = λ_1 c_kv + λ_2 c_kv^(layer 1), v_i = c_v W_UV_i, while keys still read c_kv. W_UV is linear, so this
  is ResFormer's V'_n = λ_1 V_n + λ_2 V_1 with V_1 seen through layer n's W_UV; it needs no extra cache (layer
  1's latent is cached anyway) and absorbed decoding keeps working (it attends over c_kv, sums c_v).
Reference: deepseek-ai/DeepSeek-V3 inference/model.py ``MLA`` @1ea5a1a (naive and absorb paths).
Export: ``hf_export`` maps it onto transformers' ``DeepseekV3Attention`` (rope_interleave=False); checked
in plugins/tests/test_hf_export_plugins.py by loading the export and comparing logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from archlab.api import (
    ConfigError,
    ForwardContext,
    HFPart,
    ModelDims,
    RMSNorm,
    apply_rotary,
    causal_mask,
    linear_tensors,
    rope_tables,
)


class MultiHeadLatentAttention(nn.Module):
    supports_kv_cache = True
    supports_tree_mask = True  # the naive path gets ctx.attn_mask through ctx.attend, absorbed() reads it
    supports_value_residual = True  # on the value latent c_v (module docstring)

    @dataclass
    class Config:
        kv_lora_rank: int = 64  # c: latent cached per token (V2: 4 · head size)
        q_lora_rank: int = 0  # query latent; 0 = queries straight from x (V2-Lite)
        qk_nope_head_dim: int = 32  # n: per-head content part of q and k
        qk_rope_head_dim: int = 16  # r: per-head rope part of q, and the one shared rope key
        v_head_dim: int = 32
        rope_theta: float = 10000.0
        absorb: bool = True  # fold W_UK / W_UV around attention on the latent when decoding with a cache

        def validate(self, dims: ModelDims) -> None:
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"attention.{key}", getattr(self, key), "a positive integer")
            if self.q_lora_rank < 0:
                raise ConfigError("attention.q_lora_rank", self.q_lora_rank, "0 (no query latent) or more")
            if self.qk_rope_head_dim % 2:
                raise ConfigError("attention.qk_rope_head_dim", self.qk_rope_head_dim, "an even integer")
            if not self.rope_theta > 0:
                raise ConfigError("attention.rope_theta", self.rope_theta, "a positive number")

        def num_params(self, dims: ModelDims) -> int:
            """Parameters of one module: every projection, plus the latents' RMSNorm gains."""
            d, h, c, lq = dims.d_model, dims.n_heads, self.kv_lora_rank, self.q_lora_rank
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = d * h * qk if lq == 0 else d * lq + lq + lq * h * qk
            kv = d * (c + self.qk_rope_head_dim) + c + c * h * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + h * self.v_head_dim * d

    def __init__(self, cfg: Config, dims: ModelDims, *, linear) -> None:
        super().__init__()
        d, h = dims.d_model, dims.n_heads
        self.n_heads, self.absorb, self.rope_theta = h, cfg.absorb, cfg.rope_theta
        self.kv_lora_rank, self.q_lora_rank, self.v_dim = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.v_head_dim
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.max_positions = dims.context
        self.softmax_scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim)
        qk_width = h * (self.nope_dim + self.rope_dim)
        if cfg.q_lora_rank == 0:
            self.q = linear(d, qk_width, role="attention.q")  # [W_UQ ; W_QR] ∘ W_DQ collapsed
        else:
            self.q_down = linear(d, cfg.q_lora_rank, role="attention.q_down")  # W_DQ
            self.q_norm = RMSNorm(RMSNorm.Config(), cfg.q_lora_rank)
            self.q_up = linear(cfg.q_lora_rank, qk_width, role="attention.q_up")  # [W_UQ ; W_QR]
        # [W_DKV ; W_KR] in one matmul, as the reference's wkv_a
        self.kv_down = linear(d, self.kv_lora_rank + self.rope_dim, role="attention.kv_down")
        self.kv_norm = RMSNorm(RMSNorm.Config(), self.kv_lora_rank)
        self.k_up = linear(self.kv_lora_rank, h * self.nope_dim, role="attention.k_up")  # W_UK
        self.v_up = linear(self.kv_lora_rank, h * self.v_dim, role="attention.v_up")  # W_UV
        self.out = linear(h * self.v_dim, d, role="attention.out")  # W_O
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)  # t r
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)  # t r
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Only what the ``linear`` factory does not own (it inits every projection):

        | tensor                     | init                       | why                                   |
        |----------------------------|----------------------------|---------------------------------------|
        | kv_norm, q_norm gains      | 1                          | RMSNorm identity at start (reference) |
        | rope_cos, rope_sin buffers | rope_tables(r, context, θ) | recomputed so meta-device builds work |
        """
        for norm in (self.kv_norm, getattr(self, "q_norm", None)):
            if norm is not None:
                nn.init.ones_(norm.weight)
        cos, sin = rope_tables(self.rope_dim, self.max_positions, self.rope_theta)
        device = self.kv_norm.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """RoPE on the rope part: x (..., t, r) at positions (t,)."""
        return apply_rotary(x, self.rope_cos[positions], self.rope_sin[positions])

    def forward(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """x: (b, t, d) -> (b, t, d)"""
        q = self.q(x) if self.q_lora_rank == 0 else self.q_up(self.q_norm(self.q_down(x)))
        q = rearrange(q, "b t (h k) -> b h t k", h=self.n_heads)
        q_nope, q_rope = q.split((self.nope_dim, self.rope_dim), dim=-1)  # b h t n, b h t r
        c_kv, k_rope = self.kv_down(x).split((self.kv_lora_rank, self.rope_dim), dim=-1)
        c_kv = self.kv_norm(c_kv)  # b t c  NOTE: the cache holds the *normed* latent
        q_rope, k_rope = self.rotate(q_rope, ctx.positions), self.rotate(k_rope, ctx.positions)
        if ctx.cache is not None:
            c_kv, k_rope = ctx.cache.append(self, c_kv, k_rope)  # b s c, b s r
        c_v = ctx.value_residual(c_kv)  # the latent W_UV reads: c_kv, or mixed with layer 1's (docstring)
        if ctx.cache is not None and self.absorb:
            y = self.absorbed(q_nope, q_rope, c_kv, k_rope, ctx.attn_mask, c_v)
            return self.out(rearrange(y, "b h t v -> b t (h v)"))
        k_nope = rearrange(self.k_up(c_kv), "b s (h n) -> b h s n", h=self.n_heads)
        v = rearrange(self.v_up(c_v), "b s (h v) -> b h s v", h=self.n_heads)
        k_rope = k_rope[:, None].expand(-1, self.n_heads, -1, -1)  # b h s r: the shared key, broadcast
        # the kernel scales by 1/sqrt(q's last dim) = 1/sqrt(n + r), the paper's softmax scale
        y = ctx.attend(torch.cat((q_nope, q_rope), dim=-1), torch.cat((k_nope, k_rope), dim=-1), v)
        return self.out(rearrange(y, "b h t v -> b t (h v)"))

    def up_weights(self) -> tuple[Tensor, Tensor]:
        """W_UK (h, n, c) and W_UV (h, v, c), read as the up-projections' outputs on the identity."""
        weight = self.kv_norm.weight
        eye = torch.eye(self.kv_lora_rank, device=weight.device, dtype=weight.dtype)
        w_uk = rearrange(self.k_up(eye), "c (h n) -> h n c", h=self.n_heads)
        w_uv = rearrange(self.v_up(eye), "c (h v) -> h v c", h=self.n_heads)
        return w_uk, w_uv

    def absorbed(
        self,
        q_nope: Tensor,
        q_rope: Tensor,
        c_kv: Tensor,
        k_rope: Tensor,
        mask: Tensor | None = None,
        c_v: Tensor | None = None,
    ) -> Tensor:
        """Attention on the latent: (b h t n), (b h t r), (b s c), (b s r) -> y (b h t v);
        ``mask`` (t, s), True = may attend, replaces the causal mask (tree verification);
        ``c_v`` (b s c) is the latent the values are read from (default c_kv; value residual)."""
        c_v = c_kv if c_v is None else c_v
        w_uk, w_uv = self.up_weights()
        q_c = torch.einsum("bhtn,hnc->bhtc", q_nope, w_uk.to(q_nope.dtype))
        scores = torch.einsum("bhtc,bsc->bhts", q_c, c_kv) + torch.einsum("bhtr,bsr->bhts", q_rope, k_rope)
        if mask is None:
            mask = causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
        a = (scores.float() * self.softmax_scale).masked_fill(~mask, float("-inf")).softmax(-1)
        o_c = torch.einsum("bhts,bsc->bhtc", a.to(c_v.dtype), c_v)  # attention-weighted latent
        return torch.einsum("bhtc,hvc->bhtv", o_c, w_uv.to(o_c.dtype))

    def hf_export(self) -> HFPart:
        """transformers' DeepseekV3Attention with rope_interleave=False (archlab rotates halves): W_UK and
        W_UV interleaved per head into kv_b_proj ([k_nope_i; v_i] for each head i); latent norms eps 1e-6."""
        if self.q_lora_rank == 0:
            tensors = linear_tensors(self.q, "q_proj")
        else:
            tensors = linear_tensors(self.q_down, "q_a_proj") | linear_tensors(self.q_up, "q_b_proj")
            tensors["q_a_layernorm.weight"] = self.q_norm.weight
        tensors |= linear_tensors(self.kv_down, "kv_a_proj_with_mqa") | linear_tensors(self.out, "o_proj")
        tensors["kv_a_layernorm.weight"] = self.kv_norm.weight
        k_up = rearrange(linear_tensors(self.k_up, "k")["k.weight"], "(h n) c -> h n c", h=self.n_heads)
        v_up = rearrange(linear_tensors(self.v_up, "v")["v.weight"], "(h v) c -> h v c", h=self.n_heads)
        tensors["kv_b_proj.weight"] = rearrange(torch.cat((k_up, v_up), dim=1), "h nv c -> (h nv) c")
        fields = {
            "num_key_value_heads": self.n_heads,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank or None,
            "qk_nope_head_dim": self.nope_dim,
            "qk_rope_head_dim": self.rope_dim,
            "v_head_dim": self.v_dim,
            "rope_interleave": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_bias": False,
        }
        return HFPart({"deepseek_v3": fields}, tensors)

    def kv_cache_elems_per_token(self) -> int:
        """The latent and the shared rope key: kv_lora_rank + qk_rope_head_dim (no factor h)."""
        return self.kv_lora_rank + self.rope_dim

    def attention_flops_per_token(self, context: int) -> int:
        """Forward FLOPs of the naive path per token at full context: q kᵀ over n + r and (softmax) v over v,
        2 · t · h · (n + r + v). Up-projecting each token's latent once is in 2 · params; absorbed decoding
        instead costs 2 · t · h · (2c + r) plus the per-query absorption, not counted here."""
        return 2 * context * self.n_heads * (self.nope_dim + self.rope_dim + self.v_dim)
