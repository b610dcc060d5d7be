"""``archlab eval RUN --tasks T1,T2``: downstream scores of a student through EleutherAI's lm-eval
(``archlab[eval]``), on the student's own forward and KV cache (``archlab.lmeval``), so any student is
evaluated, exportable or not. archlab's own tasks (``archlab.eval_tasks``) run offline; any lm-eval task
runs when its data is on this machine.

Prints lm-eval's table and writes its results as JSON (temp name, fsync, rename: ``archlab.durable``)
to ``--out`` (default ``<run dir>/eval.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from archlab import checkpoint, durable, typos
from archlab.errors import ArchlabError, ConfigError, check_out
from archlab.eval_tasks import SHIPPED, TASKS_DIR

log = logging.getLogger(__name__)


def require_lm_eval() -> None:
    """An ``ArchlabError`` naming the extra to install unless lm-eval can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise ArchlabError(
            f"archlab eval needs EleutherAI's lm-eval ({exc}): pip install 'archlab[eval]'"
        ) from None


def task_manager(tasks: list[str], include: list[Path] = ()):
    """lm-eval's ``TaskManager`` that knows ``tasks``: archlab's own and those under ``include`` alone
    when they hold every one of them (indexing lm-eval's ~15 000 task configs takes seconds), else
    lm-eval's too. A ``ConfigError`` names the first unknown task, with the nearest known one; a near
    miss of archlab's own fails before lm-eval's tasks are indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    for name in unknown:
        if typos.nearest(name, list(SHIPPED), "").startswith(";"):
            raise ConfigError(
                "--tasks", name, f"a task lm-eval knows{typos.nearest(name, list(SHIPPED), '')}"
            )
    if unknown:
        manager = TaskManager(include_path=paths)
    for name in unknown:
        if name not in manager.all_tasks:
            tail = typos.nearest(name, manager.all_tasks, "tasks")
            if not tail.startswith(";"):
                tail = f" (archlab's own: {', '.join(SHIPPED)}; `lm_eval ls tasks` lists lm-eval's)"
            raise ConfigError("--tasks", name, f"a task lm-eval knows{tail}")
    return manager


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",")]
    if not all(tasks):
        raise ConfigError("--tasks", text, "comma-separated task names, e.g. " + ",".join(SHIPPED))
    return tasks


def run_dir_of(ckpt: Path) -> Path:
    """The run dir holding checkpoint ``ckpt`` (``<run>/checkpoints/step_N``), else ``ckpt`` itself."""
    return ckpt.parents[1] if ckpt.parent.name == "checkpoints" else ckpt


def evaluate(
    run: str | Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    bootstrap_iters: int = 1000,
    include: list[Path] = (),
) -> dict:
    """lm-eval's ``simple_evaluate`` of run ``run``'s student on ``tasks`` (found among archlab's own,
    the task YAMLs under ``include`` and lm-eval's): its results dict."""
    require_lm_eval()
    manager = task_manager(tasks, include)
    from lm_eval import simple_evaluate

    from archlab.lmeval import ArchlabLM

    lm = ArchlabLM(run=str(run), device=device, batch_size=batch_size)
    return simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )


def scores(results: dict) -> dict[str, dict[str, float]]:
    """Per task, its metrics' values (lm-eval's ``"acc,none"`` keys as ``acc``; no stderrs)."""
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, int | float)
        }
    return out


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archlab eval",
        description="Score a trained student on lm-eval tasks (archlab's own: "
        + ", ".join(SHIPPED)
        + ") through the archlab lm-eval model; needs archlab[eval].",
    )
    parser.add_argument("run", help="a run dir, its checkpoints/ dir, or one checkpoint dir")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--bootstrap-iters", type=int, default=1000, help="resamples for the perplexities' stderr"
    )
    parser.add_argument(
        "--include-path", type=Path, action="append", default=[], help="a folder of your own task YAMLs"
    )
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default <run dir>/eval.json)")
    opts = parser.parse_args(args)
    tasks = parse_tasks(opts.tasks)
    for key, value, bad in (
        ("--limit", opts.limit, opts.limit is not None and opts.limit < 1),
        ("--batch-size", opts.batch_size, opts.batch_size < 1),
        ("--bootstrap-iters", opts.bootstrap_iters, opts.bootstrap_iters < 0),
    ):
        if bad:
            raise ConfigError(key, value, "a positive integer" if key != "--bootstrap-iters" else ">= 0")
    missing = next((p for p in opts.include_path if not p.is_dir()), None)
    if missing is not None:
        raise ConfigError("--include-path", str(missing), "a folder of lm-eval task YAMLs")
    ckpt = checkpoint.find(opts.run, key="RUN")
    out = check_out(opts.out or run_dir_of(ckpt) / "eval.json", directory=False)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    results = evaluate(
        ckpt,
        tasks,
        limit=opts.limit,
        batch_size=opts.batch_size,
        device=opts.device,
        bootstrap_iters=opts.bootstrap_iters,
        include=opts.include_path,
    )
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    record = {"checkpoint": str(ckpt), "tasks": tasks, "scores": scores(results), "lm_eval": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, default=handle_non_serializable)
    durable.write_atomic(out, text.encode())
    print(f"results in {out}", file=sys.stderr)
    return 0
