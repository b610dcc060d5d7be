"""The shared teacher: what a teacher plugin receives, and the contract it fulfils.

A teacher plugin (entry-point group ``archlab.teacher``) is a class with a ``Config``
dataclass, built as ``cls(cfg, env)`` with the ``TeacherEnv`` below, offering:

    vocab_size: int                        the size of its next-token distribution
    identity() -> dict                     JSON-able; everything that determines its predictions
                                           (config, corpus, weights hash): keys the soft-target cache
    prepare() -> None                      build or load itself (may be slow; idempotent)
    log_probs(tokens: (b, t)) -> (b, t, V) float32 log-probabilities of the next token at every
                                           position, given only the tokens up to that position
                                           (tokens arrive on the CPU; the result may be on any device)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from archlab.data import TokenSplit


@dataclass
class TeacherEnv:
    """What a teacher may use to build itself: the run's corpus split, where to cache its state, and
    the ``train`` service: ``train(cfg, run_dir)`` trains an archlab student from a composed config into
    ``run_dir`` on this split, resuming from its checkpoints there (a teacher never imports the trainer)."""

    split: TokenSplit  # train and validation tokens (memory maps) and their metadata
    vocab_size: int
    context: int
    cache_dir: Path  # a directory the teacher may use for its own state
    device: torch.device
    progress: bool = True
    train: Callable[[DictConfig, Path], None] | None = None

    @property
    def train_tokens(self) -> np.ndarray:
        return self.split.train

    @property
    def corpus_key(self) -> str:
        """Identifies the corpus split (the name of its cache directory)."""
        return Path(self.split.meta["path"]).name


@torch.no_grad()
def student_log_probs(model, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Next-token log-probabilities of an archlab student: (b, t) -> (b, t, V) float32."""
    return torch.log_softmax(model(tokens.to(device)).float(), dim=-1)
