"""Corpus slot: ``stdlib`` (the running interpreter's standard library) and ``files`` (local text).

A corpus plugin yields ``(document_id, bytes)`` pairs in a deterministic order;
the core tokenises (bytes by default), splits by document and caches the result
(see ``archlab.data``).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from archlab.errors import CorpusError

Document = tuple[str, bytes]


def _read_text_files(paths: list[Path], root: Path | None) -> Iterator[Document]:
    """Files in sorted order, skipping binaries (a NUL byte) and empty files."""
    for path in sorted(paths):
        data = path.read_bytes()
        if data and b"\x00" not in data:
            yield (str(path.relative_to(root)) if root else str(path)), data


class StdlibCorpus:
    """The Python standard library's sources and text files: real code and prose on every machine.

    ``suffixes`` picks the files (.py modules with their docstrings, .txt/.rst docs);
    site-packages is excluded so the corpus does not depend on what is installed.
    """

    @dataclass
    class Config:
        suffixes: list[str] = field(default_factory=lambda: [".py", ".txt", ".rst"])

    def __init__(self, cfg: Config) -> None:
        self.root = Path(sysconfig.get_paths()["stdlib"])
        self.suffixes = set(cfg.suffixes)

    def describe(self) -> str:
        return f"Python standard library at {self.root} ({', '.join(sorted(self.suffixes))})"

    def documents(self) -> Iterator[Document]:
        files = []
        for folder, subfolders, names in os.walk(self.root):
            subfolders[:] = [s for s in subfolders if s not in ("site-packages", "__pycache__")]  # not walked
            files += [Path(folder, n) for n in names if Path(n).suffix in self.suffixes]
        return _read_text_files([p for p in files if p.is_file()], self.root)


class FilesCorpus:
    """Local text: each entry of ``paths`` is a file, a folder (read recursively) or a glob."""

    @dataclass
    class Config:
        paths: list[str] = field(default_factory=list)

    def __init__(self, cfg: Config) -> None:
        if not cfg.paths:
            raise CorpusError("corpus.paths is empty: give files, folders or globs of text")
        self.paths = list(cfg.paths)

    def describe(self) -> str:
        return f"local files {self.paths}"

    def documents(self) -> Iterator[Document]:
        files: set[Path] = set()
        for entry in self.paths:
            matches = [Path(m) for m in glob.glob(str(Path(entry).expanduser()), recursive=True)]
            if not matches:
                raise CorpusError(f"corpus.paths: {entry!r} matches no file or folder")
            for match in matches:
                if match.is_dir():
                    files.update(p for p in match.rglob("*") if p.is_file())
                else:
                    files.add(match)
        return _read_text_files(sorted(p.resolve() for p in files), None)
