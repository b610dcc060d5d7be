"""The ``archlab`` command in a subprocess: plugin listing, clear errors, real training runs."""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

import archlab
from archlab import slots

BROKEN_AND_FINE = {
    "clibroken_pkg/__init__.py": "",
    "clibroken_pkg/broken.py": "raise ImportError('clibroken needs the frobnicate package')\n",
    "clibroken_pkg/fine.py": """
        from dataclasses import dataclass


        class Fine:
            @dataclass
            class Config:
                depth: int = 7
    """,
}
BROKEN_ENTRY_POINTS = {
    "archlab.ffn": {"clibroken": "clibroken_pkg.broken:Broken"},
    "archlab.attention": {"clifine": "clibroken_pkg.fine:Fine"},
}

MYFFN = """
    from dataclasses import dataclass

    from torch import nn

    from archlab.errors import ConfigError


    class MyFFN(nn.Module):
        @dataclass
        class Config:
            width: int = 4

            def validate(self, dims):
                if self.width < 1:
                    raise ConfigError("ffn.width", self.width, "a positive integer")

        def __init__(self, cfg, dims, *, linear):
            super().__init__()
            self.down = linear(dims.d_model, dims.d_model, role="ffn.down")

        def forward(self, x, ctx):
            return self.down(x)
"""

#: Small, fast settings for runs that really train (a 2 MB slice of the stdlib corpus).
FAST = (
    "trainer.eval_every=10",
    "trainer.eval_tokens=4096",
    "trainer.batch_size=8",
    "data.max_bytes=2000000",
    "trainer.progress=false",
)
SUMMARY_KEYS = (
    "params/total",
    "params/non_embedding",
    "params/active",
    "weight_bytes",
    "flops_per_token",
    "kv_bytes_per_token",
    "tokens_per_s",
    "val/bpb",
)

LISTING = re.compile(
    r"^  (?P<name>\S+)\s+(?P<dist>\S+) (?P<version>\S+)\s+"
    r"(?P<status>ok|BROKEN \((?P<entry_point>[^)]*)\): .*)$"
)


def listed(stdout: str) -> dict[str, dict[str, re.Match]]:
    """``archlab plugins`` output as {slot: {name: match}}."""
    out: dict[str, dict[str, re.Match]] = {}
    slot = None
    for line in stdout.splitlines():
        if (
            line
            and not line.startswith(" ")
            and line.split(":")[0] in slots.names("sublayer", "model", "pipeline")
        ):
            slot = line.split(":")[0]
            out[slot] = {}
        elif slot and (m := LISTING.match(line)):
            out[slot][m["name"]] = m
    return out


def produced_results(root: Path) -> list[Path]:
    """Anything a training run writes: metrics, summary, checkpoints."""
    patterns = ("**/metrics.jsonl", "**/summary.json", "**/checkpoints")
    return [p for pattern in patterns for p in root.glob(pattern)]


def wandb_records(path: Path) -> Iterator[bytes]:
    """Records of a W&B transaction log (``run-<id>.wandb``): a LevelDB-style log after a 7-byte header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk


def wandb_run_record(run_dir: Path):
    """The RunRecord (id, group, name, tags, config) of the one offline W&B run under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2

    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    (log,) = offline[0].glob("run-*.wandb")
    for raw in wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise AssertionError(f"no run record in {log}")


def assert_no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# --- archlab plugins ---------------------------------------------------------------------------


def test_plugins_lists_every_slot_with_its_distribution(run_cli) -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    found = listed(result.stdout)
    assert list(found) == list(slots.names("sublayer", "model", "pipeline"))
    for slot, names in {
        "attention": ["mha"],
        "ffn": ["mlp"],
        "memory": ["none"],
        "residual": ["prenorm"],
        "linear": ["dense"],
        "norm": ["layernorm", "rmsnorm"],
        "position": ["none", "rope"],
        "head": ["lm"],
        "corpus": ["files", "stdlib"],
        "teacher": ["hf", "ngram", "self", "trained"],
        "objective": ["ce", "kd"],
    }.items():
        for name in names:
            m = found[slot][name]
            assert (m["dist"], m["version"], m["status"]) == ("archlab", archlab.__version__, "ok"), m[0]
    relu2 = found["ffn"]["relu2"]
    assert (relu2["dist"], relu2["status"]) == ("archlab-plugins", "ok")
    assert "hidden_mult=4.0, bias=False" in result.stdout  # each plugin's fields and defaults
    assert "presets: pkg://archlab_plugins.conf" in result.stdout
    assert result.stderr == ""


def test_plugins_check_exits_0_when_every_plugin_loads(run_cli) -> None:
    result = run_cli("plugins", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout
    assert result.stderr == ""


def test_plugins_check_exits_1_naming_the_broken_plugin(run_cli, make_dist) -> None:
    site = make_dist("cli-broken", BROKEN_ENTRY_POINTS, BROKEN_AND_FINE, version="0.2", on_path=False)
    result = run_cli("plugins", "--check", pythonpath=[site])
    assert result.returncode == 1
    assert_no_traceback(result)
    broken = listed(result.stdout)["ffn"]["clibroken"]
    assert (broken["dist"], broken["version"]) == ("cli-broken", "0.2")
    assert broken["entry_point"] == BROKEN_ENTRY_POINTS["archlab.ffn"]["clibroken"]
    assert "ImportError: clibroken needs the frobnicate package" in broken["status"]
    assert result.stderr.strip() == "1 broken plugin(s)"


def test_plugins_without_check_still_lists_the_others(run_cli, make_dist) -> None:
    site = make_dist("cli-broken", BROKEN_ENTRY_POINTS, BROKEN_AND_FINE, on_path=False)
    result = run_cli("plugins", pythonpath=[site])
    assert result.returncode == 0, result.stderr
    found = listed(result.stdout)
    assert found["ffn"]["clibroken"]["status"].startswith("BROKEN (")
    assert found["ffn"]["mlp"]["status"] == found["ffn"]["relu2"]["status"] == "ok"
    assert found["attention"]["clifine"]["dist"] == "cli-broken"
    assert found["attention"]["clifine"]["status"] == "ok"
    assert "depth=7" in result.stdout


def test_plugins_lists_two_claims_on_one_name_as_broken_and_the_rest_ok(run_cli, make_dist) -> None:
    one = make_dist("claim-one", {"archlab.ffn": {"twice": "one_pkg.mod:A"}}, {}, on_path=False)
    two = make_dist("claim-two", {"archlab.ffn": {"twice": "two_pkg.mod:B"}}, {}, on_path=False)
    result = run_cli("plugins", "--check", pythonpath=[one, two])
    assert result.returncode == 1
    assert_no_traceback(result)
    found = listed(result.stdout)
    status = found["ffn"]["twice"]["status"]
    assert status.startswith("BROKEN (") and "two plugins claim ffn=twice" in status
    for part in ("claim-one 1.0", "claim-two 1.0", "one_pkg.mod:A", "two_pkg.mod:B"):
        assert part in status
    assert found["ffn"]["mlp"]["status"] == found["attention"]["mha"]["status"] == "ok"
    assert result.stderr.strip() == "1 broken plugin(s)"


# --- archlab train: errors before training -----------------------------------------------------


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, cli_runner) -> Callable[[str], tuple[subprocess.CompletedProcess, Path]]:
    """``bad_run(override)``: ``archlab train <override> logger=none`` once per module, in its own dir."""
    runs: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(override: str) -> tuple[subprocess.CompletedProcess, Path]:
        if override not in runs:
            cwd = tmp_path_factory.mktemp("bad-input")
            runs[override] = cli_runner("train", override, "logger=none", *FAST, cwd=cwd), cwd
        return runs[override]

    return run


@pytest.mark.parametrize(
    ("override", "key", "also"),
    [
        ("model.n_heads=3", "model.n_heads", "divisor of model.d_model=128"),
        ("attention.n_kv_heads=3", "attention.n_kv_heads", "divisor of model.n_heads=4"),
        ("attention=nope", "attention=nope", "mha"),
        ("trainer.lr=abc", "trainer.lr", "abc"),
    ],
)
def test_bad_input_stops_before_training_with_a_clear_message(bad_run, override, key, also) -> None:
    result, cwd = bad_run(override)
    assert result.returncode != 0
    assert_no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert key in lines[0], result.stderr  # the headline names the key
    assert also in result.stderr
    assert produced_results(cwd) == []
    assert "val bpb" not in result.stdout


@pytest.mark.parametrize("override", ["model.n_heads=3", "attention.n_kv_heads=3"])
def test_archlab_checks_report_exactly_one_line(bad_run, override) -> None:
    result, _ = bad_run(override)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"archlab: error: {override} is not allowed: expected ")


def test_third_party_plugin_check_fails_the_cli_before_training(run_cli, make_dist, tmp_path) -> None:
    site = make_dist(
        "cli-myffn",
        {"archlab.ffn": {"climyffn": "climyffn_pkg.ffn:MyFFN"}},
        {"climyffn_pkg/__init__.py": "", "climyffn_pkg/ffn.py": MYFFN},
        on_path=False,
    )
    result = run_cli("train", "ffn=climyffn", "ffn.width=0", "logger=none", *FAST, pythonpath=[site])
    assert result.returncode == 2
    assert_no_traceback(result)
    assert result.stderr.strip().splitlines() == [
        "archlab: error: ffn.width=0 is not allowed: expected a positive integer"
    ]
    assert produced_results(tmp_path) == []


def test_strict_mode_turns_a_broken_plugin_into_a_one_line_train_error(run_cli, make_dist, tmp_path) -> None:
    site = make_dist("cli-broken", BROKEN_ENTRY_POINTS, BROKEN_AND_FINE, on_path=False)
    result = run_cli("train", "logger=none", *FAST, pythonpath=[site], env={"ARCHLAB_STRICT_PLUGINS": "1"})
    assert result.returncode == 2
    assert_no_traceback(result)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("archlab: error: plugin ffn=clibroken ")
    assert "cli-broken 1.0" in line
    assert produced_results(tmp_path) == []


# --- archlab train: real runs ------------------------------------------------------------------


@pytest.mark.slow
def test_train_from_another_directory_writes_summary_and_offline_wandb_run(run_cli, tmp_path) -> None:
    result = run_cli(
        "train", "attention=mha", "ffn=relu2", "trainer.max_steps=20", "logger=wandb", *FAST, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result)
    summaries = list((tmp_path / "outputs").glob("*/*/summary.json"))
    assert len(summaries) == 1, summaries
    run_dir = summaries[0].parent
    assert f"results in {run_dir}" in result.stdout

    summary = json.loads(summaries[0].read_text())
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    assert not missing, f"summary.json lacks {missing}: {sorted(summary)}"
    assert summary["params/total"] >= summary["params/non_embedding"] > 0
    assert summary["params/active"] > 0
    assert summary["weight_bytes"] > 0
    assert summary["flops_per_token"] > 0
    assert summary["kv_bytes_per_token"] > 0
    assert summary["tokens_per_s"] > 0
    assert math.isfinite(summary["val/bpb"]) and 0 < summary["val/bpb"] < 8
    assert summary["train/steps"] == 20

    run = wandb_run_record(run_dir)
    assert run.project == "archlab"
    assert "ffn=relu2" in run.tags and "attention=mha" in run.tags
    assert run.run_group == ""  # a single run is not grouped
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["ffn"]["plugin"] == "relu2"
    assert (run_dir / "metrics.jsonl").exists()
    assert (run_dir / "checkpoints" / "LAST").exists()


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_grouped_wandb_run(run_cli, tmp_path) -> None:
    result = run_cli(
        "train", "-m", "ffn=mlp,relu2", "trainer.max_steps=3", "logger=wandb", *FAST, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_no_traceback(result)
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    jobs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert [job.name for job in jobs] == ["0", "1"]

    runs = {}
    for job in jobs:
        offline = list((job / "wandb").glob("offline-run-*"))
        assert len(offline) == 1, offline
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        ffn = next(o.split("=", 1)[1] for o in overrides if o.startswith("ffn="))
        runs[ffn] = (offline[0], wandb_run_record(job))
    assert set(runs) == {"mlp", "relu2"}

    (dir_mlp, run_mlp), (dir_relu2, run_relu2) = runs["mlp"], runs["relu2"]
    assert dir_mlp != dir_relu2
    assert run_mlp.run_id != run_relu2.run_id
    assert dir_mlp.name.endswith(run_mlp.run_id) and dir_relu2.name.endswith(run_relu2.run_id)
    expected_group = f"{sweep.parent.name}_{sweep.name}"
    assert run_mlp.run_group == run_relu2.run_group == expected_group
    assert "ffn=mlp" in run_mlp.tags and "ffn=relu2" in run_relu2.tags
    assert "ffn=mlp" in run_mlp.display_name and "ffn=relu2" in run_relu2.display_name
