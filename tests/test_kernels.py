"""Attention kernels: SDPA and the eager reference against the attention equation written plainly."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from archlab.errors import ConfigError
from archlab.kernels import eager_attention, sdpa_attention, select_kernel


def plain_causal_attention(q, k, v):
    """softmax_j≤i(q_i·k_j/√d) v_j for every head and position, one query at a time."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros_like(q)
    for hi in range(h):
        g = hi // group
        for i in range(t):
            scores = torch.stack([q[:, hi, i] @ k[:, g, j].T for j in range(i + 1)], -1).diagonal().T
            scores = scores / math.sqrt(d)
            weights = scores.softmax(-1)  # b, i+1
            out[:, hi, i] = torch.einsum("bj,bjd->bd", weights, v[:, g, : i + 1])
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_eager_and_sdpa_match_the_equation(heads: int, kv_heads: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, heads, 7, 8)
    k, v = torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    expected = plain_causal_attention(q, k, v)
    torch.testing.assert_close(eager_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_auto_falls_back_to_sdpa_on_cpu() -> None:
    kernel = select_kernel("auto", torch.device("cpu"), torch.float32, 16)
    assert kernel.name == "sdpa"
    assert "cpu" in kernel.reason


def test_requesting_xformers_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"model.attention_backend='xformers'.*no kernels for device cpu"):
        select_kernel("xformers", torch.device("cpu"), torch.float32, 16)


def test_unknown_backend_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, xformers, sdpa, eager"):
        select_kernel("flash9", torch.device("cpu"), torch.float32, 16)


def test_installed_xformers_has_no_cpu_kernel() -> None:
    """Why the fallback exists: the real package raises on CPU tensors."""
    xops = pytest.importorskip("xformers.ops")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError):
        xops.memory_efficient_attention(q, q, q)


def test_cpu_run_with_xformers_installed_is_silent() -> None:
    """Kernel choice and a forward on CPU print nothing: xformers is never imported off CUDA."""
    pytest.importorskip("xformers")
    code = (
        "import sys, torch, warnings\n"
        "warnings.simplefilter('error')\n"
        "from archlab.config import compose\n"
        "from archlab.model import build_student\n"
        "from archlab.kernels import select_kernel\n"
        "m = build_student(compose(['model.d_model=32', 'model.n_layers=1', 'model.n_heads=2']))\n"
        "m.kernel = select_kernel('auto', torch.device('cpu'), torch.float32, m.dims.head_dim)\n"
        "m(torch.randint(0, 256, (1, 8)))\n"
        "assert m.kernel.name == 'sdpa'\n"
        "assert 'xformers' not in sys.modules, 'xformers was imported on CPU'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def test_cached_queries_are_aligned_bottom_right() -> None:
    """With t_q < t_k (keys cached), query i sees keys up to t_k − t_q + i, in every kernel."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    full_q = torch.cat((torch.randn(1, 4, 4, 8), q), dim=2)
    expected = plain_causal_attention(full_q, k, v)[:, :, 4:]
    torch.testing.assert_close(eager_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q[:, :, -1:], k, v), expected[:, :, -1:], atol=1e-5, rtol=1e-5)


def test_shapes_xformers_refuses_go_to_sdpa_once_logged(caplog) -> None:
    """On CPU every shape is refused by the real xformers: the result is SDPA's, logged once per shape."""
    pytest.importorskip("xformers.ops")
    from archlab.kernels import xformers_or_sdpa

    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    with caplog.at_level("WARNING", logger="archlab.kernels"):
        first, second = xformers_or_sdpa(q, k, v), xformers_or_sdpa(q, k, v)
    torch.testing.assert_close(first, sdpa_attention(q, k, v))
    torch.testing.assert_close(second, first)
    assert sum("using SDPA" in r.message for r in caplog.records) == 1


def _bmhk_reference(query, key, value, attn_bias=None):
    """Stands in for xformers' CUDA kernel on CPU: its documented 4-D (b, t, h, k) contract only,
    with LowerTriangularMask aligned top-left and LowerTriangularFromBottomRightMask bottom-right."""
    from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask, LowerTriangularMask

    assert query.ndim == key.ndim == value.ndim == 4, "the 4-D layout has backward operators"
    assert query.shape[2] == key.shape[2], "one K/V head per query head"
    t_q, t_k = query.shape[1], key.shape[1]
    offset = {LowerTriangularMask: 0, LowerTriangularFromBottomRightMask: t_k - t_q}[type(attn_bias)]
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.ones(t_q, t_k, dtype=torch.bool).tril(offset)
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return y.transpose(1, 2).to(query.dtype)


@pytest.mark.parametrize("kv_heads,t_q", [(4, 6), (2, 6), (1, 6), (2, 2), (1, 1)], ids=str)
def test_xformers_layout_matches_the_equation(monkeypatch, kv_heads: int, t_q: int) -> None:
    """Our rearrangement around xformers (GQA heads, cached queries) against plain attention, with the
    kernel replaced by a reference of its 4-D contract (xformers has no CPU kernels)."""
    pytest.importorskip("xformers.ops")
    import xformers.ops

    from archlab.kernels import xformers_attention

    monkeypatch.setattr(xformers.ops, "memory_efficient_attention", _bmhk_reference)
    torch.manual_seed(0)
    q = torch.randn(2, 4, t_q, 8, requires_grad=True)
    k, v = torch.randn(2, kv_heads, 6, 8), torch.randn(2, kv_heads, 6, 8)
    full_q = torch.cat((torch.randn(2, 4, 6 - t_q, 8), q.detach()), dim=2)
    expected = plain_causal_attention(full_q, k, v)[:, :, 6 - t_q :]
    y = xformers_attention(q, k, v)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.sum().backward()  # the path trains: gradients reach the queries
    assert q.grad is not None and q.grad.abs().sum() > 0
