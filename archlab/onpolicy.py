"""On-policy distillation (GKD: Agarwal et al. 2024, arXiv 2306.13649, §3 Eq. 2-3 and Algorithm 1).

With probability λ (``distill.on_policy``) a step learns on the student's own samples instead of the
training stream's windows, and the teacher scores them online:
    u_s ~ U(0, 1) from rng(seed, step);   the step is on-policy iff u_s < λ
    x   = window[:prompt_len]                      (a prefix of each training window of the step)
    y   ~ p_S(· | x)                               (temperature, top-k, top-p; KV cache; no gradient)
    L   = mean over n of D(p_T(· | x, y<n) ‖ p_S(· | x, y<n))   over the sampled positions n only
D is the configured ``kd`` divergence (forward/reverse KL or JSD(β)) at its temperature τ, taken over
the teacher's **full** distribution (k = V, so no rest bucket: nothing is cached, nothing is truncated).
Other steps are today's offline steps on the cached, teacher-forced targets (GKD's "fixed dataset").

Why a pipeline piece and not a teacher or objective plugin: the teacher slot scores text
(``log_probs``) and the objective slot compares two distributions on given positions; on-policy
learning needs neither to change, only *which* sequences a step trains on. That is the caller's
business in ``archlab.step`` ("where the micro-batches come from"), so ``OnPolicyStep`` wraps the
optimizer step and swaps its micro-batches: every teacher that can score arbitrary text (``ngram``,
``trained``, ``self``, ``hf``) and every divergence works unchanged, and λ = 0 never builds it.

Departures and choices:
- Randomness is counter-based: the draw u_s and each micro-batch's sampling generator are seeded from
  (seed, step[, rank, micro-batch]), like the data stream (``archlab.data.stream_windows``). Resuming at
  a step therefore replays its draws and samples exactly with no RNG state to checkpoint.
- Sequences have a fixed length (no early stop at an end-of-document token); the teacher sees the prompt
  and the samples, nothing else, except the in-context teacher (SDFT/OPSD, ``archlab.incontext``), which
  plugs in as ``OnPolicyStep.score``: it prepends a privileged context and drops its positions.
- ``ngram`` on contexts it never saw: interpolated Kneser-Ney passes an unseen context's mass to the
  next-shorter context unchanged, down to the uniform 1/256 at order 0, so every byte keeps p > 0 and
  reverse KL stays finite; on a student's garbled samples it degrades towards a unigram model.
- ``objective.alpha < 1`` adds cross-entropy on the sampled tokens themselves (self-training on them).
  Auxiliary losses of plugins (MoE balance, Medusa) see the whole on-policy window, unmasked.

Shapes: ``b`` sequences, ``p`` prompt tokens, ``n`` sampled tokens, ``t = p + n − 1`` inputs, ``v`` vocab.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from archlab import registry
from archlab.context import ModelDims
from archlab.errors import ConfigError
from archlab.generate import generate, supports_kv_cache
from archlab.incontext import InContextTeacher, wants_in_context
from archlab.slots import is_causal
from archlab.soft_targets import SoftTargets
from archlab.step import MicroBatch
from archlab.teacher import TeacherEnv

#: Mixed into the seeds so that on-policy randomness never coincides with the data stream's.
DRAW_STREAM, SAMPLE_STREAM = 0x6B64, 0x5A4D


@dataclass
class Sampling:
    """How the student continues a prompt (``archlab.generate.next_token``)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def sample_tokens(cfg: DictConfig) -> int:
    """Tokens sampled after each prompt: ``distill.sample_tokens``, or up to the context when 0."""
    return cfg.distill.sample_tokens or cfg.model.context - cfg.distill.prompt_len


def validate_on_policy(cfg: DictConfig, dims: ModelDims, objective: type) -> None:
    """The checks an on-policy run needs before training (``archlab.config.validate``)."""
    lam = cfg.distill.on_policy
    if cfg.teacher.plugin == "none" or not objective.needs_teacher:
        raise ConfigError("distill.on_policy", lam, "0 unless a teacher and a kd objective are configured")
    if cfg.distill.prompt_len >= dims.context:
        raise ConfigError(
            "distill.prompt_len", cfg.distill.prompt_len, f"fewer than model.context={dims.context}"
        )
    room = dims.context - cfg.distill.prompt_len
    if sample_tokens(cfg) > room:
        raise ConfigError(
            "distill.sample_tokens", cfg.distill.sample_tokens, f"at most {room} (context − prompt)"
        )


def draws_on_policy(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` learns on-policy: u < λ with u drawn from rng(seed, step)."""
    return fraction > 0 and np.random.default_rng([seed, step, DRAW_STREAM]).random() < fraction


def sample_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The sampling generator of one micro-batch: a function of its coordinates only, so resume is exact."""
    entropy = np.random.default_rng([seed, step, rank, micro, SAMPLE_STREAM]).integers(2**63)
    return torch.Generator(device).manual_seed(int(entropy))


@torch.no_grad()
def continuations(
    model, prompts: Tensor, n_new: int, sampling: Sampling, generator: torch.Generator
) -> Tensor:
    """prompts (b, p) -> (b, p + n_new): the student's samples, through the KV cache when every token
    mixer keeps one; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    try:
        return generate(
            model,
            prompts,
            n_new,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            generator=generator,
            use_cache=supports_kv_cache(model),
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def scored_batch(
    tokens: Tensor, prompt_len: int, teacher_log_probs: Tensor, temperature: float
) -> tuple[MicroBatch, Tensor]:
    """The micro-batch of a sampled sequence and the teacher's log-prob of each sampled token.

    tokens (b, p + n), teacher_log_probs (b, t, v) of ``tokens[:, :-1]`` at τ = 1 ->
    MicroBatch(x, y, soft = teacher at τ with k = v, mask = the positions predicting sampled tokens), (b, n)
    """
    x, y = tokens[:, :-1], tokens[:, 1:]
    mask = torch.zeros_like(y, dtype=torch.bool)
    mask[:, prompt_len - 1 :] = True  # input position i predicts token i + 1: the first sample is p
    logp = teacher_log_probs.float()
    sampled_logp = logp.gather(-1, y[..., None]).squeeze(-1)[:, prompt_len - 1 :]  # b n
    tempered = logp if temperature == 1.0 else torch.log_softmax(logp / temperature, dim=-1)
    soft = SoftTargets.from_logprobs(tempered, logp.shape[-1])
    return MicroBatch(x, y, soft, mask), sampled_logp


class OnPolicyStep:
    """Wraps a trainer's optimizer step (``trainer.update``; the teacher is built in ``env``, the trainer's
    ``teacher_env``): on a drawn step (``draws_on_policy``) its micro-batches become
    the student's continuations of their prompts, scored by the teacher; logs the sampled fraction, the
    teacher's mean log-prob of the samples and the step's time split (sampling / teacher / update)."""

    def __init__(self, trainer, objective_cfg, env: TeacherEnv) -> None:
        cfg = trainer.cfg
        if any(not is_causal(m) for m in trainer.model.modules()):
            raise ConfigError(
                "distill.on_policy", cfg.distill.on_policy, "0 for a student that is not causal"
            )
        self.trainer, self.inner = trainer, trainer.update
        self.fraction, self.seed = float(cfg.distill.on_policy), int(cfg.seed)
        self.prompt_len, self.n_new = int(cfg.distill.prompt_len), sample_tokens(cfg)
        d = cfg.distill
        self.sampling = Sampling(float(d.sample_temperature), int(d.sample_top_k), float(d.sample_top_p))
        self.temperature = float(getattr(objective_cfg, "temperature", 1.0))
        teacher_cls, teacher_cfg = registry.configured("teacher", cfg.teacher)
        #: (tokens (b, t), the micro-batch's training windows (b, context), step, micro) -> (b, t, v)
        self.score: Callable[[Tensor, Tensor, int, int], Tensor]
        if wants_in_context(cfg.teacher):  # the student itself given privileged context (SDFT/OPSD)
            self.teacher = InContextTeacher(teacher_cfg, trainer)
            self.score = self.teacher.score
            self.inner.hooks = [*self.inner.hooks, self.teacher]  # the EMA update, after each optimizer step
            trainer.state.extras["teacher"] = self.teacher  # θ_T is saved with every checkpoint
        else:
            self.teacher = teacher_cls(teacher_cfg, env)
            self.teacher.prepare()
            self.score = lambda tokens, *_: self.teacher.log_probs(tokens)
        self._count_to, self._count = 0, 0  # on-policy steps among steps [0, _count_to)

    def fraction_so_far(self, step: int) -> float:
        """Share of on-policy steps among steps 0..step (recounted after a resume: draws are pure)."""
        if self._count_to != step:
            self._count = sum(draws_on_policy(self.seed, s, self.fraction) for s in range(step))
        self._count += draws_on_policy(self.seed, step, self.fraction)
        self._count_to = step + 1
        return self._count / (step + 1)

    def sampled(self, micro_batches: Iterable[MicroBatch], step: int) -> tuple[list[MicroBatch], dict]:
        """The step's on-policy micro-batches, from the prompts of the offline ones, and their timings."""
        t = self.trainer
        out, logps, seconds = [], [], {"sampling_s": 0.0, "teacher_s": 0.0}
        for micro, offline in enumerate(micro_batches):  # reading an offline micro-batch is not timed
            start = time.perf_counter()
            generator = sample_generator(self.seed, step, t.ranks.rank, micro, t.device)
            with t.autocast():
                tokens = continuations(
                    t.model, offline.x[:, : self.prompt_len], self.n_new, self.sampling, generator
                )
                inputs = tokens[:, :-1].cpu()  # teachers take CPU tokens; waits for the device's samples
            middle = time.perf_counter()
            teacher_logp = self.score(inputs, offline.x, step, micro).to(t.device)
            batch, logp = scored_batch(tokens, self.prompt_len, teacher_logp, self.temperature)
            seconds["teacher_s"] += time.perf_counter() - middle
            seconds["sampling_s"] += middle - start
            out.append(batch)
            logps.append(logp)
        return out, {**seconds, "teacher_logprob": float(torch.cat(logps).mean())}

    def __call__(self, micro_batches: Iterable[MicroBatch]) -> dict[str, float]:
        step = self.trainer.step
        on = draws_on_policy(self.seed, step, self.fraction)
        extra: dict[str, float] = {"sampling_s": 0.0, "teacher_s": 0.0}
        if on:
            micro_batches, extra = self.sampled(micro_batches, step)
        start = time.perf_counter()
        metrics = self.inner(micro_batches)  # an offline step reads its cached targets in here
        metrics.update(
            {
                "on_policy/sampled": float(on),
                "on_policy/fraction": self.fraction_so_far(step),
                "time/sampling_s": extra["sampling_s"],
                "time/teacher_s": extra["teacher_s"],
                "time/update_s": time.perf_counter() - start,
            }
        )
        if on:
            metrics["on_policy/teacher_logprob"] = extra["teacher_logprob"]
        return metrics
