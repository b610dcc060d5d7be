"""``archlab report``: run dirs in, a self-contained HTML + Markdown report and a W&B Report spec out."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from archlab.cli import main as cli_main
from archlab.density import LadderFit, fit_ladder
from archlab.errors import ConfigError
from archlab.loggers import JsonlLogger
from archlab.report import calibration, load_runs, table, write_report
from archlab.report.figures import bpb_vs_params, density_bars, ladder_plot, loss_curves, pareto
from archlab.report.publish import build_wandb_report, has_credentials
from archlab.report.runs import Run, check_shared
from archlab.report.tables import THROUGHPUT_CAVEAT, notes

E, A, ALPHA = 1.2, 30.0, 0.3
LADDER_N = np.geomspace(3e4, 3e6, 5)
STEPS, TOKENS_PER_STEP, TEACHER_BPB = 200, 8 * 128, 2.5


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
        "corpus": {"plugin": "stdlib", "suffixes": [".py", ".txt"]},
        "teacher": {"plugin": "ngram", "order": 5},
        "objective": {"plugin": "kd", "alpha": 1.0},
        "distill": {"top_k": 32, "build_batch_size": 16},
        "data": {
            "val_fraction": 0.02,
            "max_bytes": None,
            "cache_dir": "${oc.env:ARCHLAB_CACHE,'~/.cache/archlab'}",
        },
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
    steps: int = STEPS,
    flops_per_token: float = 1e6,
) -> Path:
    """A run dir as the trainer leaves it; ``bpb=None`` leaves it unfinished (no summary.json). Its
    metrics.jsonl is written by the trainer's own logger: training loss every 10 steps, val bpb every 100
    and at the end, a last line cut short by a kill."""
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
            "train/steps": steps,
            "train/tokens": steps * TOKENS_PER_STEP,
            "train_flops_per_token": flops_per_token,
            "teacher/val_bpb": TEACHER_BPB,
        }
        (path / "summary.json").write_text(json.dumps(summary))
        logger = JsonlLogger(path)
        for step in range(10, steps + 1, 10):
            record = {"train/loss": 2.0 + 200 / step, "train/tokens": step * TOKENS_PER_STEP}
            if step % 100 == 0 or step == steps:
                record["val/bpb"] = bpb + 100 / step - 100 / steps
            logger.log(record, step)
        with (path / "metrics.jsonl").open("a") as f:
            f.write('{"step": 999, "train/lo')
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
    figures = ["ladder_fit.png", "bpb_vs_params.png", "density.png", "loss_curves.png"]
    pngs = [*figures, "runs/1/depth_weights.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in figures:  # every figure's data beside it
        with (out / name).with_suffix(".csv").open() as f:
            rows = list(csv.DictReader(f))
        assert rows and set(rows[0]) == {"panel", "series", "at", "value", "lo", "hi"}, name
    assert not list(out.glob(".*tmp*"))  # published atomically: no temporary file left behind
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
    # the blocks in order, and what each panel asks W&B for (its query, as the saved spec holds it)
    kinds = [type(b).__name__ for b in report.blocks]
    assert kinds == ["P", "H2", "MarkdownBlock", "P", "PanelGrid", "H2", "MarkdownBlock"]
    assert report.blocks[0].text.startswith("Ladder: 5 runs at 5 sizes")
    assert report.blocks[3].text == f"Teacher's validation bpb: {TEACHER_BPB:.4f}."
    assert THROUGHPUT_CAVEAT in report.blocks[2].text
    lines = {p.title: p for p in grid.panels if isinstance(p, wr.LinePlot)}
    assert {(p.x, tuple(p.y)) for p in lines.values()} == {
        ("train/tokens", ("val/bpb",)),
        ("train/tokens", ("train/loss",)),
    }
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    (saved_grid,) = [b for b in dumped["spec"]["blocks"] if b["type"] == "panel-grid"]
    queries = {
        (
            p["viewType"],
            p["config"].get("xAxis"),
            tuple(p["config"].get("metrics") or [p["config"].get("yAxis")]),
        )
        for p in saved_grid["metadata"]["panelBankSectionConfig"]["panels"]
    }
    assert queries == {
        ("Scatter Plot", "summary:params/non_embedding", ("summary:val/bpb",)),
        ("Scatter Plot", "summary:params/active_non_embedding", ("summary:val/bpb",)),
        ("Run History Line Plot", "train/tokens", ("val/bpb",)),
        ("Run History Line Plot", "train/tokens", ("train/loss",)),
        (
            "Bar Chart",
            None,
            (
                "summary_metrics.density/per_param",
                "summary_metrics.density/per_active_param",
                "summary_metrics.density/per_weight_byte",
            ),
        ),
    }
    (saved_runset,) = saved_grid["metadata"]["runSets"]
    assert saved_runset["filters"]["filters"] == [
        {
            "key": {"section": "run", "name": "group"},
            "op": "IN",
            "value": ["2026-11-28_02-00-00"],
            "disabled": False,
        }
    ]


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


# --- what each figure draws is what it names, and its axes fit the measured points -----------------------


def _in_axes(ax, xy: np.ndarray, transform) -> np.ndarray:
    """``xy`` (under the artist's ``transform``) in axes coordinates: the axes box is [0, 1]²."""
    return ax.transAxes.inverted().transform(transform.transform(xy))


def assert_legend_is_drawn(ax) -> None:
    """Every legend entry has something in view: a line or point inside the axes, a band with an area
    (shoelace formula, as a fraction of the axes box)."""
    for artist, label in zip(*ax.get_legend_handles_labels(), strict=True):
        if isinstance(artist, PolyCollection):  # fill_between
            xy = np.concatenate(
                [_in_axes(ax, p.vertices, artist.get_transform()) for p in artist.get_paths()]
            )
            x, y = xy[:, 0], xy[:, 1]
            area = abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) / 2
            assert area > 1e-3, f"{label!r} is named but has no visible area"
            continue
        if isinstance(artist, Line2D):  # (axhline's x is in axes coordinates: its transform says so)
            xy = _in_axes(ax, artist.get_xydata(), artist.get_transform())
        else:  # scatter
            xy = _in_axes(ax, np.asarray(artist.get_offsets()), artist.get_offset_transform())
        inside = ((xy >= -1e-9) & (xy <= 1 + 1e-9)).all(axis=1)
        assert inside.any(), f"{label!r} is named but nothing of it lies inside the axes"


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


@pytest.fixture(scope="module")
def fits(fit) -> dict[str, LadderFit]:
    """Fits whose bootstrap band is zero-width (a noise-free ladder), unknown (3 sizes), or real (noisy)."""
    n6 = np.geomspace(3e4, 3e6, 6)
    noise = np.array([0.04, -0.03, 0.02, -0.04, 0.03, -0.02])
    return {
        "noise-free": fit,
        "three sizes": fit_ladder(LADDER_N[:3], [law(n) for n in LADDER_N[:3]], n_boot=10),
        "noisy": fit_ladder(n6, [law(n) + d for n, d in zip(n6, noise, strict=True)], n_boot=40),
    }


@pytest.mark.parametrize(
    ("name", "band"),
    [("noise-free", "thinner than the line"), ("three sizes", "spread unknown"), ("noisy", None)],
)
def test_the_bootstrap_band_is_named_only_where_it_is_drawn(fits, written, name, band) -> None:
    fit = fits[name]
    axes = [ladder_plot(fit).fig.axes[0], *bpb_vs_params(written[0], fit).fig.axes]
    for ax in axes:
        assert_legend_is_drawn(ax)
        named = "90% bootstrap band" in _labels(ax)
        assert named == (band is None), _labels(ax)
        if band is not None:  # the curve's label says why there is no band
            assert band in next(label for label in _labels(ax) if label.startswith("ladder fit"))


def test_the_ladder_axis_spans_its_points_not_the_floor() -> None:
    """A fit whose floor E sits far below the points (E = 0) does not squeeze them into a strip."""
    n = np.geomspace(3e4, 3e6, 5)
    b = 5.0 * n**-0.1
    flat = LadderFit(
        E=0.0,
        A=5.0,
        alpha=0.1,
        boot=np.tile([0.0, 5.0, 0.1], (10, 1)),
        n_range=(n[0], n[-1]),
        loss_range=(b.min(), b.max()),
        residual_rms=0.0,
        points=list(zip(n, b, strict=True)),
    )
    ax = ladder_plot(flat).fig.axes[0]
    lo, hi = ax.get_ylim()
    span = b.max() - b.min()
    assert b.min() - 0.2 * span < lo < b.min() and b.max() < hi < b.max() + 0.2 * span
    assert "floor E" not in _labels(ax)  # E = 0 lies outside the axis: not named either
    assert_legend_is_drawn(ax)


def _run(i: int, n_eff: float, lo: float, hi: float) -> Run:
    density = {
        "density/n_eff": n_eff,
        "density/n_eff_lo": lo,
        "density/n_eff_hi": hi,
        "density/per_param": n_eff / 1e5,
        "density/per_active_param": n_eff / 1e5,
        "density/per_weight_byte": n_eff / 1e5,
        "density/extrapolated": False,
        "density/uncertain": True,
    }
    return Run(Path(f"r{i}"), f"run{i}", {"val/bpb": 2.0, "params/non_embedding": 1e5}, {}, density=density)


def _whiskers(ax) -> tuple[int, int, int]:
    """(error bars, arrows, "interval unknown" labels) drawn in ``ax``."""
    from matplotlib.container import ErrorbarContainer
    from matplotlib.text import Annotation

    bars = sum(isinstance(c, ErrorbarContainer) for c in ax.containers)
    notes_ = [t for t in ax.texts if isinstance(t, Annotation)]
    arrows = sum(t.arrow_patch is not None for t in notes_)
    return bars, arrows, sum("unknown" in t.get_text() for t in notes_)


def test_no_whisker_without_both_interval_ends(study_result, tmp_path) -> None:
    """A known interval is a whisker, an unbounded end an arrow, an unknown one words (never `[?, ?]`)."""
    runs = [_run(0, 2e5, 1e5, 4e5), _run(1, 2e5, 1e5, math.inf), _run(2, 2e5, math.nan, math.nan)]
    plot = density_bars(runs)
    for ax in plot.fig.axes:
        assert _whiskers(ax) == (2, 1, 1)
    cells = [row[table(runs)[0].index("N_eff [90% CI]")] for row in table(runs)[1]]
    assert cells == [
        "2.00e+05 [1.00e+05, 4.00e+05]",
        "2.00e+05 [1.00e+05, unbounded]",
        "2.00e+05 (interval unknown)",
    ]
    plot.save(tmp_path / "density.png")
    with (tmp_path / "density.csv").open() as f:
        his = [row["hi"] for row in csv.DictReader(f)][:3]
    assert his == ["4.0", "inf", "nan"]  # ρ's interval: N_eff's over N = 1e5
    # the study's density intervals: an unbounded end is an arrow, an unknown one has no whisker
    arms = [dict(a) for a in study_result["students"]]
    roles = {a["role"]: a for a in arms}
    roles["student"]["density_hi"] = math.inf
    roles["placebo"]["density_lo"] = None
    ax = calibration.density_plot(study_result | {"students": arms}).fig.axes[0]
    assert _whiskers(ax) == (2, 1, 1)  # control and student (the baseline is the reference)


def test_the_forest_plot_shades_the_detectable_difference_only_when_known(study_result) -> None:
    def shaded(study: dict) -> tuple[int, str]:
        ax = calibration.forest_plot(study).fig.axes[0]
        return len(ax.patches), ax.get_xlabel()  # axvspan's patch is the only one

    count, label = shaded(study_result)
    assert count == 1 and "shaded: ± minimum detectable Δ" in label
    unknown = study_result | {"calibration": study_result["calibration"] | {"mde_bpb": math.nan}}
    count, label = shaded(unknown)
    assert count == 0 and "shaded" not in label


def test_tokens_per_s_carries_the_load_caveat(written) -> None:
    runs, index = written
    assert "tokens/s (wall clock)" in table(runs)[0]
    assert THROUGHPUT_CAVEAT in notes(runs, None)
    assert THROUGHPUT_CAVEAT in (index.parent / "report.md").read_text()


def test_loss_curves_are_the_runs_metrics_against_tokens(written) -> None:
    runs = written[0]
    plot = loss_curves(runs)
    train_ax, val_ax = plot.fig.axes
    assert len(train_ax.lines) == len(runs)  # one per run
    assert len(val_ax.lines) == len(runs) + 1  # and the teacher's reference
    teacher = val_ax.lines[-1]
    assert set(teacher.get_ydata()) == {TEACHER_BPB} and _labels(val_ax)[-1] == f"teacher {TEACHER_BPB:.3f}"
    for run, line in zip(runs, val_ax.lines, strict=False):
        assert list(line.get_xdata()) == [100 * TOKENS_PER_STEP, STEPS * TOKENS_PER_STEP]
        assert line.get_ydata()[-1] == pytest.approx(run.bpb)  # the summary's val bpb is its last point
    assert list(train_ax.lines[0].get_xdata()) == [s * TOKENS_PER_STEP for s in range(10, STEPS + 1, 10)]
    for ax in (train_ax, val_ax):
        assert_legend_is_drawn(ax)
    assert "objective kd" in train_ax.get_ylabel()
    assert {r[0] for r in plot.rows} == {
        "training loss, objective kd (nats/token) vs training tokens",
        "validation bits per byte vs training tokens",
    }


def test_loss_curves_read_what_the_trainer_writes(make_trainer, tmp_path) -> None:
    """A real (tiny) training run's metrics.jsonl gives both curves, so a renamed key cannot hide them."""
    trainer = make_trainer(tmp_path, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=1")
    summary = trainer.run()
    plot = loss_curves([Run(tmp_path, "tiny", summary, {})])
    train_ax, val_ax = plot.fig.axes
    assert len(train_ax.lines[0].get_xdata()) == 4 and len(val_ax.lines[0].get_xdata()) == 2
    assert val_ax.lines[0].get_xdata()[-1] == summary["train/tokens"]
    assert val_ax.lines[0].get_ydata()[-1] == pytest.approx(summary["val/bpb"])


# --- every run of a report shares teacher, objective, data and budget ------------------------------------


def _with(cfg: dict, key: str, value: object) -> dict:
    cfg = json.loads(json.dumps(cfg))
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("teacher.order", 3),
        ("teacher.plugin", "model"),
        ("objective.alpha", 0.5),
        ("distill.top_k", 8),
        ("corpus.suffixes", [".py"]),
        ("data.max_bytes", 400000),
    ],
)
def test_a_report_refuses_runs_trained_differently(key, value, tmp_path, capsys) -> None:
    a = run_dir(tmp_path / "a", bpb=2.0, n=1e5)
    b = run_dir(tmp_path / "b", bpb=2.1, n=1e5, cfg=_with(config(), key, value))
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        write_report(load_runs([a, b]), None, tmp_path / "out")
    assert str(a) in str(err.value) and str(b) in str(err.value)
    assert cli_main(["report", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0]
    assert not (tmp_path / "out" / "index.html").exists()


def test_a_report_refuses_a_different_token_budget_and_a_ladder_trained_differently(dirs, tmp_path, capsys):
    a = run_dir(tmp_path / "a", bpb=2.0, n=1e5)
    b = run_dir(tmp_path / "b", bpb=2.1, n=1e5, steps=100)
    with pytest.raises(ConfigError, match=rf"train/tokens='{STEPS * TOKENS_PER_STEP} in .* but 102400 in "):
        check_shared(load_runs([a, b]))
    # students alike, but the ladder they are measured against was distilled from another teacher
    ladder = multirun(tmp_path / "ladder")
    other = _with(config(), "teacher.order", 3)
    for i, n in enumerate(LADDER_N):
        run_dir(ladder / str(i), bpb=law(n), n=n, cfg=other)
    assert (
        cli_main(["report", str(dirs["sweep"]), "--ladder", str(ladder), "--out", str(tmp_path / "o")]) == 2
    )
    assert "teacher.order" in capsys.readouterr().err


def test_a_flops_budget_compares_training_flops_to_within_a_step(tmp_path) -> None:
    """``archlab study --budget flops`` gives a costlier arm fewer steps: its report passes budget=flops."""
    base = run_dir(tmp_path / "base", bpb=2.0, n=1e5, steps=200, flops_per_token=1e6)
    costly = run_dir(
        tmp_path / "costly", bpb=2.0, n=1e5, steps=133, flops_per_token=1.5e6
    )  # 199.5 steps' worth
    off = run_dir(tmp_path / "off", bpb=2.0, n=1e5, steps=120, flops_per_token=1.5e6)
    check_shared(load_runs([base, costly]), "flops")
    with pytest.raises(ConfigError, match="train/tokens="):
        check_shared(load_runs([base, costly]), "tokens")
    with pytest.raises(ConfigError, match="train_flops_per_token"):
        check_shared(load_runs([base, off]), "flops")
    with pytest.raises(ConfigError, match="--budget"):
        check_shared(load_runs([base]), "steps")


def test_runs_of_different_tokenizers_are_compared_only_when_asked_and_then_noted(tmp_path) -> None:
    a = run_dir(tmp_path / "a", bpb=2.0, n=1e5)
    b = run_dir(tmp_path / "b", bpb=2.1, n=1e5)
    summary = json.loads((b / "summary.json").read_text())
    (b / "summary.json").write_text(json.dumps({**summary, "corpus/tokenizer": "bpe:abc"}))
    with pytest.raises(
        ConfigError, match="corpus/tokenizer.*bytes in .* but bpe:abc in .*--across-tokenizers"
    ):
        check_shared(load_runs([a, b]))
    runs = load_runs([a, b])
    check_shared(runs, across_tokenizers=True)
    assert any("2 tokenizers (bpe:abc, bytes)" in line for line in notes(runs, None))


def test_an_unbounded_density_estimate_draws_an_arrow_not_a_crash(study_result, tmp_path) -> None:
    study = json.loads(json.dumps(study_result))
    study["students"][-1].update(density=math.inf, density_lo=0.4, density_hi=math.inf)
    calibration.density_plot(study).save(tmp_path / "density.png")  # matplotlib raised StopIteration
    assert (tmp_path / "density.png").stat().st_size > 0
