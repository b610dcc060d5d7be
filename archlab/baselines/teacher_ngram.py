"""Deprecated: moved to ``archlab.teachers.ngram``: this path forwards, warning once, for one release.

Nothing in archlab imports this module (a contract in pyproject.toml); see archlab/deprecation.py.
"""

from __future__ import annotations

from archlab import deprecation
from archlab.teachers import ngram as _new

__getattr__ = deprecation.forward(
    __name__,
    deprecation.moved_to(
        _new,
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
)
