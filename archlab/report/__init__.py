"""``archlab report``: runs compared by capability density, as a local HTML + Markdown report and,
with ``--wandb`` and credentials, a W&B Report.

    archlab report RUN_DIRS... [--ladder LADDER] [--out DIR] [--wandb] [--project P --entity E]

RUN_DIRS are run dirs or multirun sweep dirs; LADDER is the dense reference ladder's multirun dir
(fitted here, ``archlab.density``) or a saved fit JSON. Runs (and a ladder dir's runs) must share
teacher, objective, data and training budget (``runs.check_shared``), else the report is refused. The
report holds the ladder fit with its bootstrap band, bpb vs (active) non-embedding parameters with the
Pareto frontier, density bars, loss curves, one table row per run, every note that says where not to
trust a number, and each run's ``plots/``; every figure's data is a CSV beside its PNG.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import shutil
from pathlib import Path

from archlab import durable
from archlab.density import LadderFit
from archlab.errors import ConfigError, check_out
from archlab.report import calibration
from archlab.report.figures import bpb_vs_params, density_bars, ladder_plot, loss_curves
from archlab.report.runs import BUDGETS, Run, attach_density, check_shared, load_ladder, load_runs
from archlab.report.tables import fit_text, notes, table, varying_slots

__all__ = ["Run", "load_runs", "write_report", "table", "notes", "main"]

CSV_NOTE = "Each figure's data is a CSV beside its PNG in the report dir (same name, .csv)."


def _markdown(title, fit, runs, figures, run_plots, header, rows, note_lines, common, study) -> str:
    md = [f"# {title}", ""]
    if study is not None:
        s_header, s_rows = calibration.rows(study)
        md += ["## Calibration", "", *(f"- {line}" for line in calibration.panel(study)), ""]
        md += [calibration.HOW_TO_READ, "", "## Verdicts", ""]
        md += ["| " + " | ".join(s_header) + " |", "|" + "---|" * len(s_header)]
        md += ["| " + " | ".join(row) + " |" for row in s_rows] + [""]
    md += ["## Ladder", "", fit_text(fit), ""]
    md += ["## Notes", "", *(f"- {n}" for n in note_lines or ["none"]), ""]
    md += ["## Plots", "", *(f"![{p.stem}]({p.name}) ([data]({p.stem}.csv))" for p in figures), ""]
    md += ["## Runs", "", f"Common to all runs: {common or '–'}", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    for i, (run, pngs) in enumerate(zip(runs, run_plots, strict=True)):
        if pngs:
            md += [
                "",
                f"### #{i} {run.name}",
                "",
                *(f"![{p.stem}]({p.relative_to(figures[0].parent)})" for p in pngs),
            ]
    return "\n".join(md) + "\n"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]]) -> list[str]:
    e = html.escape
    out = ["<table><tr>", *(f"<th>{e(h)}</th>" for h in header), "</tr>"]
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
    return [*out, "</table>"]


def _html(title, fit, runs, figures, run_plots, header, rows, note_lines, common, study) -> str:
    e = html.escape
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px} img{max-width:100%}"
        "table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 6px}"
        "td{text-align:right} td:nth-child(2){text-align:left} .fail{color:#b00;font-weight:bold}"
        "</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if study is not None:
        lines = calibration.panel(study)
        passed = study["calibration"]["placebo_ok"] and study["calibration"]["control_ok"]
        out += [f"<h2>Calibration</h2><p class='{'' if passed else 'fail'}'>{e(lines[0])}</p><ul>"]
        out += [*(f"<li>{e(line)}</li>" for line in lines[1:]), f"</ul><p>{e(calibration.HOW_TO_READ)}</p>"]
        out += ["<h2>Verdicts</h2>", *_html_table(*calibration.rows(study))]
    out += [
        f"<h2>Ladder</h2><p>{e(fit_text(fit))}</p><h2>Notes</h2><ul>",
        *(f"<li>{e(n)}</li>" for n in note_lines or ["none"]),
        f"</ul><h2>Plots</h2><p>{e(CSV_NOTE)}</p>",
        *(f"<p>{_img(p)}</p>" for p in figures),
        f"<h2>Runs</h2><p>Common to all runs: {e(common or '–')}</p>",
        *_html_table(header, rows),
    ]
    for i, (run, pngs) in enumerate(zip(runs, run_plots, strict=True)):
        if pngs:
            out += [f"<h3>#{i} {e(run.name)}</h3>", *(f"<p>{_img(p)}</p>" for p in pngs)]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    runs: list[Run],
    fit: LadderFit | None,
    out_dir: str | Path,
    *,
    title: str = "archlab: capability density",
    extra_notes: list[str] | None = None,
    study: dict | None = None,
    budget: str = "tokens",
    across_tokenizers: bool = False,
) -> Path:
    """Write ``index.html`` (self-contained), ``report.md``, the PNGs with a CSV of each one's data,
    ``fit.json`` and ``runs.json``, each atomically.

    Refuses runs that differ in teacher, objective, data or ``budget`` (``check_shared``: tokens, or
    flops for ``archlab study --budget flops``), or in tokenizer unless ``across_tokenizers``.
    Fills each run's ``density`` from ``fit``. With ``study``
    (``archlab study``'s study.json) the calibration panel, the verdicts, the Δbpb forest plot and the
    density intervals come first. Returns the path of ``index.html``.
    """
    if not runs:
        raise ConfigError("RUN_DIRS", "[]", "at least one finished run (a run dir with summary.json)")
    check_shared(runs, budget, across_tokenizers)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    if study is not None:
        plots["delta_bpb"] = calibration.forest_plot(study)
        plots["density_intervals"] = calibration.density_plot(study)
    per_run_density = fit is not None and study is None  # a study's densities are its paired ones
    if per_run_density:
        attach_density(runs, fit)
    if fit is not None:
        durable.write_atomic(out / "fit.json", (json.dumps(fit.to_dict(), indent=1) + "\n").encode())
        plots["ladder_fit"] = ladder_plot(fit)
    plots["bpb_vs_params"] = bpb_vs_params(runs, fit)
    if per_run_density:
        plots["density"] = density_bars(runs)
    plots["loss_curves"] = loss_curves(runs)
    figures = [plot.save(out / f"{name}.png") for name, plot in plots.items() if plot is not None]
    run_plots = []
    for i, run in enumerate(runs):
        dest = out / "runs" / str(i)
        if run.plots:
            dest.mkdir(parents=True, exist_ok=True)
        run_plots.append([Path(shutil.copy2(p, dest / p.name)) for p in run.plots])
    header, rows = table(runs)
    note_lines = [*(extra_notes or []), *notes(runs, fit)]
    slots = set(varying_slots(runs))
    shared = [f"{s}={p}" for s, p in sorted(runs[0].plugins.items()) if s not in slots]
    if budget == "tokens" and "train/tokens" in runs[0].summary:  # check_shared made it every run's
        shared.append(f"train/tokens={runs[0].summary['train/tokens']:,}")
    common = ", ".join(shared)
    args = (title, fit, runs, figures, run_plots, header, rows, note_lines, common, study)
    durable.write_atomic(out / "report.md", _markdown(*args).encode())
    index = out / "index.html"
    durable.write_atomic(index, _html(*args).encode())
    records = [
        {
            "path": str(r.path),
            "name": r.name,
            "plugins": r.plugins,
            "group": r.group,
            "wandb_id": r.wandb_id,
            "summary": r.summary,
            "density": r.density,
            "error": r.error,
        }
        for r in runs
    ]
    durable.write_atomic(out / "runs.json", (json.dumps(records, indent=1, default=float) + "\n").encode())
    return index


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archlab report",
        description="Compare runs by capability density against a reference ladder: a local HTML + "
        "Markdown report, and a W&B Report with --wandb.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIRS", help="run dirs or multirun sweep dirs")
    parser.add_argument("--ladder", help="the dense ladder's multirun dir, or a saved fit JSON")
    parser.add_argument("--out", help="output dir (default: <first RUN_DIR>/report)")
    parser.add_argument("--n-boot", type=int, default=200, help="bootstrap refits of a ladder dir's fit")
    parser.add_argument(
        "--budget",
        choices=BUDGETS,
        default="tokens",
        help="what every run must share: training tokens (default), or training FLOPs (tokens × "
        "train_flops_per_token, to within one step), as archlab study --budget flops trains its arms",
    )
    parser.add_argument(
        "--across-tokenizers",
        action="store_true",
        help="compare runs whose tokenizers differ, on bits per byte (the report says so); refused otherwise",
    )
    parser.add_argument("--wandb", action="store_true", help="also publish a W&B Report (needs credentials)")
    parser.add_argument("--project", help="W&B project (default: the runs' logger.project)")
    parser.add_argument("--entity", help="W&B entity (default: the runs' logger.entity, else yours)")
    opts = parser.parse_args(args)
    if opts.n_boot < 1:
        raise ConfigError("--n-boot", opts.n_boot, "an integer >= 1")
    if opts.ladder is not None and not Path(opts.ladder).expanduser().exists():
        raise ConfigError("--ladder", opts.ladder, "an existing ladder multirun dir or fit JSON")
    out = check_out(Path(opts.out or Path(opts.runs[0]) / "report"), directory=True)
    skipped: list[str] = []
    runs = load_runs(opts.runs, skipped)
    across = opts.across_tokenizers
    check_shared(runs, opts.budget, across)  # before a ladder dir's fit, which takes a while
    fit = None
    if opts.ladder:
        fit = load_ladder(
            opts.ladder,
            n_boot=opts.n_boot,
            notes=skipped,
            students=runs,
            budget=opts.budget,
            across_tokenizers=across,
        )
    index = write_report(runs, fit, out, extra_notes=skipped, budget=opts.budget, across_tokenizers=across)
    print(f"report: {index} (and {index.with_name('report.md').name}, PNGs beside it)")
    for line in notes(runs, fit):
        print(f"note: {line}")
    if opts.wandb:
        from archlab.report.publish import publish_if_possible

        publish_if_possible(runs, fit, project=opts.project, entity=opts.entity)
    return 0
