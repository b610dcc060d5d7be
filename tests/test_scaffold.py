"""``archlab new-plugin``: refuses bad names, writes ruff-clean sources, and what it writes for every
slot is a plugin that passes the conformance suite and whose preset composes; end to end (slow), a
scaffolded plugin installed with pip into a throw-away venv is listed, trains and passes its own tests."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from archlab import cli, scaffold, slots
from archlab.config import compose
from archlab.errors import ConfigError
from archlab.testing import check_plugin, requires_plugin
from archlab.testing.venv import overlay_venv, venv_env

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
TINY = ["model.d_model=32", "model.n_heads=4", "model.n_layers=2", "model.context=32"]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["router", "fancy"], "SLOT"),
        (["ffn", "Fancy"], "NAME"),
        (["ffn", "2fast"], "NAME"),
        (["ffn", "lambda"], "NAME"),
        (["ffn", "mlp"], "NAME"),
        (["norm", "rmsnorm"], "NAME"),
    ],
)
def test_refuses_unknown_slots_invalid_and_installed_names(tmp_path: Path, args: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        scaffold.main([*args, "--dir", str(tmp_path / "out")])
    assert info.value.key == key and info.value.value == args[key == "NAME"]
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_directory_and_the_cli_says_why(tmp_path: Path, capsys) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert cli.main(["new-plugin", "ffn", "fancy", "--dir", str(tmp_path / "taken")]) == 2
    assert "--dir=" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


def test_every_model_slot_of_the_slot_table_has_a_template(capsys) -> None:
    assert set(scaffold.TEMPLATES) == set(slots.names("sublayer", "model"))
    assert cli.main(["new-plugin", "teacher", "mine"]) == 2  # a slot, but no template
    assert "it has none yet" in capsys.readouterr().err


def test_generated_sources_are_ruff_clean_for_every_slot(tmp_path: Path) -> None:
    for slot in scaffold.TEMPLATES:
        scaffold.scaffold(slot, f"my_{slot}", tmp_path / slot)
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        done = subprocess.run([ruff, *args, "."], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("slot", list(scaffold.TEMPLATES))
def test_scaffolded_plugin_conforms_and_its_preset_composes(tmp_path: Path, make_dist, slot: str) -> None:
    name = f"new_{slot}"
    scaffold.scaffold(slot, name, tmp_path / "dist")
    pyproject = tomllib.loads((tmp_path / "dist" / "pyproject.toml").read_text())
    sources = {
        str(p.relative_to(tmp_path / "dist")): p.read_text()
        for p in (tmp_path / "dist").rglob("*")
        if p.is_file()
    }
    package = {rel: text for rel, text in sources.items() if rel.startswith(f"archlab_{name}/")}
    make_dist(pyproject["project"]["name"], pyproject["project"]["entry-points"], package)
    outcomes = check_plugin(slot, name)
    assert outcomes["check_gradients_reach_every_parameter"] == "passed", outcomes
    template = scaffold.TEMPLATES[slot]
    cfg = compose([*TINY, f"{slot}={name}_{template.preset}"])
    assert cfg[slot].plugin == name
    assert {key: cfg[slot][key] for key in template.fields} == template.fields


@pytest.mark.slow
def test_installed_with_pip_it_is_listed_trains_and_passes_its_tests(tmp_path: Path, cli_env) -> None:
    bin_dir = overlay_venv(tmp_path / "venv")
    env = venv_env(bin_dir, cli_env)

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    run("archlab", "new-plugin", "attention", "gated", "--dir", "archlab-gated")
    run("pip", "install", "-q", "-e", "archlab-gated")
    assert re.search(r"^ +gated +archlab-gated 0\.1\.0 +ok$", run("archlab", "plugins"), re.M)
    train = run(
        "archlab",
        "train",
        "attention=gated_bias",
        *TINY[:2],
        "model.n_layers=1",
        "model.context=64",
        "teacher=none",
        "objective=ce",
        "logger.backend=none",
        "trainer.max_steps=3",
        "trainer.batch_size=2",
        "trainer.eval_every=3",
        "trainer.eval_tokens=1024",
        "trainer.progress=false",
        "data.max_bytes=200000",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert "val bpb" in train
    assert "passed" in run("pytest", "-q", "-p", "no:cacheprovider", "archlab-gated/tests")


def test_requires_plugin_skips_only_where_the_plugin_is_missing() -> None:
    installed, missing = requires_plugin("ffn", "mlp"), requires_plugin("ffn", "nosuchffn")
    assert installed.args == (False,)
    assert missing.args == (True,) and "ffn=nosuchffn is not installed" in missing.kwargs["reason"]
