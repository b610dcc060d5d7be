"""Errors that the CLI prints as one clear line instead of a traceback."""

from __future__ import annotations


class ArchlabError(Exception):
    """Base of every error archlab reports to a user."""


class ConfigError(ArchlabError, ValueError):
    """A config value that is not allowed: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r} is not allowed: expected {allowed}")


class PluginError(ArchlabError):
    """A plugin that cannot be loaded or two plugins claiming the same name."""


class CorpusError(ArchlabError):
    """A corpus that cannot be read or holds no text."""


class NonFiniteLossError(ArchlabError):
    """Training produced a NaN or Inf loss; the last good checkpoint is kept."""
