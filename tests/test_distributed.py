"""trainer.parallel=ddp (archlab.distributed): N processes of batch b follow the curve of one process of
batch N·b, write one run dir from rank 0, and agree on the MoE router's balancing biases.

The multi-process cases spawn ``torchrun --standalone --nproc_per_node=2`` (gloo on CPU, one thread
per process) as a subprocess; the reference and world-size-1 runs are ``archlab train`` in-process."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archlab import checkpoint, cli, distributed
from archlab.errors import ConfigError
from archlab.resume import ResumeError

WORKER = Path(__file__).with_name("distributed_worker.py")
QUIET_HYDRA = ("hydra/job_logging=none", "hydra/hydra_logging=none")  # leave the session's logging be
# a distilled run (the ngram teacher's soft targets must follow the windows), 2 micro-batches a step
RUN = (
    "teacher=ngram",
    "objective=kd",
    "trainer.grad_accum=2",
    "trainer.max_steps=4",
    "trainer.eval_every=2",
    "trainer.log_every=1",
    "trainer.device=cpu",
)
MOE = ("ffn=moe", "ffn.router=aux_free", "+ffn.router_options.bias_update_rate=0.01")


def torchrun(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on CPU, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    done = subprocess.run(
        command, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_in_process(run_dir: Path, *overrides: str) -> list[dict]:
    """``archlab train OVERRIDES`` in this process; its metrics.jsonl records."""
    assert cli.main(["train", *QUIET_HYDRA, f"hydra.run.dir={run_dir}", *overrides]) == 0
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got: list[dict], want: list[dict], atol: float = 1e-5) -> None:
    """Per step, the same training loss and the same eval metrics, within ``atol``."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want, strict=True):
        compared = [k for k in w if k.startswith(("train/loss", "train/total_loss", "val/"))]
        assert compared and set(compared) <= set(g), (sorted(w), sorted(g))
        for key in compared:
            assert abs(g[key] - w[key]) <= atol, f"step {w['step']} {key}: {g[key]} vs {w[key]}"
        assert g.get("train/tokens") == w.get("train/tokens")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides) -> list[dict]:
    """One process, batch 16: the curve the data-parallel runs must follow."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return train_in_process(run_dir, *tiny_overrides, *RUN, "trainer.batch_size=16")


def test_two_processes_of_batch_8_follow_one_of_batch_16(tmp_path, cli_env, tiny_overrides, reference):
    # a run dir each process resolves differently, as Hydra's ${now:...} may (one second apart)
    per_process_dir = "hydra.run.dir=outputs/rank${oc.env:RANK}"
    torchrun(
        "-m", "archlab.cli", "train", *tiny_overrides, *RUN, "trainer.batch_size=8", "trainer.parallel=ddp",
        per_process_dir, cwd=tmp_path, env=cli_env,
    )  # fmt: skip
    run_dir = tmp_path / "outputs" / "rank0"
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["rank0"], "one run, one run dir"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["world_size"] == 2 and reference[0]["world_size"] == 1
    assert_same_curve(records[1:], reference[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["memory/peak_rss_bytes"] > 0
    assert summary["train/tokens"] == 4 * 16 * 2 * 32  # steps × global batch × grad_accum × context
    log = (run_dir / "train.log").read_text()
    assert log.count("teacher ngram: val bpb") == 1, "only rank 0 writes the log"
    assert checkpoint.latest(run_dir).name == "step_00000004"


def test_ddp_without_torchrun_is_world_size_one(tmp_path, tiny_overrides, reference, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    records = train_in_process(
        tmp_path / "run", *tiny_overrides, *RUN, "trainer.batch_size=16", "trainer.parallel=ddp"
    )
    assert records[0]["world_size"] == 1
    assert_same_curve(records[1:], reference[1:], atol=1e-6)
    assert not torch.distributed.is_initialized(), "the process group is left when the run ends"


def test_moe_biases_agree_across_ranks_and_drift_without_the_sum(
    tmp_path, cli_env, tiny_overrides, make_trainer
):
    steps, out = 3, tmp_path / "biases.json"
    overrides = [*tiny_overrides, *MOE, "trainer.device=cpu", "trainer.parallel=ddp", "trainer.batch_size=8"]
    torchrun(str(WORKER), str(out), str(steps), str(tmp_path / "run"), *overrides, cwd=tmp_path, env=cli_env)
    biases = json.loads(out.read_text())
    rank0, rank1 = biases["summed"]
    assert rank0 == rank1, "the ranks' biases differ although the router declares its load"
    single = make_trainer(tmp_path / "single", *MOE, "trainer.device=cpu", "trainer.batch_size=16")
    for _ in range(steps):
        single.train_step()
    expected = [b.tolist() for name, b in single.model.named_buffers() if name.endswith("expert_bias")]
    assert rank0 == expected, "summed over 2 ranks of 8, the load is not that of one process of 16"
    rank0, rank1 = biases["unsummed"]
    assert rank0 != rank1, "without the sum each rank balances its own half: the biases must drift apart"


def test_parallel_must_be_none_or_ddp(capsys, tiny_overrides, tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli.main(
            ["train", *tiny_overrides, *QUIET_HYDRA, f"hydra.run.dir={tmp_path}", "trainer.parallel=fsdp"]
        )
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert "trainer.parallel='fsdp'" in err and "none or ddp" in err
    assert not (tmp_path / "checkpoints").exists(), "training started"


def test_parallel_none_under_a_torchrun_of_two_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = pytest.raises(ConfigError, match="trainer.parallel.*ddp under torchrun")
    with refused, distributed.process_group("none", torch.device("cpu")):
        pass


def test_a_resume_at_another_world_size_is_refused(tmp_path, make_trainer):
    run_dir = tmp_path / "run"
    make_trainer(run_dir, "trainer.max_steps=1", "trainer.device=cpu").run()
    resumed = make_trainer(run_dir, "trainer.max_steps=2", "trainer.device=cpu", "trainer.resume=auto")
    resumed.ranks = dataclasses.replace(resumed.ranks, world_size=2)  # as a torchrun of 2 would have it
    with pytest.raises(ResumeError, match="trained on 1 process.*this run has 2.*not built yet"):
        resumed.run()
