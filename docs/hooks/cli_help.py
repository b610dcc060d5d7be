"""MkDocs hook: ``<!-- archlab-help: COMMAND -->`` in a page becomes that command's ``--help`` text.

The CLI reference is generated at build time from the parsers themselves (``archlab.cli.main``, the
same entry point as the ``archlab`` script), so a new flag or command cannot be missing from the docs.
Hooks: https://www.mkdocs.org/user-guide/configuration/#hooks
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from functools import cache

MARKER = re.compile(r"<!-- archlab-help: ?(?P<command>[\w -]*?) ?-->")


@cache
def help_text(command: str) -> str:
    """What ``archlab COMMAND --help`` prints (``archlab --help`` for an empty command)."""
    from archlab.cli import main

    argv, out = [*command.split(), "--help"], io.StringIO()
    saved = sys.argv[:]  # `archlab train` hands sys.argv to Hydra
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    except SystemExit as exc:  # argparse's --help exits 0
        code = exc.code
    finally:
        sys.argv = saved
    text = out.getvalue().strip()
    if code or not text:
        raise RuntimeError(f"`archlab {command} --help` exited {code} and printed {len(text)} characters")
    return text


def on_page_markdown(markdown: str, **_: object) -> str:
    """Replace every marker with a ``text`` block of the command's help."""
    return MARKER.sub(lambda m: f"```text\n{help_text(m['command'])}\n```", markdown)
