"""What the corpus and soft-target caches share: verified files, one builder at a time, read-only use.

A cache is a directory ``<root>/<key>/`` holding ``meta.json`` and data files whose
sizes and SHA-256 sums the meta records. It is built under the lock
``<root>/<key>.lock`` into ``<root>/.tmp-<key>-*`` and published with
``archlab.durable.publish_dir`` (``publish``); temporary directories of the same key
left by a killed build are removed under the lock. The lock's holder writes its PID to
``<key>.lock.pid`` so that a waiter can say whom it waits for. A cache whose
directory is not writable is used without the lock when it is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from archlab import durable
from archlab.durable import sha256_file
from archlab.errors import NOT_WRITABLE, ArchlabError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Corrupt(Exception):
    """A cache whose meta.json or files cannot be trusted; the message says which and why."""


class _NotWritable(Exception):
    """The cache's directory or lock cannot be created or opened for writing."""


def check_file(file: Path, size: int, sha256: str) -> None:
    """Raise ``Corrupt`` unless ``file`` has ``size`` bytes and that SHA-256."""
    if not file.is_file():
        raise Corrupt(f"{file.name} is missing")
    if (actual := file.stat().st_size) != size:
        raise Corrupt(f"{file.name} has {actual} bytes, meta.json says {size}")
    if sha256_file(file) != sha256:
        raise Corrupt(f"{file.name} does not match its checksum")


def read_meta(path: Path, schema: dict[str, tuple[type, ...]]) -> dict:
    """``path/meta.json``, with every key of ``schema`` of one of its types; ``Corrupt`` if not."""
    try:
        meta = json.loads((path / "meta.json").read_bytes())
    except (OSError, ValueError) as e:  # ValueError: not UTF-8 or not JSON
        raise Corrupt(f"meta.json cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise Corrupt("meta.json is not a JSON object")
    for key, types in schema.items():
        if key not in meta:
            raise Corrupt(f"meta.json has no {key!r}")
        if type(meta[key]) not in types:
            names = "/".join(t.__name__ for t in types)
            raise Corrupt(f"meta.json has {key}={meta[key]!r}, not of type {names}")
    return meta


def make_tmp(path: Path) -> Path:
    """A fresh temporary directory for building the cache ``path`` (removed by the next build if left)."""
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))


def publish(tmp: Path, path: Path) -> None:
    """Publish the finished ``tmp`` as the cache ``path`` (``durable.publish_dir``), replacing a stale
    one: moved aside to ``<tmp>.old`` (which the next build removes, if a crash leaves it), then deleted."""
    old = tmp.with_name(tmp.name + ".old")
    if path.exists():
        os.rename(path, old)
    durable.publish_dir(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _holder(pid_file: Path) -> str:
    try:
        return str(int(pid_file.read_text()))
    except (OSError, ValueError):
        return "unknown"


def _acquire(lock: FileLock, pid_file: Path, what: str, timeout: float | None, timeout_key: str) -> None:
    try:
        lock.acquire(timeout=0)
        return
    except Timeout:
        pass
    log.info("waiting for the %s build held by PID %s (%s)", what, _holder(pid_file), lock.lock_file)
    try:
        lock.acquire(timeout=-1 if timeout is None else timeout)
    except Timeout:
        raise ArchlabError(
            f"gave up after {timeout:g} s waiting for the {what} build held by PID {_holder(pid_file)} "
            f"({lock.lock_file}); wait longer with {timeout_key}=<seconds>"
        ) from None


@contextmanager
def _locked(path: Path, what: str, timeout: float | None, timeout_key: str) -> Iterator[None]:
    pid_file = path.with_name(path.name + ".lock.pid")
    lock = FileLock(path.with_name(path.name + ".lock"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _acquire(lock, pid_file, what, timeout, timeout_key)
    except OSError as e:
        if e.errno not in NOT_WRITABLE:
            raise
        raise _NotWritable(f"{e.filename or path.parent}: {e.strerror}") from e
    try:
        with suppress(OSError):  # only informs waiters
            pid_file.write_text(f"{os.getpid()}\n")
        yield
    finally:
        with suppress(OSError):
            pid_file.unlink(missing_ok=True)
        lock.release()


def _diagnose(problem: Callable[[], str | None]) -> tuple[str | None, bool]:
    """(why the cache cannot be used or None, whether it is corrupt)."""
    try:
        return problem(), False
    except Corrupt as e:
        return str(e), True


def build_once(
    path: Path,
    what: str,
    *,
    problem: Callable[[], str | None],
    build: Callable[[], None],
    load: Callable[[], T],
    timeout: float | None = None,
    timeout_key: str = "",
    label: str | None = None,
) -> T:
    """``load()`` the cache at ``path``, built first under its lock by ``build()`` if it must be.

    ``problem()`` says why the cache cannot be used (None: it can), raising ``Corrupt``
    when it is damaged (logged as a warning, then rebuilt). ``timeout`` (seconds, None:
    forever) bounds the wait for another process's build, named ``timeout_key`` in the error.
    ``what`` names the cache in messages ("the soft-target build"), ``label`` (default: ``what``)
    starts its found/building log lines.
    """
    label = label or what
    try:
        with _locked(path, what, timeout, timeout_key):
            for stale in path.parent.glob(f".tmp-{path.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            reason, corrupt = _diagnose(problem)
            if reason is None:
                log.info("%s: found %s", label, path)
                return load()
            if not os.access(path.parent, os.W_OK):  # its lock file was writable, the directory is not
                raise _NotWritable(f"{path.parent}: not writable")
            if corrupt:
                log.warning("%s cache %s: %s; rebuilding", what, path, reason)
            log.info("%s: building %s (%s)", label, path, reason)
            build()
            return load()
    except _NotWritable as e:
        reason, _ = _diagnose(problem)
        if reason is not None:
            raise ArchlabError(
                f"the {what} cache {path} must be built ({reason}) but is not writable ({e}); "
                f"set data.cache_dir (or the ARCHLAB_CACHE environment variable) to a writable directory"
            ) from None
        log.info("%s: found %s (read-only, used without the lock)", label, path)
        return load()
