"""``archlab teacher build`` under torchrun (issue 20): the ranks share the soft-target build.

Two CPU processes (gloo; torchrun, or 2 SLURM tasks) build a cache byte-identical to the
one-process build, every ``.bin`` file and meta.json, for the n-gram teacher and a small trained
teacher, over windows that do not split evenly (7 train and 22 val batches of 3 windows); a DDP
training run shares the build of its missing cache; a rank that fails leaves no published cache
and no rank hangs. The builds run as subprocesses, one thread each, so both sides round alike."""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import slurm_tasks

pytestmark = pytest.mark.slow
BUILD = ("-m", "archlab.cli", "teacher", "build")
# 5 steps x batch 4 = 20 train windows, 2048 / 32 = 64 val windows, in batches of 3: 7 and 22 batches
RUN = (
    "objective=kd",
    "trainer.max_steps=5",
    "trainer.device=cpu",
    "distill.build_batch_size=3",
)
TEACHERS = {
    "ngram": ("teacher=ngram", "teacher.order=3"),
    "trained": (
        "teacher=trained",
        'teacher.overrides=["model.d_model=32","model.n_layers=1","model.n_heads=2",'
        '"trainer.max_steps=10","trainer.batch_size=4","trainer.eval_tokens=1024"]',
    ),
}
SPLIT = "soft targets: 2 ranks fill train windows [0, 9) [9, 20) and val windows [0, 33) [33, 66)"
# rank 1 fails while filling its share; rank 0 fails before the build starts (module:attribute)
FAULTS = {
    "rank 1 fills": ("1", "archlab.teachers.ngram:NGramTeacher.log_probs"),
    "rank 0 starts": ("0", "archlab.soft_targets:_check_space"),
}
TOLD = {  # what the rank without the fault says
    "1": "rank 1 of 2 failed its share of the soft-target build: RuntimeError: injected fault",
    "0": "rank 0 could not build or load the soft targets",
}
FAULTY = """import importlib, os, sys
from archlab import cli
rank, target = sys.argv[1:3]  # on that rank, target raises
if os.environ["RANK"] == rank:
    module, path = target.split(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module)
    for part in owners:
        owner = getattr(owner, part)
    def fault(*args, **kwargs):
        raise RuntimeError("injected fault")
    setattr(owner, name, fault)
sys.exit(cli.main(sys.argv[3:]))
"""


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` on CPU, one thread per process; it must end within 180 s (no rank may hang)."""
    env = {**env, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def built(cache: Path) -> Path:
    """The one soft-target cache published under ``cache``."""
    [path] = [p for p in (cache / "soft_targets").iterdir() if p.is_dir() and not p.name.startswith(".")]
    return path


def corpus_only(cache: Path, into: Path) -> None:
    """A copy of ``cache`` without its teachers and soft targets: the corpus tokens, not rebuilt."""
    shutil.copytree(cache, into, ignore=lambda d, names: {"teachers", "soft_targets"} & set(names))


@pytest.fixture(scope="module")
def overrides(tiny_overrides) -> list[str]:
    """The tiny run, distilled, without its cache dir (each build gets its own)."""
    return [o for o in tiny_overrides if not o.startswith("data.cache_dir=")] + list(RUN)


def two_ranks(launcher: str, args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """What 2 ranks of ``archlab teacher build ARGS`` print (stdout and stderr), started by ``launcher``:
    torchrun, or as the 2 tasks of a SLURM job (``tests/test_distributed.py``'s ``slurm_tasks``)."""
    if launcher == "slurm":
        slurm_tasks(*BUILD, *args, cwd=cwd, env=env)
        return "".join((cwd / f"task{rank}.log").read_text() for rank in range(2))
    done = run(torchrun(*BUILD, *args), cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    ("teacher", "launcher"), [("ngram", "torchrun"), ("trained", "torchrun"), ("ngram", "slurm")]
)
def test_two_ranks_build_the_cache_one_process_builds(teacher, launcher, overrides, tmp_path, cli_env):
    args = [*overrides, *TEACHERS[teacher]]
    one = run([sys.executable, *BUILD, *args, f"data.cache_dir={tmp_path / 'one'}"], tmp_path, cli_env)
    assert one.returncode == 0, one.stderr[-3000:]
    corpus_only(tmp_path / "one", tmp_path / "two")
    printed = two_ranks(launcher, [*args, f"data.cache_dir={tmp_path / 'two'}"], tmp_path, cli_env)
    assert SPLIT in printed, printed[-3000:]
    assert printed.count("soft targets (20 train windows") == 1, "rank 0 alone reports"
    a, b = built(tmp_path / "one"), built(tmp_path / "two")
    assert a.name == b.name, "the same cache key"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) == 7
    different = [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]
    assert not different, f"differ from the one-process build: {different}"
    meta = json.loads((b / "meta.json").read_text())
    assert (meta["train_rows"], meta["val_windows"]) == (20, 66)  # 64 needed, in whole batches of 3
    assert not list((tmp_path / "two" / "soft_targets").glob(".tmp-*")), "a temporary dir is left"


def test_two_ranks_extend_a_cache_as_one_process_does(overrides, tmp_path, cli_env):
    """A cache built for 5 steps, extended to 8 steps of another seed: by 2 ranks, the same files."""
    args = [*overrides, *TEACHERS["ngram"]]
    longer = ["trainer.max_steps=8", "seed=1"]
    for where in ("one", "two"):
        first = run([sys.executable, *BUILD, *args, f"data.cache_dir={tmp_path / where}"], tmp_path, cli_env)
        assert first.returncode == 0, first.stderr[-3000:]
    one = run(
        [sys.executable, *BUILD, *args, *longer, f"data.cache_dir={tmp_path / 'one'}"], tmp_path, cli_env
    )
    assert one.returncode == 0, one.stderr[-3000:]
    printed = two_ranks("torchrun", [*args, *longer, f"data.cache_dir={tmp_path / 'two'}"], tmp_path, cli_env)
    assert "training windows to compute (" in printed and "(0 kept)" not in printed, printed[-3000:]
    a, b = built(tmp_path / "one"), built(tmp_path / "two")
    different = [p.name for p in a.iterdir() if not filecmp.cmp(p, b / p.name, shallow=False)]
    assert not different, f"differ from the one-process extension: {different}"
    assert json.loads((b / "meta.json").read_text())["train_rows"] > 20


def test_a_ddp_training_run_shares_the_build_of_its_missing_cache(overrides, tmp_path, cli_env):
    (tmp_path / "cache").mkdir()
    args = [*overrides, *TEACHERS["ngram"], "trainer.parallel=ddp", "trainer.max_steps=2"]
    args += [f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = run(torchrun("-m", "archlab.cli", "train", *args), tmp_path, cli_env)
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 steps x batch 4 x 2 ranks = 16 train windows in 6 batches of 3
    split = "soft targets: 2 ranks fill train windows [0, 9) [9, 16) and val windows [0, 33) [33, 66)"
    assert split in (tmp_path / "run" / "train.log").read_text()
    assert json.loads((built(tmp_path / "cache") / "meta.json").read_text())["train_rows"] == 16


def test_two_ranks_find_a_published_cache(overrides, tmp_path, cli_env):
    args = [*overrides, *TEACHERS["ngram"], f"data.cache_dir={tmp_path}"]
    first = run(torchrun(*BUILD, *args), tmp_path, cli_env)
    assert first.returncode == 0, first.stderr[-3000:]
    stamp = (built(tmp_path) / "meta.json").stat().st_mtime_ns
    again = run(torchrun(*BUILD, *args), tmp_path, cli_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "soft targets: found" in again.stderr and "soft targets: building" not in again.stderr
    assert (built(tmp_path) / "meta.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_rank_fails_every_rank_and_publishes_nothing(fault, overrides, tmp_path, cli_env):
    (tmp_path / "faulty.py").write_text(FAULTY)
    rank, target = FAULTS[fault]
    args = [*overrides, *TEACHERS["ngram"], f"data.cache_dir={tmp_path / 'cache'}"]
    command = torchrun(str(tmp_path / "faulty.py"), rank, target, "teacher", "build", *args)
    done = run(command, tmp_path, cli_env)
    assert done.returncode != 0
    assert "RuntimeError: injected fault" in done.stderr and TOLD[rank] in done.stderr, done.stderr[-3000:]
    left = [p.name for p in (tmp_path / "cache" / "soft_targets").iterdir() if not p.name.endswith(".lock")]
    assert not left, "a cache or a temporary dir is left"
