"""archlab.slots: the slot and capability tables, the docs that list them, the protocol checks the core
uses, and a slot added from its table row alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from archlab import api, cli, deprecation, registry, slots

ROOT = Path(__file__).resolve().parents[1]
DOCS, CONFIG = ROOT / "docs" / "plugins.md", ROOT / "conf" / "config.yaml"


def test_docs_carry_the_capability_table_as_generated() -> None:
    text = DOCS.read_text()
    found = re.search(r"<!-- capability-table:[^>]*-->\n(.*?)<!-- /capability-table -->", text, re.S)
    assert found, "docs/plugins.md lost its capability-table markers"
    assert found.group(1) == slots.capability_table(), "regenerate with archlab.slots.capability_table()"


def test_every_capability_is_a_public_protocol() -> None:
    for capability in slots.CAPABILITIES:
        assert getattr(api, capability.name) is capability.protocol
        assert capability.name in api.__all__ and capability.doc


def test_a_flag_must_be_true_and_a_method_present() -> None:
    class Cached(nn.Module):
        supports_kv_cache = True

    class Off(nn.Module):
        supports_kv_cache = False

    class Packs(nn.Module):
        def packed_state(self) -> dict:
            return {}

    assert slots.offers(Cached(), slots.SupportsKVCache) and slots.offers(Cached, slots.SupportsKVCache)
    assert not slots.offers(Off(), slots.SupportsKVCache) and not slots.offers(
        nn.Linear(2, 2), slots.SupportsKVCache
    )
    assert not slots.offers(Packs(), slots.PackedState)  # load_packed_state is missing: not offered
    Packs.load_packed_state = lambda self, state: None
    assert slots.offers(Packs(), slots.PackedState)


def test_only_a_declared_false_is_not_causal() -> None:
    class Reads(nn.Module):
        is_causal = False

    assert not slots.is_causal(Reads()) and slots.is_causal(nn.Linear(2, 2))


def test_docs_carry_the_slot_table_as_generated() -> None:
    found = re.search(r"<!-- slot-table:[^>]*-->\n(.*?)<!-- /slot-table -->", DOCS.read_text(), re.S)
    assert found, "docs/plugins.md lost its slot-table markers"
    assert found.group(1) == slots.slot_table(), "regenerate with archlab.slots.slot_table()"


def test_every_slot_with_a_group_defaults_to_its_baseline() -> None:
    defaults = {}
    for entry in OmegaConf.load(CONFIG).defaults:
        if isinstance(entry, DictConfig):
            defaults.update(entry)
    for s in slots.SLOTS:
        if s.kind != "part":
            assert defaults[s.name] == s.baseline, s.name
            assert s.baseline in registry.plugins(s.name), s.name


GATE = """
    from dataclasses import dataclass

    import torch
    from torch import nn


    class Gate(nn.Module):
        '''y = tanh(g) * x, one learnt gate per channel: the simplest sublayer there is.'''

        @dataclass
        class Config:
            init: float = 0.5

        def __init__(self, cfg, dims, *, linear) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.full((dims.d_model,), cfg.init))

        def forward(self, x, ctx):
            return torch.tanh(self.g) * x
"""


def test_a_new_sublayer_slot_is_a_table_row_and_a_baseline(
    make_dist, monkeypatch, tmp_path: Path, make_trainer, capsys
) -> None:
    """Issue 19's three files: the slot's row (here added for the test), its baseline plugin (here a
    test distribution) and its default (here ``+probe=gate``). It builds, trains and is listed."""
    make_dist("probe-slot", {"archlab.probe": {"gate": "probe_pkg:Gate"}}, {"probe_pkg/__init__.py": GATE})
    row = slots.Slot("probe", "sublayer", slots.SUBLAYER_BUILT, slots.SUBLAYER_CALLED, "gate")
    monkeypatch.setattr(slots, "SLOTS", (*slots.SLOTS, row))
    trainer = make_trainer(tmp_path / "run", "+probe=gate", "probe.init=0.25", "trainer.max_steps=1")
    model = trainer.model
    assert model.sublayer_names[:3] == ["L0.attention", "L0.ffn", "L0.probe"]
    gates = [m for m in model.sublayers if type(m).__name__ == "Gate"]
    assert len(gates) == model.dims.n_layers and float(gates[0].g.detach()[0]) == 0.25
    assert trainer.run()["train/steps"] == 1
    assert float(gates[0].g.detach()[0]) != 0.25  # trained: the gradient reached the new slot
    assert cli.main(["plugins"]) == 0
    listing = capsys.readouterr().out
    assert "probe:" in listing and "gate" in listing and "probe-slot" in listing


def test_moved_names_still_work_with_a_warning_and_removed_ones_say_what_replaces_them() -> None:
    deprecation.warned.discard("archlab.registry.MODEL_SLOTS")  # it warns once a process
    with pytest.warns(DeprecationWarning, match=r"archlab.slots.names\('sublayer', 'model'\)"):
        assert slots.names("sublayer", "model") == registry.MODEL_SLOTS
    ctx = api.ForwardContext(torch.arange(2), lambda x, p: x, lambda q, k, v: q)
    with pytest.raises(AttributeError, match="aux_loss"):
        ctx.targets  # noqa: B018
