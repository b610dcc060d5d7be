"""Errors a plugin author meets point at the fix: a wrong entry point, a missing Config dataclass,
a constructor or forward that does not match its slot's call, and an exception inside forward
(which then names the slot, the plugin and the sublayer)."""

from __future__ import annotations

import pytest
import torch

from archlab import registry
from archlab.config import compose
from archlab.errors import PluginError
from archlab.model import build_student

TINY = ["model.d_model=16", "model.n_heads=2", "model.n_layers=2", "model.context=16"]
HINT = 'check [project.entry-points."archlab.ffn"] in your pyproject.toml'
FFN = """
from dataclasses import dataclass
from torch import nn


class {name}(nn.Module):
    @dataclass
    class Config:
        pass

    def __init__(self, cfg, dims{init_extra}) -> None:
        super().__init__()
        self.proj = nn.Linear(dims.d_model, dims.d_model)

    def forward(self, x{forward_extra}):
        {body}
"""


def ffn_source(
    name: str = "Ffn",
    init_extra: str = ", *, linear",
    forward_extra: str = ", ctx",
    body: str = "return self.proj(x)",
) -> str:
    return FFN.format(name=name, init_extra=init_extra, forward_extra=forward_extra, body=body)


def install_ffn(make_dist, name: str, value: str, source: str = "") -> None:
    files = {f"{name}_pkg/__init__.py": "", f"{name}_pkg/mod.py": source or ffn_source()}
    make_dist(f"{name}-dist", {"archlab.ffn": {name: value}}, files)


@pytest.mark.parametrize(
    ("value", "kind"), [("missing_pkg.nowhere:Ffn", "module"), ("{name}_pkg.mod:Fnf", "class")]
)
def test_entry_point_naming_nothing_points_at_pyproject(make_dist, value: str, kind: str) -> None:
    install_ffn(make_dist, "typo", value.format(name="typo"))
    error = registry.plugins("ffn")["typo"].error
    assert f"names a {kind} that does not exist" in error and HINT in error, error


def test_missing_dependency_of_the_plugin_is_not_blamed_on_the_entry_point(make_dist) -> None:
    install_ffn(make_dist, "needy", "needy_pkg.mod:Ffn", "import not_installed_dep\n")
    error = registry.plugins("ffn")["needy"].error
    assert "not_installed_dep" in error and HINT not in error, error


def test_config_that_is_not_a_dataclass_says_so(make_dist) -> None:
    source = ffn_source().replace("    @dataclass\n", "")
    install_ffn(make_dist, "plain", "plain_pkg.mod:Ffn", source)
    error = registry.plugins("ffn")["plain"].error
    assert "not decorated with @dataclass" in error and "nested @dataclass named Config" in error, error


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            ffn_source(init_extra=""),
            r"ffn=bad \(bad_pkg.mod:Ffn\) cannot be built: the core calls Ffn\(.*linear=",
        ),
        (
            ffn_source(forward_extra=""),
            r"ffn=bad \(bad_pkg.mod:Ffn\) has forward\(x\); the core calls forward\(x",
        ),
    ],
    ids=["constructor", "forward"],
)
def test_signature_that_does_not_match_the_slot_is_refused_at_build(
    make_dist, source: str, expected: str
) -> None:
    install_ffn(make_dist, "bad", "bad_pkg.mod:Ffn", source)
    with pytest.raises(PluginError, match=expected) as info:
        build_student(compose([*TINY, "ffn=bad"]))
    assert "docs/plugins.md" in str(info.value)


def test_exception_inside_forward_names_slot_plugin_and_sublayer(make_dist) -> None:
    install_ffn(make_dist, "boom", "boom_pkg.mod:Ffn", ffn_source(body="raise RuntimeError('kaput')"))
    model = build_student(compose([*TINY, "ffn=boom"]))
    with pytest.raises(RuntimeError, match="kaput") as info:
        model(torch.zeros(1, 4, dtype=torch.long))
    (note,) = info.value.__notes__
    assert note.startswith("archlab: raised in sublayer L0.ffn, running ffn=boom (boom_pkg.mod:Ffn)"), note
    assert "norm=rmsnorm" in note and "residual=prenorm" in note
