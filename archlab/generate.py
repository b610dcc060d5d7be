"""Generation through the KV cache: greedy, or sampling with temperature, top-k and top-p.

Every step feeds only the new token; attention plugins keep what they need per token in
``archlab.context.KVCache`` (K/V per KV head for ``mha``; the latent for ``mla``).
top-k keeps the k most likely tokens (Fan et al. 2018); top-p keeps the smallest set
whose probability reaches p (nucleus sampling, Holtzman et al. 2020, arXiv 1904.09751).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from archlab.context import KVCache
from archlab.errors import ArchlabError
from archlab.model import Student
from archlab.slots import SupportsKVCache, is_causal, offers, slot


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """logits (b, V) with everything outside the top-k / nucleus set to −inf (0 / 1.0 = off)."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def next_token(
    logits: Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """(b, V) -> (b,): argmax when temperature is 0, else a sample from the filtered softmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k=top_k, top_p=top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def supports_kv_cache(model: Student) -> bool:
    """Whether every sublayer of a slot that mixes tokens (attention, memory) caches its state."""
    names = [name.rsplit(".", 1)[-1] for name in model.sublayer_names]  # "L<layer>.<slot>"
    mixing = [m for m, name in zip(model.sublayers, names, strict=True) if slot(name).mixes_tokens]
    return all(offers(m, SupportsKVCache) for m in mixing)


def check_can_generate(model: Student, prompt: Tensor, max_new_tokens: int, *, use_cache: bool) -> None:
    """Raise ArchlabError, saying what to change, if this student cannot continue ``prompt`` so far."""
    if prompt.shape[1] + max_new_tokens > model.dims.context:
        raise ArchlabError(
            f"prompt ({prompt.shape[1]} tokens) + {max_new_tokens} new tokens exceed the model's "
            f"context of {model.dims.context}; shorten the prompt or generate fewer tokens"
        )
    non_causal = sorted({type(m).__name__ for m in model.modules() if not is_causal(m)})
    if non_causal:
        raise ArchlabError(
            f"not causal (reads later tokens): {', '.join(non_causal)}; this student cannot generate, "
            "train it with a causal choice"
        )
    if use_cache and not supports_kv_cache(model):
        raise ArchlabError(
            "this student's attention plugin has no KV cache; generate without it (--no-cache)"
        )


@torch.no_grad()
def decode(
    model: Student,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[Tensor]:
    """The new tokens (b,) continuing ``prompt`` (b, t), one step at a time, up to ``max_new_tokens``:
    a caller that stops iterating (a stop string, ``archlab.lmeval``) spends no further forward."""
    check_can_generate(model, prompt, max_new_tokens, use_cache=use_cache)
    model.eval()
    cache = KVCache(model.dims.context) if use_cache else None
    tokens, fresh = prompt, prompt
    for _ in range(max_new_tokens):
        logits = model(fresh if use_cache else tokens, cache=cache)[:, -1].float()
        new = next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        tokens = torch.cat((tokens, new[:, None]), dim=1)
        fresh = new[:, None]
        yield new


def generate(model: Student, prompt: Tensor, max_new_tokens: int, **sampling) -> Tensor:
    """Continue ``prompt`` (b, t) by ``max_new_tokens``; returns (b, t + max_new_tokens). ``sampling``:
    ``decode``'s keywords (temperature, top_k, top_p, generator, use_cache)."""
    new = list(decode(model, prompt, max_new_tokens, **sampling))
    return torch.cat((prompt, torch.stack(new, 1)), dim=1) if new else prompt
