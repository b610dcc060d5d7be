"""The run's tokens: its tokenizer (bytes, a learnt BPE, or the one its teacher brings) and its corpus
tokenised, split and cached (``archlab.data``), as the ``corpus``, ``tokenizer`` and ``data`` sections say."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from archlab import bpe, registry
from archlab.bpe import BPETokenizerConfig
from archlab.config import tokenizer_config
from archlab.data import TokenSplit, build_split
from archlab.errors import ConfigError
from archlab.slots import BringsTokenizer, offers
from archlab.tokenizer import ByteTokenizer, Tokenizer, TokenizerRecipe

log = logging.getLogger(__name__)


def tokenizer_for(cfg: DictConfig) -> Tokenizer | TokenizerRecipe:
    """The ``tokenizer`` section's: bytes, or a BPE (its recipe until trained, archlab.bpe); a teacher
    that brings its own tokenizer (``tokenizer(cfg)``) imposes it, with ``tokenizer=bytes`` only."""
    spec = tokenizer_config(cfg)
    if cfg.teacher.plugin != "none":
        teacher_cls, teacher_cfg = registry.configured("teacher", cfg.teacher)
        if offers(teacher_cls, BringsTokenizer):
            if spec.kind != ByteTokenizer.name:
                allowed = (
                    f"bytes (the default) with teacher={cfg.teacher.plugin}: the student takes its tokenizer"
                )
                raise ConfigError("tokenizer", spec.kind, allowed)
            return teacher_cls.tokenizer(teacher_cfg)
    return bpe.from_config(spec) if isinstance(spec, BPETokenizerConfig) else ByteTokenizer()


def run_tokenizer(cfg: DictConfig) -> Tokenizer:
    """The tokenizer a trained run's saved config names (``tokenizer.path`` for a learnt BPE)."""
    tokenizer = tokenizer_for(cfg)
    if isinstance(tokenizer, TokenizerRecipe):
        raise ConfigError("tokenizer.path", None, "the tokenizer.json the run learnt (its config records it)")
    return tokenizer


def load_split(cfg: DictConfig) -> TokenSplit:
    """The run's corpus, tokenised, split and cached as its ``corpus``, ``tokenizer`` and ``data`` say.

    Tokens are bytes unless ``tokenizer=bpe`` or the teacher brings a tokenizer; then the student's
    ``model.vocab_size`` becomes that tokenizer's vocabulary, and a BPE learnt here is recorded as
    ``tokenizer.path`` so that the run's saved config finds it (generate, sample-corpus, export).
    """
    corpus_cls, corpus_cfg = registry.configured("corpus", cfg.corpus)
    tokenizer = tokenizer_for(cfg)
    if tokenizer.name == ByteTokenizer.name and cfg.model.vocab_size < ByteTokenizer.vocab_size:
        allowed = f"at least the vocabulary of the bytes tokenizer ({ByteTokenizer.vocab_size})"
        raise ConfigError("model.vocab_size", cfg.model.vocab_size, allowed)
    d = cfg.data
    split = build_split(
        corpus_cls(corpus_cfg),
        val_fraction=d.val_fraction,
        max_bytes=d.max_bytes,
        cache_dir=d.cache_dir,
        tokenizer=tokenizer,
    )
    learnt = split.tokenizer
    with open_dict(cfg):
        if isinstance(tokenizer, TokenizerRecipe):
            cfg.tokenizer.path = str(learnt.path)
        if learnt.name != ByteTokenizer.name and cfg.model.vocab_size != learnt.vocab_size:
            log.info(
                "model.vocab_size set to %d, the %s tokenizer's vocabulary", learnt.vocab_size, learnt.name
            )
            cfg.model.vocab_size = learnt.vocab_size
    return split
