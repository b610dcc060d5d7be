"""Paths that moved keep working for one release (issue 19): each old ``from module import name``
gives the new object and warns once, naming the replacement (archlab/deprecation.py; the list is
docs/plugins.md's)."""

from __future__ import annotations

import importlib
import warnings

import pytest

from archlab import deprecation, slots

#: (old module, new module, names): the teachers moved from archlab/baselines/ to archlab/teachers/.
MOVED = [
    ("archlab.baselines.teacher_hf", "archlab.teachers.hf", ["HFTeacher", "HFTokenizer"]),
    (
        "archlab.baselines.teacher_model",
        "archlab.teachers.trained",
        ["TrainedTeacher", "SelfTeacher", "DEFAULT_OVERRIDES"],
    ),
    (
        "archlab.baselines.teacher_ngram",
        "archlab.teachers.ngram",
        [
            "NGramTeacher",
            "VOCAB",
            "MAX_ORDER",
            "KENLM_FALLBACK",
            "ROWS_PER_CHUNK",
            "gram_codes",
            "estimate_discounts",
            "interpolation_level",
            "group_by_context",
            "count_orders",
            "interpolate",
        ],
    ),
]
CASES = [(old, name, new) for old, new, names in MOVED for name in names]

#: archlab.registry's slot tuples, now kinds of slot in archlab.slots.
SLOT_TUPLES = {
    "MODEL_SLOTS": ("sublayer", "model"),
    "PIPELINE_SLOTS": ("pipeline",),
    "SLOTS": ("sublayer", "model", "pipeline"),
    "PART_SLOTS": ("part",),
}


@pytest.fixture
def first_access(request):
    """Forget that ``old.name`` warned (an earlier test may have used it), before and after."""
    old, name = request.param[:2]
    deprecation.warned.discard(f"{old}.{name}")
    yield request.param
    deprecation.warned.discard(f"{old}.{name}")


def deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("first_access", CASES, ids=[f"{o}.{n}" for o, n, _ in CASES], indirect=True)
def test_a_moved_name_forwards_and_warns_once(first_access) -> None:
    old, name, new = first_access
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"from {old} import {name} as found", namespace)
    assert namespace["found"] is getattr(importlib.import_module(new), name)
    assert deprecations(caught) == [
        f"{old}.{name} is deprecated; use {new}.{name} (removed in the next release)"
    ]
    assert caught[0].filename == "<string>"  # points at the importing line, not at archlab
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        exec(f"from {old} import {name} as found", namespace)
        assert getattr(importlib.import_module(old), name) is namespace["found"]
    assert deprecations(again) == []


@pytest.mark.parametrize(
    "first_access",
    [("archlab.registry", name, kinds) for name, kinds in SLOT_TUPLES.items()],
    ids=list(SLOT_TUPLES),
    indirect=True,
)
def test_a_slot_tuple_of_the_registry_forwards_and_warns_once(first_access) -> None:
    _, name, kinds = first_access
    from archlab import registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert getattr(registry, name) == slots.names(*kinds)
        assert getattr(registry, name) == slots.names(*kinds)
    replacement = f"archlab.slots.names({', '.join(repr(k) for k in kinds)})"
    assert deprecations(caught) == [
        f"archlab.registry.{name} is deprecated; use {replacement} (removed in the next release)"
    ]


def test_an_unknown_name_of_a_deprecated_path_is_an_import_error() -> None:
    with pytest.raises(ImportError, match="NoSuchTeacher"):
        exec("from archlab.baselines.teacher_ngram import NoSuchTeacher", {})
