"""Objective slot: ``ce`` (next-token cross-entropy) and ``kd`` (knowledge distillation), in nats.

Hinton et al. 2015 (arXiv 1503.02531): temperature² keeps soft-target gradients comparable across τ.
    ce:          loss = mean −log softmax(z)[y]
    kd:          loss = (1 − alpha)·ce(z, y) + alpha·temperature²·mean D(p ‖ q)
                 q = softmax(z / temperature); p = the teacher's cached top-k, built at the same temperature
    forward_kl:  D = KL(p ‖ q) = Σ p·(log p − log q)            (mass-covering; Hinton et al. 2015)
    reverse_kl:  D = KL(q ‖ p) = Σ q·(log q − log p)            (mode-seeking; GKD, MiniLLM arXiv 2306.08543)
GKD (Agarwal et al. 2024, arXiv 2306.13649, Eq. 1), generalized JSD:
    jsd:         D = beta·KL(p ‖ m) + (1 − beta)·KL(q ‖ m),   m = beta·p + (1 − beta)·q
    NOTE: TRL's convention, special-cased exactly: beta = 0 is forward_kl KL(p ‖ q) and beta = 1 is
    reverse_kl KL(q ‖ p). The interior formula tends to 0 at both ends, so beta near 0 or 1 shrinks the loss
    rather than choosing a direction.
Top-k caches with a "rest" bucket (techniques.md §7; top-k bias: Anshumann et al. 2025, arXiv 2503.16870):
    p = (p_K, p_rest = 1 − Σ_K p),   q = (q_K, q_rest = 1 − Σ_K q),   no rest bucket when k = V
    so with k = V, D is exactly full-vocabulary KD; top-k is never renormalised (that is biased).
Departures: the hard-label ce inside kd is always at temperature 1; temperature² multiplies every divergence,
not only forward_kl.
Numerics: float32 throughout; log q_rest = log(1 − exp(logsumexp(log q_K))) via expm1/log1p, both rest masses
floored at REST_FLOOR (float32 noise); 0·log 0 = 0.
Reference: trl GKDTrainer.generalized_jsd_loss (endpoints); checked in tests/test_objectives.py.

Shapes: ``b`` batch, ``t`` tokens, ``v`` vocabulary, ``k`` cached teacher tokens, ``n`` counted positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

from archlab.context import ModelDims
from archlab.errors import ConfigError
from archlab.soft_targets import SoftTargets

#: Smallest rest-bucket mass: below it, 1 − Σ exp(logprobs) in float32 is rounding noise.
REST_FLOOR = 1e-7


class Divergence(Enum):
    forward_kl = "forward_kl"  # KL(teacher ‖ student)
    reverse_kl = "reverse_kl"  # KL(student ‖ teacher)
    jsd = "jsd"  # generalized JSD(beta), GKD


def log1m_exp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def rest_logprob(logp_k: Tensor) -> Tensor:
    """log of the mass outside the k given log-probabilities: (..., k) -> (...)."""
    return log1m_exp(torch.logsumexp(logp_k, dim=-1).clamp_max(math.log1p(-REST_FLOOR)))


def kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ p·(log p − log q) over the last dim, with 0·log 0 = 0: (..., k) -> (...)."""
    support = logp > -math.inf
    logp = torch.where(support, logp, torch.zeros_like(logp))  # keeps -inf out of the backward pass too
    term = logp.exp() * (logp - logq)
    return torch.where(support, term, torch.zeros_like(term)).sum(-1)


def divergence(logp: Tensor, logq: Tensor, kind: Divergence, beta: float = 0.5) -> Tensor:
    """D(p ‖ q) per position from teacher log-probs ``logp`` and student ``logq``: (n, k) -> (n,)."""
    if kind is Divergence.forward_kl or (kind is Divergence.jsd and beta == 0.0):
        return kl(logp, logq)
    if kind is Divergence.reverse_kl or (kind is Divergence.jsd and beta == 1.0):
        return kl(logq, logp)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm)


def bucketed(logq_v: Tensor, teacher: SoftTargets) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs on the teacher's k ids plus a rest bucket unless k = V.

    logq_v: (n, v) student log-probs, teacher: (n, k) -> ((n, k[+1]), (n, k[+1]))
    """
    logp = teacher.logprobs.float()
    logq = logq_v.gather(-1, teacher.ids)
    if teacher.ids.shape[-1] < logq_v.shape[-1]:
        logp = torch.cat([logp, rest_logprob(logp).unsqueeze(-1)], dim=-1)
        logq = torch.cat([logq, rest_logprob(logq).unsqueeze(-1)], dim=-1)
    return logp, logq


def counted(
    logits: Tensor, targets: Tensor, teacher: SoftTargets | None, mask: Tensor | None
) -> tuple[Tensor, Tensor, SoftTargets | None]:
    """Flatten to the counted positions only, so masked positions (padding, garbage) are never read.

    logits: (b, t, v), targets: (b, t), mask: (b, t) -> (n, v) float32, (n,), SoftTargets (n, k)
    """
    z, y = logits.flatten(0, 1).float(), targets.flatten()
    ids = lp = None
    if teacher is not None:
        ids, lp = teacher.ids.flatten(0, 1), teacher.logprobs.flatten(0, 1)
    if mask is not None:
        keep = mask.flatten().bool()
        z, y = z[keep], y[keep]
        if teacher is not None:
            ids, lp = ids[keep], lp[keep]
    return z, y, (SoftTargets(ids, lp) if teacher is not None else None)


class CrossEntropy:
    @dataclass
    class Config:
        def validate(self, dims: ModelDims | None = None) -> None:
            pass

    needs_teacher = False

    def __init__(self, cfg: Config) -> None:
        cfg.validate()

    def __call__(
        self, logits: Tensor, targets: Tensor, teacher: SoftTargets | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """logits: (b, t, v), targets: (b, t), mask: (b, t) True = counted -> scalar (0 if none counted)"""
        z, y, _ = counted(logits, targets, None, mask)
        if z.shape[0] == 0:
            return z.sum()  # zero, still attached to the graph
        return F.cross_entropy(z, y)


class Distillation:
    @dataclass
    class Config:
        divergence: Divergence = Divergence.forward_kl
        beta: float = 0.5  # jsd only: 0 = forward_kl, 1 = reverse_kl (TRL convention)
        temperature: float = 1.0  # the shared soft targets are cached at this temperature too
        alpha: float = 1.0  # weight of the distillation term; 1 − alpha goes to hard-label ce

        def validate(self, dims: ModelDims | None = None) -> None:
            if not isinstance(self.divergence, Divergence):
                allowed = " | ".join(d.value for d in Divergence)
                raise ConfigError("objective.divergence", self.divergence, allowed)
            if not 0.0 <= self.beta <= 1.0:
                raise ConfigError("objective.beta", self.beta, "a number in [0, 1]")
            if not self.temperature > 0.0 or not math.isfinite(self.temperature):
                raise ConfigError("objective.temperature", self.temperature, "a finite number > 0")
            if not 0.0 <= self.alpha <= 1.0:
                raise ConfigError("objective.alpha", self.alpha, "a number in [0, 1]")

    needs_teacher = True

    def __init__(self, cfg: Config) -> None:
        cfg.validate()
        self.divergence, self.beta = cfg.divergence, float(cfg.beta)
        self.temperature, self.alpha = float(cfg.temperature), float(cfg.alpha)

    def __call__(
        self, logits: Tensor, targets: Tensor, teacher: SoftTargets | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """logits: (b, t, v), targets: (b, t), teacher: (b, t, k), mask: (b, t) -> scalar"""
        if teacher is None and self.alpha > 0.0:
            raise ValueError("objective=kd needs the teacher's soft targets: pass teacher=SoftTargets(...)")
        z, y, soft = counted(logits, targets, teacher, mask)
        if z.shape[0] == 0:
            return z.sum()  # zero, still attached to the graph
        loss = z.new_zeros(())
        if self.alpha < 1.0:
            loss = loss + (1.0 - self.alpha) * F.cross_entropy(z, y)
        if self.alpha > 0.0:
            zt = z if self.temperature == 1.0 else z / self.temperature  # skip a full-size pass at τ = 1
            logp, logq = bucketed(F.log_softmax(zt, dim=-1), soft)
            d = divergence(logp, logq, self.divergence, self.beta).mean()
            loss = loss + self.alpha * self.temperature**2 * d
        return loss


@torch.no_grad()
def teacher_agreement(
    logits: Tensor, teacher: SoftTargets, mask: Tensor | None = None, *, temperature: float = 1.0
) -> dict[str, float]:
    """Eval metrics against the teacher, averaged over counted positions (nan if none).

    kl_teacher_student: bucketed KL(p ‖ q) with q = softmax(logits / temperature); the default 1 assumes
    a cache built at τ = 1. top1_agreement: fraction of positions where argmax logits == teacher.ids[..., 0].
    """
    z, _, soft = counted(logits, teacher.ids[..., 0], teacher, mask)
    if z.shape[0] == 0:
        return {"kl_teacher_student": math.nan, "top1_agreement": math.nan}
    logp, logq = bucketed(F.log_softmax(z / temperature, dim=-1), soft)
    return {
        "kl_teacher_student": kl(logp, logq).mean().item(),
        "top1_agreement": (z.argmax(-1) == soft.ids[:, 0]).float().mean().item(),
    }
