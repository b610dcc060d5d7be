"""Deprecated: moved to ``archlab.teachers.hf``: this path forwards, warning once, for one release.

Nothing in archlab imports this module (a contract in pyproject.toml); see archlab/deprecation.py.
"""

from __future__ import annotations

from archlab import deprecation
from archlab.teachers import hf as _new

__getattr__ = deprecation.forward(__name__, deprecation.moved_to(_new, ["HFTeacher", "HFTokenizer"]))
