"""Teacher slot: archlab models as teachers.

``trained``: a larger archlab student (any plugins; its own Hydra overrides) trained once
with cross-entropy on the run's own training split and cached under
``<cache>/teachers/trained-<hash>``, the hash covering its resolved config and the corpus.
A later run or sweep finds the checkpoint and never retrains; an interrupted build
resumes from its last checkpoint. ``archlab teacher build`` runs this step on its own.

``self``: self-distillation (Furlanello et al. 2018, "Born-Again Neural Networks",
arXiv 1805.04770): the teacher is a frozen earlier checkpoint of an archlab run, usually
of the same student architecture; point ``checkpoint`` at a run or checkpoint directory.
With ``distill.on_policy=1`` its other options make it the in-context teacher of SDFT/OPSD
(``archlab.incontext``): the student's own weights (``checkpoint`` empty: the student at step 0),
frozen or an EMA (``update``, ``ema_decay``), given a privileged context (``context``,
``context_len``, ``context_paths``). With their defaults it is the teacher above, unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock
from omegaconf import OmegaConf
from torch import Tensor

from archlab import checkpoint
from archlab.checkpoint import load_student
from archlab.errors import ArchlabError, ConfigError
from archlab.teacher import TeacherEnv, student_log_probs

#: The default teacher: 2.7 M non-embedding parameters (3.3x the tiny student), trained for 450 steps.
DEFAULT_OVERRIDES = [
    "model.d_model=192",
    "model.n_layers=6",
    "model.n_heads=6",
    "trainer.max_steps=450",
    "trainer.lr=2e-3",
]


class TrainedTeacher:
    @dataclass
    class Config:
        overrides: list[str] = field(default_factory=lambda: list(DEFAULT_OVERRIDES))

    def __init__(self, cfg: Config, env: TeacherEnv) -> None:
        from archlab.config import ON_POLICY_FIELDS, compose, validate

        self.env = env
        fixed = [
            "teacher=none",
            "objective=ce",
            "logger=none",
            f"model.context={env.context}",
            f"model.vocab_size={env.vocab_size}",
            "trainer.resume=auto",
            f"trainer.progress={env.progress}",
        ]
        try:
            self.config = compose([*cfg.overrides, *fixed])
            validate(self.config)
        except ConfigError as exc:
            raise ConfigError(f"teacher.overrides: {exc.key}", exc.value, exc.allowed) from None
        described = OmegaConf.to_container(self.config, resolve=True, enum_to_str=True)
        for key in (
            "logger",
            "data",
            "corpus",
            "tokenizer",
        ):  # how runs log and find the corpus; corpus_key says what it is (its tokenizer too)
            described.pop(key)
        described["trainer"].pop("progress")
        for key in ON_POLICY_FIELDS:
            described["distill"].pop(key)
        self._identity = {"plugin": "trained", "config": described, "corpus": env.corpus_key}
        digest = hashlib.sha256(json.dumps(self._identity, sort_keys=True).encode()).hexdigest()[:16]
        self.run_dir = Path(env.cache_dir) / f"trained-{digest}"
        self.vocab_size = env.vocab_size
        self.model = None

    def identity(self) -> dict:
        return self._identity

    def prepare(self) -> None:
        """Train the teacher unless its final checkpoint is cached (under a lock), then load it."""
        if self.model is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        max_steps = self.config.trainer.max_steps
        with FileLock(str(self.run_dir) + ".lock"):
            last = checkpoint.latest(self.run_dir)
            if last is None or not last.name.endswith(f"{max_steps:08d}"):
                if self.env.train is None:
                    raise ArchlabError("teacher=trained needs the train service of its TeacherEnv")
                self.env.train(self.config, self.run_dir)
            self.model = load_student(checkpoint.latest(self.run_dir), self.env.device)

    def log_probs(self, tokens: Tensor) -> Tensor:
        return student_log_probs(self.model, tokens, self.env.device)


class SelfTeacher:
    @dataclass
    class Config:
        checkpoint: str = ""  # a run dir, its checkpoints/ dir, or one checkpoint dir
        # the in-context teacher (archlab.incontext; distill.on_policy=1 only): how its weights move,
        update: str = "frozen"  # frozen | ema: θ_T ← d·θ_T + (1 − d)·θ_S after each optimizer step
        ema_decay: float = 0.99  # d in [0, 1); 0: the student's current weights (OPSD)
        # and the privileged context it reads before the prompt: none | same_doc | corpus
        context: str = "none"
        context_len: int = 64  # tokens of privileged context
        context_paths: list[str] = field(default_factory=list)  # context=corpus: files, folders or globs

    def __init__(self, cfg: Config, env: TeacherEnv) -> None:
        if not cfg.checkpoint:
            raise ConfigError(
                "teacher.checkpoint", cfg.checkpoint, "the run or checkpoint dir of the teacher"
            )
        self.ckpt = checkpoint.find(cfg.checkpoint, key="teacher.checkpoint")
        self.env = env
        weights = hashlib.sha256((self.ckpt / "model.safetensors").read_bytes()).hexdigest()
        self._identity = {"plugin": "self", "weights_sha256": weights}
        self.vocab_size = checkpoint.saved_config(self.ckpt).model.vocab_size
        self.model = None

    def identity(self) -> dict:
        return self._identity

    def prepare(self) -> None:
        if self.model is None:
            self.model = load_student(self.ckpt, self.env.device)

    def log_probs(self, tokens: Tensor) -> Tensor:
        return student_log_probs(self.model, tokens, self.env.device)
