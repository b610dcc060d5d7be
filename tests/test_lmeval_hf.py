"""``archlab eval --model hf``: lm-eval's stock ``HFLM`` on the exported student answers every request as the
archlab model does (the same tokens, prefix and truncation; greedy text too), so both give the shipped
tasks' scores (dense and MLA + MoE students); a student no stock class holds is refused before lm-eval
runs."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
import torch

from archlab import cli
from archlab.downstream import hf_lm
from archlab.errors import ArchlabError
from archlab.export import write_hf
from archlab.generate import generate
from archlab.lmeval import ArchlabLM
from tests import test_lmeval
from tests.test_lmeval import TASKS, instance, save_student

pytest.importorskip("transformers")

trained = test_lmeval.trained  # the fixture of tiny trained runs, here with a context the choices fit

WIDE = "model.context=128"  # HFLM refuses a continuation longer than the context: the longest choice is 79
MLA_MOE = [
    "attention=mla",
    "attention.kv_lora_rank=16",
    "attention.qk_nope_head_dim=8",
    "attention.v_head_dim=12",
    "ffn=moe",
    "ffn.router=aux_free",
    "ffn.n_experts=6",
    "ffn.top_k=2",
]


def test_hflm_on_the_export_scores_every_request_as_the_archlab_model(tmp_path: Path) -> None:
    model = save_student(tmp_path / "run", scale=2)  # logits of a few units: the export's check holds
    ours = ArchlabLM(run=str(tmp_path / "run"), device="cpu", batch_size=3)
    stock = hf_lm(Path(write_hf(ours.checkpoint, tmp_path / "hf")["dir"]), device="cpu", batch_size=3)
    own = ours.tok_decode(generate(model, torch.tensor([list(b"def f(x):")]), 6)[0, 9:].tolist())
    asked = [
        ("def f(x):", "\n    return x"),
        ("", "import os"),  # the prefix token stands for the empty context
        ("x" * 40, " = 1"),  # longer than the context: left-truncated
        ("café = 'Ā\x00'", " # é"),  # U+0100 is the NUL byte's symbol in the export's vocabulary
        ("def f(x):", own),  # greedy
    ]
    requests = [instance("loglikelihood", c, x) for c, x in asked]
    documents = [
        instance("loglikelihood_rolling", t) for t in ("print(1)", "".join(map(chr, range(33, 120))))
    ]
    assert stock.eot_token_id == ours.eot_token_id and stock.max_length == ours.max_length
    assert [stock.tok_encode(c + x) for c, x in asked] == [ours.tok_encode(c + x) for c, x in asked]
    got, want = (
        stock.loglikelihood(requests, disable_tqdm=True),
        ours.loglikelihood(requests, disable_tqdm=True),
    )
    assert [g for _, g in got] == [g for _, g in want] and want[-1][1]
    assert [t for t, _ in got] == pytest.approx([t for t, _ in want], rel=1e-5)
    rolled = stock.loglikelihood_rolling(documents, disable_tqdm=True)
    assert rolled == pytest.approx(ours.loglikelihood_rolling(documents, disable_tqdm=True), rel=1e-5)
    until = {"until": ["\n"], "max_gen_toks": 8}  # an empty prompt: HFLM puts no prefix token before it
    prompts = [instance("generate_until", c, until) for c, _ in asked if c]
    assert stock.generate_until(prompts, disable_tqdm=True) == ours.generate_until(prompts, disable_tqdm=True)


def test_an_answer_longer_than_the_context_is_refused_by_name_not_by_an_assert(tmp_path: Path) -> None:
    save_student(tmp_path / "run", scale=2)
    ours = ArchlabLM(run=str(tmp_path / "run"), device="cpu", batch_size=3)
    stock = hf_lm(Path(write_hf(ours.checkpoint, tmp_path / "hf")["dir"]), device="cpu", batch_size=3)
    long = [instance("loglikelihood", "x=", "1" * (ours.max_length + 1))]
    assert len(ours.loglikelihood(long, disable_tqdm=True)) == 1  # archlab scores it in chunks
    with pytest.raises(ArchlabError, match=rf"answer of {ours.max_length + 1} tokens .* use --model archlab"):
        stock.loglikelihood(long, disable_tqdm=True)


def _scores(run_cli, source: Path, model: str, out: Path) -> dict:
    args = ["eval", str(source), "--tasks", TASKS, "--limit", "16", "--model", model, "--device", "cpu"]
    done = run_cli(*args, "--out", str(out), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    ran = record["lm_eval"]["config"]  # what the model that ran told lm-eval (its get_model_info)
    assert record["model"] == model
    assert (ran.get("model_dtype") == "torch.float32") if model == "hf" else ("archlab_step" in ran)
    return record["scores"]


def _agree(hf: dict, ours: dict) -> None:
    """acc and acc_norm exactly, the perplexities to 1e-4 relative (float32 against float32)."""
    assert hf["archlab_stdlib_choice"] == ours["archlab_stdlib_choice"]
    assert hf["archlab_stdlib_perplexity"] == pytest.approx(ours["archlab_stdlib_perplexity"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name, student", [("dense-wide", []), ("mla-moe-wide", MLA_MOE)])
def test_the_shipped_tasks_score_the_same_through_hf_and_archlab(
    trained, run_cli, tmp_path: Path, name: str, student: list[str]
) -> None:
    run = trained(name, WIDE, *student)
    ours = _scores(run_cli, run, "archlab", tmp_path / "archlab.json")
    _agree(_scores(run_cli, run, "hf", tmp_path / "hf.json"), ours)
    if not student:  # an export made beforehand: `archlab eval DIR --model hf`
        assert run_cli("export", str(run), "--hf", str(tmp_path / "export")).returncode == 0
        _agree(_scores(run_cli, tmp_path / "export", "hf", tmp_path / "export.json"), ours)


def test_model_hf_refuses_a_student_without_a_stock_class_before_lm_eval_runs(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    save_student(tmp_path, 0, "residual=attnres")
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **_: pytest.fail("lm-eval ran"))
    assert cli.main(["eval", str(tmp_path), "--tasks", TASKS, "--model", "hf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("archlab: error: ") and "\n" not in err, err
    assert "residual=attnres" in err and "--model archlab" in err
    assert cli.main(["eval", str(tmp_path), "--tasks", TASKS, "--model", "vllm"]) == 2
    assert "--model='vllm' is not allowed: expected archlab (any student) or hf" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()
