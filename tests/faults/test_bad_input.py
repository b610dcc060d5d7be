"""Bad input (issue 18): exit 2 and one line naming the key and the value, before any training, no
traceback; 1 is left for a crash. Most cases call ``archlab.cli.main`` in-process (the exit code and
stderr are the command's); those where Hydra's process-level handling matters run the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from archlab import cli, registry

# Hydra's logging left as it is: an in-process run must not reconfigure the test session's loggers.
QUIET_HYDRA = ("hydra/job_logging=none", "hydra/hydra_logging=none")
BROKEN_FFN = {
    "brokenffn_pkg/__init__.py": "",
    "brokenffn_pkg/mod.py": "raise ImportError('needs frobnicate')\n",
}


def archlab(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``archlab ARGS`` in-process: its exit status and its stderr."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_bad_input(code: int, stderr: str, *parts: str) -> str:
    """Exit 2, no traceback, and a single stderr line holding every part; returns the line."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, f"exit {code}:\n{stderr}"
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def train(capsys, tiny_overrides, tmp_path):
    """``train(*overrides)``: ``archlab train`` of the tiny run in-process, into a fresh run dir."""

    def run(*overrides: str) -> tuple[int, str]:
        run_dir = tmp_path / "run"
        code, err = archlab(
            capsys, "train", *tiny_overrides, *QUIET_HYDRA, f"hydra.run.dir={run_dir}", *overrides
        )
        assert not (run_dir / "checkpoints").exists(), "training started"
        return code, err

    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_trainer) -> Path:
    """A finished two-step tiny run."""
    run_dir = tmp_path_factory.mktemp("trained")
    make_trainer(run_dir, "trainer.max_steps=2").run()
    return run_dir


# --- archlab train ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "parts"),
    [
        ("trainer.lr=nan", ["trainer.lr=nan"]),
        ("trainer.lr=inf", ["trainer.lr=inf"]),
        ("trainer.grad_clip=nan", ["trainer.grad_clip=nan"]),
        ("trainer.grad_clip=inf", ["trainer.grad_clip=inf"]),
        ("trainer.device=gpu9", ["trainer.device='gpu9'"]),
        ("seed=-1", ["seed=-1"]),
        ("seed=1.5", ["seed=1.5"]),
        ("seed=abc", ["seed='abc'"]),
        ("model.vocab_size=100", ["model.vocab_size=100", "256"]),
        ("trainer.init_from=/nonexistent", ["trainer.init_from='/nonexistent'"]),
        # Hydra's own config errors: an unknown key, bad override syntax, a missing config group option
        ("no_such_key=1", ["no_such_key"]),
        ("trainer.no_such_key=1", ["trainer.no_such_key"]),
        ("trainer.lr=[", ["'['"]),
        ("trainer.lr=abc", ["trainer.lr=abc", "could not be converted to Float"]),
        ("attention=nope", ["attention=nope", "mha"]),
    ],
)
def test_train_refuses_bad_config_before_training(train, override, parts) -> None:
    assert_bad_input(*train(override), *parts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_train_refuses_a_device_this_build_lacks(train) -> None:
    assert_bad_input(*train("trainer.device=cuda"), "trainer.device='cuda'")


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs /sys, which refuses new files even to root")
def test_a_run_dir_that_cannot_be_written_is_named(capsys, tiny_overrides) -> None:
    """/sys stands in for a read-only run dir: creating anything there fails, also for root."""
    code, err = archlab(capsys, "train", *tiny_overrides, *QUIET_HYDRA, "hydra.run.dir=/sys/archlab-run")
    assert_bad_input(code, err, "/sys/archlab-run")


def test_hydra_config_errors_exit_2_from_the_process(run_cli) -> None:
    result = run_cli("train", "no_such_key=1")
    assert_bad_input(result.returncode, result.stderr, "no_such_key")


BOOM_FFN = """
from dataclasses import dataclass
from torch import nn


class Boom(nn.Module):
    @dataclass
    class Config:
        pass

    def __init__(self, cfg, dims, *, linear) -> None:
        super().__init__()

    def forward(self, x, ctx):
        raise RuntimeError("kaput")
"""


def test_a_crash_exits_1_with_its_traceback(run_cli, make_dist, tiny_overrides) -> None:
    files = {"boom_pkg/__init__.py": "", "boom_pkg/mod.py": BOOM_FFN}
    site = make_dist("boom-ffn", {"archlab.ffn": {"boom": "boom_pkg.mod:Boom"}}, files, on_path=False)
    result = run_cli("train", *tiny_overrides, "ffn=boom", pythonpath=[site])
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
    assert "RuntimeError: kaput" in result.stderr


# --- plugins ----------------------------------------------------------------------------------------


def test_selecting_a_broken_plugin_shows_its_import_error(make_dist, train) -> None:
    make_dist("broken-ffn", {"archlab.ffn": {"brokenffn": "brokenffn_pkg.mod:Ffn"}}, BROKEN_FFN)
    assert_bad_input(
        *train("ffn=brokenffn"), "ffn=brokenffn", "broken-ffn 1.0", "ImportError: needs frobnicate"
    )


def test_a_duplicate_name_disables_only_that_name(make_dist, capsys, train) -> None:
    make_dist("dup-one", {"archlab.ffn": {"dupffn": "one_pkg.mod:A"}}, {})
    make_dist("dup-two", {"archlab.ffn": {"dupffn": "two_pkg.mod:B"}}, {})
    assert {"mlp", "relu2"} <= set(registry.loadable("ffn")) and "dupffn" not in registry.loadable("ffn")
    code, err = archlab(capsys, "plugins", "--check")
    assert code == 1 and err.strip() == "1 broken plugin(s)"
    assert_bad_input(*train("ffn=dupffn"), "two plugins claim ffn=dupffn", "dup-one 1.0", "dup-two 1.0")


# --- archlab generate and export --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["--temperature", "nan"], ["--temperature=nan"]),
        (["--temperature", "inf"], ["--temperature=inf"]),
        (["--top-p", "nan"], ["--top-p=nan"]),
        (["--top-k", "-1"], ["--top-k=-1"]),
        (["--seed", "-1"], ["--seed=-1"]),
        (["--prompt", "caf\udce9"], ["--prompt=", "UTF-8"]),  # a Latin-1 byte as Python passes it from argv
        (["--device", "gpu9"], ["--device='gpu9'"]),
    ],
)
def test_generate_refuses_bad_flags(capsys, trained, args, parts) -> None:
    assert_bad_input(*archlab(capsys, "generate", str(trained), "--max-new-tokens", "2", *args), *parts)


@pytest.mark.parametrize("command", [["generate"], ["export", "--packed"]])
def test_a_missing_checkpoint_is_named_as_the_argument(capsys, tmp_path, command) -> None:
    line = assert_bad_input(*archlab(capsys, command[0], str(tmp_path / "none"), *command[1:]), "CHECKPOINT=")
    assert "trainer.resume" not in line


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_export_out_must_be_a_file_path(capsys, trained, tmp_path, where) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path if where == "a directory" else tmp_path / "file" / "packed.safetensors"
    assert_bad_input(
        *archlab(capsys, "export", str(trained), "--packed", "--out", str(out)), f"--out='{out}'"
    )


def nan_checkpoint(trained: Path, tmp_path: Path) -> Path:
    """A copy of the run's last checkpoint with a NaN in its embedding, without a manifest (as one written
    before manifests existed), so that verification lets it through to the weights check."""
    ckpt = Path(
        shutil.copytree(
            trained / "checkpoints" / (trained / "checkpoints" / "LAST").read_text(), tmp_path / "ckpt"
        )
    )
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["embed.weight"][0, 0] = math.nan
    save_file(weights, str(ckpt / "model.safetensors"))
    (ckpt / "manifest.json").unlink()
    return ckpt


@pytest.mark.parametrize("command", [["generate", "--max-new-tokens", "2"], ["export", "--packed"]])
def test_non_finite_weights_are_warned_about(capsys, caplog, trained, tmp_path, command) -> None:
    ckpt = nan_checkpoint(trained, tmp_path)
    code, err = archlab(capsys, command[0], str(ckpt), *command[1:])
    assert code == 0, err
    (warning,) = [r.getMessage() for r in caplog.records if "NaN" in r.getMessage()]
    assert "embed.weight" in warning and str(ckpt) in warning and "\n" not in warning


# --- archlab report ---------------------------------------------------------------------------------


@pytest.mark.parametrize("summary", ["{not json", "[1, 2]", '{"val/bpb": "low"}', "\xff"])
def test_report_skips_a_garbage_summary_with_a_note(capsys, caplog, trained, tmp_path, summary) -> None:
    bad = tmp_path / "bad"
    (bad / ".hydra").mkdir(parents=True)
    (bad / "summary.json").write_bytes(summary.encode("latin-1"))
    code, err = archlab(capsys, "report", str(trained), str(bad), "--out", str(tmp_path / "report"))
    assert code == 0 and "Traceback" not in err, err
    assert len(json.loads((tmp_path / "report" / "runs.json").read_text())) == 1
    (note,) = [r.getMessage() for r in caplog.records if str(bad / "summary.json") in r.getMessage()]
    assert note.startswith("skipped") and "\n" not in note
    assert note in (tmp_path / "report" / "report.md").read_text()


def test_report_out_must_be_a_directory(capsys, trained, tmp_path) -> None:
    (tmp_path / "file").write_text("")
    out = tmp_path / "file"
    assert_bad_input(*archlab(capsys, "report", str(trained), "--out", str(out)), f"--out='{out}'")
