"""The training loop: AdamW, warmup + cosine/WSD schedule, eval, checkpoints, resume, logging.

The optimizer step itself (forward, loss, backward over the micro-batches, clipping) is
``archlab.step.OptimizerStep`` (or its DDP/FSDP2 forms, ``archlab.distributed``); the trainer feeds
it the micro-batches of each step. Evaluation is ``archlab.evaluation``; checkpoints and resume are
``archlab.train_state``.

The optimizer and its schedule are ``archlab.optim``; the run's tokens ``archlab.run_tokens``. The
batch of a step is the training stream's windows at positions fixed by (seed, step) (``archlab.data``),
and with a teacher the same windows' rows of the shared soft-target cache; checkpoints hold weights,
optimizer, scheduler and RNG state, so resuming a killed run replays exactly the loss curve of an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from archlab import checkpoint, distributed, plots, registry
from archlab.config import TrainerConfig
from archlab.data import TokenSplit, n_val_windows, train_batch
from archlab.distill_checks import wants_in_context
from archlab.errors import ConfigError, NonFiniteLossError
from archlab.evaluation import Evaluation
from archlab.kernels import select_kernel
from archlab.loggers import Loggers, RunInfo
from archlab.metrics import model_metrics
from archlab.model import build_student
from archlab.onpolicy import OnPolicyStep
from archlab.optim import freeze_except, init_from, lr_factor, make_optimizer
from archlab.run_tokens import load_split
from archlab.soft_targets import TargetCache, TargetRequest, build_or_load
from archlab.step import MicroBatch, NonFiniteStep, OptimizerStep
from archlab.teacher import TeacherEnv
from archlab.train_state import TrainState, read_resumable, resume_point

log = logging.getLogger(__name__)


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto`` (CUDA where available, else CPU), ``cpu``, or an accelerator this machine has (``cuda``,
    ``cuda:N``, ...); anything else is a ``ConfigError`` naming ``key``, the option that gave ``name``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    here = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    count = torch.accelerator.device_count()
    allowed = "auto or cpu" + (
        f", or {here.type} / {here.type}:N, N < {count}" if here else " (no accelerator here)"
    )
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(key, name, allowed) from None
    if device.type == "cpu" or (
        here is not None and device.type == here.type and (device.index or 0) < count
    ):
        return device
    raise ConfigError(key, name, allowed)


def teacher_env(cfg: DictConfig, split: TokenSplit, device: torch.device, progress: bool) -> TeacherEnv:
    """What the run's teacher receives (``archlab.teacher.TeacherEnv``), its train service included."""

    def train(teacher_cfg: DictConfig, run_dir: Path) -> None:
        Trainer(teacher_cfg, RunInfo(run_dir=run_dir, name="teacher"), split=split).run()

    return TeacherEnv(
        split=split,
        vocab_size=cfg.model.vocab_size,
        context=cfg.model.context,
        cache_dir=Path(cfg.data.cache_dir).expanduser() / "teachers",
        device=device,
        progress=progress,
        train=train,
    )


def soft_targets_for(
    cfg: DictConfig,
    split: TokenSplit,
    device: torch.device,
    t: TrainerConfig,
    objective_cfg,
    world_size: int = 1,
    builders: distributed.Ranks | None = None,
) -> TargetCache | None:
    """The shared teacher's cached targets for a run of ``world_size`` ranks (built once per sweep, by the
    process that takes the cache's lock first, with ``builders`` sharing its work: the ranks of a DDP run
    or of ``archlab teacher build`` under torchrun; other processes wait on the lock), or None without a
    teacher or with the in-context one (``archlab.incontext``)."""
    if cfg.teacher.plugin == "none" or wants_in_context(cfg.teacher):
        return None
    teacher_cls, teacher_cfg = registry.configured("teacher", cfg.teacher)
    cache_dir = Path(cfg.data.cache_dir).expanduser()
    env = teacher_env(cfg, split, device, t.progress)
    teacher = teacher_cls(teacher_cfg, env)
    if teacher.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            "teacher",
            cfg.teacher.plugin,
            f"a teacher whose vocabulary ({teacher.vocab_size}) equals "
            f"model.vocab_size={cfg.model.vocab_size}",
        )
    request = TargetRequest(
        context=cfg.model.context,
        top_k=min(cfg.distill.top_k, teacher.vocab_size),
        temperature=float(getattr(objective_cfg, "temperature", 1.0)),
        seed=cfg.seed,
        train_windows=t.max_steps * t.grad_accum * t.batch_size * world_size,
        val_windows=n_val_windows(split.val, cfg.model.context, t.eval_tokens),
        batch_size=cfg.distill.build_batch_size,
        lock_timeout=cfg.distill.lock_timeout,
    )
    targets = build_or_load(teacher, split, request, cache_dir, t.progress, builders)
    log.info("teacher %s: val bpb %.4f", cfg.teacher.plugin, targets.teacher_val_bpb)
    return targets


def memory_peak(device: torch.device) -> dict[str, int]:
    """The training process's memory high-water mark (rank 0's; DDP ranks hold the same): on CUDA the
    tensors' peak on its device (``memory/peak_device_bytes``), on CPU the process's peak resident set,
    tensors and everything else (``memory/peak_rss_bytes``, Linux's ru_maxrss)."""
    if device.type == "cuda":
        return {"memory/peak_device_bytes": torch.cuda.max_memory_allocated(device)}
    return {"memory/peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def density_summary(ladder: str | None, summary: dict) -> dict:
    """The run's ``density/*`` metrics against the ladder fit at ``density.ladder`` ({} without one).

    A loss the fit cannot place (at or below its floor E) is logged as a warning, not an error: the
    run itself is fine, only the ladder is too small to measure it. Unknown or unbounded interval ends
    (NaN, inf) are logged as None, so summary.json stays valid JSON.
    """
    if ladder is None:
        return {}
    from archlab.density import DensityError, LadderFit, summary_density  # scipy: only when asked

    try:
        metrics = summary_density(LadderFit.load(Path(ladder).expanduser()), summary)
    except DensityError as exc:
        log.warning("density: %s", exc)
        return {}
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


class Trainer:
    """Trains one student described by a composed archlab config; ``run()`` returns the summary."""

    def __init__(self, cfg: DictConfig, info: RunInfo, split: TokenSplit | None = None) -> None:
        self.cfg, self.info = cfg, info
        self.t: TrainerConfig = OmegaConf.to_object(cfg.trainer)
        self.ranks = distributed.current(self.t.parallel, resolve_device(self.t.device))
        self.device = self.ranks.device
        # windows of the training stream per optimizer step, over all ranks
        self.windows_per_step = self.t.batch_size * self.t.grad_accum * self.ranks.world_size
        bf16 = self.t.precision.name == "bf16"
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.split = split or load_split(cfg)
        log.info(self.split.report())
        # where to resume, checked now against the config the split completed (vocabulary, tokenizer)
        self.resume_from = resume_point(self.t, info.run_dir)
        self.resume_state = (
            read_resumable(self.resume_from, cfg, self.ranks.world_size) if self.resume_from else None
        )
        init_seed = cfg.model.init_seed
        torch.manual_seed(cfg.seed if init_seed is None else init_seed)
        self.model = build_student(cfg).to(self.device)
        if init_seed is not None:  # randomness drawn after the init follows the run's seed, as without it
            torch.manual_seed(cfg.seed)
        self.model.kernel = select_kernel(
            cfg.model.attention_backend, self.device, self.compute_dtype, self.model.dims.head_dim
        )
        log.info("attention kernel: %s (%s)", self.model.kernel.name, self.model.kernel.reason)
        if self.t.compile:
            # NOTE: in place (nn.Module.compile), not torch.compile(model): a wrapper would prefix every
            # state-dict key with `_orig_mod.`, and checkpoints, resume and export read the eager names
            self.model.compile()
        objective, objective_cfg = registry.configured("objective", cfg.objective)
        self.objective = objective(objective_cfg)
        self.targets = soft_targets_for(
            cfg, self.split, self.device, self.t, objective_cfg, self.ranks.world_size, self.ranks
        )
        self.evaluate = Evaluation(self.model, self.split, self.t, self.targets, self.device, self.autocast)
        if self.t.init_from:
            init_from(self.model, self.t.init_from)
        freeze_except(self.model, self.t.train_only)
        self.static = model_metrics(self.model, self.compute_dtype)  # of the whole model, before sharding
        if self.t.parallel == "fsdp":
            distributed.shard(self.model, self.device, bf16)
        self.optimizer = make_optimizer(self.model, self.t)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.t)
        )
        step = {"none": OptimizerStep, "ddp": distributed.DataParallelStep, "fsdp": distributed.ShardedStep}
        self.update = step[self.t.parallel](
            self.model,
            self.objective,
            self.optimizer,
            self.scheduler,
            grad_clip=self.t.grad_clip,
            autocast=self.autocast,
        )
        self.step = 0
        self.state = TrainState(
            cfg, self.t, info.run_dir, self.model, self.optimizer, self.scheduler, self.ranks, lr_factor
        )
        if cfg.distill.on_policy > 0:  # with probability λ a step learns on the student's own samples
            self.update = OnPolicyStep(
                self, objective_cfg, teacher_env(cfg, self.split, self.device, self.t.progress)
            )

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def micro_batches(self) -> Iterator[MicroBatch]:
        """The step's ``grad_accum`` micro-batches: the training stream's windows at the positions of
        (seed, step), with the soft targets of the same positions. Of each global micro-batch of
        world_size · batch_size windows, rank r reads the r-th batch_size."""
        t, ranks = self.t, self.ranks
        for micro in range(t.grad_accum):
            global_micro = self.step * t.grad_accum + micro
            first, count = (global_micro * ranks.world_size + ranks.rank) * t.batch_size, t.batch_size
            x, y = train_batch(
                self.split.train,
                context=self.model.dims.context,
                seed=self.cfg.seed,
                first=first,
                count=count,
            )
            soft = self.targets.train(first, count).to(self.device) if self.targets else None
            yield MicroBatch(x.to(self.device), y.to(self.device), soft)

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``archlab.step``); raises on a non-finite loss or gradient norm."""
        try:
            metrics = self.update(self.micro_batches())
        except NonFiniteStep as exc:
            raise NonFiniteLossError(self._non_finite_message(str(exc))) from None
        self.step += 1
        lr, grad_norm = metrics.pop("lr"), metrics.pop("grad_norm")
        return {
            **{f"train/{k}": v for k, v in metrics.items()},
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens": self.tokens_seen,
        }

    def _non_finite_message(self, what: str) -> str:
        last = checkpoint.latest(self.info.run_dir)
        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written"
        advice = "Lower trainer.lr or raise trainer.warmup_fraction"
        if self.t.grad_clip == 0:
            advice += ", or set trainer.grad_clip (e.g. 1.0)"
        stopped = f"the optimizer did not step, training stopped and {kept}"
        return f"{what} at step {self.step + 1}; {stopped}. {advice}."

    @property
    def tokens_seen(self) -> int:
        """Training tokens of all ranks so far."""
        return self.step * self.windows_per_step * self.model.dims.context

    def log_plots(self, loggers: Loggers | None) -> None:
        """Plugin diagnostics on the first validation batch: the residual plugin's depth weights, if it
        offers them, to ``<run_dir>/plots/depth_weights.{png,json}`` and W&B. Every rank runs the forward
        (a collective under FSDP); rank 0 (``loggers`` given) writes them."""
        depth = self.evaluate.depth_weights()
        if depth is not None and loggers:
            png = plots.save_depth_weights(depth, self.info.run_dir / "plots", self.step)
            loggers.image(f"plots/{png.stem}", png, self.step)

    def save(self, wandb_id: str | None) -> Path:
        """Checkpoint this step (``archlab.train_state``); under ddp/fsdp every rank takes part."""
        return self.state.save(self.step, wandb_id)

    def restore(self, ckpt: Path, state: dict | None = None) -> str | None:
        """Load a checkpoint (and its ``state.pt``, if already read) into model, optimizer, scheduler and
        RNG; returns its W&B run id."""
        state = state or read_resumable(ckpt, self.cfg, self.ranks.world_size)
        self.step, wandb_id = self.state.restore(ckpt, state)
        return wandb_id

    def run(self) -> dict:
        """Train to ``max_steps`` (resuming if asked), evaluate, log and return the summary: rank 0's,
        on every rank. Every rank steps, evaluates and checkpoints (FSDP's forwards and DCP's writes are
        collectives); rank 0 alone logs, plots and publishes the checkpoints."""
        ckpt = self.resume_from
        if self.ranks.is_main:
            checkpoint.remove_partial(self.state.ckpt_root)
        wandb_id = self.restore(ckpt, self.resume_state) if ckpt else None
        self.resume_state = None  # its tensors are the model's and optimizer's now
        done = self.state.finished_summary(self.step)
        if done is not None:
            log.info("run finished at step %d already; its summary.json is kept", self.step)
            return done
        if not self.ranks.is_main:
            self._loop(None, {})
            return self.ranks.broadcast(None)
        loggers = Loggers(self.cfg, self.info, resume_id=wandb_id)
        loggers.jsonl.truncate_after(self.step)
        static = {
            **self.static,
            "kernel/attention": self.model.kernel.name,
            "world_size": self.ranks.world_size,
        }
        static.update(
            {
                f"corpus/{k}": self.split.meta[k]
                for k in ("documents", "train_tokens", "val_tokens", "tokenizer")
            }
        )
        if self.targets:
            static["teacher/val_bpb"] = self.targets.teacher_val_bpb
        try:
            summary = self._loop(loggers, static)
        except BaseException:
            loggers.finish(exit_code=1)
            raise
        summary.update(density_summary(self.cfg.density.ladder, summary))
        loggers.summary(summary)
        loggers.finish()
        for line in loggers.locations():
            log.info(line)
        return self.ranks.broadcast(summary)

    def _loop(self, loggers: Loggers | None, static: dict) -> dict:
        """Steps to ``max_steps`` with eval, plots and checkpoints on their schedules, on every rank;
        ``loggers`` is rank 0's (None on the others, which log nothing)."""
        if self.step == 0 and loggers:  # a resumed run logged them when it started
            loggers.log(static, self.step)
        t, train_time, val, first, metrics = self.t, 0.0, {}, self.step, {}
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not (t.progress and loggers),
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        with bar:
            while self.step < t.max_steps:
                start = time.perf_counter()
                metrics = self.train_step()
                train_time += time.perf_counter() - start
                if self.step % t.eval_every == 0 or self.step == t.max_steps:
                    val = self.evaluate()
                    metrics.update(val)
                    self.log_plots(loggers)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.3f}", val_bpb=f"{val.get('val/bpb', math.nan):.3f}"
                )
                if loggers and (self.step % t.log_every == 0 or "val/bpb" in metrics):
                    loggers.log(metrics, self.step)
                if self.step % t.ckpt_every == 0 or self.step == t.max_steps:
                    self.save(loggers.wandb_id if loggers else None)
        if not val:
            val = self.evaluate()
        tokens_per_step = self.windows_per_step * self.model.dims.context
        done = self.step - first
        return {
            **static,
            **metrics,  # the last step's training metrics (loss, plugins' routing metrics, ...)
            **val,
            "train/steps": self.step,
            "train/tokens": self.tokens_seen,
            "tokens_per_s": done * tokens_per_step / train_time if train_time else 0.0,  # all ranks'
            **memory_peak(self.device),
        }
