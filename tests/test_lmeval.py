"""The lm-eval model ``archlab`` against plain computations on the student's forward, and ``archlab eval``
end to end on the shipped tasks (dense and attention-residual students), with its errors."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from omegaconf import OmegaConf

from archlab import checkpoint, downstream, study
from archlab.config import TrainerConfig, compose
from archlab.data import TokenSplit
from archlab.errors import ConfigError
from archlab.eval_tasks import TASKS_DIR, jsonl_dataset
from archlab.evaluation import Evaluation
from archlab.generate import generate
from archlab.lmeval import ArchlabLM, scoring_windows
from archlab.model import build_student
from archlab.report import calibration
from archlab.tokenizer import ByteTokenizer
from tests.conftest import TINY_RUN

C = 32  # the students' context
SHAPE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", f"model.context={C}"]
TASKS = "archlab_stdlib_choice,archlab_stdlib_perplexity"


def save_student(run: Path, seed: int = 0, *overrides: str, scale: float = 8):
    """A run dir ``run`` holding one checkpoint of a random student (``SHAPE`` and ``overrides``; weights
    scaled up by ``scale``, so that greedy text varies); returns that student."""
    cfg = compose([*SHAPE, *overrides])
    torch.manual_seed(seed)
    model = build_student(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    state = {"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)}
    checkpoint.save(run / "checkpoints", 1, model, state)
    return model.eval().requires_grad_(False)


@pytest.fixture
def saved(tmp_path: Path):
    """A run dir of a random student (``save_student``) and that student."""
    return tmp_path, save_student(tmp_path)


def instance(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def plain_loglikelihood(model, context: bytes, continuation: bytes) -> tuple[float, bool]:
    """Σ log softmax(f(x_<i))[x_i] over the continuation's bytes, and whether each is the argmax."""
    tokens = list(context or b"\x00") + list(continuation)  # an empty context: the end-of-document byte
    logp = torch.log_softmax(model(torch.tensor([tokens[:-1]]))[0].double(), -1)
    first = len(tokens) - len(continuation)
    total = sum(float(logp[i - 1, tokens[i]]) for i in range(first, len(tokens)))
    greedy = all(int(logp[i - 1].argmax()) == tokens[i] for i in range(first, len(tokens)))
    return total, greedy


def test_loglikelihood_is_the_sum_of_log_softmax_of_the_forward(saved) -> None:
    run, model = saved
    lm = ArchlabLM(run=str(run), device="cpu", batch_size=3)  # 5 requests: batches padded to their longest
    own = bytes(generate(model, torch.tensor([list(b"def f(x):")]), 6)[0, 9:].tolist())
    asked = [
        (b"def f(x):", b"\n    return x"),
        (b"", b"import os"),
        (b"a", b"b"),
        (b"def f(x):", own),  # the student's own greedy continuation: is_greedy
        (b"x" * 40, b" = 1"),  # longer than the context: left-truncated to its last C + 1 tokens
    ]
    requests = [instance("loglikelihood", c.decode("latin-1"), x.decode("latin-1")) for c, x in asked]
    lm.tok.encode = lambda text: list(text.encode("latin-1"))  # every byte value as one character
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (total, greedy) in zip(asked, got, strict=True):
        want_total, want_greedy = plain_loglikelihood(
            model, context[-(C + 1 - len(continuation)) :], continuation
        )
        assert total == pytest.approx(want_total, rel=1e-5, abs=1e-4), (context, continuation)
        assert greedy == want_greedy, (context, continuation)
    assert got[3][1] and not got[0][1]


def test_rolling_loglikelihood_is_the_disjoint_window_sum(saved) -> None:
    run, model = saved
    lm = ArchlabLM(run=str(run), device="cpu", batch_size=2)
    text = bytes(range(33, 33 + 83))  # 83 bytes: windows predicting 32, 32 and the last 19
    t = list(text)

    def scored(inputs: list[int], targets: list[int]) -> float:
        logp = torch.log_softmax(model(torch.tensor([inputs]))[0].double(), -1)[-len(targets) :]
        return sum(float(logp[j, y]) for j, y in enumerate(targets))

    by_hand = scored([0, *t[0:31]], t[0:32]) + scored(t[31:63], t[32:64]) + scored(t[50:82], t[64:83])
    short = b"print(1)"
    got = lm.loglikelihood_rolling(
        [instance("loglikelihood_rolling", text.decode()), instance("loglikelihood_rolling", short.decode())],
        disable_tqdm=True,
    )
    assert got[0] == pytest.approx(by_hand, rel=1e-5)
    assert got[1] == pytest.approx(plain_loglikelihood(model, b"", short)[0], rel=1e-5)


@pytest.mark.parametrize("n", [1, 5, C - 1, C, C + 1, 3 * C, 3 * C + 7])
def test_scoring_windows_are_lm_evals_rolling_windows_made_disjoint(n: int) -> None:
    tokens = list(range(1, n + 1))
    disjoint = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, C, 1)]
    harness = [((context + targets)[:-1], targets) for context, targets in disjoint]  # (inputs, targets)
    windows = scoring_windows([0], tokens, C)
    assert windows == harness
    assert [y for _, ys in windows for y in ys] == tokens  # every token predicted exactly once
    assert all(len(x) <= C and x[len(x) - len(ys) + 1 :] == ys[:-1] for x, ys in windows)


def test_generate_until_stops_at_the_until_string(saved) -> None:
    run, model = saved
    lm = ArchlabLM(run=str(run), device="cpu", batch_size=4)
    prompt = list(b"def f(x):")
    greedy = generate(model, torch.tensor([prompt]), 20)[0, len(prompt) :].tolist()
    k = next(i for i, b in enumerate(greedy) if i >= 3 and 33 <= b < 127 and b not in [0, *greedy[:i]])
    stop = chr(greedy[k])
    forwards = []
    lm.model.register_forward_hook(lambda *_: forwards.append(1))
    request = instance("generate_until", "def f(x):", {"until": [stop], "max_gen_toks": 20})
    (text,) = lm.generate_until([request], disable_tqdm=True)
    assert text == ByteTokenizer().decode(greedy[:k])
    assert len(forwards) == k + 1  # stopped at the token that completed the stop string, not at 20
    assert 0 in greedy  # the end-of-document byte stops it too
    request = instance("generate_until", "def f(x):", {"until": ["never"], "max_gen_toks": 20})
    assert lm.generate_until([request], disable_tqdm=True) == [
        ByteTokenizer().decode(greedy[: greedy.index(0)])
    ]


def test_the_shipped_tasks_data_loads_and_is_what_the_yaml_names() -> None:
    choice = jsonl_dataset("stdlib_choice.jsonl")["test"]
    assert len(choice) == 80 and all(
        len(c) == 4 and 0 <= g < 4 for c, g in zip(choice["choices"], choice["label"], strict=True)
    )
    text = jsonl_dataset("stdlib_heldout.jsonl")["test"]["text"]
    assert len(text) == 16 and all(t and "\x00" not in t for t in text)
    assert {p.name for p in TASKS_DIR.glob("*.yaml")} == {"stdlib_choice.yaml", "stdlib_perplexity.yaml"}


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(saved, run_cli, tmp_path: Path) -> None:
    run, _ = saved
    missing = run_cli("eval", str(tmp_path / "nothing"), "--tasks", TASKS)
    assert missing.returncode == 2 and "RUN=" in missing.stderr, missing.stderr
    typo = run_cli("eval", str(run), "--tasks", "archlab_stdlib_choise")
    assert typo.returncode == 2, typo.stderr
    assert "--tasks='archlab_stdlib_choise'" in typo.stderr and "'archlab_stdlib_choice'" in typo.stderr
    limit = run_cli("eval", str(run), "--tasks", TASKS, "--limit", "0")
    assert limit.returncode == 2 and "--limit=0" in limit.stderr
    blocker = tmp_path / "site-no-lm-eval" / "lm_eval"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    absent = run_cli("eval", str(run), "--tasks", TASKS, pythonpath=[blocker.parent])
    assert absent.returncode == 2 and "archlab[eval]" in absent.stderr, absent.stderr
    assert len(absent.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, cli_runner, archlab_cache: Path):
    """``trained(name, *overrides)``: the run dir of a tiny student trained for 20 steps (once each)."""
    runs: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("lmeval-runs")

    def train(name: str, *overrides: str) -> Path:
        if name not in runs:
            args = [*TINY_RUN, f"data.cache_dir={archlab_cache}", "trainer.max_steps=20", *overrides]
            done = cli_runner("train", *args, f"hydra.run.dir={root / name}", cwd=root, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            runs[name] = root / name
        return runs[name]

    return train


@pytest.mark.slow
@pytest.mark.parametrize("name, student", [("dense", []), ("attnres", ["residual=attnres"])])
def test_archlab_eval_runs_both_shipped_tasks(
    trained, run_cli, name: str, student: list[str], tmp_path
) -> None:
    run = trained(name, *student)
    out = tmp_path / "scores.json"
    done = run_cli("eval", str(run), "--tasks", TASKS, "--limit", "8", "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "archlab_stdlib_choice" in done.stdout and "bits_per_byte" in done.stdout
    scores = json.loads(out.read_text())["scores"]
    assert 0 <= scores["archlab_stdlib_choice"]["acc"] <= 1
    bpb = scores["archlab_stdlib_perplexity"]["bits_per_byte"]
    assert 0 < bpb < 8.5 and math.isfinite(bpb)  # a byte model that learnt a little: under log2(256) + slack
    assert not list(tmp_path.glob(".scores.json.tmp-*"))


@pytest.mark.slow
def test_rolling_bits_per_byte_equals_archlabs_val_bpb_on_the_same_text(trained, tmp_path: Path) -> None:
    """One document of 8·C bytes: lm-eval's rolling windows ([EOT] + text[:C-1] → text[:C], then
    text[kC-1 : (k+1)C-1] → text[kC : (k+1)C]) are archlab's validation windows of NUL + text, and both
    divide by the same bytes, so the two bpb differ only by float32 summation order (~1e-7 relative):
    1e-5 relative tolerance."""
    run = trained("dense")
    texts = jsonl_dataset("stdlib_heldout.jsonl")["test"]["text"]
    text = "".join(texts)[: 8 * C]
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "one.yaml").write_text(
        f"include: {TASKS_DIR / 'stdlib_perplexity.yaml'}\ntask: one_text\n"
        f"dataset_kwargs:\n  file: {tmp_path / 'one.jsonl'}\n"
    )
    results = downstream.evaluate(run, ["one_text"], device="cpu", batch_size=3, include=[tmp_path])
    harness = downstream.scores(results)["one_text"]["bits_per_byte"]

    ckpt = checkpoint.find(run)
    model = checkpoint.load_student(ckpt, torch.device("cpu"))
    val = np.frombuffer(b"\x00" + text.encode(), dtype=np.uint8)
    split = TokenSplit(train=val, val=val, meta={})
    t = TrainerConfig(batch_size=4, eval_tokens=8 * C)
    own = Evaluation(model, split, t, None, torch.device("cpu"), contextlib.nullcontext)()["val/bpb"]
    assert harness == pytest.approx(own, rel=1e-5)


@pytest.mark.parametrize(
    ("args", "key"),
    [(["--eval", "archlab_stdlib_choise"], "--tasks"), (["--eval-limit", "3"], "--eval-limit")],
)
def test_study_refuses_bad_eval_tasks_before_any_work(args: list[str], key: str, tmp_path: Path) -> None:
    out = tmp_path / "study"
    with pytest.raises(ConfigError, match=key):
        study.main(["--quick", "--out", str(out), *args])
    assert not out.exists()


def test_mean_scores_average_each_metric_over_the_runs_that_have_it() -> None:
    runs = [{"a": {"acc": 0.25, "acc_norm": 0.5}}, {"a": {"acc": 0.75}, "b": {"bits_per_byte": 3.0}}]
    assert study.mean_scores(runs) == {"a": {"acc": 0.5, "acc_norm": 0.5}, "b": {"bits_per_byte": 3.0}}


@pytest.mark.slow
def test_study_eval_adds_each_arms_downstream_scores_to_its_row(tmp_path: Path) -> None:
    runs = {name: tmp_path / name for name in ("baseline_s0", "baseline_s1", "mqa_s0")}
    for seed, run in enumerate(runs.values()):
        save_student(run, seed)
    job = study.Study(
        tmp_path / "study", study.Preset.load("quick"), [], "tokens", 1, evals=(["archlab_stdlib_choice"], 4)
    )
    result = {"students": [{"name": "baseline"}, {"name": "mqa"}]}
    job.downstream(list(runs.items()), result)
    acc = {
        name: json.loads((run / "eval.json").read_text())["scores"]["archlab_stdlib_choice"]["acc"]
        for name, run in runs.items()
    }
    assert all(a in (0, 0.25, 0.5, 0.75, 1) for a in acc.values())  # 4 items each
    baseline, mqa = result["students"]
    assert (
        baseline["downstream"]["archlab_stdlib_choice"]["acc"]
        == (acc["baseline_s0"] + acc["baseline_s1"]) / 2
    )
    assert mqa["downstream"]["archlab_stdlib_choice"]["acc"] == acc["mqa_s0"]
    assert "  mqa downstream: archlab_stdlib_choice acc" in study.downstream_line(mqa)
    accs = [row[-2] for row in _rows(result)]  # the report's verdict table: acc, then acc_norm
    assert accs == [f"{baseline['downstream']['archlab_stdlib_choice']['acc']:.4g}", f"{acc['mqa_s0']:.4g}"]


def _rows(result: dict) -> list[list[str]]:
    """The report's verdict rows of ``result`` given the fields the table reads besides downstream."""
    filled = {"role": "student", "seeds": [0], "bpb_mean": 1.0, "delta_bpb": 0.0, "delta_bpb_lo": 0.0,
              "delta_bpb_hi": 0.0, "density": 1.0, "density_lo": 1.0, "density_hi": 1.0,
              "density_per_active": 1.0, "verdict": "x"}  # fmt: skip
    header, rows = calibration.rows({"students": [{**filled, **r} for r in result["students"]]})
    assert header[-2:] == ["archlab_stdlib_choice acc", "archlab_stdlib_choice acc_norm"]
    return rows
