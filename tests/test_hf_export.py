"""``archlab export RUN --hf DIR``: dense students load in transformers' stock classes with the same logits.

Each mapping is checked by loading the export with ``AutoModelForCausalLM`` in fp32 and comparing with
archlab's own forward on random tokens (max abs diff <= 1e-5, at weights scaled so logits are O(1-10)) and
greedy ``generate`` with ``archlab.generate``; refusals name the slot and the plugin.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archlab import cli
from archlab.config import compose
from archlab.errors import ArchlabError
from archlab.hf_dir import write_dir
from archlab.hf_export import HFPart, assemble
from archlab.loggers import RunInfo
from archlab.model import build_student
from archlab.testing.hf import hf_round_trip, scrambled
from archlab.tokenizer import ByteTokenizer
from archlab.trainer import Trainer

transformers = pytest.importorskip("transformers")

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=32"]


def student(*overrides: str):
    torch.manual_seed(0)
    return scrambled(build_student(compose([*SMALL, *overrides])))


@pytest.mark.parametrize(
    ("overrides", "architecture"),
    [
        ((), "LlamaForCausalLM"),  # MHA, RoPE, RMSNorm, SwiGLU, tied head
        (("attention.n_kv_heads=2", "head.tied=false", "attention.bias=true"), "LlamaForCausalLM"),  # GQA
        (
            ("attention.n_kv_heads=1", "ffn.bias=true", "norm.eps=1e-5", "position.theta=500"),
            "LlamaForCausalLM",
        ),
        (("ffn.activation=gelu", "ffn.bias=true", "attention.n_kv_heads=2"), "ArceeForCausalLM"),
    ],
    ids=["mha-tied", "gqa-untied-bias", "mqa-eps-theta", "gelu-arcee"],
)
def test_a_dense_student_has_the_same_logits_and_greedy_tokens_in_transformers(
    overrides, architecture, tmp_path: Path
) -> None:
    trip = hf_round_trip(student(*overrides), tmp_path / "hf")
    assert trip.architecture == architecture
    assert trip.max_abs_logit > 1.0  # the comparison is at a scale where a wrong layout shows
    assert trip.max_logit_diff <= 1e-5, f"max abs logit diff {trip.max_logit_diff:.3g}"
    assert trip.same_greedy_tokens, (trip.archlab_tokens, trip.hf_tokens)


def test_the_byte_tokenizer_loads_with_autotokenizer_and_ids_are_bytes(tmp_path: Path) -> None:
    write_dir(student(), ByteTokenizer(), tmp_path / "hf", force=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "def f(x):\n    return x ** 2  # é, 漢字, Ā, \x00 and  spaces "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 256 and tok.eos_token_id == 0  # lm-eval's HFLM reads the tokenizer's EOS
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["vocab_size"] == 256


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("norm=layernorm",), "norm=layernorm"),
        (("position=none",), "position=none"),
        (("model.value_residual=true",), "model.value_residual=true"),
    ],
)
def test_a_student_without_a_stock_class_is_refused_naming_slot_and_plugin(
    overrides, named, tmp_path: Path
) -> None:
    with pytest.raises(ArchlabError) as info:
        write_dir(build_student(compose([*SMALL, *overrides])), ByteTokenizer(), tmp_path / "hf", force=False)
    message = str(info.value)
    assert named in message and "archlab eval" in message and "\n" not in message
    assert not (tmp_path / "hf").exists()


def test_an_export_that_fails_its_logit_check_leaves_nothing_behind(tmp_path: Path, monkeypatch) -> None:
    from archlab import hf_dir

    monkeypatch.setattr(hf_dir, "TOLERANCE", -1.0)  # no difference passes, not even 0
    with pytest.raises(ArchlabError, match="nothing written"):
        write_dir(student(), ByteTokenizer(), tmp_path / "hf", force=False)
    assert list(tmp_path.iterdir()) == []  # neither DIR nor its temporary directory


def test_two_parts_setting_one_field_differently_are_refused_naming_both() -> None:
    model = build_student(compose(SMALL))
    model.final_norm.eps = 1e-5  # the layers' norms say 1e-6: one rms_norm_eps cannot hold both
    with pytest.raises(ArchlabError, match=r"norm=rmsnorm sets rms_norm_eps=1e-06 and .* rms_norm_eps=1e-05"):
        assemble(model)
    assert isinstance(model.final_norm.hf_export(), HFPart)


@pytest.mark.slow
def test_the_cli_exports_a_trained_run_and_refuses_a_non_empty_dir(
    tmp_path: Path, archlab_cache: Path, capsys
) -> None:
    run = tmp_path / "run"
    train = [
        "trainer.max_steps=3",
        "trainer.batch_size=2",
        "trainer.eval_tokens=256",
        "trainer.progress=false",
    ]
    train += ["logger=none", "teacher=none", "objective=ce", "data.max_bytes=200000"]
    cfg = compose([*SMALL, *train, f"data.cache_dir={archlab_cache}", "head.tied=false"])
    Trainer(cfg, RunInfo(run_dir=run, name="hf")).run()
    out = tmp_path / "hf"
    assert cli.main(["export", str(run), "--hf", str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert not hf.config.tie_word_embeddings
    assert cli.main(["export", str(run), "--hf", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--hf", str(out), "--force"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")] == []  # no tmp or old dir left
