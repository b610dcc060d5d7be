"""KV-cache decoding against full forwards, sampling filters against plain computations, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from archlab import registry
from archlab.config import compose
from archlab.context import KVCache
from archlab.errors import ArchlabError
from archlab.generate import filter_logits, generate
from archlab.loggers import RunInfo
from archlab.metrics import model_metrics
from archlab.model import build_student
from archlab.trainer import Trainer

SHAPE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=24"]
VARIANTS = {"mha": [], "gqa": ["attention.n_kv_heads=2"], "mqa": ["attention.n_kv_heads=1"]}
VARIANTS.update({name: [f"attention={name}"] for name in registry.plugins("attention") if name != "mha"})


def student(overrides: list[str]):
    torch.manual_seed(0)
    return build_student(compose([*SHAPE, *overrides])).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_token_by_token_decoding_equals_the_full_forward(variant: str) -> None:
    model = student(VARIANTS[variant])
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        steps = [model(tokens[:, i : i + 1], cache=cache)[:, 0] for i in range(20)]
        chunked_cache = KVCache()  # a prefill of 7, then blocks of 5 and 8: bottom-right causal masks
        chunks = [model(tokens[:, a:b], cache=chunked_cache) for a, b in ((0, 7), (7, 12), (12, 20))]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)
    assert cache.offset == 20
    elements = cache.elements_per_token()  # what the cache really holds per token, all layers
    assert model_metrics(model, torch.float32)["kv_bytes_per_token"] == 4 * elements
    assert model_metrics(model, torch.bfloat16)["kv_bytes_per_token"] == 2 * elements


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_cache_holds_2_kv_heads_head_dim_per_token_per_layer(kv_heads: int) -> None:
    model = student([f"attention.n_kv_heads={kv_heads}"])
    cache = KVCache()
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)), cache=cache)
    assert cache.elements_per_token() == 2 * 2 * kv_heads * 8  # layers · (K and V) · g · head_dim


def test_greedy_generation_is_the_same_with_and_without_cache() -> None:
    model = student([])
    prompt = torch.randint(0, 256, (2, 4))
    with_cache = generate(model, prompt, 12)
    without = generate(model, prompt, 12, use_cache=False)
    assert with_cache.equal(without) and with_cache[:, :4].equal(prompt)
    again = generate(model, prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert again.equal(
        generate(model, prompt, 12, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    )


def test_generation_beyond_the_context_or_without_cache_support_is_refused() -> None:
    model = student([])
    with pytest.raises(ArchlabError, match="exceed the model's context of 24"):
        generate(model, torch.zeros(1, 20, dtype=torch.long), 5)
    model.sublayers[0].supports_kv_cache = False
    with pytest.raises(ArchlabError, match="no KV cache"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
    assert generate(model, torch.zeros(1, 2, dtype=torch.long), 2, use_cache=False).shape == (1, 4)


def test_top_k_and_top_p_keep_the_plain_sets() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    probs = logits.softmax(-1)[0].tolist()  # 0.53, 0.20, 0.12, 0.07, 0.03 (rounded)
    smallest = next(n for n in range(1, 6) if sum(sorted(probs, reverse=True)[:n]) >= 0.8)
    assert kept(filter_logits(logits, top_p=0.8)) == [i < smallest for i in range(5)]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]
    shuffled = logits[:, [3, 0, 4, 1, 2]]  # the set follows the values, not the positions
    assert kept(filter_logits(shuffled, top_p=0.8)) == [False, True, False, smallest > 1, smallest > 2]


def test_generate_cli_continues_a_prompt_from_a_checkpoint(tmp_path) -> None:
    cfg = compose(
        [
            *SHAPE,
            "model.context=64",
            "trainer.max_steps=2",
            "trainer.batch_size=2",
            "trainer.eval_tokens=256",
            "trainer.progress=false",
            "logger=none",
            "teacher=none",
            "objective=ce",
            "data.max_bytes=300000",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    Trainer(cfg, RunInfo(run_dir=tmp_path / "run", name="g")).run()
    cmd = [
        sys.executable,
        "-m",
        "archlab.cli",
        "generate",
        str(tmp_path / "run"),
        "--prompt",
        "def f(",
        "--max-new-tokens",
        "10",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def f(") and "10 tokens in" in result.stderr
    bad = subprocess.run([*cmd, "--top-p", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--top-p=0.0 is not allowed" in bad.stderr


def test_cache_capacity_stops_at_max_tokens() -> None:
    cache, module = KVCache(max_tokens=40), object()
    cache.append(module, torch.zeros(1, 2, 30, 4))
    (k,) = cache.append(module, torch.ones(1, 2, 1, 4))
    assert k.shape == (1, 2, 31, 4) and k[..., 30, :].eq(1).all() and k[..., :30, :].eq(0).all()
    assert cache._buffers[id(module)][0].shape[-2] == 40  # not doubled to 60


def test_a_non_causal_module_cannot_generate() -> None:
    model = student([])
    model.sublayers[1].is_causal = False  # as an expert-choice router declares
    with pytest.raises(ArchlabError, match=r"not causal \(reads later tokens\): MLP;"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 2)
