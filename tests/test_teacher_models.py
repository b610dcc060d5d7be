"""`trained` and `self` teachers: archlab models whose predictions are the checkpoint's, cached once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_model

from archlab import registry
from archlab.config import compose
from archlab.errors import ConfigError
from archlab.loggers import RunInfo
from archlab.model import build_student
from archlab.run_tokens import load_split
from archlab.teacher import TeacherEnv
from archlab.trainer import Trainer, soft_targets_for, teacher_env

SMALL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.context=32",
    "trainer.batch_size=4",
    "trainer.eval_tokens=1024",
    "trainer.progress=false",
    "data.max_bytes=300000",
    "logger=none",
    "teacher=none",
    "objective=ce",
]
TEACHER = [
    'teacher.overrides=["model.d_model=48","model.n_layers=1","model.n_heads=2",'
    '"trainer.max_steps=6","trainer.batch_size=4","trainer.eval_tokens=1024"]'
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def env_for(cfg, cache_dir: Path) -> TeacherEnv:
    env = teacher_env(cfg, load_split(cfg), torch.device("cpu"), progress=False)
    assert env.cache_dir == cache_dir / "teachers"
    return env


def test_trained_teacher_trains_once_then_is_found(cache_dir) -> None:
    cfg = compose([*SMALL, f"data.cache_dir={cache_dir}", "teacher=trained", *TEACHER])
    cls, tcfg = registry.configured("teacher", cfg.teacher)
    teacher = cls(tcfg, env_for(cfg, cache_dir))
    teacher.prepare()
    weights = next(teacher.run_dir.glob("checkpoints/step_*/model.safetensors"))
    stamp = weights.stat().st_mtime_ns
    again = cls(tcfg, env_for(cfg, cache_dir))
    assert again.run_dir == teacher.run_dir and again.identity() == teacher.identity()
    again.prepare()
    assert weights.stat().st_mtime_ns == stamp  # loaded, not retrained
    tokens = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(again.log_probs(tokens), teacher.log_probs(tokens))
    assert again.model.dims.d_model == 48
    other = cls(type(tcfg)(overrides=[*tcfg.overrides, "trainer.lr=1e-3"]), env_for(cfg, cache_dir))
    assert other.run_dir != teacher.run_dir  # another teacher config, another cache entry


def test_trained_teacher_config_errors_name_the_key(cache_dir) -> None:
    cfg = compose(
        [*SMALL, f"data.cache_dir={cache_dir}", "teacher=trained", 'teacher.overrides=["model.n_heads=5"]']
    )
    cls, tcfg = registry.configured("teacher", cfg.teacher)
    with pytest.raises(ConfigError, match=r"teacher.overrides: model.n_heads=5"):
        cls(tcfg, env_for(cfg, cache_dir))


def test_self_teacher_is_the_frozen_checkpoint(tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    first = compose([*SMALL, f"data.cache_dir={cache_dir}", "trainer.max_steps=3"])
    Trainer(first, RunInfo(run_dir=run, name="t")).run()
    cfg = compose([*SMALL, f"data.cache_dir={cache_dir}", "teacher=self", f"teacher.checkpoint={run}"])
    cls, tcfg = registry.configured("teacher", cfg.teacher)
    teacher = cls(tcfg, env_for(cfg, cache_dir))
    teacher.prepare()
    reference = build_student(first)  # built independently and loaded from the weights file
    load_model(reference, str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    tokens = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(teacher.log_probs(tokens), torch.log_softmax(reference(tokens), -1))
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_teacher_vocabulary_must_match_the_student(tmp_path, cache_dir) -> None:
    run = tmp_path / "run"
    Trainer(
        compose([*SMALL, f"data.cache_dir={cache_dir}", "trainer.max_steps=1", "model.vocab_size=300"]),
        RunInfo(run_dir=run, name="t"),
    ).run()
    cfg = compose([*SMALL, f"data.cache_dir={cache_dir}", "teacher=self", f"teacher.checkpoint={run}"])
    with pytest.raises(ConfigError, match=r"vocabulary \(300\) equals model.vocab_size=256"):
        soft_targets_for(cfg, load_split(cfg), torch.device("cpu"), OmegaConf.to_object(cfg.trainer), None)


def test_missing_self_checkpoint_is_a_clear_error(tmp_path, cache_dir) -> None:
    cfg = compose(
        [*SMALL, f"data.cache_dir={cache_dir}", "teacher=self", f"teacher.checkpoint={tmp_path}/nope"]
    )
    cls, tcfg = registry.configured("teacher", cfg.teacher)
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        cls(tcfg, env_for(cfg, cache_dir))
