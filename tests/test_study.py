"""``density.ladder`` puts a run's capability density into its summary; ``archlab study`` runs the main job
(teacher, ladder, fit, students, report) and refuses bad input before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from archlab import study
from archlab.config import compose, validate
from archlab.density import fit_ladder
from archlab.errors import ConfigError
from archlab.trainer import density_summary

E, A, ALPHA = 1.2, 40.0, 0.35  # a made-up ladder: L(N) = E + A·N^(−α), noise-free


@pytest.fixture
def fit_json(tmp_path: Path) -> Path:
    n = np.geomspace(5e4, 2e6, 5)
    return fit_ladder(n, E + A * n**-ALPHA, n_boot=20).save(tmp_path / "ladder_fit.json")


def test_density_ladder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="density.ladder"):
        validate(compose([f"density.ladder={tmp_path / 'missing.json'}"]))


def test_density_summary_is_the_effective_size_over_the_parameters(fit_json: Path) -> None:
    fit = json.loads(fit_json.read_text())
    bpb = E + A * 3e5**-ALPHA  # the loss the ladder reaches at N = 300 K
    summary = {
        "val/bpb": bpb,
        "params/non_embedding": 1e5,
        "params/active_non_embedding": 5e4,
        "weight_bytes/non_embedding": 2e5,
    }
    density = density_summary(str(fit_json), summary)
    n_eff = (fit["A"] / (bpb - fit["E"])) ** (1 / fit["alpha"])  # the fitted curve, inverted by hand
    assert n_eff == pytest.approx(3e5, rel=1e-3)
    assert density["density/n_eff"] == pytest.approx(n_eff)
    assert density["density/per_param"] == pytest.approx(n_eff / 1e5)
    assert density["density/per_active_param"] == pytest.approx(n_eff / 5e4)
    assert density["density/per_weight_byte"] == pytest.approx(n_eff * 4 / 2e5)  # fp32 ladder: 4 B/param
    assert density["density/n_eff_lo"] <= n_eff <= density["density/n_eff_hi"]
    assert density["density/extrapolated"] is False
    assert density_summary(None, summary) == {}


def test_a_loss_below_the_fit_floor_gives_no_density(fit_json: Path, caplog) -> None:
    summary = {"val/bpb": E / 2, "params/non_embedding": 1e5, "params/active_non_embedding": 1e5}
    assert density_summary(str(fit_json), summary) == {}
    assert "floor" in caplog.text


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--students", "mha,nope"], "--students"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
    ],
)
def test_study_refuses_bad_input_before_any_work(args: list[str], key: str, tmp_path: Path) -> None:
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=key):
        study.main(["--out", str(out), *args])
    assert not out.exists()


def test_study_refuses_a_used_output_dir(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("")
    with pytest.raises(ConfigError, match="--out"):
        study.main(["--out", str(tmp_path)])


def test_every_preset_names_known_rungs_and_students() -> None:
    rungs = {p.stem for p in (Path(study.__file__).parent / "conf" / "rung").glob("*.yaml")}
    for name, preset in study.PRESETS.items():
        assert set(preset.rungs) <= rungs and set(preset.students) <= set(study.STUDENTS), name
        assert len({r.split("_seed")[0] for r in preset.rungs}) >= 3, f"{name}: a fit needs >= 3 sizes"
    assert len({r.split("_seed")[0] for r in study.PRESETS["full"].rungs}) >= 5


@pytest.mark.slow
def test_quick_study_writes_a_report_with_every_run(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = run_cli(
        "study",
        "--quick",
        "--students",
        "mha,mla",
        "--out",
        str(out),
        "logger=none",
        "trainer.max_steps=5",
        "trainer.eval_tokens=1024",
        "data.max_bytes=300000",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = [
        line.split("] ", 1)[1].split(":")[0] for line in result.stdout.splitlines() if line.startswith("[")
    ]
    assert stages[:3] == ["study in " + str(out), "teacher", "ladder"], stages
    index = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert index == out / "report" / "index.html" and index.is_file()
    fit = json.loads((out / "ladder_fit.json").read_text())
    assert len(fit["points"]) == len(study.PRESETS["quick"].rungs)
    students = sorted((out / "students").glob("*/summary.json"))
    assert len(students) == 2
    html = index.read_text()
    for job in [*(f"+rung={r}" for r in study.PRESETS["quick"].rungs), "+student=mha", "+student=mla"]:
        assert job in html, job
    # the mha student is the ladder's rung m trained again (same shape, seed, data): it IS a ladder point
    mha = json.loads(students[0].read_text())
    assert mha["params/non_embedding"] == 332_448
    assert mha["density/per_param"] == pytest.approx(1.0, rel=0.05)
