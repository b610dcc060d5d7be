"""Hydra launchers run archlab sweeps: joblib (local processes) and submitit_local (the SLURM launcher's local
twin), each a 2-job multirun through the real CLI whose jobs share one teacher cache, into one sweep dir.
The Optuna sweeper (optional extra ``archlab[optuna]``) is checked at config level: it composes with
hydra-core 1.3 and its ``range`` is inclusive, unlike the basic sweeper's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

# A student small enough for a few steps in seconds; the default n-gram teacher on a small corpus slice.
TINY = (
    "model.d_model=32",
    "model.n_heads=2",
    "model.context=32",
    "trainer.max_steps=3",
    "trainer.batch_size=4",
    "trainer.eval_tokens=256",
    "data.max_bytes=200000",
    "logger=none",
)


def _launch(run_cli, tmp_path: Path, *launcher: str) -> list[dict]:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", *launcher, "model.n_layers=1,2", f"hydra.sweep.dir={sweep_dir}", *TINY, timeout=180
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert [p.parent.name for p in summaries] == ["0", "1"], list(sweep_dir.rglob("*"))
    return [json.loads(p.read_text()) for p in summaries]


def _check_two_jobs(summaries: list[dict]) -> None:
    """Each job trained its own shape against the same teacher (one soft-target cache, read by both)."""
    assert [s["train/steps"] for s in summaries] == [3, 3]
    small, large = (s["params/non_embedding"] for s in summaries)
    assert large > small  # n_layers 1 then 2: the overrides reached the workers
    assert summaries[0]["teacher/val_bpb"] == summaries[1]["teacher/val_bpb"]


@pytest.mark.slow
def test_joblib_launcher_runs_two_jobs_in_parallel(run_cli, tmp_path: Path) -> None:
    summaries = _launch(run_cli, tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    _check_two_jobs(summaries)


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs(run_cli, tmp_path: Path) -> None:
    summaries = _launch(
        run_cli,
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1",
    )
    _check_two_jobs(summaries)
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))  # really went through submitit


@pytest.mark.slow
def test_optuna_sweeper_minimises_val_bpb(run_cli, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "train",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=0",
        "trainer.lr=tag(log, interval(0.001, 0.01))",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))]
    assert len(summaries) == 2
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(s["val/bpb"] for s in summaries))  # the job's return value
    assert 0.001 <= best["best_params"]["trainer.lr"] <= 0.01


def test_optuna_range_is_inclusive() -> None:
    """The pitfall the README documents: ``range(0,5)`` gives 5 seeds to the basic sweeper, 6 to Optuna."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    (override,) = OverridesParser.create().parse_overrides(["seed=range(0,5)"])
    assert len(list(override.sweep_iterator())) == 5
    distribution = create_optuna_distribution_from_override(override)
    assert (distribution.low, distribution.high) == (0, 5)
