"""teacher=hf on a tiny randomly initialised GPT-2 that the test saves locally (no hub access)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from archlab import registry  # noqa: E402
from archlab.config import compose  # noqa: E402
from archlab.errors import ConfigError  # noqa: E402
from archlab.loggers import RunInfo  # noqa: E402
from archlab.run_tokens import load_split  # noqa: E402
from archlab.trainer import Trainer  # noqa: E402

TEXT = "def f{i}(x):\n    return x * {i} + 1  # café {i}\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on a little code, and a 1-layer GPT-2 with its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT.format(i=i) for i in range(200)], trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    folder = tmp_path_factory.mktemp("hf-teacher")
    fast.save_pretrained(folder)
    eos = fast.eos_token_id
    config = transformers.GPT2Config(
        vocab_size=len(fast),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        (folder / f"m{i:02d}.py").write_text("".join(TEXT.format(i=i * 7 + j) for j in range(20)))
    return folder


def overrides(checkpoint: Path, corpus: Path, cache: Path) -> list[str]:
    return [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.context=32",
        "trainer.batch_size=4",
        "trainer.max_steps=3",
        "trainer.eval_tokens=512",
        "trainer.progress=false",
        "logger=none",
        "corpus=files",
        f"corpus.paths=[{corpus}]",
        "data.val_fraction=0.2",
        f"data.cache_dir={cache}",
        "teacher=hf",
        f"teacher.path={checkpoint}",
        "objective=kd",
    ]


def test_corpus_is_tokenised_by_the_teachers_tokenizer(checkpoint, corpus, tmp_path) -> None:
    cfg = compose(overrides(checkpoint, corpus, tmp_path))
    split = load_split(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert cfg.model.vocab_size == len(tok) and split.train.dtype.name == "uint16"
    text = tok.decode(split.train[:200].tolist())
    documents = {f.read_text() for f in corpus.iterdir()}
    first_doc = tok.decode(split.train.tolist()).split("<eos>")[0]
    assert first_doc in documents and "café" in text  # a whole document, UTF-8 intact, then EOS
    window = split.val[1:33]  # bits per byte count the UTF-8 bytes the targets decode to
    assert split.val_window_bytes(32, 1)[0] == len(
        tok.decode(window.tolist(), skip_special_tokens=True).encode()
    )


def test_log_probs_are_the_hf_models(checkpoint, corpus, tmp_path) -> None:
    cfg = compose(overrides(checkpoint, corpus, tmp_path))
    split = load_split(cfg)
    cls, tcfg = registry.configured("teacher", cfg.teacher)
    from archlab.teacher import TeacherEnv

    teacher = cls(tcfg, TeacherEnv(split, cfg.model.vocab_size, 32, tmp_path, torch.device("cpu"), False))
    teacher.prepare()
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    tokens = torch.from_numpy(split.train[:64].astype("int64")).view(2, 32)
    with torch.no_grad():
        expected = torch.log_softmax(reference(tokens).logits, -1)
    torch.testing.assert_close(teacher.log_probs(tokens), expected)
    assert teacher.vocab_size == cfg.model.vocab_size


def test_a_student_distils_from_the_hf_teacher(checkpoint, corpus, tmp_path) -> None:
    cfg = compose(overrides(checkpoint, corpus, tmp_path))
    summary = Trainer(cfg, RunInfo(run_dir=tmp_path / "run", name="hf")).run()
    assert summary["params/total"] > cfg.model.vocab_size * 32  # the embedding has the teacher's vocabulary
    for key in ("val/bpb", "teacher/val_bpb", "val/kl_teacher_student", "val/top1_agreement"):
        assert math.isfinite(summary[key]), key
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val/bpb"] == summary["val/bpb"]


def test_missing_checkpoint_is_a_clear_error_before_training(tmp_path, corpus) -> None:
    cfg = compose(overrides(tmp_path / "nowhere", corpus, tmp_path))
    with pytest.raises(ConfigError, match=r"teacher.path=.*nowhere.* a local Hugging Face checkpoint"):
        load_split(cfg)
    args = [sys.executable, "-m", "archlab.cli", "train", *overrides(tmp_path / "nowhere", corpus, tmp_path)]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, env={**os.environ})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("archlab: error: teacher.path=")


def test_a_missing_gguf_file_is_a_clear_error_before_training(checkpoint, corpus, tmp_path) -> None:
    cfg = compose([*overrides(checkpoint, corpus, tmp_path), "teacher.gguf_file=absent.gguf"])
    with pytest.raises(ConfigError, match=r"teacher.gguf_file='absent.gguf'.* a GGUF file in teacher.path="):
        load_split(cfg)
