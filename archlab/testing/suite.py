"""Running the checks: ``check_plugin`` for scripts and CI, ``PluginSuite`` for pytest (a test per check)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from archlab import registry
from archlab.testing.checks import CHECKS, Case, Check


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: a tiny student only loses time to more (5x on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def requires_plugin(slot: str, name: str) -> Any:
    """A pytest mark that skips a test (or, as ``pytestmark``, a module) unless plugin ``slot=name`` is
    installed: for tests of code that works with any plugin but is exercised with one from elsewhere."""
    import pytest

    return pytest.mark.skipif(
        name not in registry.plugins(slot),
        reason=f"{slot}={name} is not installed (archlab's own: pip install -e ./plugins)",
    )


def applicable(case: Case, *, compile: bool = False) -> list[tuple[Check, str | None]]:
    """Every check with None, or the reason it does not apply to ``case``."""
    out = []
    with one_thread():
        for check in CHECKS:
            skip = "torch.compile check is opt-in (compile_safe = True): tens of seconds per plugin"
            out.append((check, skip if check.slow and not compile else check.applies(case)))
    return out


def run_check(case: Case, check: Check) -> None:
    """Run one check; a failure names the plugin, the slot and the check."""
    try:
        with one_thread():
            check.fn(case)
    except AssertionError as exc:
        raise AssertionError(f"{case.label} fails {check.name}: {exc}") from None


def check_plugin(
    slot: str,
    name: str,
    overrides: tuple[str, ...] = (),
    *,
    expected_failed_checks: Mapping[str, str] | None = None,
    compile: bool = False,
) -> dict[str, str]:
    """Run every applicable check on plugin (or preset) ``slot=name``; returns check -> outcome.

    Raises AssertionError listing every failed check; checks named in ``expected_failed_checks``
    (check -> reason) are run but may fail.
    """
    case, expected = Case(slot, name, tuple(overrides)), dict(expected_failed_checks or {})
    outcomes, failures = {}, []
    for check, skip in applicable(case, compile=compile):
        if skip is not None:
            outcomes[check.name] = f"skipped: {skip}"
            continue
        try:
            run_check(case, check)
            outcomes[check.name] = "passed"
        except AssertionError as exc:
            outcomes[check.name] = (
                f"expected failure: {expected[check.name]}" if check.name in expected else "failed"
            )
            if check.name not in expected:
                failures.append(str(exc))
    if failures:
        raise AssertionError("\n".join(failures))
    return outcomes


def conformance_params(
    case: Case, *, expected_failed_checks: Mapping[str, str] | None = None, compile: bool = False
) -> list[Any]:
    """``pytest.param`` per check (id = check name), skipped or xfail-marked where that applies."""
    import pytest

    expected, params = dict(expected_failed_checks or {}), []
    for check, skip in applicable(case, compile=compile):
        marks = [pytest.mark.archlab_conformance]
        if skip is not None:
            marks.append(pytest.mark.skip(reason=skip))
        if check.slow:
            marks.append(pytest.mark.slow)
        if check.name in expected:
            marks.append(pytest.mark.xfail(reason=expected[check.name], strict=True, raises=AssertionError))
        params.append(pytest.param(case, check, marks=marks, id=check.name))
    return params


class PluginSuite:
    """Base class of a plugin's conformance tests: pytest collects one test per check.

        from archlab.testing import PluginSuite

        class TestGated(PluginSuite):
            slot = "attention"
            name = "gated"

    ``overrides`` adds Hydra overrides for the tiny student (e.g. ``("ffn.n_experts=4",)``);
    ``expected_failed_checks = {"check_kv_cache": "reason, #issue"}`` marks known failures
    (strict xfail: a fixed one fails until removed); ``compile_safe = True`` adds the slow
    torch.compile check. Select one check with ``pytest -k check_causal``.
    """

    slot: ClassVar[str]
    name: ClassVar[str]
    overrides: ClassVar[tuple[str, ...]] = ()
    expected_failed_checks: ClassVar[dict[str, str]] = {}
    compile_safe: ClassVar[bool] = False

    def pytest_generate_tests(self, metafunc: Any) -> None:
        if metafunc.function.__name__ == "test_conformance":
            case = Case(self.slot, self.name, tuple(self.overrides))
            params = conformance_params(
                case, expected_failed_checks=self.expected_failed_checks, compile=self.compile_safe
            )
            metafunc.parametrize(("case", "check"), params)

    def test_conformance(self, case: Case, check: Check) -> None:
        run_check(case, check)
