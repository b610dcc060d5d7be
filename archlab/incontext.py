"""In-context self-distillation: the teacher is the student itself, given privileged context it does not see.

SDFT (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning", arXiv 2601.19897) trains the
student π_θ(· | x) on its own samples to match the same model conditioned on a demonstration c,
minimising D_KL(π_θ(· | x) ‖ π(· | x, c)) over the sampled tokens (reverse KL); OPSD (Zhao et al. 2026,
"Self-Distilled Reasoner: On-Policy Self-Distillation", arXiv 2601.18734) does the same with c the
reference solution y*, minimising the per-token divergence D(p_T(· | x, y*, ŷ<n) ‖ p_S(· | x, ŷ<n))
over the student's rollout ŷ, with no gradient through the teacher. (The search tool gave the papers'
abstracts and method summaries, not their numbered equations; these are the objectives as written
there.) Here, on the machinery of ``archlab.onpolicy`` (prompt x = the first ``distill.prompt_len``
tokens of a training window, y ~ p_S(· | x)):

    L   = mean over n of D(p_θT(· | c, x, y<n) ‖ p_θS(· | x, y<n))       over the sampled positions n
    θ_T = θ_S at step 0 (after ``trainer.init_from``), or the weights of ``teacher.checkpoint``;
          update=frozen: never changed; update=ema: after each optimizer step
          θ_T ← d·θ_T + (1 − d)·θ_S          (d = ``teacher.ema_decay``; d = 0 is OPSD's shared weights)

with D the configured ``kd`` divergence in GKD's argument order (``forward_kl`` = KL(p_T ‖ p_S);
``reverse_kl`` = KL(p_S ‖ p_T) is SDFT's objective; ``jsd`` between them). The privileged context c
(``teacher.context``, L = ``teacher.context_len`` tokens) is placed before the prompt:
    none      c is empty: the teacher scores x, y alone (update=frozen: ``teacher=self`` on θ_T)
    same_doc  c = window[p : p + L], the L tokens of the training window right after the prompt: the
              corpus's own continuation of x, i.e. the demonstration / reference solution y* of x
    corpus    c = L consecutive tokens of the train split of a second corpus (``teacher.context_paths``,
              read and split as ``corpus=files`` reads them), one chunk per sequence at an aligned
              chunk index drawn from rng(seed, step, rank, micro-batch): the new domain as context
The teacher scores ``c + x + y[:-1]`` (L + p + n − 1 tokens, which must fit ``model.context``) and its
log-probs at c's L positions are dropped, so it returns (b, p + n − 1, v) aligned with the student's
inputs (``OnPolicyStep.score``'s contract).

Why options of ``teacher=self`` and not a new teacher plugin: this *is* self-distillation, and
``teacher=self`` already names a frozen copy of the model's own weights; the options only say where
those weights start, how they move and what they see. Their defaults leave ``teacher=self`` as it was.
Why on-policy only (``distill.on_policy=1``): offline steps read soft targets cached once before
training from a teacher that sees only the window; a moving (EMA), context-conditioned teacher that is
the student itself cannot be cached that way.

Departures and choices:
- same_doc's demonstration is the reference continuation of the very prompt (OPSD's y*), not a
  demonstration of a related query (SDFT's); both ``same_doc`` and ``corpus`` chunks may cross
  document boundaries (the end-of-document bytes stay in them).
- The teacher runs in eval mode in fp32, without autocast, like every teacher; its whole state dict
  (buffers included, frozen or EMA) is saved in each checkpoint's ``state.pt``, so resume is exact.
- One process only (``trainer.parallel=none``): the EMA of DDP replicas or FSDP shards is not built.
"""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from archlab import checkpoint, registry
from archlab.context import ModelDims
from archlab.data import build_split, n_train_windows, windows
from archlab.errors import ConfigError, CorpusError
from archlab.model import build_student
from archlab.teacher import student_log_probs

UPDATES = ("frozen", "ema")
CONTEXTS = ("none", "same_doc", "corpus")
#: Mixed into the seeds of context=corpus's chunk draws (see ``archlab.onpolicy``'s streams).
CONTEXT_STREAM = 0x4354


def wants_in_context(teacher: DictConfig) -> bool:
    """Whether the ``teacher`` config asks for the in-context teacher: ``teacher=self`` with no
    checkpoint (the student itself), an EMA update or a privileged context. (``teacher["update"]``:
    on a DictConfig, ``.update`` is its dict method.)"""
    return teacher.plugin == "self" and (
        not teacher.checkpoint or teacher["update"] != "frozen" or teacher.context != "none"
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


def context_corpus(paths: list[str], data: DictConfig, tokenizer) -> np.ndarray:
    """The train split's tokens of the second corpus at ``paths``, read as ``corpus=files`` with the run's
    data settings."""
    corpus_cls, corpus_cfg = registry.configured(
        "corpus", OmegaConf.create({"plugin": "files", "paths": list(paths)})
    )
    try:
        split = build_split(
            corpus_cls(corpus_cfg),
            val_fraction=data.val_fraction,
            max_bytes=None,
            cache_dir=data.cache_dir,
            tokenizer=tokenizer,
        )
    except CorpusError as exc:
        raise ConfigError("teacher.context_paths", list(paths), f"a readable text corpus ({exc})") from None
    return split.train


def frozen_copy(student: nn.Module, cfg: DictConfig) -> nn.Module:
    """A copy of ``student`` (same config, weights and attention kernel) with no gradients, in eval mode;
    built under a forked RNG, so the run's random stream is the one it would be without it."""
    with torch.random.fork_rng(devices=[]):
        model = build_student(cfg)
    model.load_state_dict(student.state_dict())
    model.kernel = student.kernel
    device = next(student.parameters()).device
    return model.to(device).eval().requires_grad_(False)


class InContextTeacher:
    """The student's own weights θ_T (frozen or EMA) scoring the samples after a privileged context.

    Built by ``archlab.onpolicy.OnPolicyStep`` from ``trainer`` (its student, config, split and ranks);
    the optimizer step calls ``on_step_end`` after each step and ``archlab.train_state`` saves
    ``state_dict``."""

    def __init__(self, cfg, trainer) -> None:
        self.student, self.device = trainer.model, trainer.device
        self.update, self.decay = cfg.update, float(cfg.ema_decay)
        self.kind, self.length = cfg.context, int(cfg.context_len)
        self.prompt_len, self.seed = int(trainer.cfg.distill.prompt_len), int(trainer.cfg.seed)
        self.rank = trainer.ranks.rank
        self.model = frozen_copy(trainer.model, trainer.cfg)
        if cfg.checkpoint:
            checkpoint.load_weights(checkpoint.find(cfg.checkpoint, key="teacher.checkpoint"), self.model)
        self.corpus = None
        if self.kind == "corpus":
            self.corpus = context_corpus(cfg.context_paths, trainer.cfg.data, trainer.split.tokenizer)
            self.n_chunks = n_train_windows(self.corpus, self.length)

    def context(self, prompts_windows: Tensor, step: int, micro: int) -> Tensor:
        """The privileged context (b, L) of the micro-batch whose training windows are ``prompts_windows``
        (b, model.context), on the CPU; (b, 0) for context=none."""
        b = prompts_windows.shape[0]
        if self.kind == "none":
            return torch.zeros(b, 0, dtype=torch.long)
        if self.kind == "same_doc":
            return prompts_windows[:, self.prompt_len : self.prompt_len + self.length].cpu()
        rng = np.random.default_rng([self.seed, step, self.rank, micro, CONTEXT_STREAM])
        ids = rng.integers(self.n_chunks, size=b)
        return windows(self.corpus, ids * self.length, self.length)[0]

    @torch.no_grad()
    def score(self, tokens: Tensor, prompts_windows: Tensor, step: int, micro: int) -> Tensor:
        """tokens (b, t) of prompt + samples -> (b, t, v) log-probs of θ_T given context + tokens, the
        context's positions dropped."""
        context = self.context(prompts_windows, step, micro)
        logp = student_log_probs(self.model, torch.cat([context, tokens], dim=1), self.device)
        return logp[:, context.shape[1] :]

    @torch.no_grad()
    def on_step_end(self) -> None:
        """update=ema: θ_T ← d·θ_T + (1 − d)·θ_S over every floating-point tensor (buffers too); the
        others (integer buffers) are copied from the student."""
        if self.update != "ema":
            return
        teacher, student = self.model.state_dict(), self.student.state_dict()
        floats = [name for name, value in teacher.items() if value.is_floating_point()]
        torch._foreach_mul_([teacher[n] for n in floats], self.decay)
        torch._foreach_add_([teacher[n] for n in floats], [student[n] for n in floats], alpha=1 - self.decay)
        for name in teacher.keys() - set(floats):
            teacher[name].copy_(student[name])

    def state_dict(self) -> dict[str, Tensor]:
        """θ_T, as saved in a checkpoint's ``state.pt``."""
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)
