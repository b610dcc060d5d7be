"""Checkpoints written before a model slot existed still load, with that slot's baseline; sharded (DCP)
checkpoints load model and optimizer, and their metadata cannot run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from archlab import checkpoint
from archlab.checkpoint import CheckpointError
from archlab.config import compose
from archlab.distributed import Ranks
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


def sharded_checkpoint(root) -> tuple:
    """A ``save_sharded`` checkpoint of one rank (no process group: DCP writes it alone), its model and
    optimizer after one step."""
    cfg = compose(SMALL)
    torch.manual_seed(0)
    student = build_student(cfg)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student(torch.randint(0, cfg.model.vocab_size, (2, 8))).square().mean().backward()
    optimizer.step()
    state = {"config": OmegaConf.to_container(cfg, resolve=True)}
    return checkpoint.save_sharded(root, 1, student, optimizer, state, Ranks()), student, optimizer


def test_a_sharded_checkpoint_loads_model_and_optimizer(tmp_path) -> None:
    ckpt, student, optimizer = sharded_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.is_sharded(ckpt) and checkpoint.find(tmp_path) == ckpt  # the manifest verifies
    torch.manual_seed(1)
    fresh = build_student(compose(SMALL))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpoint.load_sharded(ckpt, fresh, fresh_optimizer)
    for (name, want), got in zip(student.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    want, got = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert all(torch.equal(got[i]["exp_avg_sq"], want[i]["exp_avg_sq"]) for i in want) and len(got) == len(
        want
    )


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_dcp_metadata_cannot_run_code(tmp_path) -> None:
    ckpt, student, optimizer = sharded_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "ran"
    (ckpt / checkpoint.DCP_METADATA).write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match="system is not allowed in DCP metadata"):
        checkpoint.load_sharded(ckpt, student, optimizer)
    assert not marker.exists(), "unpickling the crafted metadata ran its code"
