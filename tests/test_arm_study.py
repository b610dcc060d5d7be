"""Procedure studies (archlab.arm_study, `archlab study --preset continual|onpolicy`): the intervals
against their formula, the evaluation against the runs' own, and a tiny continual study end to end."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from archlab.arm_study import interval, tabulate
from archlab.cli import main
from archlab.study import read_preset


def test_interval_is_the_t_interval_of_the_mean():
    cell = interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t_0.95(2) = 2.919986
    assert cell["mean"] == pytest.approx(2.0)
    assert cell["hi"] - 2.0 == pytest.approx(2.919986 / math.sqrt(3), rel=1e-6)
    assert cell["lo"] == pytest.approx(4.0 - cell["hi"])
    assert math.isinf(interval([5.0])["hi"])


def test_deltas_are_paired_by_seed():
    values = {
        "ref": {0: {"bpb": 3.0}, 1: {"bpb": 2.0}, 2: {"bpb": 4.0}},
        "arm": {0: {"bpb": 2.9}, 1: {"bpb": 1.9}, 2: {"bpb": 3.9}},
    }
    table = tabulate(values, "ref")
    delta = table["arm"]["delta"]["bpb"]  # the seeds differ by 1 bpb but the paired gap is exactly -0.1
    assert delta["mean"] == pytest.approx(-0.1) and delta["hi"] - delta["lo"] == pytest.approx(0, abs=1e-12)
    assert table["arm"]["bpb"]["hi"] - table["arm"]["bpb"]["lo"] > 1  # unpaired: wide
    assert "delta" not in table["ref"]


def test_the_shipped_presets_load():
    from archlab.arm_study import ArmsPreset

    for name in ("continual", "onpolicy"):
        path, raw = read_preset(name)
        preset = ArmsPreset.from_yaml(name, raw, path)
        assert preset.reference in preset.arms and preset.train_domain in preset.domains


def _corpus(folder, word: str, n: int = 24):
    folder.mkdir()
    for i in range(n):
        (folder / f"{word}{i}.txt").write_text(f"{word} {i} " * 60 + "\n")
    return folder


@pytest.mark.slow
def test_a_tiny_continual_study_runs_end_to_end(tmp_path, tiny_overrides):
    old, new = _corpus(tmp_path / "old", "alpha"), _corpus(tmp_path / "new", "omega")
    preset = {
        "kind": "arms",
        "seeds": 2,
        "steps": 3,
        "overrides": [*tiny_overrides, "trainer.eval_every=3"],
        "domains": {
            "old": ["corpus=files", f"corpus.paths=[{old}]", "data.val_fraction=0.3"],
            "new": ["corpus=files", f"corpus.paths=[{new}]", "data.val_fraction=0.3"],
        },
        "base": {"domain": "old", "steps": 4},
        "train_domain": "new",
        "arms": {
            "finetune": {},
            "ssd": {"sample": {"prompts": 48, "prompt_len": 8, "max_new_tokens": 24}},
        },
        "reference": "finetune",
        "metrics": ["val/loss"],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    out = tmp_path / "study"
    assert main(["study", "--preset", str(path), "--out", str(out)]) == 0
    study = json.loads((out / "arms.json").read_text())
    assert set(study["table"]) == {"base", "finetune", "ssd"}
    assert study["columns"] == ["old bpb", "new bpb", "val/loss", "wall s"]
    for seed in ("0", "1"):
        # the finetune run's own final eval is on the new domain's windows: the study's must agree
        summary = json.loads((out / "runs" / f"finetune_s{seed}" / "summary.json").read_text())
        assert study["values"]["finetune"][seed]["new bpb"] == pytest.approx(summary["val/bpb"], rel=1e-6)
        assert (out / "samples" / f"ssd_s{seed}" / "manifest.json").is_file()
    assert "Δ new bpb vs finetune" in (out / "report.md").read_text()
    assert (out / "arms.png").is_file() and (out / "arms.csv").is_file()


def test_a_procedure_study_refuses_students(tmp_path):
    assert main(["study", "--preset", "continual", "--students", "mla", "--out", str(tmp_path / "s")]) == 2
