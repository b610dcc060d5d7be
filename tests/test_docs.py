"""The docs site: every public API name has a docstring, and ``mkdocs build --strict`` succeeds.

The API page (docs/api.md) is rendered by mkdocstrings from ``archlab.api``, which reads the source
statically with griffe; the check below asks griffe too, so a name that would render without a
docstring fails here (an attribute's docstring is the string literal right after its assignment).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import archlab.api

ROOT = Path(__file__).resolve().parents[1]

griffe = pytest.importorskip("griffe", reason="the docs extra: pip install -e '.[docs]'")


def undocumented(module: str, names: list[str]) -> list[str]:
    """The names of ``module`` whose object, followed through imports, has no docstring."""
    loaded = griffe.load(module, search_paths=[str(ROOT)], resolve_aliases=True)
    return [name for name in names if not (loaded[name].docstring and loaded[name].docstring.value.strip())]


def test_every_api_name_has_a_docstring():
    missing = undocumented("archlab.api", list(archlab.api.__all__))
    assert not missing, f"archlab.api names without a docstring (the API page needs one): {missing}"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """A broken link, a missing page, a missing anchor or a failing ``--help`` fails the build."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or pytest.skip("no mkdocs")
    out = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-4000:]
    api_page = (tmp_path / "site" / "api" / "index.html").read_text()
    unrendered = [name for name in archlab.api.__all__ if f'id="archlab.api.{name}"' not in api_page]
    assert not unrendered, f"names of archlab.api.__all__ missing from the API page: {unrendered}"


def test_the_readme_is_a_front_door_whose_links_all_resolve():
    """Issue 23: at most 250 lines, and every relative link or image points at a file of the checkout."""
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local, "the README links to its docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
