"""Checkpoints written before a model slot existed still load, with that slot's baseline."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from archlab import checkpoint
from archlab.config import compose
from archlab.model import build_student

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=16", "teacher=none"]


def test_a_checkpoint_without_the_memory_slot_loads_with_no_memory(tmp_path) -> None:
    cfg = compose(SMALL)
    torch.manual_seed(0)
    student = build_student(cfg)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["memory"]  # as written before the memory slot existed
    ckpt = checkpoint.save(tmp_path / "checkpoints", 1, student, {"config": old})
    assert checkpoint.saved_config(ckpt).memory.plugin == "none"
    loaded = checkpoint.load_student(checkpoint.find(tmp_path), torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x), student.eval()(x))
