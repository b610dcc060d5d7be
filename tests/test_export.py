"""``archlab export --packed`` and ``archlab.export.load_packed``: a packed file rebuilds the same student.

Dense students have nothing to pack and must come back bit for bit; ternary students (archlab-plugins)
come back from 2 bits per weight with logits equal to the fake-quant training path (techniques.md §4e.6).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from archlab import cli
from archlab.checkpoint import find, load_student
from archlab.config import compose
from archlab.errors import ArchlabError
from archlab.export import load_packed, packed_modules, save_packed, size_report
from archlab.loggers import RunInfo
from archlab.metrics import weight_bytes
from archlab.model import build_student
from archlab.testing import requires_plugin
from archlab.trainer import Trainer

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.context=32"]
TRAIN = [
    "trainer.max_steps=3",
    "trainer.batch_size=2",
    "trainer.eval_tokens=256",
    "trainer.progress=false",
    "logger=none",
    "teacher=none",
    "objective=ce",
    "data.max_bytes=200000",
]
needs_ternary = requires_plugin("linear", "ternary")


@pytest.fixture(scope="module")
def ternary_run(tmp_path_factory, archlab_cache: Path) -> Path:
    """A ternary student with an untied (dense) head after a few optimizer steps, so the latent weights are
    no longer their init; returns the run dir."""
    run = tmp_path_factory.mktemp("ternary") / "run"
    cfg = compose([*SMALL, *TRAIN, f"data.cache_dir={archlab_cache}", "linear=ternary", "head.tied=false"])
    Trainer(cfg, RunInfo(run_dir=run, name="export")).run()
    return run


def test_a_dense_student_comes_back_bit_for_bit(tmp_path: Path) -> None:
    cfg = compose(SMALL)
    torch.manual_seed(0)
    model = build_student(cfg).eval()
    tensors = save_packed(model, cfg, tmp_path / "dense.safetensors")
    loaded, loaded_cfg = load_packed(tmp_path / "dense.safetensors")
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert loaded_cfg.model.d_model == 32 and not packed_modules(model)
    report = size_report(model, tensors)
    assert report["bytes_packed"] == report["bytes_fp32"] == 2 * report["bytes_bf16"]


def test_a_file_that_is_not_a_packed_export_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ArchlabError, match="not an archlab packed export"):
        load_packed(tmp_path / "other.safetensors")


@needs_ternary
def test_packed_ternary_logits_equal_fake_quant_logits(ternary_run: Path, tmp_path: Path) -> None:
    model = load_student(find(ternary_run), torch.device("cpu"))  # the fake-quant training path, float32
    out = tmp_path / "packed.safetensors"
    assert cli.main(["export", str(ternary_run), "--packed", "--out", str(out)]) == 0
    packed, _ = load_packed(out)
    tokens = torch.randint(0, 256, (3, 32))
    diff = (packed(tokens) - model(tokens)).abs().max().item()
    assert diff <= 1e-5, f"max |Δ logits| = {diff:.3g}"

    modules = packed_modules(model)
    projections = {0: ("qkv", "out"), 1: ("up", "down")}
    expected = {f"sublayers.{i}.{p}" for i in range(4) for p in projections[i % 2]}
    assert set(modules) == expected  # the untied head stays dense
    with safe_open(str(out), framework="pt") as f:
        for name, module in modules.items():
            stored = f.get_tensor(f"{name}.weight.packed")
            assert stored.dtype == torch.uint8 and stored.numel() == math.ceil(module.weight.numel() / 4)
            assert f.get_tensor(f"{name}.weight.scale").numel() == 1
        assert f.get_tensor("head.proj.weight").dtype == torch.float32
    assert weight_bytes(packed) == weight_bytes(model)  # the training run already reported packed bytes


@needs_ternary
def test_export_prints_the_size_report_and_generate_reads_the_file(ternary_run: Path, capsys) -> None:
    assert cli.main(["export", str(ternary_run), "--packed"]) == 0
    printed = capsys.readouterr().out
    assert "weight bytes: packed" in printed and "bits each" in printed
    (out,) = ternary_run.glob("checkpoints/step_*/packed.safetensors")
    assert cli.main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_export_without_a_format_is_a_config_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "--packed" in capsys.readouterr().err


@needs_ternary
@pytest.mark.slow
def test_train_ternary_and_export_from_the_command_line(run_cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("train", *SMALL, *TRAIN, "linear=ternary", f"hydra.run.dir={run}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("export", str(run), "--packed", "--out", str(tmp_path / "m.safetensors"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bits each" in result.stdout and (tmp_path / "m.safetensors").exists()
