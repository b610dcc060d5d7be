"""corpus=hf: local data sets read with Hugging Face datasets (archlab.corpora.hf)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from archlab.corpora.hf import HFCorpus  # noqa: E402
from archlab.data import build_split  # noqa: E402
from archlab.errors import ConfigError  # noqa: E402

TEXTS = [f"Document {i}: naïve café, 日本語 {i}\nsecond line {'x' * i}\n" for i in range(30)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' own Arrow cache goes to the test's directory, not ~/.cache/huggingface."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write(tmp_path, fmt: str, texts: list[str]) -> list[str]:
    """``texts`` in a file (or folder) of format ``fmt``, with a second column; the data_files to read."""
    rows = {"text": texts, "n": list(range(len(texts)))}
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps({"text": t, "n": n}) + "\n" for n, t in enumerate(texts)))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "data.parquet"
        pq.write_table(pa.table(rows), path)
    elif fmt == "csv":
        path = tmp_path / "data.csv"
        datasets.Dataset.from_dict(rows).to_csv(path, index=False)
    elif fmt == "text":  # one document per file
        (tmp_path / "txt").mkdir()
        for i, text in enumerate(texts):
            (tmp_path / "txt" / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
        return [str(tmp_path / "txt" / "*.txt")]
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(path)
    return [str(path)]


def texts_of(corpus: HFCorpus) -> list[str]:
    return [data.decode("utf-8") for _, data in corpus.documents()]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv", "text", "disk"])
@pytest.mark.parametrize("streaming", [False, True])
def test_documents_are_the_files_text(tmp_path, fmt: str, streaming: bool) -> None:
    files = write(tmp_path, fmt, TEXTS)
    corpus = HFCorpus(HFCorpus.Config(data_files=files, streaming=streaming))
    assert texts_of(corpus) == TEXTS
    limited = HFCorpus(HFCorpus.Config(data_files=files, streaming=streaming, max_documents=7))
    assert texts_of(limited) == TEXTS[:7]


def test_streaming_and_loading_give_the_same_tokens(tmp_path) -> None:
    files = write(tmp_path, "jsonl", TEXTS)
    splits = [
        build_split(
            HFCorpus(HFCorpus.Config(data_files=files, streaming=streaming)),
            val_fraction=0.2,
            max_bytes=None,
            cache_dir=tmp_path / f"cache-{streaming}",
        )
        for streaming in (False, True)
    ]
    assert splits[0].meta["path"].split("/")[-1] == splits[1].meta["path"].split("/")[-1]
    assert np.array_equal(splits[0].train, splits[1].train) and np.array_equal(splits[0].val, splits[1].val)
    assert 0 < splits[0].meta["val_documents"] < len(TEXTS)


def test_an_edited_file_rebuilds_and_a_renamed_one_does_not(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    [file] = write(tmp_path / "d", "jsonl", TEXTS)

    def split_of(path: str):
        corpus = HFCorpus(HFCorpus.Config(data_files=[path]))
        return build_split(corpus, val_fraction=0.2, max_bytes=None, cache_dir=tmp_path / "cache")

    first = split_of(file)
    edited = [*TEXTS[:-1], "an edited last document\n"]
    write(tmp_path / "d", "jsonl", edited)
    second = split_of(file)
    assert second.meta["path"] != first.meta["path"]
    assert b"an edited last document" in bytes(second.train) + bytes(second.val)
    renamed = tmp_path / "d" / "renamed.jsonl"
    (tmp_path / "d" / "data.jsonl").rename(renamed)
    assert split_of(str(renamed)).meta["path"] == second.meta["path"]


def test_bad_input_is_a_one_line_config_error(tmp_path) -> None:
    files = write(tmp_path, "jsonl", TEXTS)
    with pytest.raises(ConfigError, match="corpus.data_files=.*missing"):
        HFCorpus(HFCorpus.Config(data_files=[str(tmp_path / "missing*.jsonl")]))
    with pytest.raises(ConfigError, match="corpus.data_files"):
        HFCorpus(HFCorpus.Config())
    with pytest.raises(ConfigError, match="corpus.format='xml'.*json, parquet, csv, text, disk"):
        HFCorpus(HFCorpus.Config(data_files=files, format="xml"))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="corpus.format='auto'"):
        HFCorpus(HFCorpus.Config(data_files=[str(tmp_path / "data.xml")]))
    for streaming in (False, True):
        corpus = HFCorpus(HFCorpus.Config(data_files=files, text_field="body", streaming=streaming))
        with pytest.raises(ConfigError, match="corpus.text_field='body'.*field of the data: text, n"):
            list(corpus.documents())
    with pytest.raises(ConfigError, match="corpus.text_field='n'.*strings"):
        list(HFCorpus(HFCorpus.Config(data_files=files, text_field="n")).documents())
    with pytest.raises(ConfigError, match="corpus.split='test'"):
        list(HFCorpus(HFCorpus.Config(data_files=files, split="test")).documents())
    saved = write(tmp_path, "disk", TEXTS)
    with pytest.raises(ConfigError, match="corpus.split='validation'.*train"):
        list(HFCorpus(HFCorpus.Config(data_files=saved, split="validation")).documents())
    with pytest.raises(ConfigError, match="corpus.max_documents"):
        HFCorpus(HFCorpus.Config(data_files=files, max_documents=0))


@pytest.mark.slow
def test_train_from_a_local_data_set_with_a_learnt_bpe(tmp_path, train_cli, monkeypatch) -> None:
    """`archlab train corpus=hf tokenizer=bpe` end to end from the CLI; the run's saved config finds its
    tokenizer and the student's vocabulary is the tokenizer's."""
    pytest.importorskip("tokenizers")
    from archlab import checkpoint

    texts = [f"{t} The quick brown fox jumps over the lazy dog. " * 20 for t in TEXTS]
    [file] = write(tmp_path, "parquet", texts)
    summary = train_cli(
        "corpus=hf",
        f"corpus.data_files=[{file}]",
        "tokenizer=bpe",
        "tokenizer.vocab_size=320",
        "data.val_fraction=0.2",
        "trainer.max_steps=5",
        "trainer.eval_every=5",
    )
    assert np.isfinite(summary["val/bpb"]) and summary["corpus/tokenizer"].startswith("bpe:")
    saved = checkpoint.saved_config(checkpoint.find(str(tmp_path / "run")))
    assert saved.model.vocab_size == 320 and saved.tokenizer.path.endswith("tokenizer.json")
    generate = [sys.executable, "-m", "archlab.cli", "generate", str(tmp_path / "run"), "--prompt", "Grüße"]
    result = subprocess.run([*generate, "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("Grüße"), result.stderr[-2000:]
