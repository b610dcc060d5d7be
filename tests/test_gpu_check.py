"""The GPU check's helpers judge right: the agreement and cached-decoding checks pass archlab's kernels
and FAIL a kernel that is wrong (scale, mask alignment, causality); a check that raises is a FAIL.
The whole ``scripts/gpu_check.sh --cpu`` runs in CI from scripts/test.sh, not here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from archlab.kernels import Kernel, sdpa_attention

BENCHMARK = "gpu_check"


def wrong_scale(q, k, v):
    """SDPA with scale 1 instead of 1/sqrt(k)."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=1.0, enable_gqa=k.shape[1] != q.shape[1]
    )


def top_left_causal(q, k, v):
    """SDPA's own is_causal, aligned top-left: wrong once queries follow cached keys."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


@pytest.fixture(scope="module", params=["mha", "gqa", "mqa", "mla"])
def case(bench, request):
    return next(c for c in bench.attention_cases(bench.CPU) if c.name == request.param)


def test_agreement_passes_sdpa_and_fails_a_wrong_scale(bench, case):
    inputs = bench.attention_inputs(case, bench.CPU, torch.float32, torch.device("cpu"))
    tol = bench.TOL[torch.float32]
    passed, detail = bench.agreement(sdpa_attention, inputs, tol, backward=True)
    assert passed, detail
    assert {"out", "dq", "dk", "dv"} == set(bench.attention_errors(sdpa_attention, inputs, backward=True))
    passed, detail = bench.agreement(wrong_scale, inputs, tol, backward=True)
    assert not passed, f"a kernel scaled by 1 instead of 1/sqrt(k) passed: {detail}"


def test_agreement_after_cached_keys_fails_a_top_left_mask(bench, case):
    queries = bench.CPU.tokens // 8
    inputs = bench.attention_inputs(case, bench.CPU, torch.float32, torch.device("cpu"), queries=queries)
    assert inputs[0].shape[2] == queries < inputs[1].shape[2]
    tol = bench.TOL[torch.float32]
    assert bench.agreement(sdpa_attention, inputs, tol, backward=False)[0]
    passed, detail = bench.agreement(top_left_causal, inputs, tol, backward=False)
    assert not passed, f"a top-left causal mask after cached keys passed: {detail}"


def test_decoding_check_fails_a_kernel_that_sees_later_tokens(bench):
    cpu, tol = torch.device("cpu"), bench.DECODE_TOL[torch.float32]
    err, kernel = bench.decode_error(bench.CPU.decode_model, cpu, torch.float32)
    assert err <= tol and kernel == "sdpa"
    not_causal = Kernel("sdpa", "test: no causal mask")
    not_causal.fn = lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    err, _ = bench.decode_error(bench.CPU.decode_model, cpu, torch.float32, kernel=not_causal)
    assert err > tol, "the full forward of a non-causal kernel matched cached decoding"


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("Some Future GPU", None),
    ],
)
def test_peak_is_looked_up_from_the_device_name(bench, name, peak):
    assert bench.peak_bf16(name) == peak


def test_a_check_that_raises_is_a_fail_that_fails_the_run(bench, capsys):
    results = bench.Results()
    results.check("attn", "fine", lambda: (True, "err 1e-7"))
    results.add("attn", "xformers", "SKIP", "no CUDA device")
    assert not results.failed

    def broken() -> tuple[bool, str]:
        raise RuntimeError("The expanded size of the tensor (1) must match\nmore text")

    results.check("decode", "mha", broken)
    assert results.failed
    assert (
        results.checks[-1]["detail"]
        == "RuntimeError: The expanded size of the tensor (1) must match … more text"
    )
    assert results.summary() == "1 PASS, 1 FAIL, 1 SKIP"
    assert "FAIL  decode" in capsys.readouterr().out


def test_rel_err_is_scale_free(bench):
    want = torch.tensor([1.0, -2.0, 4.0])
    assert bench.rel_err(want * 1000 + 1, want * 1000) == pytest.approx(1 / 4000)
    assert bench.rel_err(want, want) == 0 and not math.isnan(bench.rel_err(want * 0, want * 0))
