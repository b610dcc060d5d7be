"""Errors that the CLI prints as one clear line instead of a traceback, and its exit codes.

Exit codes of every ``archlab`` command: 0 done; 1 a crash (an unexpected exception, with its
traceback); 2 bad input (``ArchlabError``: a config value, a file, a flag); 3 a run that started
and failed (``RunFailedError``: it diverged, a study stage failed); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import errno
import importlib
from pathlib import Path

#: ``OSError.errno`` of a directory that cannot be written (permissions, a read-only file system).
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

EXIT_CRASH, EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 1, 2, 3, 130


class ArchlabError(Exception):
    """Base of every error archlab reports to a user; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_BAD_INPUT


class RunFailedError(ArchlabError):
    """A run that was set up correctly and then failed (diverged, a study stage exited non-zero)."""

    exit_code = EXIT_RUN_FAILED


class ConfigError(ArchlabError, ValueError):
    """A config value that is not allowed: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: expected {allowed}")


class PluginError(ArchlabError):
    """A plugin that cannot be loaded or two plugins claiming the same name."""


class CorpusError(ArchlabError):
    """A corpus that cannot be read or holds no text."""


class NonFiniteLossError(RunFailedError):
    """Training produced a NaN or Inf loss; the last good checkpoint is kept."""


def check_out(path: Path, *, directory: bool, key: str = "--out") -> Path:
    """``path`` as where a command writes: a ``ConfigError`` if it is a file where a directory goes (or
    the reverse), or lies under a file."""
    path = path.expanduser()
    if path.exists() and path.is_dir() != directory:
        raise ConfigError(
            key, str(path), "a directory, not a file" if directory else "a file path, not a directory"
        )
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(key, str(path), f"a path that is not under a file ({blocker} is one)")
    return path


def optional_module(module: str, key: str, value: object, extra: str):
    """``module`` imported, or a ConfigError for ``key=value`` saying which archlab extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(key, value, f"{module} installed: pip install 'archlab[{extra}]'") from None
