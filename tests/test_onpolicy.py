"""On-policy distillation (archlab.onpolicy): the loss written out by hand, λ = 0 is the offline run
bitwise, sampling is reproducible and resumes exactly, and plugin students sample through their cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from archlab.config import compose, validate
from archlab.errors import ConfigError
from archlab.generate import supports_kv_cache
from archlab.onpolicy import OnPolicyStep, draws_on_policy
from archlab.step import OptimizerStep
from archlab.trainer import teacher_env

PROMPT = 8
NGRAM = ["teacher=ngram", "teacher.order=3", f"distill.prompt_len={PROMPT}"]


def hand_divergence(
    teacher_logp: torch.Tensor, logits: torch.Tensor, kind: str, beta: float, tau: float
) -> float:
    """τ²·mean over rows of D(p ‖ q), p = softmax(teacher / τ), q = softmax(student / τ), in float64 sums."""
    total, rows = 0.0, 0
    for lp_row, z_row in zip(teacher_logp.double(), logits.double(), strict=True):
        p = torch.softmax(lp_row / tau, -1)
        q = torch.softmax(z_row / tau, -1)
        if kind == "forward_kl":
            d = (p * (p.log() - q.log())).sum()
        elif kind == "reverse_kl":
            d = (q * (q.log() - p.log())).sum()
        else:
            m = beta * p + (1 - beta) * q
            d = beta * (p * (p.log() - m.log())).sum() + (1 - beta) * (q * (q.log() - m.log())).sum()
        total, rows = total + float(d), rows + 1
    return tau**2 * total / rows


@pytest.mark.parametrize(
    ("objective", "beta", "tau"), [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 2.0), ("jsd", 0.3, 1.0)]
)
def test_the_step_loss_is_the_divergence_over_the_sampled_positions(
    tmp_path, make_trainer, objective, beta, tau
):
    trainer = make_trainer(
        tmp_path,
        *NGRAM,
        f"objective={objective}",
        f"objective.beta={beta}",
        f"objective.temperature={tau}",
        "distill.on_policy=1",
    )
    assert isinstance(trainer.update, OnPolicyStep)
    offline = list(trainer.micro_batches())
    batches, _ = trainer.update.sampled(iter(offline), step=0)  # the draws are pure: the step samples these
    (batch,) = batches
    tokens = torch.cat([batch.x, batch.y[:, -1:]], dim=1)
    assert torch.equal(tokens[:, :PROMPT], offline[0].x[:, :PROMPT])  # prompts: the windows' prefixes
    assert tokens.shape[1] == trainer.model.dims.context  # prompt + samples fill the context
    with torch.no_grad():
        logits = trainer.model(tokens[:, :-1])
    teacher_logp = trainer.update.teacher.log_probs(tokens[:, :-1])
    # input position i predicts token i + 1: the sampled tokens PROMPT.. are predicted from PROMPT − 1..
    sampled = slice(PROMPT - 1, None)
    expected = hand_divergence(
        teacher_logp[:, sampled].flatten(0, 1), logits[:, sampled].flatten(0, 1), objective, beta, tau
    )
    metrics = trainer.train_step()
    assert metrics["train/on_policy/sampled"] == 1.0
    assert metrics["train/loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    own = teacher_logp[:, sampled].gather(-1, tokens[:, PROMPT:, None]).mean()
    assert metrics["train/on_policy/teacher_logprob"] == pytest.approx(float(own), rel=1e-5)
    assert min(metrics[f"train/time/{k}_s"] for k in ("sampling", "teacher", "update")) > 0


def test_lambda_zero_is_the_offline_run_bitwise(tmp_path, make_trainer):
    plain = make_trainer(tmp_path / "plain", *NGRAM)
    assert type(plain.update) is OptimizerStep  # λ = 0 builds nothing
    wrapped = make_trainer(tmp_path / "wrapped", *NGRAM)
    env = teacher_env(wrapped.cfg, wrapped.split, wrapped.device, False)
    wrapped.update = OnPolicyStep(wrapped, wrapped.objective, env)  # the wrapper itself, never drawing
    for _ in range(4):
        a, b = plain.train_step(), wrapped.train_step()
        assert a["train/loss"] == b["train/loss"] and b["train/on_policy/sampled"] == 0.0
    for (name, pa), pb in zip(
        plain.model.state_dict().items(), wrapped.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name


def records(run_dir: Path) -> dict[int, tuple[float, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {
        r["step"]: (r["train/loss"], r["train/on_policy/sampled"])
        for r in map(json.loads, lines)
        if "train/loss" in r
    }


def test_sampling_is_reproducible_and_resumes_exactly(tmp_path, make_trainer):
    steps = [
        *NGRAM,
        "distill.on_policy=0.5",
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "trainer.eval_every=100",
    ]
    assert {draws_on_policy(0, s, 0.5) for s in range(6)} == {True, False}  # both kinds of step below
    make_trainer(tmp_path / "whole", *steps, "trainer.ckpt_every=100").run()
    first = make_trainer(tmp_path / "split", *steps, "trainer.ckpt_every=3")
    original = first.train_step

    def interrupted():
        if first.step == 4:
            raise KeyboardInterrupt
        return original()

    first.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.run()
    make_trainer(tmp_path / "split", *steps, "trainer.ckpt_every=3", "trainer.resume=auto").run()
    assert records(tmp_path / "split") == records(tmp_path / "whole")  # exact, sampled steps included

    again, other = (make_trainer(tmp_path / name, *steps) for name in ("again", "other"))
    offline = list(again.micro_batches())
    ours = again.update.sampled(iter(offline), step=2)[0][0].x
    assert torch.equal(
        ours, make_trainer(tmp_path / "same", *steps).update.sampled(iter(offline), step=2)[0][0].x
    )
    assert not torch.equal(ours, other.update.sampled(iter(offline), step=3)[0][0].x)


@pytest.mark.parametrize("student", ["ffn=moe", "attention=mla", "residual=attnres"])
def test_plugin_students_learn_on_their_own_samples(tmp_path, make_trainer, student):
    trainer = make_trainer(tmp_path, *NGRAM, student, "distill.on_policy=1")
    assert supports_kv_cache(trainer.model)
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["train/on_policy/sampled"] == 1.0 and math.isfinite(metrics["train/loss"])
        assert metrics["train/on_policy/teacher_logprob"] < 0


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("distill.on_policy=1.5", "distill.on_policy"),
        ("distill.sample_top_p=0", "distill.sample_top_p"),
        ("distill.prompt_len=32", "distill.prompt_len"),
        ("distill.sample_tokens=30", "distill.sample_tokens"),
    ],
)
def test_bad_on_policy_settings_are_config_errors(tiny_overrides, override, key):
    cfg = compose([*tiny_overrides, *NGRAM, "objective=kd", "distill.on_policy=0.5", override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.key == key


def test_on_policy_needs_a_teacher(tiny_overrides):
    with pytest.raises(ConfigError, match="distill.on_policy"):
        validate(compose([*tiny_overrides, "distill.on_policy=0.5"]))  # teacher=none objective=ce


def test_the_ngram_teacher_scores_contexts_it_never_saw(tmp_path, make_trainer):
    teacher = make_trainer(tmp_path, *NGRAM, "distill.on_policy=1").update.teacher
    unseen = torch.tensor([[255, 254, 1, 2, 253, 252, 3, 251]])  # byte strings absent from the stdlib
    logp = teacher.log_probs(unseen)
    assert torch.isfinite(
        logp
    ).all()  # backed off to shorter contexts, down to 1/256: reverse KL stays finite
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(1, 8))


def test_the_trained_teacher_s_identity_leaves_the_on_policy_fields_out(tmp_path):
    """They cannot change a teacher trained with ce; keeping them out keeps cached teachers' hashes."""
    from archlab.teacher import TeacherEnv
    from archlab.teachers.trained import TrainedTeacher

    split = type("Split", (), {"meta": {"path": "/corpus/abc"}})()
    env = TeacherEnv(split=split, vocab_size=256, context=64, cache_dir=tmp_path, device=torch.device("cpu"))
    described = TrainedTeacher(TrainedTeacher.Config(), env).identity()["config"]
    assert "top_k" in described["distill"] and "on_policy" not in described["distill"]
