"""Checkpoints and resume under faults: divergence, changed settings, reused run dirs, damaged files,
malicious pickles, kills at every point of a save, power loss (fsync) and permissions."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from archlab import checkpoint, durable
from archlab.checkpoint import CheckpointError
from archlab.errors import ArchlabError, NonFiniteLossError
from archlab.resume import ResumeError

STEPS = ("trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.log_every=1", "trainer.eval_every=100")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_trainer) -> Path:
    """A finished tiny run of ``STEPS``: checkpoints at steps 4 and 6, summary and metrics."""
    run_dir = tmp_path_factory.mktemp("trained")
    make_trainer(run_dir, *STEPS).run()
    return run_dir


@pytest.fixture
def run_dir(trained, tmp_path) -> Path:
    """A copy of the finished run, for a test to damage or resume."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def all_finite(ckpt: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(str(ckpt / "model.safetensors")).values())


# --- divergence: never a NaN "last good" checkpoint ---------------------------------------------------


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_non_finite_gradient_never_reaches_the_weights(tmp_path, make_trainer, clip) -> None:
    trainer = make_trainer(tmp_path, "trainer.max_steps=10", f"trainer.grad_clip={clip}")
    trainer.train_step()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.model.embed.weight.register_hook(lambda g: torch.full_like(g, math.inf))
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf") as error:
        trainer.train_step()
    assert ("set trainer.grad_clip" in str(error.value)) == (clip == 0)  # no advice to set what is set
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), f"{name} changed although the gradient was not finite"


def test_non_finite_weights_are_never_saved_nor_named_last(tmp_path, make_trainer) -> None:
    trainer = make_trainer(tmp_path, "trainer.max_steps=10")
    trainer.train_step()
    good = trainer.save(None)
    trainer.train_step()
    with torch.no_grad():
        trainer.model.embed.weight[0, 0] = math.nan
    with pytest.raises(
        NonFiniteLossError, match=r"embed.weight.*last good checkpoint is kept at .*step_00000001"
    ):
        trainer.save(None)
    assert checkpoint.latest(tmp_path) == good
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [good.name]


def test_a_diverging_run_keeps_a_finite_last_checkpoint(tmp_path, make_trainer) -> None:
    """The reported case (a finite loss, then a NaN gradient norm) with a checkpoint every 2 steps: on
    the tiny run trainer.lr=1e4 gets there at step 5."""
    trainer = make_trainer(tmp_path, "trainer.lr=1e4", "trainer.ckpt_every=2", "trainer.max_steps=60")
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan \(loss [\d.]+\) at step 5"):
        trainer.run()
    kept = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert [c.name for c in kept] == ["step_00000002", "step_00000004"]
    assert all(all_finite(c) for c in kept) and checkpoint.latest(tmp_path) == kept[-1]


# --- resume with changed settings ----------------------------------------------------------------------


def test_a_changed_lr_is_applied_on_resume_and_recorded(run_dir, make_trainer) -> None:
    resumed = make_trainer(run_dir, *STEPS, "trainer.max_steps=8", "trainer.lr=1e-4", "trainer.resume=auto")
    resumed.restore(checkpoint.latest(run_dir))
    expected = 1e-4 * resumed.scheduler.lr_lambdas[0](resumed.step)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx([expected, expected])
    assert resumed.scheduler.base_lrs == [1e-4, 1e-4]
    metrics = resumed.train_step()
    assert metrics["train/lr"] == pytest.approx(expected)
    entry = json.loads((run_dir / "resumes.jsonl").read_text().splitlines()[-1])
    assert entry["changed"]["trainer.lr"] == {"checkpoint": 3e-3, "now": 1e-4}
    assert entry["changed"]["trainer.max_steps"] == {"checkpoint": 6, "now": 8}


def test_a_resume_that_would_change_the_model_or_data_is_refused(run_dir, make_trainer, monkeypatch) -> None:
    """Before the run builds anything for it: its teacher's targets are never asked for."""
    monkeypatch.setattr("archlab.trainer.soft_targets_for", lambda *_: pytest.fail("teacher work began"))
    with pytest.raises(ResumeError, match=r"model.d_model=32 \(now 64\).*seed=0 \(now 3\)"):
        make_trainer(run_dir, *STEPS, "model.d_model=64", "seed=3", "trainer.resume=auto")


# --- a fresh run into a used run dir --------------------------------------------------------------------


def test_a_fresh_run_into_a_run_dir_with_checkpoints_is_refused(run_dir, make_trainer) -> None:
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ArchlabError, match="trainer.resume=auto"):
        make_trainer(run_dir, *STEPS, "trainer.max_steps=3")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_dangling_last_falls_back_to_the_newest_complete_checkpoint(run_dir, caplog) -> None:
    (run_dir / "checkpoints" / "LAST").write_text("step_00000099")
    assert checkpoint.find(run_dir).name == "step_00000006"
    assert "newest complete checkpoint" in caplog.text


# --- damaged checkpoint files ---------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint")


DAMAGE = {"truncated": _truncate, "flipped": _flip, "garbage": _garbage, "deleted": Path.unlink}


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt", "manifest.json"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_gives_way_to_the_previous_one(
    run_dir, make_trainer, file, damage
) -> None:
    newest = run_dir / "checkpoints" / "step_00000006"
    if file == "manifest.json" and damage in ("flipped", "deleted"):
        pytest.skip("a flipped byte in JSON may still parse; a missing manifest is an older checkpoint")
    DAMAGE[damage](newest / file)
    with pytest.raises(CheckpointError, match=str(newest)):
        checkpoint.find(newest)  # named directly: an error naming the damaged checkpoint
    assert checkpoint.latest(run_dir).name == "step_00000004"  # resume falls back
    if (file, damage) == ("model.safetensors", "truncated"):  # once: the resumed run rewrites step 6
        resumed = make_trainer(run_dir, *STEPS, "trainer.resume=auto")
        resumed.run()
        assert resumed.step == 6 and checkpoint.latest(run_dir).name == "step_00000006"


def test_a_checkpoint_of_another_shape_names_the_tensors(trained, tmp_path, make_trainer) -> None:
    wide = make_trainer(tmp_path / "wide", "model.d_model=64")
    with pytest.raises(CheckpointError, match=r"embed.weight: checkpoint \(256, 32\), model \(256, 64\)"):
        checkpoint.load_weights(checkpoint.find(trained), wide.model)


# --- untrusted checkpoints ------------------------------------------------------------------------------


class _Exploit:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_state_pt_is_refused_and_runs_nothing(run_dir, make_trainer) -> None:
    ckpt = checkpoint.latest(run_dir)
    exploit = _Exploit()
    exploit.marker = run_dir / "pwned"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    torch.save({**state, "wandb_id": exploit}, ckpt / "state.pt")
    manifest = json.loads((ckpt / "manifest.json").read_text())  # the attacker rewrites the manifest too
    manifest["files"]["state.pt"] = {
        "bytes": (ckpt / "state.pt").stat().st_size,
        "sha256": durable.sha256_file(ckpt / "state.pt"),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    readers = {
        "resume": lambda: make_trainer(run_dir, *STEPS, "trainer.resume=auto").run(),
        "saved_config": lambda: checkpoint.saved_config(ckpt),
        "load_student": lambda: checkpoint.load_student(ckpt, torch.device("cpu")),
    }
    for name, read in readers.items():
        with pytest.raises(CheckpointError, match="weights_only=True"):
            read()
        assert not exploit.marker.exists(), f"{name} ran code from the checkpoint"


# --- kills at every point of a save, and power loss ------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it (it is not an Exception)."""


KILL_POINTS = {  # (module, attribute): a call the save makes; the kill comes before or after it
    "weights": (checkpoint, "save_model"),
    "state": (torch, "save"),
    "publish": (durable, "publish_dir"),
    "rename": (os, "rename"),
    "last": (durable, "write_atomic"),
    "prune": (shutil, "rmtree"),
}


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_any_point_of_a_save_leaves_a_complete_checkpoint(
    run_dir, make_trainer, monkeypatch, point, when
) -> None:
    resume = (*STEPS, "trainer.max_steps=8", "trainer.resume=auto")
    trainer = make_trainer(run_dir, *resume)
    trainer.restore(checkpoint.latest(run_dir))  # step 6, with step 4 on disk too
    trainer.step = 8  # the save below is step 8's, whose prune removes step 4 (KEEP = 2)
    module, name = KILL_POINTS[point]
    real = getattr(module, name)

    def killed(*args, **kwargs):
        if when == "after":
            real(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(module, name, killed)
    with contextlib.suppress(Killed):
        trainer.save(None)
    monkeypatch.undo()
    last = checkpoint.latest(run_dir)
    assert last.name in ("step_00000006", "step_00000008")
    checkpoint.verify(last)
    make_trainer(run_dir, *resume).restore(last)  # and a run resumes from it


def test_a_save_fsyncs_every_file_and_directory_before_publishing(
    tmp_path, make_trainer, monkeypatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    trainer = make_trainer(tmp_path, *STEPS)
    trainer.train_step()
    ckpt = trainer.save(None)
    root = str(tmp_path / "checkpoints")
    tmp_files = [p for p in synced if "/.tmp-" in p]
    assert {Path(p).name for p in tmp_files} >= {"model.safetensors", "state.pt", "manifest.json"}
    assert any(Path(p).name.startswith(".tmp-") for p in tmp_files)  # the directory before its rename
    assert synced.count(root) >= 2  # after the rename, and after LAST is replaced
    assert (ckpt / "model.safetensors").exists()


@pytest.mark.parametrize("mask", [0o002, 0o022, 0o077])
def test_checkpoints_respect_the_umask(tmp_path, make_trainer, mask) -> None:
    trainer = make_trainer(tmp_path, *STEPS)
    trainer.train_step()
    old = os.umask(mask)
    try:
        ckpt = trainer.save(None)
    finally:
        os.umask(old)
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~mask
    assert {f.stat().st_mode & 0o777 for f in ckpt.iterdir()} == {0o666 & ~mask}


# --- resuming finished and killed runs -----------------------------------------------------------------


def test_resuming_a_finished_run_keeps_its_summary_and_metrics(run_dir, make_trainer) -> None:
    summary, metrics = (run_dir / "summary.json").read_bytes(), (run_dir / "metrics.jsonl").read_bytes()
    (run_dir / "checkpoints" / ".tmp-killed").mkdir()  # what a save killed part-way leaves
    again = make_trainer(run_dir, *STEPS, "trainer.resume=auto").run()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # removed at the start
    assert (run_dir / "summary.json").read_bytes() == summary and again == json.loads(summary)
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_a_resumed_run_logs_each_step_once_even_after_a_torn_last_line(run_dir, make_trainer) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "train/lo')  # a kill in the middle of a write
    make_trainer(run_dir, *STEPS, "trainer.max_steps=8", "trainer.resume=auto").run()
    steps = [r["step"] for r in records(run_dir)]
    assert steps == sorted(set(steps)) == list(range(9))
