"""Head slot ``medusa``: the LM head plus K draft heads (Medusa, Cai et al. 2024, arXiv 2401.10774, §2.1).

    logits   = W h_t                                  (the base LM head: predicts x_{t+1})
    h^(k)    = ResBlock_k,L(... ResBlock_k,1(h_t))    ResBlock(z) = z + SiLU(W_1 z + b)   (W_1, b zero-init)
    q^(k)_t  = softmax(W_2^(k) h^(k))                 head k = 1..K predicts x_{t+k+1}
    L        = L_LM + λ_0 · Σ_k 0.8^k · CE(q^(k)_t, x_{t+k+1})           (Medusa-2; §2.2.2)
Medusa-1 (heads on a frozen backbone) is the same loss with ``trainer.train_only=[head.heads]``. With
``distill=true`` and a teacher, head k's term is KL(teacher_{t+k} ‖ q^(k)_t) instead of the CE: the
shared teacher's distribution for the same token x_{t+k+1}. Every head starts equal to the base head.
Decoding with the drafts: ``archlab.speculative`` (``archlab generate --draft``) through
``draft_logits``.
Shapes: b batch, t tokens, d d_model, K heads (``num_heads``), V vocab.

Departures:
- ``projection=own`` is W_2^(k) = W + Δ_k with Δ_k zero-init (the paper copies W into W_2^(k)): equal
  at init whatever order the student initialises its embedding in, and through the base head's own
  forward (tied embedding or a ``linear`` plugin); ``shared`` (default) uses W itself, as Hydra/EAGLE.
- Each of the L residual blocks of each head has its own weights (the reference repeats one module:
  techniques.md §5(d), Liger PR #269); b is zero too, so a head is exactly the base head at init.
- λ_k = 0.8^k with k = 1..K (the paper's formula; the reference ``train.py`` sums unweighted).
Reference: FasterDecoding/Medusa medusa/model/medusa_model.py ``ResBlock``, ``MedusaModel``;
checked in test_medusa.py (label shift, init equality, losses written out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.api import ConfigError, ForwardContext, LMHead, ModelDims, SoftTargets, bucketed, kl

PROJECTIONS = ("shared", "own")


def shifted(logits: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Head k (1-based) pairs logits at t with x_{t+k+1} = labels[t+k]: (b,t,V), (b,t) -> (n,V), (n,)."""
    t = labels.shape[1]
    return logits[:, : t - k].flatten(0, 1), labels[:, k:].flatten()


class ResBlock(nn.Module):
    """z + SiLU(W_1 z + b) (Medusa's ``ResBlock``)."""

    def __init__(self, d_model: int, *, linear) -> None:
        super().__init__()
        self.linear = linear(d_model, d_model, bias=True, role="head.medusa")

    def forward(self, z: Tensor) -> Tensor:
        """z: (b, t, d) -> (b, t, d)"""
        return z + F.silu(self.linear(z))


class MedusaHead(nn.Module):
    @dataclass
    class Config:
        num_heads: int = 4  # K draft heads; head k predicts the token k + 1 after the base head's
        num_layers: int = 1  # residual blocks per head, each with its own weights
        projection: str = "shared"  # shared: the base head's W | own: W + Δ_k per head
        loss_weight: float = 0.2  # λ_0, weight of the heads' loss next to the LM loss
        decay: float = 0.8  # λ_k = decay^k
        distill: bool = False  # heads learn the teacher's distribution (when the run has a teacher)
        tied: bool = True  # base head tied to the embedding, as head=lm

        def validate(self, dims: ModelDims) -> None:
            for key in ("num_heads", "num_layers"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"head.{key}", getattr(self, key), "a positive integer")
            if self.projection not in PROJECTIONS:
                raise ConfigError("head.projection", self.projection, " | ".join(PROJECTIONS))
            if self.loss_weight < 0:
                raise ConfigError("head.loss_weight", self.loss_weight, "a number >= 0")
            if not 0 < self.decay <= 1:
                raise ConfigError("head.decay", self.decay, "a number in (0, 1]")

        def num_params(self, dims: ModelDims) -> int:
            """Base head (0 if tied) + K · (L · (d² + d) + V · d if own)."""
            d, v = dims.d_model, dims.vocab_size
            own = v * d if self.projection == "own" else 0
            return (0 if self.tied else v * d) + self.num_heads * (self.num_layers * (d * d + d) + own)

    def __init__(self, cfg: Config, dims: ModelDims, *, embedding: nn.Embedding, linear) -> None:
        super().__init__()
        self._h: Tensor | None = None  # the last forward's input, for aux_loss
        self.num_draft_heads, self.decay = cfg.num_heads, cfg.decay
        self.loss_weight, self.distill = cfg.loss_weight, cfg.distill
        self.lm = LMHead(LMHead.Config(tied=cfg.tied), dims, embedding=embedding, linear=linear)
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResBlock(dims.d_model, linear=linear) for _ in range(cfg.num_layers)))
            for _ in range(cfg.num_heads)
        )
        own = cfg.projection == "own"
        self.deltas = (
            nn.ParameterList(nn.Parameter(torch.empty(dims.vocab_size, dims.d_model)) for _ in self.heads)
            if own
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """| tensor            | init | why                                               |
        |-------------------|------|---------------------------------------------------|
        | ResBlock W_1, b   | 0    | every block is the identity: heads = base head    |
        | Δ_k (own)         | 0    | W_2^(k) = W at init, as the paper's copy          |
        The base head is the ``lm`` head's (tied embedding or the linear factory's init)."""
        for block in self.modules():
            if isinstance(block, ResBlock):
                nn.init.zeros_(block.linear.weight)
                nn.init.zeros_(block.linear.bias)
        for delta in self.deltas or ():
            nn.init.zeros_(delta)

    def draft_logits(self, h: Tensor) -> Tensor:
        """h: (b, t, d) -> (b, t, K, V): at t, draft k (0-based) predicts x_{t+k+2}."""
        drafts = []
        for k, head in enumerate(self.heads):
            z = head(h)
            logits = self.lm(z, None)
            drafts.append(logits if self.deltas is None else logits + F.linear(z, self.deltas[k]))
        return torch.stack(drafts, dim=2)

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        """h: (b, t, d) -> logits (b, t, V); ``h`` is kept for ``aux_loss`` on a labelled batch."""
        self._h = h
        return self.lm(h, ctx)

    def aux_loss(self, ctx: ForwardContext, labels: Tensor, soft: SoftTargets | None) -> None:
        """λ_0 · Σ_k decay^k · L_k into ``ctx`` as aux loss ``medusa``; per head its loss and top-1
        (the ``AuxLoss`` capability: called after the forward of a labelled batch)."""
        drafts, self._h = self.draft_logits(self._h), None
        total = drafts.new_zeros(())
        for k in range(1, min(self.num_draft_heads, labels.shape[1] - 1) + 1):
            z, y = shifted(drafts[:, :, k - 1].float(), labels, k)
            if self.distill and soft is not None:
                teacher = type(soft)(soft.ids[:, k:].flatten(0, 1), soft.logprobs[:, k:].flatten(0, 1))
                loss = kl(*bucketed(F.log_softmax(z, dim=-1), teacher)).mean()
            else:
                loss = F.cross_entropy(z, y)
            total = total + self.decay**k * loss
            ctx.add_metric(f"medusa/head{k}_loss", loss.detach())
            ctx.add_metric(f"medusa/head{k}_top1", (z.argmax(-1) == y).float().mean())
        ctx.add_loss("medusa", total, self.loss_weight)
