"""``archlab report``: run dirs in, a self-contained HTML + Markdown report and a W&B Report spec out."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure

from archlab.cli import main as cli_main
from archlab.density import LadderFit, fit_ladder
from archlab.errors import ConfigError
from archlab.report import load_runs, table, write_report
from archlab.report.figures import pareto
from archlab.report.publish import build_wandb_report, has_credentials

E, A, ALPHA = 1.2, 30.0, 0.3
LADDER_N = np.geomspace(3e4, 3e6, 5)


def law(n: float) -> float:
    return E + A * n ** (-ALPHA)


def config(attention: str = "mha", ffn: str = "mlp", linear: str = "dense", group: str | None = None) -> dict:
    """A composed config as .hydra/config.yaml holds it (slot nodes carry ``plugin``)."""
    return {
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "context": 128, "vocab_size": 256},
        "attention": {"plugin": attention, "n_kv_heads": None},
        "ffn": {
            "plugin": ffn,
            "activation": "swiglu",
            **({"router": {"plugin": "topk"}} if ffn == "moe" else {}),
        },
        "residual": {"plugin": "prenorm"},
        "linear": {"plugin": linear},
        "norm": {"plugin": "rmsnorm", "eps": 1e-6},
        "position": {"plugin": "rope", "theta": 10000.0},
        "head": {"plugin": "lm", "tied": True},
        "corpus": {"plugin": "stdlib"},
        "teacher": {"plugin": "ngram"},
        "objective": {"plugin": "kd"},
        "data": {"cache_dir": "${oc.env:ARCHLAB_CACHE,'~/.cache/archlab'}"},
        "logger": {"backend": "wandb", "project": "archlab-test", "entity": None, "group": group},
        "seed": 0,
    }


def run_dir(
    path: Path,
    *,
    bpb: float | None,
    n: float,
    active: float | None = None,
    bytes_per_param: float = 4.0,
    overrides: list[str] = (),
    cfg: dict | None = None,
    wandb_id: str | None = None,
    plot: bool = False,
) -> Path:
    """A run dir as the trainer leaves it; ``bpb=None`` leaves it unfinished (no summary.json)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg or config()))
    (path / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([*overrides, "trainer.max_steps=200", "hydra.verbose=false"])
    )
    active = n if active is None else active
    if bpb is not None:
        summary = {
            "val/bpb": bpb,
            "val/loss": bpb * 0.693,
            "val/kl_teacher_student": 0.25,
            "params/total": int(n + 16384),
            "params/non_embedding": int(n),
            "params/active": int(active + 16384),
            "params/active_non_embedding": int(active),
            "weight_bytes": int(n * bytes_per_param + 65536),
            "weight_bytes/non_embedding": int(n * bytes_per_param),
            "kv_bytes_per_token": 1024,
            "tokens_per_s": 12345.6,
            "train/steps": 200,
        }
        (path / "summary.json").write_text(json.dumps(summary))
    if wandb_id:
        (path / "wandb" / f"offline-run-20261128_013124-{wandb_id}").mkdir(parents=True)
    if plot:
        (path / "plots").mkdir()
        fig = Figure(figsize=(2, 2))
        fig.add_subplot().imshow(np.eye(3))
        fig.savefig(path / "plots" / "depth_weights.png")
    return path


def multirun(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "multirun.yaml").write_text("hydra: {}\n")
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    ladder = multirun(root / "ladder" / "2026-11-28" / "01-00-00")
    for i, n in enumerate(LADDER_N):
        run_dir(ladder / str(i), bpb=law(n), n=n, overrides=[f"model.d_model={32 * 2**i}"])
    sweep = multirun(root / "multirun" / "2026-11-28" / "02-00-00")
    students = [
        dict(bpb=law(3e5), n=3e5, overrides=["attention=mha"]),  # on the ladder's curve: ρ = 1
        dict(bpb=law(6e5), n=3e5, overrides=["attention=mla"], cfg=config("mla"), plot=True),  # ρ = 2
        dict(bpb=law(1e6), n=2e6, active=5e5, overrides=["ffn=moe"], cfg=config(ffn="moe")),  # MoE
        dict(
            bpb=law(3e5),
            n=3e5,
            bytes_per_param=0.25,
            overrides=["linear=ternary"],
            cfg=config(linear="ternary"),
        ),
        dict(
            bpb=law(1e7), n=3e6, overrides=["attention=mla", "model.d_model=512"], cfg=config("mla")
        ),  # extrap.
        dict(bpb=E - 0.05, n=3e6, overrides=["attention=magic"], cfg=config("magic")),  # below the floor
        dict(bpb=None, n=1e5, overrides=["attention=crashed"]),  # unfinished
    ]
    for i, kw in enumerate(students):
        run_dir(sweep / str(i), wandb_id=f"id{i}", **kw)
    return {"ladder": ladder, "sweep": sweep, "root": root}


@pytest.fixture(scope="module")
def fit(dirs) -> LadderFit:
    runs = load_runs([dirs["ladder"]])
    return fit_ladder([r.n for r in runs], [r.bpb for r in runs], n_boot=10)


@pytest.fixture(scope="module")
def written(dirs, fit) -> tuple[list, Path]:
    """The students' report, written once: (runs with densities filled in, index.html)."""
    runs = load_runs([dirs["sweep"]])
    return runs, write_report(runs, fit, dirs["root"] / "report")


def test_load_runs_reads_a_multirun_and_skips_unfinished_jobs(dirs) -> None:
    notes: list[str] = []
    runs = load_runs([dirs["sweep"]], notes)
    assert [r.path.name for r in runs] == ["0", "1", "2", "3", "4", "5"]
    assert len(notes) == 1 and "6" in notes[0] and "no summary.json" in notes[0]
    mla = runs[1]
    assert mla.name == "attention=mla"  # hydra.* and the overrides every run shares dropped
    assert mla.overrides == ["attention=mla", "trainer.max_steps=200"]
    assert mla.plugins["attention"] == "mla" and mla.plugins["ffn"] == "mlp"
    assert runs[2].plugins["ffn.router"] == "topk"
    assert mla.group == "2026-11-28_02-00-00"  # as cli.run_info names the sweep's W&B group
    assert mla.wandb_id == "id1" and mla.project == "archlab-test"
    assert [p.name for p in mla.plots] == ["depth_weights.png"]
    assert runs[2].n == 2e6 and runs[2].n_active == 5e5
    single = load_runs([dirs["sweep"] / "3"])
    assert len(single) == 1 and single[0].plugins["linear"] == "ternary"
    assert single[0].name == "linear=ternary trainer.max_steps=200"


def test_load_runs_rejects_a_dir_without_runs(tmp_path) -> None:
    with pytest.raises(ConfigError, match="RUN_DIRS"):
        load_runs([tmp_path])


def test_report_table_densities_and_flags(written, fit) -> None:
    runs, index = written
    header, rows = table(runs)
    col = {h: i for i, h in enumerate(header)}
    assert {"attention", "ffn", "linear", "ffn.router"} <= set(col)  # varying slots get columns
    assert "residual" not in col  # common to all runs
    rho = [r[col["ρ/param"]] for r in rows]
    # the ladder is noise-free: a run on its curve gets ρ = 1, one at twice the size's loss ρ = 2
    assert float(rho[0]) == pytest.approx(1.0, abs=0.01)
    assert float(rho[1]) == pytest.approx(2.0, rel=0.02)
    assert float(rows[2][col["ρ/param"]]) == pytest.approx(0.5, rel=0.02)  # N_eff 1e6 over 2e6 total
    assert float(rows[2][col["ρ/active param"]]) == pytest.approx(2.0, rel=0.02)  # ... over 5e5 active
    assert float(rows[3][col["ρ/weight byte"]]) == pytest.approx(16.0, rel=0.02)  # 1/4 byte vs fp32's 4
    assert rows[0][col["val bpb"]] == f"{law(3e5):.4f}"
    assert rows[2][col["N active (non-emb)"]] == "500,000"
    assert rows[0][col["KL teacher"]] == "0.2500"
    assert "extrapolated" in rows[4][col["flags"]]
    assert "extrapolated" not in rows[0][col["flags"]]
    assert rows[5][col["ρ/param"]] == "–" and "loss ≤ E" in rows[5][col["flags"]]
    assert runs[5].error and "at or below the fitted floor" in runs[5].error
    md = (index.parent / "report.md").read_text()
    assert "N_eff is extrapolated" in md and "#4" in md
    assert "common to all runs: " in md.lower() and "residual=prenorm" in md
    saved = json.loads((index.parent / "runs.json").read_text())
    assert saved[1]["density"]["density/per_param"] == pytest.approx(2.0, rel=0.02)
    assert LadderFit.load(index.parent / "fit.json").alpha == fit.alpha


def test_report_writes_pngs_and_the_html_embeds_them(written) -> None:
    out = written[1].parent
    index = out / "index.html"
    pngs = ["ladder_fit.png", "bpb_vs_params.png", "density.png", "runs/1/depth_weights.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = index.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(pngs)
    assert {base64.b64decode(e) for e in embedded} == {(out / n).read_bytes() for n in pngs}
    assert 'src="ladder_fit.png"' not in page  # self-contained: no file references
    md = (out / "report.md").read_text()
    for name in pngs:
        assert f"]({name})" in md


def test_report_without_a_ladder_has_no_densities(dirs, tmp_path) -> None:
    runs = load_runs([dirs["sweep"]])
    index = write_report(runs, None, tmp_path / "out")
    assert not (index.parent / "density.png").exists() and (index.parent / "bpb_vs_params.png").exists()
    assert "no ladder given" in index.read_text()


def test_pareto_frontier() -> None:
    pts = [(1.0, 3.0), (2.0, 2.0), (2.0, 2.5), (3.0, 2.2), (4.0, 1.0), (0.5, 4.0)]
    assert pareto(pts) == [5, 0, 1, 4]


@pytest.mark.slow
def test_cli_report_from_a_ladder_dir_and_from_a_saved_fit(dirs, fit, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "rep"
    args = ["report", str(dirs["sweep"]), "--ladder", str(dirs["ladder"]), "--out", str(out), "--n-boot", "5"]
    assert cli_main([*args, "--wandb"]) == 0
    text = capsys.readouterr().out
    assert "no credentials" in text and "local report only" in text
    assert (out / "index.html").exists() and "extrapolated" in text
    saved = fit.save(tmp_path / "fit.json")
    assert (
        cli_main(["report", str(dirs["sweep"] / "1"), "--ladder", str(saved), "--out", str(tmp_path / "r2")])
        == 0
    )
    assert json.loads((tmp_path / "r2" / "runs.json").read_text())[0]["density"]["density/per_param"] > 1.5


def test_cli_report_bad_input_is_one_line(dirs, tmp_path, capsys) -> None:
    assert cli_main(["report", str(dirs["sweep"]), "--ladder", str(tmp_path / "missing")]) == 2
    assert "--ladder" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "RUN_DIRS" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert cli_main(["report", str(dirs["sweep"]), "--ladder", str(tmp_path / "bad.json")]) == 2
    assert "fit.json" in capsys.readouterr().err


def test_credentials_from_env_or_netrc(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not has_credentials()
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc.chmod(0o600)
    assert has_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert has_credentials()


def test_wandb_report_spec_builds_without_network(written, fit, monkeypatch) -> None:
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.reports.v2.interface as interface

    runs = written[0]
    report = build_wandb_report(runs, fit, project="archlab-test", entity="me")
    assert report.project == "archlab-test" and report.entity == "me"
    grid = next(b for b in report.blocks if isinstance(b, wr.PanelGrid))
    scatters = [p for p in grid.panels if isinstance(p, wr.ScatterPlot)]
    assert {p.x.name for p in scatters} == {"params/non_embedding", "params/active_non_embedding"}
    assert all(p.y.name == "val/bpb" and p.log_x for p in scatters)
    bars = next(p for p in grid.panels if isinstance(p, wr.BarPlot))
    assert [m.name for m in bars.metrics] == [
        "density/per_param",
        "density/per_active_param",
        "density/per_weight_byte",
    ]
    (runset,) = grid.runsets
    assert runset.filters == "Metric(\"Group\") in ['2026-11-28_02-00-00']"  # the sweep's W&B group
    markdown = "\n".join(b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock))
    assert "attention=mla" in markdown and "extrapolated" in markdown
    # the spec serialises up to the point of saving: stub the one project-id lookup it makes
    monkeypatch.setattr(interface, "_get_api", lambda: None)
    monkeypatch.setattr(interface, "execute_graphql", lambda *a, **k: {"project": {"internalId": "p1"}})
    spec = report._to_model()
    assert spec.display_name == "archlab: capability density"
    assert spec.project.name == "archlab-test" and spec.project.entity_name == "me"


def test_publish_updates_run_summaries_and_saves_the_report(written, fit, monkeypatch, capsys) -> None:
    """With credentials (faked here, no network): density metrics go into each found W&B run's summary."""
    import wandb

    from archlab.report import publish

    runs = written[0]
    remote: dict[str, dict] = {}

    class FakeRun:
        def __init__(self, path: str) -> None:
            self.summary = remote.setdefault(path, {})

    class FakeApi:
        default_entity = "me"

        def run(self, path: str) -> FakeRun:
            if path.endswith("id1"):  # never synced
                raise wandb.errors.CommError(f"Could not find run {path}")
            return FakeRun(path)

    saved = []

    class FakeReport:
        url = "https://wandb.ai/me/archlab-test/reports/x"

        def save(self) -> None:
            saved.append(True)

    monkeypatch.setattr(wandb, "Api", FakeApi)
    monkeypatch.setattr(publish, "build_wandb_report", lambda *a, **k: FakeReport())
    monkeypatch.setattr(publish, "has_credentials", lambda: True)
    publish.publish_if_possible(runs, fit, project=None, entity=None)
    out = capsys.readouterr().out
    assert "W&B report: https://wandb.ai/me/archlab-test/reports/x" in out and saved == [True]
    assert "id1" in out and "wandb sync" in out  # the missing run is named with the fix
    # project and entity come from the runs' logger config, else the API's default entity
    assert set(remote) == {f"me/archlab-test/id{i}" for i in (0, 2, 3, 4)}  # #5 has no density
    assert remote["me/archlab-test/id0"]["density/per_param"] == pytest.approx(1.0, abs=0.01)
    assert remote["me/archlab-test/id4"]["density/extrapolated"] is True


@pytest.fixture(scope="module")
def study_result(fit) -> dict:
    """A study.json-like result over the fixture ladder: the baseline, a placebo, a control, one student."""
    from archlab.calibration import Arm, calibrate

    n = sorted(fit.points)[len(fit.points) // 2][0]  # the baseline at a middle rung
    base = [3.00, 3.02]
    arms = [
        Arm("baseline", "baseline", (0, 1), tuple(base), n, n),
        Arm("placebo", "placebo", (0, 1), (3.004, 3.018), n, n),
        Arm("control", "control", (0, 1), (3.30, 3.31), n, n),
        Arm("mla", "student", (0, 1), (2.95, 2.97), n, n),
    ]
    return {"budget": "tokens", "seeds": 2, "preset": "test"} | calibrate(arms, fit)


def test_a_study_report_puts_calibration_and_verdicts_first(dirs, fit, study_result) -> None:
    runs = load_runs([dirs["sweep"]])
    index = write_report(runs, fit, dirs["root"] / "study_report", study=study_result)
    html_text = index.read_text()
    order = [html_text.index(s) for s in ("Calibration", "Verdicts", "delta_bpb", "density_intervals")]
    assert order == sorted(order) and order[-1] < html_text.index("ladder_fit")
    assert (index.parent / "delta_bpb.png").is_file() and not (index.parent / "density.png").exists()
    for name in ("placebo", "control", "mla"):
        assert name in html_text


def test_a_study_wandb_report_opens_with_its_calibration(written, fit, study_result) -> None:
    import wandb_workspaces.reports.v2 as wr

    report = build_wandb_report(written[0], fit, project="p", entity="me", study=study_result)
    assert [b.text for b in report.blocks[:1]] == ["Calibration"]
    verdicts = report.blocks[4].text
    assert "placebo" in verdicts and "control" in verdicts and "mla" in verdicts
    grid = next(b for b in report.blocks if isinstance(b, wr.PanelGrid))
    assert not any(isinstance(p, wr.BarPlot) for p in grid.panels)  # per-run densities left out
