"""pytest plugin of archlab (entry point ``pytest11``): registers the conformance suite's markers.

Imports nothing heavy, so it adds nothing to a test run that does not use the suite.
``-m archlab_conformance`` selects (``-m "not archlab_conformance"`` drops) every
conformance check; the torch.compile check also carries ``slow``.
"""

from __future__ import annotations

from typing import Any


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "archlab_conformance: a check of archlab's plugin conformance suite")
    config.addinivalue_line(
        "markers", "slow: long-running tests (archlab: the torch.compile conformance check)"
    )
