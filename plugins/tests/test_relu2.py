"""ffn=relu2 (Primer squared ReLU) against its equation, and found through its entry point."""

from __future__ import annotations

import torch
from archlab_plugins.ffn.relu2 import ReLU2

from archlab import registry
from archlab.baselines.linear import DenseLinear
from archlab.config import compose
from archlab.context import ModelDims
from archlab.model import Choice, LinearFactory, build_student


def test_discovered_through_its_entry_point() -> None:
    plugin = registry.plugins("ffn")["relu2"]
    assert plugin.distribution.startswith("archlab-plugins ")
    assert plugin.load() is ReLU2


def test_matches_squared_relu_equation() -> None:
    dims = ModelDims(d_model=16, n_layers=1, n_heads=2, context=8)
    linear = LinearFactory(Choice(DenseLinear, DenseLinear.Config()), {}, n_layers=1)
    ffn = ReLU2(ReLU2.Config(hidden_mult=3.0), dims, linear=linear)
    x = torch.randn(2, 5, 16)
    hidden = x @ ffn.up.weight.T
    expected = torch.where(hidden > 0, hidden * hidden, 0.0) @ ffn.down.weight.T
    assert ffn.up.weight.shape == (48, 16)
    torch.testing.assert_close(ffn(x, None), expected, atol=1e-6, rtol=1e-5)


def test_preset_from_the_plugin_package_composes() -> None:
    cfg = compose(["ffn=relu2_wide", "model.d_model=16", "model.n_heads=2", "model.n_layers=1"])
    assert cfg.ffn.plugin == "relu2" and cfg.ffn.hidden_mult == 6.0
    assert build_student(cfg).sublayers[1].up.weight.shape == (96, 16)
