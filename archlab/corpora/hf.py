"""Corpus ``hf``: local data sets read with Hugging Face ``datasets`` (JSON lines, Parquet, CSV, text, or
a directory written by ``save_to_disk``).

``corpus.data_files`` lists files or globs, read with ``load_dataset(format, data_files=..., split=...)``,
or names one ``save_to_disk`` directory, read with ``load_from_disk``; nothing is fetched from a hub.
Each row's ``text_field`` is one document. ``streaming=true`` iterates the files without converting
them to Arrow first (``datasets``' own cache), so data larger than memory or disk-cache stays where
it is; the core tokenises document by document, and both ways yield the same documents.

A document's id is the SHA-256 of its text, so the train/validation split of a document depends on
its content alone (it survives renamed, reordered or concatenated files, and duplicates share a
split), and the corpus cache, keyed by every document's id and content, rebuilds when any file's
text changes, never because a file was renamed. Rows whose text is empty, null or holds a NUL
(the byte tokenizer's end of document) are skipped, as binaries are by ``corpus=files``.
Requires the ``hf`` extra: ``pip install 'archlab[hf]'``.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from archlab.errors import ConfigError, optional_module

Document = tuple[str, bytes]
#: ``load_dataset`` builders by file suffix (``format=auto``); ``disk`` is a ``save_to_disk`` directory.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
FORMATS = ("auto", "json", "parquet", "csv", "text", "disk")
SAMPLE_BY = ("document", "paragraph", "line")
READ_BATCH = 1000  # rows read per Arrow batch


def _datasets():
    return optional_module("datasets", "corpus", "hf", "hf")


def _expand(entries: list[str]) -> list[Path]:
    """Every file or directory the entries (paths or globs) name, in sorted order."""
    if not entries:
        raise ConfigError("corpus.data_files", entries, "files or globs of data, or a save_to_disk directory")
    found: list[Path] = []
    for entry in entries:
        matches = sorted(Path(m) for m in glob.glob(str(Path(entry).expanduser()), recursive=True))
        if not matches:
            raise ConfigError("corpus.data_files", entry, "an existing file, glob or save_to_disk directory")
        found += [m.resolve() for m in matches]
    return found


def _format(fmt: str, paths: list[Path]) -> str:
    """The builder for ``paths``: ``fmt``, or for ``auto`` the one their suffixes (or a directory) say."""
    if fmt not in FORMATS:
        raise ConfigError("corpus.format", fmt, ", ".join(FORMATS))
    is_dir = [p.is_dir() for p in paths]
    if any(is_dir) and (fmt not in ("auto", "disk") or len(paths) > 1):
        allowed = "files (a directory only as the one save_to_disk directory, with format auto or disk)"
        raise ConfigError("corpus.data_files", [str(p) for p in paths], allowed)
    if fmt == "disk" and not all(is_dir):
        raise ConfigError("corpus.data_files", [str(p) for p in paths], "one save_to_disk directory")
    if fmt != "auto":
        return fmt
    if all(is_dir):
        return "disk"
    builders = {BUILDERS.get(p.suffix.lower()) for p in paths}
    if len(builders) != 1 or None in builders:
        suffixes = sorted({p.suffix or "(none)" for p in paths})
        allowed = f"corpus.format set to one of {', '.join(FORMATS[1:])} (files with suffixes {suffixes})"
        raise ConfigError("corpus.format", "auto", allowed)
    return builders.pop()


class HFCorpus:
    """Documents from a local data set, one per row's ``text_field``, read with ``datasets``."""

    @dataclass
    class Config:
        data_files: list[str] = field(default_factory=list)  # files or globs, or one save_to_disk directory
        format: str = "auto"  # auto (by suffix) | json | parquet | csv | text | disk
        text_field: str = "text"  # the column holding each document's text
        split: str = "train"  # load_dataset's split (slices such as train[:1000] too); disk: a DatasetDict's
        max_documents: int | None = None  # read at most this many documents (null: all)
        streaming: bool = False  # iterate the files instead of converting them to Arrow first
        sample_by: str = "document"  # format=text: one document per file, per paragraph or per line

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.paths = _expand(list(cfg.data_files))
        self.format = _format(cfg.format, self.paths)
        if cfg.max_documents is not None and cfg.max_documents < 1:
            raise ConfigError("corpus.max_documents", cfg.max_documents, "a positive integer or null")
        if cfg.sample_by not in SAMPLE_BY:
            raise ConfigError("corpus.sample_by", cfg.sample_by, ", ".join(SAMPLE_BY))

    def describe(self) -> str:
        files = ", ".join(p.name for p in self.paths[:3]) + (", ..." if len(self.paths) > 3 else "")
        how = "streamed" if self.cfg.streaming else "loaded"
        c = self.cfg
        return f"datasets {self.format} [{files}] split {c.split!r}, field {c.text_field!r} ({how})"

    def _load(self):
        """The ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of the configured split."""
        datasets, c = _datasets(), self.cfg
        if self.format == "disk":
            loaded = datasets.load_from_disk(str(self.paths[0]))
            if isinstance(loaded, datasets.DatasetDict):
                if c.split not in loaded:
                    raise ConfigError("corpus.split", c.split, f"a split of the data: {', '.join(loaded)}")
                loaded = loaded[c.split]
            return loaded.to_iterable_dataset() if c.streaming else loaded
        options = {"sample_by": c.sample_by} if self.format == "text" else {}
        files = [str(p) for p in self.paths]
        try:
            return datasets.load_dataset(
                self.format, data_files=files, split=c.split, streaming=c.streaming, **options
            )
        except ValueError as exc:  # an unknown split, or a bad slice of one
            if "split" not in str(exc).lower():
                raise
            raise ConfigError("corpus.split", c.split, f"a split of the data ({exc})") from None

    def _texts(self, data) -> Iterator[object]:
        """The ``text_field`` of every row; a missing field lists the fields there are."""
        c = self.cfg
        columns = data.column_names
        if columns is None:  # a stream whose features are unknown until read: the first row has them
            columns = list(next(iter(data), {}))
        if c.text_field not in columns:
            raise ConfigError("corpus.text_field", c.text_field, f"a field of the data: {', '.join(columns)}")
        total = getattr(data, "num_rows", None)
        with tqdm(desc="reading corpus", unit="doc", total=total, leave=False, disable=None) as rows:
            for batch in data.select_columns([c.text_field]).iter(batch_size=READ_BATCH):
                rows.update(len(batch[c.text_field]))
                yield from batch[c.text_field]

    def documents(self) -> Iterator[Document]:
        c, n = self.cfg, 0
        for i, text in enumerate(self._texts(self._load())):
            if text is not None and not isinstance(text, str):
                allowed = f"a field of strings (row {i} holds {type(text).__name__})"
                raise ConfigError("corpus.text_field", c.text_field, allowed)
            data = (text or "").encode("utf-8")
            if not data or b"\x00" in data:
                continue
            yield hashlib.sha256(data).hexdigest(), data
            n += 1
            if n == c.max_documents:
                return
