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
Logits of a source for all readers are computed once, when the source is complete (the paper's
"two-phase" split: one (d × readers) matmul per source), so a read only gathers them and mixes.
Shapes: b batch, t tokens, d d_model, s sources, r readers (n_sublayers + 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

from archlab.context import ModelDims
from archlab.errors import ConfigError
from archlab.plots import DepthWeights


class Mode(Enum):
    full = "full"
    block = "block"


@dataclass
class DepthState:
    """Completed sources (values and their logits for every reader) and the open group's partial sum."""

    values: list[Tensor]  # each (b, t, d)
    logits: list[Tensor]  # each (b, t, r)
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

    def _logits(self, v: Tensor, queries: Tensor) -> Tensor:
        """w_rᵀ RMSNorm(v) for the given queries: (b, t, d) -> (b, t, r), computed as (v w_r) / rms(v) so
        the normalised (b, t, d) tensor is never materialised (the norm has no gain, see Departures)."""
        wide = v.to(torch.promote_types(v.dtype, torch.float32))  # at least fp32 under bf16 autocast
        inv_rms = torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)  # b t 1
        return (v @ queries.T.to(v.dtype)) * inv_rms.to(v.dtype)

    def begin(self, x: Tensor) -> DepthState:
        if self.record_depth_weights:
            self._recorded = {}
        return DepthState(values=[x], logits=[self._logits(x, self.queries)])

    def weights(self, state: DepthState, reader: int) -> tuple[Tensor, list[Tensor]]:
        """α (b, t, s) and the sources v_0 … v_{s−1}, each (b, t, d), that ``reader`` mixes."""
        values = state.values + ([state.partial] if state.partial is not None else [])
        logits = [lg[..., reader] for lg in state.logits]
        if state.partial is not None:
            logits.append(self._logits(state.partial, self.queries[reader : reader + 1])[..., 0])
        logits = torch.stack(logits, dim=-1)  # b t s; the softmax in at least float32 (bf16 autocast)
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1), values

    def read(self, state: DepthState, i: int) -> Tensor:
        alpha, values = self.weights(state, i)
        if self.record_depth_weights:
            self._recorded[i] = alpha.mean(dim=(0, 1)).detach()
        alpha = alpha.to(values[0].dtype)
        # s fused multiply-adds, not a stacked (b, t, s, d) tensor: the sources are never copied
        h = alpha[..., :1] * values[0]
        for s, v in enumerate(values[1:], start=1):
            h = torch.addcmul(h, alpha[..., s : s + 1], v)
        return h

    def write(self, state: DepthState, i: int, y: Tensor) -> DepthState:
        partial = y if state.partial is None else state.partial + y
        if i + 1 < len(self.group) and self.group[i + 1] == self.group[i]:
            state.partial = partial
        else:  # the group is complete: it becomes a source, with its logits for every reader
            state.values.append(partial)
            state.logits.append(self._logits(partial, self.queries))
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
