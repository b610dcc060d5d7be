"""Residual slot ``attnres``: Attention Residuals (Kimi Team, arXiv 2603.15031), softmax attention over depth.

Every sublayer l (attention, ffn, ... each count) reads a mix of earlier sources instead of their sum:
    α_{i→l} = softmax_i( w_lᵀ RMSNorm(v_i) )        over the sources i visible to l, per token
    h_l     = Σ_i α_{i→l} · v_i                      keys are RMSNorm-ed, values are not
with one learned pseudo-query w_l ∈ R^d per reader.
    mode=full:  sources v_0 = embedding, v_i = output of sublayer i−1 (outputs, not cumulative states).
    mode=block: sublayers are cut into ``n_blocks`` contiguous groups; inside a group outputs are summed.
                The sources are b_0 = embedding, the completed groups' sums, and the current group's
                partial sum once it holds an output. One sublayer per group is exactly mode=full.
The final norm and the head read one more mix, with its own pseudo-query (reader "final"): the stack
ends as a depth-attention read, like every sublayer input, rather than as a plain sum.
Invariant (tested): scaling a source by s > 0 leaves every depth logit, so every α, unchanged (the keys
are RMSNorm-ed; exact up to the norm's eps); only that source's share of the mix scales, by s. The values
are not normed, so the student's logits do change.
Departures:
- The key RMSNorm has no gain (as nanochat PR #648): a gain g would only rescale w (wᵀ(g∘k) = (w∘g)ᵀk).
- Zero pseudo-queries give the uniform MEAN of the sources at step 0, not the pre-norm sum (as the paper).
- The queries are one (readers × d) matrix, so AdamW decays them (toward 0, the uniform mix), as the
  README pseudocode's ``Linear(d, 1)`` per sublayer would be.
How it is computed (the equations are unchanged; tests compare with them written out, forward and gradient):
- The logits of a source for all its later readers are one (readers × d) matmul, taken once when the
  source is complete (as the paper's two-phase computation batches the readers), as (W v) / rms(v): the
  normalised source is never materialised. A read only gathers them and mixes.
- Logits and weights are laid out (s, b, t): a softmax over a short last dimension is ~15× slower on CPU.
- The two autograd Functions below have hand-written backward passes. A source is read by every later
  reader; rather than one gradient tensor per reader that autograd then sums, every reader adds its share
  α·g in place into one accumulator per source (``GradSlot``); the backward of the source's logits, which
  autograd runs after every read of the source, hands the sum over once. On the tiny CPU student this
  took a block-mode training step from 1.12× to about 1.08× prenorm (benchmarks/residuals.py).
  No double backward (``once_differentiable``).
Shapes: b batch, t tokens, d d_model, s sources, r readers (n_sublayers + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import reduce

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from archlab.api import ConfigError, DepthWeights, ModelDims


class GradSlot:
    """Where every reader of one depth source adds its share of the source's gradient, in place, during the
    backward pass; the source's ``_DepthLogits`` hands the sum to autograd (see ``_DepthLogits``)."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Tensor | None = None

    def add_scaled(self, scale: Tensor, incoming: Tensor) -> None:
        """grad += scale · incoming (scale broadcast over d)."""
        if self.grad is None:
            self.grad = incoming * scale
        else:
            self.grad.addcmul_(scale, incoming)


class _DepthLogits(torch.autograd.Function):
    """(W v) / rms(v): (b, t, d) source, (r, d) queries -> (r, b, t) logits, in at least float32.

    Backward, with ĝ = g / rms(v) and ℓ the logits:
        ∂v = ĝᵀW − (Σ_r g_r ℓ_r) · v / (d · rms(v)²),      ∂W = ĝ v.
    Every read of the source also takes its logits (through α), so autograd runs this backward after the
    backward of every ``_DepthMix`` that read the source: ∂v is added to the slot they filled and the total
    goes to autograd here, once, as the gradient of the source."""

    @staticmethod
    def forward(ctx, v: Tensor, queries: Tensor, eps: float, slot: GradSlot) -> Tensor:
        dtype, d = torch.promote_types(v.dtype, torch.float32), v.shape[-1]
        with torch.autocast(v.device.type, enabled=False):
            wide = v.to(dtype)
            inv_rms = torch.rsqrt(torch.linalg.vector_norm(wide, dim=-1).square_().div_(d).add_(eps))  # b t
            logits = (queries.to(dtype) @ wide.reshape(-1, d).T).view(-1, *v.shape[:-1]).mul_(inv_rms)
        ctx.save_for_backward(wide, queries, inv_rms, logits)
        ctx.slot = slot
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        wide, queries, inv_rms, logits = ctx.saved_tensors
        d = wide.shape[-1]
        scaled = (grad * inv_rms).view(grad.shape[0], -1)  # r (b t)
        grad_v = grad_queries = None
        if ctx.needs_input_grad[0]:
            coef = (grad * logits).sum(0).mul_(inv_rms.square()).div_(-d).unsqueeze(-1)  # b t 1
            w, grad_v, ctx.slot.grad = queries.to(scaled.dtype), ctx.slot.grad, None
            if grad_v is None:
                grad_v = (scaled.T @ w).view(wide.shape)
            else:
                grad_v.view(-1, d).addmm_(scaled.T, w)
            grad_v.addcmul_(coef, wide)
        if ctx.needs_input_grad[1]:
            grad_queries = (scaled @ wide.view(-1, d)).to(queries.dtype)
        return grad_v, grad_queries, None, None


class _DepthMix(torch.autograd.Function):
    """h = Σ_s α_s v_s: (s, b, t) weights and s (b, t, d) sources -> (b, t, d).

    Backward: ∂α_s = ⟨g, v_s⟩ over d; α_s · g is added to source s's slot, and None goes to autograd."""

    @staticmethod
    def forward(ctx, alpha: Tensor, slots: list[GradSlot], *values: Tensor) -> Tensor:
        dtype = reduce(torch.promote_types, (v.dtype for v in values))
        alpha = alpha.to(dtype).unsqueeze(-1)
        with torch.autocast(values[0].device.type, enabled=False):
            h = values[0].to(dtype) * alpha[0]
            for a, v in zip(alpha[1:], values[1:], strict=True):  # in place: no (b, t, s, d) stack
                h.addcmul_(a, v)
        ctx.save_for_backward(alpha, *values)
        ctx.slots = slots
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        alpha, *values = ctx.saved_tensors
        grad_alpha = None
        if ctx.needs_input_grad[0]:  # ⟨g, v_s⟩ through one scratch buffer, not a fresh product per source
            scratch, grad_alpha = torch.empty_like(grad), grad.new_empty(len(values), *grad.shape[:-1])
            for dot, v in zip(grad_alpha, values, strict=True):
                torch.sum(torch.mul(grad, v, out=scratch), dim=-1, out=dot)
        for a, slot, needed in zip(alpha, ctx.slots, ctx.needs_input_grad[2:], strict=True):
            if needed:
                slot.add_scaled(a, grad)
        return grad_alpha, None, *(None for _ in values)


class Mode(Enum):
    full = "full"
    block = "block"


@dataclass
class DepthState:
    """One forward's completed sources, their gradient slots and logits, and the open group's sum."""

    values: list[Tensor] = field(default_factory=list)  # each (b, t, d)
    slots: list[GradSlot] = field(default_factory=list)
    logits: list[tuple[int, tuple[Tensor, ...]]] = field(default_factory=list)  # first reader, (b, t) each
    partial: Tensor | None = None  # mode=block: the current group's sum so far


class AttentionResiduals(nn.Module):
    @dataclass
    class Config:
        mode: Mode = Mode.full
        n_blocks: int = 4  # mode=block: groups of sublayers (attention and ffn count separately)
        eps: float = 1e-6  # of the key RMSNorm

        def validate(self, dims: ModelDims) -> None:
            if self.n_blocks < 1:
                raise ConfigError("residual.n_blocks", self.n_blocks, "a positive integer")
            if not self.eps > 0:
                raise ConfigError("residual.eps", self.eps, "a positive number")

    record_depth_weights = False

    def __init__(
        self, cfg: Config, dims: ModelDims, *, n_sublayers: int, sublayer_names: tuple[str, ...]
    ) -> None:
        super().__init__()
        n_groups = cfg.n_blocks if cfg.mode is Mode.block else n_sublayers
        if n_groups > n_sublayers:
            raise ConfigError("residual.n_blocks", cfg.n_blocks, f"at most the {n_sublayers} sublayers")
        self.eps, self.names = cfg.eps, sublayer_names
        self.group = [i * n_groups // n_sublayers for i in range(n_sublayers)]  # contiguous, near-equal
        self.queries = nn.Parameter(torch.empty(n_sublayers + 1, dims.d_model))  # w_l, the last one: final
        self.source_names = ["emb", *(self._group_name(g) for g in range(n_groups))]
        self._recorded: dict[int, Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """
        | tensor  | init | why                                                            |
        |---------|------|----------------------------------------------------------------|
        | queries | 0    | the paper's init: uniform weights over the visible sources     |
        """
        nn.init.zeros_(self.queries)

    def _group_name(self, g: int) -> str:
        members = [name for name, group in zip(self.names, self.group, strict=True) if group == g]
        return members[0] if len(members) == 1 else f"{members[0]}..{members[-1]}"

    def _complete(self, state: DepthState, v: Tensor, first_reader: int) -> None:
        """``v`` becomes a source, with its logits for readers ``first_reader`` … final."""
        slot = GradSlot()
        logits = _DepthLogits.apply(v, self.queries[first_reader:], self.eps, slot)
        state.values.append(v)
        state.slots.append(slot)
        state.logits.append((first_reader, logits.unbind(0)))

    def _visible(self, state: DepthState, reader: int) -> tuple[Tensor, list[Tensor], list[GradSlot]]:
        """α (s, b, t), the sources and their gradient slots that ``reader`` mixes."""
        values, slots = list(state.values), list(state.slots)
        logits = [per_reader[reader - first] for first, per_reader in state.logits]
        if state.partial is not None:
            slot = GradSlot()
            query = self.queries[reader : reader + 1]
            logits.append(_DepthLogits.apply(state.partial, query, self.eps, slot)[0])
            values.append(state.partial)
            slots.append(slot)
        return torch.stack(logits).softmax(dim=0), values, slots

    def begin(self, x: Tensor) -> DepthState:
        if self.record_depth_weights:
            self._recorded = {}
        state = DepthState()
        self._complete(state, x, 0)
        return state

    def weights(self, state: DepthState, reader: int) -> tuple[Tensor, list[Tensor]]:
        """α (s, b, t) and the sources v_0 … v_{s−1}, each (b, t, d), that ``reader`` mixes."""
        alpha, values, _ = self._visible(state, reader)
        return alpha, values

    def read(self, state: DepthState, i: int) -> Tensor:
        if len(state.values) == 1 and state.partial is None:  # the embedding alone: α = 1
            if self.record_depth_weights:
                self._recorded[i] = torch.ones(1)
            return state.values[0]
        alpha, values, slots = self._visible(state, i)
        if self.record_depth_weights:
            self._recorded[i] = alpha.mean(dim=(1, 2)).detach()
        return _DepthMix.apply(alpha, slots, *values)

    def write(self, state: DepthState, i: int, y: Tensor) -> DepthState:
        partial = y if state.partial is None else state.partial + y
        if i + 1 < len(self.group) and self.group[i + 1] == self.group[i]:
            state.partial = partial
        else:  # the group is complete: it becomes a source, read by every later sublayer and the final
            self._complete(state, partial, i + 1)
            state.partial = None
        return state

    def final(self, state: DepthState) -> Tensor:
        return self.read(state, len(self.group))

    def depth_weights(self) -> DepthWeights | None:
        """Mean α of the last recorded forward: rows = readers (sublayers, final), columns = sources."""
        if not self._recorded:
            return None
        w = torch.full((len(self.group) + 1, len(self.source_names)), float("nan"))
        for reader, alpha in self._recorded.items():
            w[reader, : len(alpha)] = alpha.cpu()
        return DepthWeights(w, [*self.names, "final"], list(self.source_names))
