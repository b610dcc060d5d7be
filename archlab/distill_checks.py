"""The checks of on-policy distillation and of the in-context teacher that run before training
(``archlab.config.validate``), apart from the modules that build them (``archlab.onpolicy``,
``archlab.incontext``), so validating a config imports no trainer, checkpoint or teacher code."""

from __future__ import annotations

from omegaconf import DictConfig

from archlab.context import ModelDims
from archlab.errors import ConfigError

UPDATES = ("frozen", "ema")
CONTEXTS = ("none", "same_doc", "corpus")


def sample_tokens(cfg: DictConfig) -> int:
    """Tokens sampled after each prompt: ``distill.sample_tokens``, or up to the context when 0."""
    return cfg.distill.sample_tokens or cfg.model.context - cfg.distill.prompt_len


def wants_in_context(teacher: DictConfig) -> bool:
    """Whether the ``teacher`` config asks for the in-context teacher: ``teacher=self`` with no
    checkpoint (the student itself), an EMA update or a privileged context. (``teacher["update"]``:
    on a DictConfig, ``.update`` is its dict method.)"""
    return teacher.plugin == "self" and (
        not teacher.checkpoint or teacher["update"] != "frozen" or teacher.context != "none"
    )


def validate_on_policy(cfg: DictConfig, dims: ModelDims, objective: type) -> None:
    """The checks an on-policy run needs before training (``archlab.config.validate``)."""
    lam = cfg.distill.on_policy
    if cfg.teacher.plugin == "none" or not objective.needs_teacher:
        raise ConfigError("distill.on_policy", lam, "0 unless a teacher and a kd objective are configured")
    if cfg.distill.prompt_len >= dims.context:
        raise ConfigError(
            "distill.prompt_len", cfg.distill.prompt_len, f"fewer than model.context={dims.context}"
        )
    room = dims.context - cfg.distill.prompt_len
    if sample_tokens(cfg) > room:
        raise ConfigError(
            "distill.sample_tokens", cfg.distill.sample_tokens, f"at most {room} (context − prompt)"
        )


def validate_in_context(cfg: DictConfig, dims: ModelDims, n_new: int) -> None:
    """The checks of ``teacher=self``'s in-context options before training (``archlab.config.validate``);
    ``n_new``: the tokens sampled after each prompt (``archlab.onpolicy.sample_tokens``)."""
    t = cfg.teacher
    if t.plugin != "self":
        return
    checks = (
        ("update", t["update"] in UPDATES, "frozen or ema"),
        ("ema_decay", 0.0 <= t.ema_decay < 1.0, "a number in [0, 1) (0: the student's current weights)"),
        ("context", t.context in CONTEXTS, "none, same_doc or corpus"),
        ("context_len", t.context_len >= 1, "a positive number of tokens"),
    )
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"teacher.{key}", t[key], allowed)
    if t.context == "corpus" and not t.context_paths:
        allowed = "files, folders or globs of text (teacher.context=corpus)"
        raise ConfigError("teacher.context_paths", [], allowed)
    if not wants_in_context(t):
        return
    lam, only = cfg.distill.on_policy, "unless distill.on_policy=1 (in-context: it scores samples only)"
    if not t.checkpoint and lam != 1:
        raise ConfigError(
            "teacher.checkpoint",
            "",
            "the run or checkpoint dir of the teacher; empty only with "
            "distill.on_policy=1, where the student at step 0 is the teacher",
        )
    if t["update"] != "frozen" and lam != 1:
        raise ConfigError("teacher.update", t["update"], f"frozen {only}")
    if t.context != "none" and lam != 1:
        raise ConfigError("teacher.context", t.context, f"none {only}")
    if cfg.trainer.parallel != "none":
        raise ConfigError("trainer.parallel", cfg.trainer.parallel, "none with the in-context teacher")
    prompt = cfg.distill.prompt_len
    room = dims.context - prompt - n_new + 1
    if t.context != "none" and t.context_len > room:
        raise ConfigError(
            "teacher.context_len",
            t.context_len,
            f"at most {room}: context + prompt ({prompt}) + samples ({n_new}) − 1 must fit "
            f"model.context={dims.context} (lower distill.sample_tokens to make room)",
        )
