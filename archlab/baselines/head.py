"""Head slot ``lm``: next-token logits = h Eᵀ (tied to the embedding; Press & Wolf 2017,
arXiv 1608.05859) or h W_outᵀ with a separate matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from archlab.context import ForwardContext, ModelDims
from archlab.hf_export import ANY, HFPart, linear_tensors


class LMHead(nn.Module):
    """The ``lm`` head: logits = h Eᵀ with the token embedding E (``tied``) or h W_outᵀ; plugins such as
    ``medusa`` wrap it to keep the base prediction."""

    @dataclass
    class Config:
        tied: bool = True

    def __init__(self, cfg: Config, dims: ModelDims, *, embedding: nn.Embedding, linear) -> None:
        super().__init__()
        self.tied = cfg.tied
        # NOTE: kept in a tuple so the tied weight is not registered (and counted) twice.
        self._embedding = (embedding,)
        if not self.tied:
            self.proj = linear(dims.d_model, dims.vocab_size, bias=False, role="head")

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        """h: (b, t, d) -> logits (b, t, vocab)"""
        if self.tied:
            return F.linear(h, self._embedding[0].weight)
        return self.proj(h)

    def hf_export(self) -> HFPart:
        """``lm_head`` of any transformers causal LM; tied: ``tie_word_embeddings`` and no tensor."""
        tensors = {} if self.tied else linear_tensors(self.proj, "lm_head")
        return HFPart({ANY: {"tie_word_embeddings": self.tied}}, tensors)
