"""Corpus plugins beyond the baselines (entry points in pyproject.toml): hf, local data via ``datasets``.

Kept apart from ``archlab.baselines.corpus`` (stdlib, files: the standard library only) because they need
an optional extra.
"""
