"""archlab.api, the plugin authors' surface: every promised name exists, and its shared building
blocks agree with the equations written out."""

from __future__ import annotations

import math

import torch

from archlab import api


def test_every_promised_name_is_there() -> None:
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing and isinstance(api.API_VERSION, int)


def test_causal_mask_is_bottom_right_aligned() -> None:
    for t_q, t_k in ((4, 4), (1, 5), (3, 7)):
        expected = torch.tensor([[j <= t_k - t_q + i for j in range(t_k)] for i in range(t_q)])
        assert torch.equal(api.causal_mask(t_q, t_k), expected)


def test_rotary_scores_depend_only_on_the_position_difference() -> None:
    """RoFormer eq. 16: <R(m) q, R(n) k> is a function of m - n."""
    cos, sin = api.rope_tables(8, 32, 10000.0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        rq = api.apply_rotary(q, cos[m].double(), sin[m].double())
        rk = api.apply_rotary(k, cos[n].double(), sin[n].double())
        return float(rq @ rk)

    assert abs(score(5, 2) - score(20, 17)) < 1e-5 and abs(score(0, 0) - float(q @ k)) < 1e-6
    angle = 3 * 10000.0 ** (-2 * 1 / 8)  # pair (1, 5) at position 3 turns by 3·θ^(−2/8)
    assert abs(float(cos[3, 1]) - math.cos(angle)) < 1e-6
