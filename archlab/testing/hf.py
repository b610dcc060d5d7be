"""Round trip of ``archlab export --hf`` for tests: export a student, load it with transformers, compare.

    model = scrambled(build_student(cfg))
    trip = hf_round_trip(model, tmp_path / "hf")
    assert trip.max_logit_diff <= 1e-5 and trip.same_greedy_tokens

``scrambled`` redraws every parameter at a scale where logits are O(1–10), so that a row or head laid out
wrongly shows in the logits (at init, 0.02-std weights give logits near 0 whatever the layout). The
comparison is independent of the export's own check: other tokens, and transformers' ``generate``
against ``archlab.generate``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class RoundTrip:
    architecture: str  # config.json's architectures[0]
    max_logit_diff: float
    max_abs_logit: float  # the scale the difference is read against
    archlab_tokens: list[int]
    hf_tokens: list[int]

    @property
    def same_greedy_tokens(self) -> bool:
        """transformers stops at eos (the byte tokenizer's NUL); up to there, the same tokens."""
        n = len(self.hf_tokens)
        stopped = n == len(self.archlab_tokens) or self.hf_tokens[-1] == 0
        return stopped and self.archlab_tokens[:n] == self.hf_tokens


@torch.no_grad()
def scrambled(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with matrices ~ N(0, 1/d), vectors (gains, biases) ~ 1 + N(0, 0.25), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    std = 1 / math.sqrt(model.dims.d_model)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(noise * std if p.dim() > 1 else 1 + 0.5 * noise)
    return model.eval()


def hf_round_trip(model: nn.Module, folder: Path, *, seed: int = 1, new_tokens: int = 12) -> RoundTrip:
    """Export ``model`` (byte tokenizer) to ``folder``, load it in fp32, compare logits on random tokens
    and greedy continuations of a random prompt."""
    import transformers

    from archlab.generate import generate
    from archlab.hf_dir import write_dir
    from archlab.tokenizer import ByteTokenizer

    write_dir(model, ByteTokenizer(), folder, force=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.dims.vocab_size, (3, model.dims.context - 1), generator=generator)
    with torch.no_grad():
        ours, theirs = model(tokens), hf.eval()(tokens).logits
    prompt = tokens[:1, :8]
    hf_out = hf.generate(
        prompt, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(prompt)
    )
    return RoundTrip(
        architecture=json.loads((folder / "config.json").read_text())["architectures"][0],
        max_logit_diff=(ours - theirs).abs().max().item(),
        max_abs_logit=ours.abs().max().item(),
        archlab_tokens=generate(model, prompt, new_tokens)[0, 8:].tolist(),
        hf_tokens=hf_out[0, 8:].tolist(),
    )
