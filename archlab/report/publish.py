"""The W&B side of ``archlab report --wandb``: a W&B Report built with ``wandb-workspaces``
(``wandb_workspaces.reports.v2``) and, when credentials exist, saved with each run's density metrics
written into its W&B summary.

Building the Report needs no network; ``Report.save()`` and the summary updates do (WANDB_API_KEY or
``wandb login``; WANDB_BASE_URL for a self-hosted server). Offline runs must be uploaded first with
``wandb sync <run_dir>/wandb/offline-run-*`` for the runset and the summary updates to find them.
"""

from __future__ import annotations

import math
import netrc
import os
from urllib.parse import urlparse

from archlab.density import LadderFit
from archlab.report import calibration
from archlab.report.runs import Run
from archlab.report.tables import fit_text, notes, table, teacher_text

DEFAULT_PROJECT = "archlab"


def has_credentials() -> bool:
    """An API key in the environment or a ``wandb login`` entry in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")  # wandb honours NETRC too
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _markdown_table(runs: list[Run]) -> str:
    header, rows = table(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows])


def build_wandb_report(
    runs: list[Run],
    fit: LadderFit | None,
    *,
    project: str,
    entity: str,
    title: str | None = None,
    study: dict | None = None,
):
    """The W&B Report object (no network): fit text, notes, bpb-vs-params scatters, loss curves against
    training tokens (the teacher's bpb in words: a W&B line plot has no reference line), density bars,
    run table.

    With ``study`` (``archlab study``'s study.json) the calibration panel and the verdict table (Δbpb and
    density with their intervals) come first, and the per-run density bars are left out (a study's
    densities are its paired ones). The scatter of bpb against parameters shows every seed's point.

    The runset selects the runs' W&B groups (one per sweep), else their run ids.
    """
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    groups = sorted({r.group for r in runs if r.group})
    ids = sorted({r.wandb_id for r in runs if r.wandb_id})
    filters = [expr.Metric("Group").isin(groups)] if groups else [expr.Metric("ID").isin(ids)] if ids else []
    columns = [
        "summary:val/bpb",
        "summary:params/non_embedding",
        "summary:params/active_non_embedding",
        "summary:density/n_eff",
        "summary:density/per_param",
        "summary:density/per_active_param",
        "summary:density/per_weight_byte",
        "summary:density/extrapolated",
    ]
    runset = wr.Runset(
        entity=entity,
        project=project,
        name="compared runs",
        filters=filters,
        groupby=[],
        pinned_columns=columns,
    )
    panels = [
        wr.ScatterPlot(
            title="val bpb vs non-embedding parameters",
            x=wr.SummaryMetric("params/non_embedding"),
            y=wr.SummaryMetric("val/bpb"),
            log_x=True,
        ),
        wr.ScatterPlot(
            title="val bpb vs active non-embedding parameters",
            x=wr.SummaryMetric("params/active_non_embedding"),
            y=wr.SummaryMetric("val/bpb"),
            log_x=True,
        ),
    ]
    panels += [
        wr.LinePlot(title="validation bpb vs training tokens", x="train/tokens", y=["val/bpb"]),
        wr.LinePlot(title="training loss vs training tokens", x="train/tokens", y=["train/loss"]),
    ]
    if fit is not None and study is None:
        panels.append(
            wr.BarPlot(
                title="capability density ρ = N_eff / denominator",
                orientation="v",
                metrics=[
                    wr.SummaryMetric("density/per_param"),
                    wr.SummaryMetric("density/per_active_param"),
                    wr.SummaryMetric("density/per_weight_byte"),
                ],
            )
        )
    note_lines = notes(runs, fit)
    blocks = [] if study is None else _study_blocks(wr, study)
    blocks += [
        wr.P(fit_text(fit)),
        wr.H2("Notes"),
        wr.MarkdownBlock("\n".join(f"- {n}" for n in note_lines) or "none"),
        wr.P(teacher_text(runs)),
        wr.PanelGrid(runsets=[runset], panels=panels),
        wr.H2("Runs"),
        wr.MarkdownBlock(_markdown_table(runs)),
    ]
    return wr.Report(
        project=project,
        entity=entity,
        title=title or "archlab: capability density",
        description="Runs compared by capability density against a dense reference ladder (archlab report).",
        blocks=blocks,
    )


def _study_blocks(wr, study: dict) -> list:
    """Calibration panel, then the verdicts (Δbpb and density intervals) as a Markdown table."""
    header, rows = calibration.rows(study)
    table_lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table_lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [
        wr.H2("Calibration"),
        wr.MarkdownBlock("\n".join(f"- {line}" for line in calibration.panel(study))),
        wr.P(calibration.HOW_TO_READ),
        wr.H2("Verdicts: Δbpb and density, 90 % intervals"),
        wr.MarkdownBlock("\n".join(table_lines)),
    ]


def _summary_update(run: Run) -> dict:
    """Density metrics as W&B accepts them (inf/NaN become None)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in run.density.items()}


def publish(
    runs: list[Run], fit: LadderFit | None, *, project: str, entity: str | None, study: dict | None = None
) -> str:
    """Write density metrics into each run's W&B summary, save the Report, return its URL (network)."""
    import wandb

    api = wandb.Api()
    entity = entity or api.default_entity
    for run in runs:
        if not (run.density and run.wandb_id):
            continue
        try:
            remote = api.run(f"{entity}/{project}/{run.wandb_id}")
        except (wandb.errors.CommError, ValueError) as exc:
            print(
                f"W&B: run {run.wandb_id} ({run.name}) not found ({exc}); upload it with "
                f"`wandb sync {run.path / 'wandb'}` and rerun to add its density metrics"
            )
            continue
        remote.summary.update(_summary_update(run))
    report = build_wandb_report(runs, fit, project=project, entity=entity, study=study)
    report.save()
    return report.url


def publish_if_possible(
    runs: list[Run],
    fit: LadderFit | None,
    *,
    project: str | None,
    entity: str | None,
    study: dict | None = None,
) -> None:
    project = project or next((r.project for r in runs if r.project), DEFAULT_PROJECT)
    entity = entity or next((r.entity for r in runs if r.entity), None)
    if not has_credentials():
        print("W&B: no credentials (set WANDB_API_KEY or run `wandb login`): wrote the local report only")
        return
    print(f"W&B report: {publish(runs, fit, project=project, entity=entity, study=study)}")
