"""trainer.parallel=ddp|fsdp (archlab.distributed): N processes of batch b follow the curve of one process
of batch N·b, write one run dir from rank 0, and agree on the MoE router's balancing biases; every
first-party plugin trains under FSDP2; checkpoints resume at the same and at another world size.

The multi-process cases spawn ``torchrun --standalone --nproc_per_node=2`` (gloo on CPU, one thread
per process) as a subprocess; the reference and world-size-1 runs are ``archlab train`` in-process."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archlab import checkpoint, cli, distributed, resume
from archlab.errors import ConfigError

WORKER = Path(__file__).with_name("distributed_worker.py")
PLUGINS_WORKER = Path(__file__).with_name("fsdp_plugins_worker.py")
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
    "trainer.ckpt_every=2",
)
MOE = ("ffn=moe", "ffn.router=aux_free", "+ffn.router_options.bias_update_rate=0.01")


def torchrun(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on CPU, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    done = subprocess.run(
        command, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout
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


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, tiny_overrides) -> Path:
    """One process, batch 16: the run whose curve the data-parallel runs must follow."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_in_process(run_dir, *tiny_overrides, *RUN, "trainer.batch_size=16")
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_dir) -> list[dict]:
    return records_of(reference_dir)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, cli_env, tiny_overrides) -> Path:
    """2 processes of batch 8 under fsdp: the run of ``RUN``, checkpoints at steps 2 and 4."""
    cwd = tmp_path_factory.mktemp("sharded")
    args = (
        "-m",
        "archlab.cli",
        "train",
        *tiny_overrides,
        *RUN,
        "trainer.batch_size=8",
        "trainer.parallel=fsdp",
    )
    torchrun(*args, f"hydra.run.dir={cwd / 'run'}", cwd=cwd, env=cli_env)
    return cwd / "run"


def slurm_tasks(*args: str, cwd: Path, env: dict[str, str]) -> None:
    """``python ARGS`` as the 2 tasks of one SLURM job on this host (what ``srun`` or submitit starts):
    SLURM_* variables only, no torchrun, one thread each; the job's number gives a free MASTER_PORT."""
    while (port := free_port()) >= 60000:  # archlab's port is 20000 + SLURM_JOB_ID mod 40000
        pass
    job = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(port - 20000), "SLURM_JOB_NODELIST": "localhost"}
    env = {k: v for k, v in env.items() if k not in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    logs = [cwd / f"task{rank}.log" for rank in range(2)]
    tasks = [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env={**env, **job, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "OMP_NUM_THREADS": "1"},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for rank, log in enumerate(logs)
    ]
    for task, log in zip(tasks, logs, strict=True):
        assert task.wait(timeout=120) == 0, log.read_text()[-3000:]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    ("launcher", "parallel"), [("torchrun", "ddp"), ("slurm", "ddp"), ("torchrun", "fsdp")]
)
def test_two_processes_of_batch_8_follow_one_of_batch_16(
    launcher, parallel, tmp_path, cli_env, tiny_overrides, reference
):
    # a run dir each process resolves differently, as Hydra's ${now:...} may (one second apart)
    rank = "RANK" if launcher == "torchrun" else "SLURM_PROCID"  # RANK is archlab's to set under SLURM
    args = (
        "-m", "archlab.cli", "train", *tiny_overrides, *RUN, "trainer.batch_size=8",
        f"trainer.parallel={parallel}", f"hydra.run.dir=outputs/rank${{oc.env:{rank}}}",
    )  # fmt: skip
    (torchrun if launcher == "torchrun" else slurm_tasks)(*args, cwd=tmp_path, env=cli_env)
    run_dir = tmp_path / "outputs" / "rank0"
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["rank0"], "one run, one run dir"
    records = records_of(run_dir)
    assert records[0]["world_size"] == 2 and reference[0]["world_size"] == 1
    assert_same_curve(records[1:], reference[1:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["memory/peak_rss_bytes"] > 0
    assert summary["train/tokens"] == 4 * 16 * 2 * 32  # steps × global batch × grad_accum × context
    log = (run_dir / "train.log").read_text()
    assert log.count("teacher ngram: val bpb") == 1, "only rank 0 writes the log"
    last = checkpoint.latest(run_dir)
    assert last.name == "step_00000004" and checkpoint.is_sharded(last)
    listed = json.loads((last / "manifest.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "model.safetensors"} <= set(listed), sorted(listed)


def killed_after_step_2(run_dir: Path, into: Path) -> Path:
    """A copy of the finished ``run_dir`` as a kill after step 2's checkpoint leaves it: no later
    checkpoint, no summary, metrics past step 2 (which the resumed run drops)."""
    copy = Path(shutil.copytree(run_dir, into))
    shutil.rmtree(copy / "checkpoints" / "step_00000004")
    (copy / "checkpoints" / "LAST").write_text("step_00000002")
    (copy / "summary.json").unlink()
    return copy


@pytest.mark.parametrize(
    ("saved", "parallel", "nproc"),
    [("sharded", "fsdp", 2), ("sharded", "ddp", 2), ("sharded", "none", 1), ("sharded", "ddp", 1),
     ("single", "fsdp", 2), ("single", "ddp", 2)],
)  # fmt: skip
def test_a_resume_continues_the_curve_at_any_world_size(
    saved, parallel, nproc, request, tmp_path, cli_env, tiny_overrides, reference, monkeypatch
):
    """Killed after step 2 of 4, resumed with the same global batch (16 windows) on ``nproc`` ranks: the
    same curve as the uninterrupted run, bit for bit at the world size it was saved at."""
    source = request.getfixturevalue("sharded_dir" if saved == "sharded" else "reference_dir")
    run_dir = killed_after_step_2(source, tmp_path / "run")
    args = (*tiny_overrides, *RUN, f"trainer.batch_size={16 // nproc}", f"trainer.parallel={parallel}")
    args = (*args, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    if nproc == 2:
        torchrun("-m", "archlab.cli", "train", *args, cwd=tmp_path, env=cli_env)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        assert cli.main(["train", *QUIET_HYDRA, *args]) == 0
    same_layout = (saved, parallel, nproc) == ("sharded", "fsdp", 2)
    want = records_of(source) if same_layout else reference
    assert_same_curve(records_of(run_dir)[1:], want[1:], atol=0.0 if same_layout else 1e-5)
    resumed = json.loads((run_dir / "resumes.jsonl").read_text())
    world = {"checkpoint": 2 if saved == "sharded" else 1, "now": nproc}
    assert resumed["step"] == 2 and resumed["changed"].get("world_size", world) == world
    assert checkpoint.is_sharded(checkpoint.latest(run_dir)) == (parallel != "none")


def test_a_resume_that_changes_the_global_batch_is_refused(capsys, tmp_path, tiny_overrides, reference_dir):
    run_dir = killed_after_step_2(reference_dir, tmp_path / "run")
    args = [*tiny_overrides, *RUN, "trainer.batch_size=8", "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", *QUIET_HYDRA, *args])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert "trainer.batch_size=8 is not allowed: expected 16:" in err and "global batch of 32 windows" in err
    assert not (run_dir / "checkpoints" / "step_00000004").exists(), "training went on"


def test_a_global_batch_no_split_fits_names_what_to_change():
    saved = {"batch_size": 16, "grad_accum": 2}
    with pytest.raises(ConfigError, match=r"trainer.batch_size=5.*expected none \(32 windows do not split"):
        resume.check_global_batch(Path("ckpt"), saved, 1, {"batch_size": 5, "grad_accum": 3}, 2)
    resume.check_global_batch(Path("ckpt"), saved, 1, {"batch_size": 4, "grad_accum": 4}, 2)  # 4 x 4 x 2


def test_ddp_without_torchrun_is_world_size_one(tmp_path, tiny_overrides, reference, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    records = train_in_process(
        tmp_path / "run", *tiny_overrides, *RUN, "trainer.batch_size=16", "trainer.parallel=ddp"
    )
    assert records[0]["world_size"] == 1
    assert_same_curve(records[1:], reference[1:], atol=1e-6)
    assert not torch.distributed.is_initialized(), "the process group is left when the run ends"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_biases_agree_across_ranks_and_drift_without_the_sum(
    parallel, tmp_path, cli_env, tiny_overrides, make_trainer
):
    steps, out = 3, tmp_path / "biases.json"
    overrides = [
        *tiny_overrides,
        *MOE,
        "trainer.device=cpu",
        f"trainer.parallel={parallel}",
        "trainer.batch_size=8",
    ]
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


def test_parallel_must_be_none_ddp_or_fsdp(capsys, tiny_overrides, tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli.main(
            ["train", *tiny_overrides, *QUIET_HYDRA, f"hydra.run.dir={tmp_path}", "trainer.parallel=zero3"]
        )
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1, err
    assert "trainer.parallel='zero3'" in err and "none, ddp or fsdp" in err
    assert not (tmp_path / "checkpoints").exists(), "training started"


def test_parallel_none_under_a_torchrun_of_two_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused = pytest.raises(ConfigError, match="trainer.parallel.*ddp or fsdp under torchrun or SLURM")
    with refused, distributed.process_group("none", torch.device("cpu")):
        pass


@pytest.mark.slow
def test_every_first_party_plugin_trains_under_fsdp(tmp_path, cli_env, tiny_overrides):
    """At world size 2, batch 4 a rank: the same losses and eval as one process of 2 micro-batches of 4
    (about a minute of CPU time: 12 students, each trained twice)."""
    steps, out = 2, tmp_path / "plugins.json"
    overrides = [*tiny_overrides, "trainer.device=cpu", "trainer.max_steps=4", "trainer.eval_tokens=512"]
    torchrun(
        str(PLUGINS_WORKER),
        str(out),
        str(steps),
        str(tmp_path / "run"),
        *overrides,
        cwd=tmp_path,
        env=cli_env,
    )
    results = json.loads(out.read_text())
    assert {
        "default",
        "attention=mla",
        "ffn=moe",
        "residual=attnres",
        "linear=ternary",
        "head=medusa",
    } <= set(results), sorted(results)
    for case, runs in results.items():
        got, want = runs["fsdp"], runs["single"]
        assert len(got["losses"]) == steps and all(math.isfinite(v) for v in got["losses"]), case
        pairs = zip([*got["losses"], got["val/bpb"]], [*want["losses"], want["val/bpb"]], strict=True)
        diff = max(abs(g - w) for g, w in pairs)
        assert diff <= 1e-5, f"{case}: max difference {diff:.3g}, fsdp {got} vs one process {want}"


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node07", "node07"), ("a,b", "a"), ("node[01-04]", "node01"), ("gpu[3,5-7],cpu1", "gpu3"),
     ("rack[2-3]-n[08-09]", "rack2-n08")],
)  # fmt: skip
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node[01-04", ",a"])
def test_a_malformed_node_list_is_a_config_error(nodelist):
    with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST.*node\\[01-04\\] or a,b"):
        distributed.first_host(nodelist)


SLURM_TASK = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[12-13]",
}


def test_slurm_tasks_become_torchrun_ranks():
    env = dict(SLURM_TASK)
    distributed.slurm_env(env)
    got = {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    assert got == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu12",
        "MASTER_PORT": "23456",
    }


@pytest.mark.parametrize(
    "given",
    [{"WORLD_SIZE": "2"}, {"SLURM_NTASKS": "1"}, {"MASTER_ADDR": "head", "MASTER_PORT": "29500"}],
)
def test_torchrun_wins_and_one_task_is_left_alone(given):
    env = {**SLURM_TASK, **given}
    distributed.slurm_env(env)
    if "MASTER_ADDR" in given:  # set by hand: kept, the ranks still from SLURM
        assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("head", "29500", "5")
    else:
        assert env == {**SLURM_TASK, **given}, "torchrun's variables (or one task) must be left as they are"


def test_slurm_tasks_without_a_job_id_are_a_config_error():
    env = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_JOB_ID"}
    with pytest.raises(ConfigError, match="SLURM_JOB_ID=None"):
        distributed.slurm_env(env)


@pytest.mark.parametrize(
    ("name", "job_num", "gpus", "device"),
    [
        ("auto", 5, 4, "cuda:1"),  # job 5 of a parallel sweep on 4 GPUs
        ("cuda", 2, 4, "cuda:2"),
        ("cuda:3", 0, 4, "cuda:3"),  # a device of its own is kept
        ("cpu", 1, 4, "cpu"),
        ("auto", None, 4, "auto"),  # a sequential launcher: every job may use the same GPU
        ("auto", 5, 1, "auto"),
        ("auto", 5, 0, "auto"),  # no CUDA
    ],
)
def test_parallel_sweep_jobs_are_pinned_to_their_own_gpu(monkeypatch, name, job_num, gpus, device):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert distributed.sweep_device(name, job_num) == device


def test_ranks_of_torchrun_or_slurm_are_not_pinned_by_the_job_number(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.sweep_device("auto", 3) == "auto"
