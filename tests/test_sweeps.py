"""Every sweep in ``sweeps/`` composes, launches all its jobs, and the attention sweep is parameter-matched.

A sweep is run as ``archlab train --config-dir sweeps --config-name NAME``; its jobs are what
Hydra's basic sweeper makes of ``hydra.sweeper.params`` (the cross product of the options).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from archlab.baselines.ffn import Activation
from archlab.config import register_configs, validate
from archlab.metrics import model_metrics
from archlab.model import build_student

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
NAMES = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
LOCAL = [n for n in NAMES if n != "slurm_ddp"]  # slurm_ddp submits to SLURM (srun): composed only
TOLERANCE = 0.02
TINY = (
    "trainer.max_steps=1",
    "trainer.eval_tokens=256",
    "logger=none",
    "teacher=none",
    "objective=ce",
    "data.max_bytes=200000",
    "model.context=32",
    "trainer.progress=false",
)


def compose_sweep(name: str, overrides: list[str] = (), hydra_config: bool = False) -> DictConfig:
    """The config ``archlab train --config-dir sweeps --config-name NAME OVERRIDES`` composes."""
    register_configs()
    with initialize_config_dir(str(SWEEPS), version_base="1.3"):
        # archlab's own configs (config.yaml, model/, ...) are what `archlab train` adds itself
        searchpath = "hydra.searchpath=[pkg://archlab.conf]"
        return compose(name, overrides=[searchpath, *overrides], return_hydra_config=hydra_config)


def sweep_jobs(name: str) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper expands ``hydra.sweeper.params``."""
    cfg = compose_sweep(name, hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN", f"sweeps/{name}.yaml must set hydra.mode: MULTIRUN"
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params)
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    return jobs


def test_there_are_sweeps() -> None:
    assert {"ffn", "attention", "moe", "ladder"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_job_composes_and_validates(name: str) -> None:
    jobs = sweep_jobs(name)
    assert len(jobs) > 1
    configs = [compose_sweep(name, job) for job in jobs]
    for cfg in configs:
        validate(cfg)
        build_student(cfg)  # every slot's plugin builds at the sweep's shape
    assert len({OmegaConf.to_yaml(c) for c in configs}) == len(jobs), "two jobs compose the same config"


def test_attention_sweep_matches_parameters_and_orders_kv_cache() -> None:
    jobs = sweep_jobs("attention")
    assert jobs == [[f"arch={a}"] for a in ("mha", "gqa", "mqa", "mla")]
    metrics, attention = {}, {}
    for (job,) in jobs:
        cfg = compose_sweep("attention", [job])
        arch = job.split("=", 1)[1]
        metrics[arch] = model_metrics(build_student(cfg), torch.float32)
        attention[arch] = (cfg.attention.plugin, cfg.attention.get("n_kv_heads"))
        assert cfg.model.d_model == 128 and cfg.ffn.hidden_dim > 0  # the widths are solved for tiny
    reference = metrics["mha"]["params/non_embedding"]
    for arch, m in metrics.items():
        gap = m["params/non_embedding"] / reference - 1
        assert abs(gap) <= TOLERANCE, f"arch={arch}: {gap:+.2%} non-embedding parameters vs mha"
    assert attention == {"mha": ("mha", None), "gqa": ("mha", 2), "mqa": ("mha", 1), "mla": ("mla", None)}
    kv = {arch: m["kv_bytes_per_token"] for arch, m in metrics.items()}
    assert kv["mqa"] < kv["gqa"] < kv["mha"] and kv["mla"] < kv["gqa"]


def test_ffn_sweep_changes_only_the_ffn() -> None:
    configs = [compose_sweep("ffn", job) for job in sweep_jobs("ffn")]
    assert [(c.ffn.plugin, c.ffn.get("activation")) for c in configs] == [
        ("mlp", Activation.swiglu),
        ("mlp", Activation.gelu),
        ("relu2", None),
    ]
    assert len({str(c.attention) for c in configs}) == 1


def test_residuals_sweep_matches_parameters_and_changes_the_depth_stream() -> None:
    jobs = sweep_jobs("residuals")
    names = ["prenorm", "attnres_full", "attnres_block", "denseformer", "hyper", "engram"]
    assert jobs == [[f"residual_arch={n}"] for n in names]
    configs = {job[0].split("=", 1)[1]: compose_sweep("residuals", job) for job in jobs}
    slots = {n: (c.residual.plugin, c.memory.plugin) for n, c in configs.items()}
    plugins = ["prenorm", "attnres", "attnres", "denseformer", "hyper", "prenorm"]
    assert [s[0] for s in slots.values()] == plugins
    assert slots["engram"][1] == "engram" and {s[1] for n, s in slots.items() if n != "engram"} == {"none"}
    assert (configs["attnres_full"].residual.mode.name, configs["attnres_block"].residual.mode.name) == (
        "full",
        "block",
    )
    counts = {
        n: model_metrics(build_student(c), torch.float32)["params/non_embedding"] for n, c in configs.items()
    }
    for name, count in counts.items():
        gap = count / counts["prenorm"] - 1
        assert abs(gap) <= TOLERANCE, f"residual_arch={name}: {gap:+.2%} non-embedding parameters vs prenorm"


def test_ladder_is_dense_geometric_and_trained_like_the_students() -> None:
    """>= 5 plain dense sizes over >= 1.3 decades of non-embedding parameters, each > 1.5x the last, one head
    size, depth growing with width, the students' shape among them; everything else as the architecture
    sweeps have it."""
    configs = [compose_sweep("ladder", job) for job in sweep_jobs("ladder")]
    by_size: dict[int, list[DictConfig]] = {}
    for cfg in configs:
        assert (cfg.attention.plugin, cfg.ffn.plugin, cfg.linear.plugin) == ("mha", "mlp", "dense")
        assert cfg.ffn.activation == Activation.swiglu and cfg.ffn.hidden_dim is None
        n = model_metrics(build_student(cfg), torch.float32)["params/non_embedding"]
        by_size.setdefault(n, []).append(cfg)
    sizes = sorted(by_size)
    assert len(sizes) >= 5 and math.log10(sizes[-1] / sizes[0]) >= 1.3, sizes
    ratios = [b / a for a, b in zip(sizes, sizes[1:], strict=False)]
    assert min(ratios) > 1.5, ratios  # N ∝ k³ (archlab/ladder.py): each rung well above the last
    shapes = sorted({(c.model.d_model, c.model.n_layers) for c in configs})
    assert [depth for _, depth in shapes] == sorted(depth for _, depth in shapes)
    assert len({c.model.d_model // c.model.n_heads for c in configs}) == 1
    student = compose_sweep("attention", ["arch=mha"])
    assert (student.model.d_model, student.model.n_layers, student.model.n_heads) in {
        (c.model.d_model, c.model.n_layers, c.model.n_heads) for c in configs
    }
    for cfg in configs:
        for key in ("trainer", "teacher", "objective", "distill", "data", "corpus"):
            assert cfg[key] == student[key], key
        assert cfg.model.context == student.model.context  # with the trainer: the same token budget


@pytest.mark.slow
@pytest.mark.parametrize("name", LOCAL)
def test_sweep_launches_every_job(name: str, run_cli, tmp_path: Path) -> None:
    jobs = sweep_jobs(name)
    result = run_cli("train", "--config-dir", str(SWEEPS), "--config-name", name, *TINY, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"Launching {len(jobs)} jobs locally" in result.stdout + result.stderr
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    summaries = sorted(sweep.glob("*/summary.json"), key=lambda p: int(p.parent.name))  # 10 after 9
    assert [p.parent.name for p in summaries] == [str(i) for i in range(len(jobs))]
    for i, path in enumerate(summaries):
        summary = json.loads(path.read_text())
        assert summary["train/steps"] == 1 and summary["val/bpb"] > 0
        overrides = yaml.safe_load((path.parent / ".hydra" / "overrides.yaml").read_text())
        assert set(jobs[i]) <= set(overrides), (jobs[i], overrides)


def test_slurm_ddp_sweep_runs_each_job_as_one_ddp_run_of_four_gpus() -> None:
    cfg = compose_sweep("slurm_ddp", ["ffn=gelu"], hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4, "one GPU per rank"
    assert (cfg.trainer.parallel, cfg.trainer.device) == ("ddp", "cuda")
