"""In-context self-distillation (archlab.incontext): with no context the teacher is ``teacher=self``; its
log-probs are a plain forward on context + tokens with the context's positions cut off by hand; the EMA
follows its formula; resume is bitwise; plugin students train with it; bad settings are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from archlab import registry
from archlab.config import compose, validate
from archlab.errors import ConfigError
from archlab.incontext import InContextTeacher
from archlab.trainer import teacher_env

PROMPT, NEW, CONTEXT = 8, 8, 8  # tokens of prompt, samples and privileged context: 8 + 8 + 8 − 1 ≤ 32
IN_CONTEXT = [
    "teacher=self",
    "distill.on_policy=1",
    f"distill.prompt_len={PROMPT}",
    f"distill.sample_tokens={NEW}",
    "objective=reverse_kl",
    f"teacher.context_len={CONTEXT}",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_trainer) -> Path:
    """A tiny run trained for 3 steps: the checkpoint both teachers load."""
    path = tmp_path_factory.mktemp("teacher-run")
    make_trainer(path, "trainer.max_steps=3", "trainer.eval_every=100").run()
    return path


def sampled_tokens(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-0 samples (prompt + continuation, (b, p + n)) and the training windows they came from."""
    offline = list(trainer.micro_batches())
    (batch,), _ = trainer.update.sampled(iter(offline), step=0)
    return torch.cat([batch.x, batch.y[:, -1:]], dim=1).cpu(), offline[0].x


def plain_log_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(tokens).float(), dim=-1)


@pytest.mark.parametrize(
    "start", [("teacher.update=ema", "teacher.checkpoint={run}"), ("trainer.init_from={run}",)]
)
def test_with_no_context_the_in_context_teacher_is_teacher_self(
    tmp_path, make_trainer, tiny_overrides, run, start
):
    trainer = make_trainer(tmp_path / "ic", *IN_CONTEXT, *(s.format(run=run) for s in start))
    assert isinstance(trainer.update.teacher, InContextTeacher) and trainer.targets is None
    plain_cfg = compose([*tiny_overrides, "teacher=self", f"teacher.checkpoint={run}"])
    cls, cfg = registry.configured("teacher", plain_cfg.teacher)
    plain = cls(cfg, teacher_env(plain_cfg, trainer.split, trainer.device, False))
    plain.prepare()
    tokens, windows = sampled_tokens(trainer)
    inputs = tokens[:, :-1]
    torch.testing.assert_close(trainer.update.score(inputs, windows, 0, 0), plain.log_probs(inputs))


def test_the_teacher_reads_the_context_and_drops_its_positions(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, *IN_CONTEXT, "teacher.context=same_doc")
    tokens, windows = sampled_tokens(trainer)
    inputs = tokens[:, :-1]
    demo = windows[:, PROMPT : PROMPT + CONTEXT].cpu()  # by hand: the window's tokens after the prompt
    by_hand = plain_log_probs(trainer.model, torch.cat([demo, inputs], dim=1))[:, CONTEXT:]
    scored = trainer.update.score(inputs, windows, 0, 0)
    assert scored.shape == (*inputs.shape, 256)
    torch.testing.assert_close(scored, by_hand)  # θ_T = θ_S at step 0
    assert not torch.allclose(scored, plain_log_probs(trainer.model, inputs), atol=1e-3)  # the context counts
    # and the step's samples are scored so: the logged mean log-prob of the sampled tokens is this one's
    _, info = trainer.update.sampled(iter(list(trainer.micro_batches())), step=0)
    own = by_hand[:, PROMPT - 1 :].gather(-1, tokens[:, PROMPT:, None]).mean()
    assert info["teacher_logprob"] == pytest.approx(float(own), rel=1e-5)


def test_corpus_context_is_a_chunk_of_the_second_corpus(tmp_path, make_trainer):
    texts = [f"record {i}: the quick brown fox {i * 7919 % 1000} jumps.\n".encode() * 3 for i in range(300)]
    for i, text in enumerate(texts):
        (tmp_path / "new" / f"doc{i:03d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "new" / f"doc{i:03d}.txt").write_bytes(text)
    trainer = make_trainer(
        tmp_path / "run", *IN_CONTEXT, "teacher.context=corpus", f"teacher.context_paths=[{tmp_path}/new]"
    )
    teacher = trainer.update.teacher
    windows = next(trainer.micro_batches()).x
    chunks = teacher.context(windows, step=0, micro=0)
    assert chunks.shape == (windows.shape[0], CONTEXT)
    for row in chunks:  # each piece between end-of-document bytes is text of one document of the corpus
        assert all(any(piece in text for text in texts) for piece in bytes(row.tolist()).split(b"\0"))
    assert torch.equal(chunks, teacher.context(windows, step=0, micro=0))  # a function of (seed, step, ...)
    assert not torch.equal(chunks, teacher.context(windows, step=1, micro=0))


def test_a_corpus_that_matches_nothing_is_refused(tmp_path, make_trainer):
    with pytest.raises(ConfigError) as err:
        make_trainer(
            tmp_path, *IN_CONTEXT, "teacher.context=corpus", f"teacher.context_paths=[{tmp_path}/no]"
        )
    assert err.value.key == "teacher.context_paths"


@pytest.mark.parametrize("update", ["ema", "frozen"])
def test_the_teacher_weights_follow_their_formula(tmp_path, make_trainer, update):
    d = 0.7
    trainer = make_trainer(tmp_path, *IN_CONTEXT, f"teacher.update={update}", f"teacher.ema_decay={d}")
    teacher = trainer.update.teacher
    expected = {n: v.double().clone() for n, v in trainer.model.state_dict().items()}
    for _ in range(3):
        trainer.train_step()
        if update == "ema":  # θ_T ← d·θ_T + (1 − d)·θ_S after each optimizer step
            for name, student in trainer.model.state_dict().items():
                expected[name] = d * expected[name] + (1 - d) * student.double()
    for name, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7)
    moved = [
        n for n, v in trainer.model.state_dict().items() if not torch.equal(v, teacher.model.state_dict()[n])
    ]
    assert moved  # the teacher lags the student (ema) or stays at step 0 (frozen)


def records(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


@pytest.mark.slow
def test_an_interrupted_run_resumes_bitwise(tmp_path, make_trainer):
    steps = [
        *IN_CONTEXT,
        "teacher.update=ema",
        "teacher.ema_decay=0.5",
        "teacher.context=same_doc",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.eval_every=100",
    ]
    whole = make_trainer(tmp_path / "whole", *steps, "trainer.ckpt_every=100")
    whole.run()
    first = make_trainer(tmp_path / "split", *steps, "trainer.ckpt_every=2")
    original = first.train_step

    def interrupted():
        if first.step == 3:  # killed after the checkpoint of step 2
            raise KeyboardInterrupt
        return original()

    first.train_step = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = make_trainer(tmp_path / "split", *steps, "trainer.ckpt_every=2", "trainer.resume=auto")
    resumed.run()
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    for part in (lambda t: t.model, lambda t: t.update.teacher.model):  # the student and θ_T
        a, b = (part(t).state_dict() for t in (whole, resumed))
        assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("student", ["ffn=moe", "attention=mla", "residual=attnres"])
def test_plugin_students_learn_from_their_in_context_selves(tmp_path, make_trainer, student):
    trainer = make_trainer(
        tmp_path,
        *IN_CONTEXT,
        student,
        "teacher.update=ema",
        "teacher.ema_decay=0.5",
        "teacher.context=same_doc",
    )
    metrics = trainer.train_step()
    assert math.isfinite(metrics["train/loss"]) and metrics["train/on_policy/teacher_logprob"] < 0
    tokens, windows = sampled_tokens(trainer)
    inputs, demo = tokens[:, :-1], windows[:, PROMPT : PROMPT + CONTEXT].cpu()
    teacher = trainer.update.teacher.model
    by_hand = plain_log_probs(teacher, torch.cat([demo, inputs], dim=1))[:, CONTEXT:]
    torch.testing.assert_close(trainer.update.score(inputs, windows, 0, 0), by_hand)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["teacher.update=bogus"], "teacher.update"),
        (["teacher.ema_decay=1.0"], "teacher.ema_decay"),
        (["teacher.context=bogus"], "teacher.context"),
        (["teacher.context=same_doc", "teacher.context_len=0"], "teacher.context_len"),
        (
            ["teacher.context=same_doc", "teacher.context_len=18"],
            "teacher.context_len",
        ),  # 18 + 8 + 8 − 1 > 32
        (["teacher.context=corpus"], "teacher.context_paths"),
        (["distill.on_policy=0"], "teacher.checkpoint"),
        (["distill.on_policy=0.5", "teacher.checkpoint=/run", "teacher.update=ema"], "teacher.update"),
        (["distill.on_policy=0.5", "teacher.checkpoint=/run", "teacher.context=same_doc"], "teacher.context"),
        (["trainer.parallel=ddp"], "trainer.parallel"),
    ],
)
def test_bad_in_context_settings_are_config_errors(tiny_overrides, overrides, key):
    with pytest.raises(ConfigError) as err:
        validate(compose([*tiny_overrides, *IN_CONTEXT, *overrides]))
    assert err.value.key == key


def test_a_fitting_context_and_the_plain_self_teacher_pass(tiny_overrides):
    validate(compose([*tiny_overrides, *IN_CONTEXT, "teacher.context=same_doc", "teacher.context_len=17"]))
    validate(compose([*tiny_overrides, "teacher=self", "teacher.checkpoint=/run", "objective=kd"]))  # offline


@pytest.mark.slow
def test_the_cli_trains_with_the_in_context_teacher(run_cli, tmp_path):
    common = [
        "train",
        *IN_CONTEXT,
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.context=32",
        "trainer.batch_size=4",
        "trainer.max_steps=3",
        "trainer.eval_tokens=2048",
        "trainer.progress=false",
        "data.max_bytes=400000",
        "logger=none",
        "teacher.update=ema",
        "teacher.context=same_doc",
    ]
    done = run_cli(*common, f"hydra.run.dir={tmp_path / 'ok'}", timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["train/steps"] == 3 and summary["train/on_policy/sampled"] == 1.0
    assert math.isfinite(summary["val/bpb"]) and summary["train/on_policy/teacher_logprob"] < 0
    refused = run_cli(*common, "teacher.context_len=30", f"hydra.run.dir={tmp_path / 'no'}")
    assert (
        refused.returncode == 2 and "archlab: error: teacher.context_len=30 is not allowed" in refused.stderr
    )
    assert "Traceback" not in refused.stderr and not (tmp_path / "no" / "metrics.jsonl").exists()
    built = run_cli("teacher", "build", *IN_CONTEXT, "teacher.context=same_doc")  # it caches no targets
    assert built.returncode == 2 and "archlab: error: teacher='self' is not allowed" in built.stderr
