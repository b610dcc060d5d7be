"""The ``archlab`` command: ``train`` (a Hydra app; ``-m`` for multirun) and ``plugins``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from archlab import __version__, registry, slots
from archlab.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, NOT_WRITABLE, ArchlabError, ConfigError

log = logging.getLogger("archlab")

USAGE = """usage: archlab COMMAND [ARGS]

commands:
  train [OVERRIDES]   train a student; Hydra overrides, e.g. attention=mha ffn=relu2
                      trainer.max_steps=20; -m for a multirun sweep; --help for the config
  plugins [--check]   list installed plugins per slot; --check exits 1 if any is broken
  doctor              what this machine gives archlab (torch build, GPU, xformers, W&B, backends)
                      and what to install for what is missing; exits 1 if something is broken
  generate CHECKPOINT --prompt TEXT [--temperature T --top-k K --top-p P]
                      [--draft [--draft-tree 4,2,1] [--compare]]
                      continue a prompt with a trained student (KV-cache decoding; --draft:
                      speculative decoding with the head's draft heads, e.g. head=medusa, exact)
  study [--quick] [--out DIR] [OVERRIDES]
                      the main job: a dense reference ladder and plugin students under one
                      teacher, fitted and compared by capability density in an HTML report
  report RUN_DIRS... [--ladder LADDER] [--out DIR] [--wandb] [--project P --entity E]
                      compare finished runs by capability density against a reference ladder:
                      HTML + Markdown report with plots; --wandb also publishes a W&B Report
  teacher build [OVERRIDES]
                      build the configured teacher and its soft-target cache once, so that
                      later runs and sweeps with the same overrides only read them
  teacher sample CHECKPOINT --prompts N --temperature T --top-p P [--samples-per-prompt K] --out DIR
                      a corpus sampled from a checkpoint, with a provenance manifest, for
                      corpus=files (sequence-level KD; SSD when it is the student's own run)
  eval RUN --tasks T1,T2 [--limit N] [--batch-size B] [--model archlab|hf] [--out FILE]
                      score a student on lm-eval tasks (archlab's own offline ones:
                      archlab_stdlib_choice, archlab_stdlib_perplexity); needs archlab[eval];
                      --model hf: through lm-eval's stock hf model on the exported student
  export CHECKPOINT --packed [--out PATH]
                      write the student as one packed safetensors file (ternary: 2 bits per weight);
                      `generate` reads it too
  export CHECKPOINT --hf DIR [--force]
                      write the student as a transformers model directory (Llama, Arcee, DeepSeek-V3
                      classes) with its tokenizer, checked by loading it back
  new-plugin SLOT NAME [--dir DIR]
                      write a new plugin distribution (entry point, typed Config, preset, conformance
                      test); see docs/writing-a-plugin.md
"""


def run_info(cfg: DictConfig):
    """Run dir, W&B name, group and tags from the Hydra job."""
    from archlab.loggers import RunInfo

    hc = HydraConfig.get()
    choices = hc.runtime.choices
    tags = [f"{group}={choice}" for group, choice in choices.items() if not group.startswith("hydra")]
    group = None
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.sweep.dir)
        group = f"{sweep_dir.parent.name}_{sweep_dir.name}"
    return RunInfo(
        run_dir=Path(hc.runtime.output_dir), name=hc.job.override_dirname or "default", group=group, tags=tags
    )


def parallel_job_num() -> int | None:
    """The Hydra job's number in a multirun whose launcher runs jobs side by side (joblib), else None."""
    hc = HydraConfig.get()
    parallel = hc.mode == RunMode.MULTIRUN and hc.launcher._target_.endswith(".JoblibLauncher")
    return hc.job.num if parallel else None


def train_job(cfg: DictConfig) -> float:
    """One Hydra job: validate everything, train (on the ranks of ``trainer.parallel``, in rank 0's run
    dir), print where the results are (rank 0); returns val bpb."""
    from archlab import distributed
    from archlab.config import validate
    from archlab.trainer import Trainer, resolve_device

    info = run_info(cfg)
    cfg.trainer.device = distributed.sweep_device(cfg.trainer.device, parallel_job_num())
    try:
        validate(cfg)
        with distributed.process_group(cfg.trainer.parallel, resolve_device(cfg.trainer.device)) as ranks:
            info = dataclasses.replace(info, run_dir=ranks.shared_dir(info.run_dir))
            summary = Trainer(cfg, info).run()
    except ArchlabError as exc:
        print(f"archlab: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"archlab: {_interrupted(info.run_dir)}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if not ranks.is_main:
        return float(summary["val/bpb"])
    print(
        f"\nval bpb {summary['val/bpb']:.4f} after {summary['train/steps']} steps "
        f"({summary['tokens_per_s']:,.0f} tokens/s)"
    )
    print(
        f"results in {info.run_dir}: summary.json, metrics.jsonl, checkpoints/"
        + (", wandb/" if cfg.logger.backend.name == "wandb" else "")
    )
    return float(summary["val/bpb"])


def _interrupted(run_dir: Path) -> str:
    """What a Ctrl-C left: the step of the checkpoint kept, and the command that resumes from it."""
    from archlab import checkpoint

    try:
        last = checkpoint.latest(run_dir)
    except checkpoint.CheckpointError:
        last = None
    if last is None:
        return f"interrupted before the first checkpoint; nothing to resume in {run_dir}"
    overrides = [
        o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra.run.dir=", "trainer.resume="))
    ]
    command = shlex.join(["archlab", "train", *overrides, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])
    return f"interrupted; the checkpoint of step {checkpoint.step_of(last)} is kept; resume with: {command}"


@hydra.main(version_base="1.3", config_path="pkg://archlab.conf", config_name="config")
def _train_app(cfg: DictConfig) -> float:
    return train_job(cfg)


def train(args: list[str]) -> None:
    """``archlab train``: Hydra's app, whose config errors reach ``main`` as exceptions (exit 2) rather
    than Hydra's own report and exit 1, which is left for a crash."""
    from archlab import distributed
    from archlab.config import register_configs

    register_configs()
    distributed.slurm_env()  # srun's tasks: their RANK before Hydra writes the run dir
    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: rank 0 alone writes the run dir
        args = [*args, "hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    sys.argv = ["archlab train", *args]
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises what it would print and exit 1 on
    try:
        _train_app()
    finally:
        if previous is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def teacher(args: list[str]) -> int:
    """``archlab teacher build [OVERRIDES]``: prepare the configured teacher and its soft-target cache;
    ``archlab teacher sample CKPT ...``: a corpus sampled from a checkpoint (``archlab.sample_corpus``).

    Under torchrun (or the tasks of a SLURM step) the ranks share the build: each prepares the teacher
    and fills its share of the windows, rank 0 publishes (``archlab.soft_targets``) and alone prints.
    The cache covers the run the overrides describe on one process, whatever the build's world size."""
    if args[:1] == ["sample"]:
        from archlab import sample_corpus

        return sample_corpus.main(args[1:])
    parser = argparse.ArgumentParser(
        prog="archlab teacher",
        description="Build (or find) the shared teacher and its soft targets for the run the overrides "
        "describe, so that later runs and sweeps only read them; under torchrun the ranks share the build.",
    )
    parser.add_argument(
        "action", choices=["build"], help="build; `archlab teacher sample --help` for sampling"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for `archlab train`")
    opts = parser.parse_args(args)
    from archlab import distributed
    from archlab.config import compose, validate
    from archlab.distill_checks import wants_in_context
    from archlab.run_tokens import load_split
    from archlab.trainer import resolve_device, soft_targets_for

    distributed.slurm_env()
    main_rank = os.environ.get("RANK", "0") == "0"
    level = logging.INFO if main_rank else logging.WARNING  # one rank's log, each rank's warnings
    logging.basicConfig(level=level, format="[%(asctime)s][%(name)s] %(message)s")
    cfg = compose(opts.overrides)
    validate(cfg)
    if cfg.teacher.plugin == "none" or wants_in_context(cfg.teacher):  # the latter caches no targets
        raise ConfigError("teacher", cfg.teacher.plugin, "a teacher plugin to build, e.g. teacher=ngram")
    t = OmegaConf.to_object(cfg.trainer)
    parallel = "ddp" if "WORLD_SIZE" in os.environ else "none"  # one process joins no group
    with distributed.process_group(parallel, resolve_device(t.device)) as ranks:
        split = load_split(cfg)
        log.info(split.report())
        _, objective_cfg = registry.configured("objective", cfg.objective)
        targets = soft_targets_for(cfg, split, ranks.device, t, objective_cfg, builders=ranks)
    if not ranks.is_main:
        return 0
    print(f"teacher {cfg.teacher.plugin}: val bpb {targets.teacher_val_bpb:.4f}")
    print(
        f"soft targets ({targets.meta['train_rows']} train windows, top {targets.meta['top_k']}): "
        f"{targets.path}"
    )
    return 0


#: Flags renamed in 0.x (old -> new); the old spelling works, with a warning, for one release.
RENAMED_FLAGS = {"--medusa": "--draft", "--medusa-tree": "--draft-tree"}


def _renamed_flags(args: list[str]) -> list[str]:
    """``args`` with renamed flags (``RENAMED_FLAGS``) spelt the new way, warning once per flag."""
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in RENAMED_FLAGS:
            print(f"archlab: warning: {flag} is now {RENAMED_FLAGS[flag]}", file=sys.stderr)
            arg = RENAMED_FLAGS[flag] + eq + value
        out.append(arg)
    return out


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: how Python passes argv bytes that are not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def generate(args: list[str]) -> int:
    """``archlab generate CHECKPOINT --prompt TEXT``: continue a prompt with a trained student."""
    parser = argparse.ArgumentParser(
        prog="archlab generate", description="Continue a prompt with a trained student (KV-cache decoding)."
    )
    parser.add_argument("checkpoint", help="a run dir, its checkpoints/ dir, or one checkpoint dir")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--draft", action="store_true", help="speculative decoding with the head's draft heads (exact)"
    )
    parser.add_argument("--draft-tree", default="4,2,1", help="--draft: top tokens per draft depth")
    parser.add_argument("--compare", action="store_true", help="--draft: also time plain decoding")
    opts = parser.parse_args(_renamed_flags(args))
    for key, bad, allowed in (
        ("--no-cache", opts.draft and opts.no_cache, "off with --draft (it verifies through the cache)"),
        ("--max-new-tokens", opts.max_new_tokens < 1, "a positive integer"),
        ("--temperature", not 0 <= opts.temperature < math.inf, "a finite number >= 0"),
        ("--top-k", opts.top_k < 0, "an integer >= 0"),
        ("--top-p", not 0 < opts.top_p <= 1, "a number in (0, 1]"),
        ("--seed", not 0 <= opts.seed < 2**64, "an integer in [0, 2**64)"),
        ("--prompt", not _is_utf8(opts.prompt), "UTF-8 text (the shell passed bytes that are not)"),
    ):
        if bad:
            raise ConfigError(key, getattr(opts, key[2:].replace("-", "_")), allowed)
    from archlab.speculative import generate_speculative, parse_widths, speculative_report

    widths = parse_widths(opts.draft_tree) if opts.draft else ()
    import time

    import torch

    from archlab import checkpoint, export
    from archlab.generate import generate as run_generation
    from archlab.run_tokens import run_tokenizer
    from archlab.trainer import resolve_device

    device = resolve_device(opts.device, key="--device")
    if opts.checkpoint.endswith(".safetensors"):  # a file from `archlab export --packed`
        ckpt, (model, cfg) = opts.checkpoint, export.load_packed(opts.checkpoint, device)
    else:
        ckpt = checkpoint.find(opts.checkpoint, key="CHECKPOINT")
        model, cfg = checkpoint.load_student(ckpt, device), checkpoint.saved_config(ckpt)
    tokenizer = run_tokenizer(cfg)
    prompt = torch.tensor([tokenizer.encode(opts.prompt)], device=device)
    if prompt.shape[1] == 0:
        raise ConfigError("--prompt", opts.prompt, "text that encodes to at least one token")
    sampling = {"temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p}
    start = time.perf_counter()
    if opts.draft:
        generator = torch.Generator(device).manual_seed(opts.seed)
        out, stats = generate_speculative(
            model, prompt, opts.max_new_tokens, widths=widths, **sampling, generator=generator
        )
    else:
        out = run_generation(
            model,
            prompt,
            opts.max_new_tokens,
            **sampling,
            generator=torch.Generator(device).manual_seed(opts.seed),
            use_cache=not opts.no_cache,
        )
    seconds = time.perf_counter() - start
    print(opts.prompt + tokenizer.decode(out[0, prompt.shape[1] :].tolist()))
    print(
        f"[{opts.max_new_tokens} tokens in {seconds:.2f} s, {opts.max_new_tokens / seconds:.1f} tokens/s, "
        f"{'no cache' if opts.no_cache else 'KV cache'}; {ckpt}]",
        file=sys.stderr,
    )
    if opts.draft:
        report = speculative_report(model, prompt, out, stats, sampling, widths=widths, compare=opts.compare)
        print(report, file=sys.stderr)
    return 0


def _fields(plugin: type) -> str:
    parts = []
    for f in dataclasses.fields(plugin.Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parts.append(f"{f.name}={getattr(default, 'value', default)!r}")
    return ", ".join(parts) or "(no fields)"


def plugins(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archlab plugins", description="List the installed plugins of every slot."
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if any plugin is broken")
    opts = parser.parse_args(args)
    broken = 0
    for slot in slots.names():
        found = registry.plugins(slot)
        print(f"{slot}:" + ("" if found else " (none installed)"))
        for name, plugin in sorted(found.items()):
            error = plugin.error
            status = "ok" if error is None else f"BROKEN ({plugin.entry_point.value}): {error}"
            broken += error is not None
            print(f"  {name:<12} {plugin.distribution:<24} {status}")
            if error is None:
                print(f"  {'':<12} {_fields(plugin.load())}")
                offered = [c.name for c in slots.CAPABILITIES if slots.offers(plugin.load(), c.protocol)]
                if offered:
                    print(f"  {'':<12} offers {', '.join(offered)}")
    for path in registry.preset_paths():
        print(f"presets: {path}")
    if opts.check and broken:
        print(f"{broken} broken plugin(s)", file=sys.stderr)
        return 1
    return 0


def _one_line(exc: Exception) -> str:
    """The error as one line: Hydra's and OmegaConf's texts with their cause, without Hydra's config
    search path and OmegaConf's ``full_key``/``object_type`` detail lines."""
    text = str(exc).split("\nConfig search path:")[0]
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause) not in text:
        text += f"\n({str(cause).splitlines()[0]})"
    detail = ("full_key:", "object_type=", "reference_type=")
    return " ".join(
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(detail)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            train(rest)
            return 0
        if command == "plugins":
            return plugins(rest)
        if command == "doctor":
            from archlab import doctor

            return doctor.main(rest)
        if command == "teacher":
            return teacher(rest)
        if command == "generate":
            return generate(rest)
        if command == "export":
            from archlab import export

            return export.main(rest)
        if command == "eval":
            from archlab import downstream

            return downstream.main(rest)
        if command == "new-plugin":
            from archlab import scaffold

            return scaffold.main(rest)
        if command == "report":
            from archlab import report

            return report.main(rest)
        if command == "study":
            from archlab import study

            return study.main(rest)
        if command == "--version":
            print(f"archlab {__version__}")
            return 0
    except ArchlabError as exc:  # bad input (2) or a failed run (3): one message
        print(f"archlab: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except (HydraException, OmegaConfBaseException) as exc:  # a config that does not compose
        from archlab import typos
        from archlab.config import compose

        print(f"archlab: error: {typos.hint(exc, rest, compose) or _one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a read-only run dir, cache dir or --out
        if exc.errno not in NOT_WRITABLE:
            raise
        print(f"archlab: error: cannot write {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("archlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"archlab: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
