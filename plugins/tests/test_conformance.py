"""archlab's conformance suite on every first-party plugin: the core baselines (distribution ``archlab``)
and ``archlab-plugins``, discovered from the registry, so a plugin added to either is covered with no
new test code. One test per (plugin, check): ``pytest -k "moe and check_causal"``.

torch.compile costs ~35 s per student on 2 shared CPU cores, so it runs once, slow-marked, on the
student of every slot's default plugin; a plugin opts in with ``compile_safe = True`` in its own suite.
"""

from __future__ import annotations

import pytest

from archlab import registry, slots
from archlab.testing import Case
from archlab.testing.checks import check_compiles
from archlab.testing.suite import conformance_params, run_check

FIRST_PARTY = ("archlab", "archlab-plugins")
#: Known failures, (slot, name) -> {check: reason}; each is a strict xfail, so a fix shows up.
EXPECTED_FAILURES: dict[tuple[str, str], dict[str, str]] = {}


def first_party_cases() -> list[Case]:
    cases = []
    for slot in slots.names("sublayer", "model"):
        for name, plugin in sorted(registry.plugins(slot).items()):
            dist = plugin.entry_point.dist
            if dist is not None and dist.name in FIRST_PARTY:
                cases.append(Case(slot, name))
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.function.__name__ == "test_conformance":
        params = []
        for case in first_party_cases():
            expected = EXPECTED_FAILURES.get((case.slot, case.name))
            for param in conformance_params(case, expected_failed_checks=expected):
                params.append(pytest.param(*param.values, marks=param.marks, id=f"{case.label}-{param.id}"))
        metafunc.parametrize(("case", "check"), params)


def test_conformance(case: Case, check) -> None:
    run_check(case, check)


def test_every_model_slot_has_a_first_party_plugin() -> None:
    covered = {case.slot for case in first_party_cases()}
    assert covered == set(slots.names("sublayer", "model"))


@pytest.mark.slow
def test_default_student_compiles() -> None:
    check_compiles(Case("attention", "mha"))  # every slot at its default plugin
