"""archlab.slots: the capability table, the docs that list it, and the protocol checks the core uses."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from archlab import api, slots

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


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
