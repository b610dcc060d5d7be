"""Residual slot ``hyper``: hyper-connections (Zhu et al., ByteDance Seed, arXiv 2409.19606, §2, Alg. 2),
optionally with mHC's doubly-stochastic stream mixing (DeepSeek, Dec 2025; arXiv id 2512.24880 unverified).

The stream is n parallel copies H ∈ R^{n×d} per token, H^0 = (x_0, …, x_0). Sublayer i has a matrix
[A_m | A_r] ∈ R^{n×(1+n)} and β ∈ R^n:
    input      h_i = Σ_j A_m[j] · H_j                          (width connection)
    streams    H'_k = Σ_j A_r[j,k] · H_j + β_k · f_i(norm_i(h_i))   (depth connection)
static: A_m, A_r, β are learned; dynamic adds per-token terms (Eq. 10–13)
    [A_m | A_r] += s_α · tanh(RMSNorm(H) W_α),   β += s_β · tanh(RMSNorm(H) W_β)
``sinkhorn_iters > 0`` (mHC): A_r = Sinkhorn-Knopp(exp(A_r)), doubly stochastic, so the streams' mixing
neither grows nor shrinks them; A_r's init logits are then I (as lucidrains/hyper-connections).
Init (Eq. 14): A_m = e_{i mod n}, A_r = I, β = 1, W = 0: every stream equals the pre-norm stream.
Departures:
- final() is the MEAN of the streams (the paper sums them): equal to pre-norm at init without relying on
  the final norm's scale invariance (a sum is n× the pre-norm stream).
- The RMSNorm of the dynamic branch has no gain (lucidrains: a zero-init gain around 1).
- mHC's sigmoid constraints on A_m and β are not applied: only the doubly-stochastic A_r.
- The static weights are learned as offsets from their init (buffers), so AdamW's decay of the 2-D
  parameters pulls them toward the pre-norm connections, not toward zero.
Reference: lucidrains/hyper-connections ``manifold_constrained_hyper_connections.py`` (init, scales 1e-2,
Sinkhorn); checked against prenorm and a per-stream loop in test_residuals.py.
Shapes: b batch, t tokens, n streams, d d_model, s sublayers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.api import ConfigError, DepthWeights, ModelDims

DYNAMIC_SCALE_INIT = 1e-2  # s_α, s_β (lucidrains)


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """exp(logits) scaled to a doubly-stochastic matrix (rows and columns sum to 1), (..., n, n)."""
    a = (logits - logits.amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        a = a / a.sum(dim=-2, keepdim=True)
        a = a / a.sum(dim=-1, keepdim=True)
    return a


def mix_streams(a_r: Tensor, h: Tensor) -> Tensor:
    """H'_k = Σ_j A_r[j,k] H_j for A_r (n, n) or per token (b, t, n, n); h (b, t, n, d)."""
    if a_r.dim() == 2:
        return torch.einsum("jk,btjd->btkd", a_r, h)  # one matmul over all tokens
    # per token: n broadcast products; an einsum here becomes b·t tiny matmuls, several times slower on CPU
    out = a_r[..., 0, :, None] * h[..., 0, None, :]
    for j in range(1, h.shape[-2]):
        out = torch.addcmul(out, a_r[..., j, :, None], h[..., j, None, :])
    return out


class HyperConnections(nn.Module):
    @dataclass
    class Config:
        n_streams: int = 4  # n (expansion rate; the paper's default 4)
        dynamic: bool = False  # DHC: per-token connection terms (slower: see benchmarks/residuals.py)
        sinkhorn_iters: int = 0  # > 0: mHC's doubly-stochastic A_r (DeepSeek uses 20)
        eps: float = 1e-6  # of the dynamic branch's RMSNorm

        def validate(self, dims: ModelDims) -> None:
            if self.n_streams < 1:
                raise ConfigError("residual.n_streams", self.n_streams, "a positive integer")
            if self.sinkhorn_iters < 0:
                raise ConfigError("residual.sinkhorn_iters", self.sinkhorn_iters, "0 (off) or more")

    record_depth_weights = False

    def __init__(
        self, cfg: Config, dims: ModelDims, *, n_sublayers: int, sublayer_names: tuple[str, ...]
    ) -> None:
        super().__init__()
        n, d, s = cfg.n_streams, dims.d_model, n_sublayers
        self.n, self.dynamic, self.iters, self.eps = n, cfg.dynamic, cfg.sinkhorn_iters, cfg.eps
        self.names = sublayer_names
        self.register_buffer("alpha_init", torch.empty(s, n, 1 + n), persistent=False)
        self.alpha = nn.Parameter(torch.empty(s, n, 1 + n))  # [A_m | A_r] − init
        self.beta = nn.Parameter(torch.empty(s, n))  # β − 1
        if cfg.dynamic:
            self.w_alpha = nn.Parameter(torch.empty(s, d, 1 + n))
            self.w_beta = nn.Parameter(torch.empty(s, d))
            self.scale = nn.Parameter(torch.empty(s, 2))  # s_α, s_β
        self._recorded: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """
        | tensor          | init                      | why                                        |
        |-----------------|---------------------------|--------------------------------------------|
        | alpha_init      | [e_{i mod n} | I] (buffer) | Eq. 14: read one stream, keep every stream |
        | alpha, beta     | 0 (offsets: β = 1 + beta) | Eq. 14: the pre-norm residual              |
        | w_alpha, w_beta | 0                         | dynamic terms start at 0 (static HC)       |
        | scale           | 1e-2                      | s_α, s_β (lucidrains)                      |
        """
        with torch.no_grad():
            self.alpha_init.zero_()
            for i in range(self.alpha_init.shape[0]):
                self.alpha_init[i, i % self.n, 0] = 1.0
                self.alpha_init[i, :, 1:] = torch.eye(self.n)
        nn.init.zeros_(self.alpha)
        nn.init.zeros_(self.beta)
        if self.dynamic:
            nn.init.zeros_(self.w_alpha)
            nn.init.zeros_(self.w_beta)
            nn.init.constant_(self.scale, DYNAMIC_SCALE_INIT)

    def connections(self, h: Tensor, i: int) -> tuple[Tensor, Tensor, Tensor]:
        """A_m (…, n), A_r (…, n, n), β (…, n) of sublayer i; … is (b, t) if dynamic, else empty."""
        alpha = (self.alpha_init[i] + self.alpha[i]).to(h.dtype)  # n 1+n
        beta = (1 + self.beta[i]).to(h.dtype)  # n
        if self.dynamic:
            normed = F.rms_norm(h, (h.shape[-1],), eps=self.eps)  # b t n d
            alpha = alpha + self.scale[i, 0] * torch.tanh(normed @ self.w_alpha[i].to(h.dtype))
            beta = beta + self.scale[i, 1] * torch.tanh(normed @ self.w_beta[i].to(h.dtype))
        a_m, a_r = alpha[..., 0], alpha[..., 1:]
        return a_m, sinkhorn(a_r, self.iters) if self.iters else a_r, beta

    def begin(self, x: Tensor) -> Tensor:
        if self.record_depth_weights:
            self._recorded = {}
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1])  # b t n d

    def read(self, h: Tensor, i: int) -> Tensor:
        a_m, a_r, beta = self.connections(h, i)
        if self.record_depth_weights:  # token means of A_m, A_r, β
            parts = ((a_m, 1), (a_r, 2), (beta, 1))
            self._recorded[i] = tuple(c.detach().float().reshape(-1, *c.shape[-k:]).mean(0) for c, k in parts)
        return (a_m.unsqueeze(-1) * h).sum(dim=-2)  # Σ_j A_m[j] H_j

    def write(self, h: Tensor, i: int, y: Tensor) -> Tensor:
        _, a_r, beta = self.connections(h, i)
        return mix_streams(a_r, h) + beta.unsqueeze(-1) * y.unsqueeze(-2)

    def final(self, h: Tensor) -> Tensor:
        return h.mean(dim=-2)

    def depth_weights(self) -> DepthWeights | None:
        """Effective weight of each source (embedding, sublayer outputs) in each sublayer's input, by
        unrolling the token-mean connections of the last recorded forward: C (n streams × sources) starts as
        ones on the embedding; reader i takes A_mᵀ C, then C ← A_rᵀ C and output i enters with β.
        Exact for static HC; for dynamic HC it unrolls the mean connections (not the mean of products)."""
        if not self._recorded:
            return None
        n_sources = len(self.names) + 1
        w = torch.full((n_sources, n_sources), float("nan"))
        c = torch.zeros(self.n, n_sources)
        c[:, 0] = 1.0
        for i in range(len(self.names)):
            a_m, a_r, beta = self._recorded[i]
            w[i, : i + 1] = (a_m @ c)[: i + 1]
            c = a_r.T @ c
            c[:, i + 1] = beta
        w[-1] = c.mean(dim=0)
        return DepthWeights(w, [*self.names, "final"], ["emb", *self.names])
