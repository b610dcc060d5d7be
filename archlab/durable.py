"""Durable publication of files and directories: write aside, fsync, rename, fsync the parent.

A rename is atomic, but not durable until the directory holding it is flushed: after a
power loss the new name may point at a file whose data never reached the disk. So
every file is fsynced before the rename that publishes it, and the parent directory
after it (the order durable stores use; see e.g. SQLite's "atomic commit" notes).
Temporary directories from ``tempfile.mkdtemp`` are private (mode 0700); what is
published gets the permissions the user's umask allows, so a cache shared by a group
stays readable.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def umask() -> int:
    """The process's umask: read from /proc on Linux; elsewhere by setting and restoring it (which
    another thread creating a file at that instant would see)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (hex)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new, renamed or removed names) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the finished directory ``tmp`` durable and rename it to ``final`` (which must not exist)."""
    mask = umask()
    for file in tmp.iterdir():
        fsync_file(file)
        file.chmod(0o666 & ~mask)
    tmp.chmod(0o777 & ~mask)
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(final.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
