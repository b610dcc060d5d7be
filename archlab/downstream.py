"""``archlab eval RUN --tasks T1,T2``: downstream scores of a student through EleutherAI's lm-eval
(``archlab[eval]``), on the student's own forward and KV cache (``archlab.lmeval``), so any student is
evaluated, exportable or not; ``--model hf``: through lm-eval's stock ``hf`` model (``HFLM``) on the
student exported as ``archlab export --hf`` writes it (``hf_lm``). archlab's own tasks
(``archlab.eval_tasks``) run offline; any lm-eval task runs when its data is on this machine.

Prints lm-eval's table and writes its results as JSON (temp name, fsync, rename: ``archlab.durable``)
to ``--out`` (default ``<run dir>/eval.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from archlab import checkpoint, durable, typos
from archlab.errors import ArchlabError, ConfigError, check_out
from archlab.eval_tasks import SHIPPED, TASKS_DIR

log = logging.getLogger(__name__)

#: ``--model``: archlab's lm-eval model (any student), or lm-eval's ``HFLM`` on the exported student.
MODELS = {"archlab": "any student", "hf": "lm-eval's HFLM on the student exported to transformers"}


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


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` is a transformers model directory (``archlab export --hf``'s: a config.json)."""
    return (Path(path) / "config.json").is_file()


def hf_lm(folder: Path, *, device: str, batch_size: int):
    """lm-eval's ``HFLM`` on the transformers directory ``folder`` in float32, scoring what ``ArchlabLM``
    scores (lm-eval 0.4.13's ``huggingface.py``):

    - tokens: ``add_bos_token`` is left unset, so ``tok_encode`` calls the tokenizer with its own default
      special tokens, as archlab's tokenizers' ``encode`` does: bytes and a learnt BPE add none (their
      exports have no post-processor), a teacher's (``teacher=hf``) adds what it added in training;
    - prefix: rolling windows and empty contexts start with ``prefix_token_id``, HFLM's BOS where the
      tokenizer has one, else its EOS; ``ArchlabLM``'s is the end-of-document token, the export's
      ``config.eos_token_id``, passed explicitly;
    - length: ``max_length`` is ``config.max_position_embeddings``, the student's ``model.context``,
      and both left-truncate ``context + continuation`` to its last ``max_length + 1`` tokens. HFLM
      cannot score a continuation longer than ``max_length`` (an ``assert``), which ``ArchlabLM`` scores
      in chunks: such a request is refused first, naming the lengths and ``--model archlab``.
    Both right-pad a batch; causal, a row's scores never see the padding."""
    from lm_eval.models.huggingface import HFLM

    from archlab.trainer import resolve_device

    class StockLM(HFLM):
        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            longest = max((len(continuation) for _, _, continuation in requests), default=0)
            if longest > self.max_length:
                raise ArchlabError(
                    f"archlab eval --model hf: an answer of {longest} tokens is longer than the student's "
                    f"context ({self.max_length} tokens, model.context), which lm-eval's hf model cannot "
                    "score; use --model archlab (it scores long answers in chunks)"
                )
            return super()._loglikelihood_tokens(requests, *args, **kwargs)

    config = json.loads((folder / "config.json").read_text())
    return StockLM(
        pretrained=str(folder.resolve()),  # a path, never a Hub id: no model_sha lookup online
        device=str(resolve_device(device, key="--device")),
        batch_size=batch_size,
        dtype="float32",
        prefix_token_id=config["eos_token_id"],
    )


@contextlib.contextmanager
def lm_eval_model(model: str, source: Path, *, device: str, batch_size: int) -> Iterator:
    """lm-eval model ``model`` (``MODELS``) on ``source``, a checkpoint (``hf``: exported to a temporary
    directory by ``archlab.export.write_hf``, whose refusal of a student no stock class holds is an
    ``ArchlabError``) or, for ``hf``, an exported directory."""
    if model == "archlab":
        from archlab.lmeval import ArchlabLM

        yield ArchlabLM(run=str(source), device=device, batch_size=batch_size)
        return
    from archlab.export import write_hf

    with tempfile.TemporaryDirectory(prefix="archlab-eval-hf-") as tmp:
        folder = source if is_hf_dir(source) else Path(write_hf(source, Path(tmp) / "hf")["dir"])
        yield hf_lm(folder, device=device, batch_size=batch_size)


def evaluate(
    run: str | Path,
    tasks: list[str],
    *,
    model: str = "archlab",
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "auto",
    bootstrap_iters: int = 1000,
    include: list[Path] = (),
) -> dict:
    """lm-eval's ``simple_evaluate`` of run ``run``'s student through lm-eval model ``model``
    (``lm_eval_model``) on ``tasks`` (found among archlab's own, the task YAMLs under ``include`` and
    lm-eval's): its results dict."""
    require_lm_eval()
    manager = task_manager(tasks, include)
    from lm_eval import simple_evaluate

    with lm_eval_model(model, Path(run), device=device, batch_size=batch_size) as lm:
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
        + ") through the archlab lm-eval model, or lm-eval's hf model on the exported student; needs "
        "archlab[eval].",
    )
    parser.add_argument(
        "run", help="a run dir, its checkpoints/ dir, or one checkpoint dir (--model hf: or an export)"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument(
        "--model",
        default="archlab",
        help="archlab (default: any student) or hf (lm-eval's HFLM on the student exported to "
        "transformers, as `archlab export --hf` writes it; exportable students only)",
    )
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
    if opts.model not in MODELS:
        raise ConfigError("--model", opts.model, " or ".join(f"{k} ({v})" for k, v in MODELS.items()))
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
    exported = opts.model == "hf" and is_hf_dir(opts.run)
    ckpt = Path(opts.run) if exported else checkpoint.find(opts.run, key="RUN")
    out = check_out(opts.out or run_dir_of(ckpt) / "eval.json", directory=False)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    results = evaluate(
        ckpt,
        tasks,
        model=opts.model,
        limit=opts.limit,
        batch_size=opts.batch_size,
        device=opts.device,
        bootstrap_iters=opts.bootstrap_iters,
        include=opts.include_path,
    )
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    record = {
        "checkpoint": str(ckpt),
        "model": opts.model,
        "tasks": tasks,
        "scores": scores(results),
        "lm_eval": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, default=handle_non_serializable)
    durable.write_atomic(out, text.encode())
    print(f"results in {out}", file=sys.stderr)
    return 0
