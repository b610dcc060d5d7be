"""Trainer: schedule, accumulation, exact resume (also of a killed process), non-finite loss."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from archlab import checkpoint
from archlab.config import Schedule, TrainerConfig
from archlab.data import train_batch
from archlab.errors import NonFiniteLossError
from archlab.optim import lr_factor


def test_schedules() -> None:
    t = TrainerConfig(max_steps=100, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert [lr_factor(s, t) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, t) == pytest.approx(1.0)
    assert lr_factor(55, t) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half-way
    assert lr_factor(100, t) == pytest.approx(0.1)
    w = TrainerConfig(
        max_steps=100, warmup_fraction=0.1, min_lr_ratio=0.0, schedule=Schedule.wsd, decay_fraction=0.2
    )
    assert lr_factor(50, w) == 1.0 and lr_factor(79, w) == 1.0
    assert lr_factor(90, w) == pytest.approx(0.5) and lr_factor(100, w) == pytest.approx(0.0)


def test_grad_accumulation_equals_the_full_batch_gradient(tmp_path, make_trainer) -> None:
    trainer = make_trainer(tmp_path, "trainer.grad_accum=2", "trainer.grad_clip=0")
    model = trainer.model
    batches = [train_batch(trainer.split.train, context=32, seed=0, first=4 * m, count=4) for m in range(2)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(reference[n])
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_resume_replays_the_uninterrupted_loss_curve_bitwise(tmp_path, make_trainer) -> None:
    steps = ["trainer.max_steps=12", "trainer.log_every=1", "trainer.eval_every=100"]
    whole = make_trainer(tmp_path / "whole", *steps, "trainer.ckpt_every=100")
    whole.run()
    first = make_trainer(tmp_path / "split", *steps, "trainer.ckpt_every=5")
    with pytest.raises(KeyboardInterrupt):  # stop the first run right after step 7
        original = first.train_step

        def interrupted():
            if first.step == 7:
                raise KeyboardInterrupt
            return original()

        first.train_step = interrupted
        first.run()
    assert (tmp_path / "split" / "checkpoints" / "LAST").read_text() == "step_00000005"
    make_trainer(tmp_path / "split", *steps, "trainer.ckpt_every=5", "trainer.resume=auto").run()
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # exact, not approximate
    assert len(losses(tmp_path / "whole")) == 12


@pytest.mark.slow
def test_a_killed_process_resumes_exactly(tmp_path, tiny_overrides) -> None:
    """SIGKILL a real `archlab train` after its first checkpoint, resume it, compare with a clean run."""
    args = [
        *tiny_overrides,
        "trainer.max_steps=300",
        "trainer.log_every=1",
        "trainer.eval_every=1000",
        "trainer.ckpt_every=20",
    ]
    cmd = [sys.executable, "-m", "archlab.cli", "train", *args]
    env = {**os.environ, "WANDB_MODE": "offline"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, f"hydra.run.dir={killed}"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "LAST").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < len(losses(killed)) < 300, "the run was not killed mid-way"
    subprocess.run(
        [*cmd, f"hydra.run.dir={killed}", "trainer.resume=auto"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    clean = tmp_path / "clean"
    subprocess.run([*cmd, f"hydra.run.dir={clean}"], env=env, cwd=tmp_path, check=True, capture_output=True)
    assert losses(killed) == losses(clean)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, make_trainer) -> None:
    trainer = make_trainer(tmp_path, "trainer.max_steps=10")
    trainer.train_step(), trainer.train_step()
    good = trainer.save(None)
    with torch.no_grad():
        trainer.model.embed.weight.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3.*last good checkpoint is kept at"):
        trainer.train_step()
    assert checkpoint.latest(tmp_path) == good
    fresh = make_trainer(tmp_path / "fresh", "trainer.max_steps=10")
    fresh.restore(good)
    assert all(torch.isfinite(p).all() for p in fresh.model.parameters())


def test_a_short_run_learns_and_writes_summary_and_checkpoint(tmp_path, make_trainer) -> None:
    trainer = make_trainer(tmp_path, "trainer.max_steps=40", "trainer.eval_every=40", "trainer.lr=1e-2")
    before = trainer.evaluate()["val/bpb"]
    summary = trainer.run()
    assert summary["val/bpb"] < before - 1.0  # from ~8 bits (uniform) towards real structure
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["val/bpb"] == summary["val/bpb"] and on_disk["kernel/attention"] == "sdpa"
    assert (tmp_path / "checkpoints" / "step_00000040" / "model.safetensors").exists()


def test_bf16_autocast_trains_on_cpu(tmp_path, make_trainer) -> None:
    trainer = make_trainer(tmp_path, "trainer.max_steps=3", "trainer.precision=bf16")
    metrics = trainer.train_step()
    assert math.isfinite(metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_aux_losses_reach_the_objective_through_the_context(tmp_path, make_trainer) -> None:
    """A sublayer's ctx.add_loss(name, value, weight) is summed over layers, weighted and logged."""
    trainer = make_trainer(tmp_path, "trainer.max_steps=3")
    reported = []
    for ffn in trainer.model.sublayers[1::2]:

        def forward(x, ctx, _inner=ffn.forward):
            y = _inner(x, ctx)
            penalty = y.pow(2).mean()
            reported.append(float(penalty.detach()))
            ctx.add_loss("l2", penalty, weight=0.5)
            ctx.add_metric("ffn_rms", penalty.sqrt())
            return y

        ffn.forward = forward
    metrics = trainer.train_step()
    assert len(reported) == 2  # one per layer
    assert metrics["train/aux/l2"] == pytest.approx(sum(reported), rel=1e-5)
    assert metrics["train/total_loss"] == pytest.approx(metrics["train/loss"] + 0.5 * sum(reported), rel=1e-5)
    assert metrics["train/ffn_rms"] == pytest.approx(sum(r**0.5 for r in reported) / 2, rel=1e-5)


def test_modules_get_a_hook_after_each_optimizer_step(tmp_path, make_trainer) -> None:
    """`on_step_end()` runs once per optimizer step, after the update (e.g. MoE bias balancing)."""
    trainer = make_trainer(tmp_path, "trainer.max_steps=3", "trainer.grad_accum=2")
    calls = []
    ffn = trainer.model.sublayers[1]
    ffn.on_step_end = lambda: calls.append(trainer.optimizer.state_dict()["state"][0]["step"].item())
    trainer.update.hooks = [ffn]
    trainer.train_step(), trainer.train_step()
    assert calls == [1.0, 2.0]  # once per step (not per micro-batch), after the optimizer's update


@pytest.mark.slow  # two torch.compile runs: about a minute on 2 CPU cores
def test_compiled_training_matches_eager_and_checkpoints_load_both_ways(tmp_path, make_trainer) -> None:
    from safetensors.torch import load_file

    steps = ["trainer.max_steps=4", "trainer.log_every=1", "trainer.eval_every=100", "trainer.ckpt_every=2"]
    make_trainer(tmp_path / "eager", *steps).run()
    make_trainer(tmp_path / "compiled", *steps, "trainer.compile=true").run()
    eager = losses(tmp_path / "eager")
    assert len(eager) == 4 and losses(tmp_path / "compiled") == pytest.approx(eager, rel=1e-4)
    from_compiled = tmp_path / "compiled" / "checkpoints" / "step_00000002"
    assert not [k for k in load_file(str(from_compiled / "model.safetensors")) if "_orig_mod" in k]
    make_trainer(tmp_path / "eager_resumed", *steps, f"trainer.resume={from_compiled}").run()
    assert losses(tmp_path / "eager_resumed") == pytest.approx({3: eager[3], 4: eager[4]}, rel=1e-4)
    compiled = make_trainer(tmp_path / "compiled_resumed", *steps, "trainer.compile=true")
    compiled.restore(tmp_path / "eager" / "checkpoints" / "step_00000002")
    resumed = [compiled.train_step()["train/loss"] for _ in range(2)]
    assert resumed == pytest.approx([eager[3], eager[4]], rel=1e-4)
