"""tokenizer=bpe: a byte-level BPE learnt on the training split (archlab.bpe), and its bits-per-byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from archlab.baselines.corpus import FilesCorpus  # noqa: E402
from archlab.bpe import EOD_TOKEN, BPERecipe, BPETokenizer, BPETokenizerConfig, from_config  # noqa: E402
from archlab.config import compose  # noqa: E402
from archlab.data import _is_val, build_split  # noqa: E402
from archlab.errors import ConfigError  # noqa: E402
from archlab.run_tokens import tokenizer_for  # noqa: E402
from archlab.teacher import TeacherEnv  # noqa: E402
from archlab.teachers.ngram import NGramTeacher  # noqa: E402
from archlab.tokenizer import ByteTokenizer  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 6,
    "The cat sat on the mat. The dog sat on the log. " * 8,
    "Grüße aus Köln: naïve café, 日本語のテキスト, emoji 🙂 and more. " * 5,
]


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode (Radford et al. 2019, encoder.py), written out: printable bytes stand for
    themselves, the other 68 are shifted to 256 + n in byte order; inverted to character -> byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], n = chr(256 + n), n + 1
    return {c: b for b, c in chars.items()}


def corpus_of(root, texts: list[str]) -> FilesCorpus:
    root.mkdir(exist_ok=True)
    for i, text in enumerate(texts):
        (root / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return FilesCorpus(FilesCorpus.Config(paths=[str(root)]))


def many_texts(n: int = 24) -> list[str]:
    return [f"{TEXTS[i % 3]} variant {i} " * (1 + i % 4) for i in range(n)]


def test_bpe_round_trips_text_and_counts_the_bytes_each_token_stands_for(tmp_path) -> None:
    tok = BPERecipe(BPETokenizerConfig(vocab_size=400)).fit(
        [t.encode() for t in TEXTS], "digest", len(TEXTS), tmp_path
    )
    assert 257 < tok.vocab_size <= 400 and tok.eod == 0
    unseen = "Neue Grüße: a + b == 日本 🙂\n\tdef f(x): return x"
    ids = tok.encode(unseen)
    assert tok.decode(ids) == unseen
    assert len(ids) < len(unseen.encode())  # merges learnt on the corpus apply
    # each token's bytes, decoded by hand through GPT-2's byte alphabet
    decoder = gpt2_byte_decoder()
    by_hand = [len(bytes(decoder[c] for c in tok.tok.id_to_token(i))) for i in ids]
    assert [tok.count_bytes(np.array([i])) for i in ids] == by_hand
    assert tok.count_bytes(np.array(ids)) == sum(by_hand) == len(unseen.encode("utf-8"))
    assert tok.count_bytes(np.array([tok.eod])) == 1  # as the NUL that ends a byte-level document
    docs = tok.encode_documents([b"ab", b"", EOD_TOKEN.encode()])  # the marker inside a text is text
    assert list(docs).count(tok.eod) == 3 and tok.decode(list(docs)) == "ab" + EOD_TOKEN


def test_a_bytes_only_bpe_counts_exactly_what_the_byte_tokenizer_counts(tmp_path) -> None:
    """With no merges (vocab 257) BPE relabels each byte and the NUL end marker one to one, so every
    model's bits per byte is the same under both: the token streams are one bijection apart and the
    bytes that each validation window stands for (the bpb denominator) are equal."""
    corpus = corpus_of(tmp_path / "c", many_texts())
    by_bytes = build_split(corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache")
    recipe = from_config(BPETokenizerConfig(vocab_size=257))
    by_bpe = build_split(
        corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache", tokenizer=recipe
    )
    assert by_bpe.tokenizer.vocab_size == 257 and by_bpe.meta["path"] != by_bytes.meta["path"]
    for a, b in ((by_bytes.train, by_bpe.train), (by_bytes.val, by_bpe.val)):
        assert len(a) == len(b)
        pairs = set(zip(a.tolist(), b.tolist(), strict=True))
        assert len(pairs) == len({x for x, _ in pairs}) == len({y for _, y in pairs})  # a bijection
    context, n = 16, (len(by_bytes.val) - 1) // 16
    assert np.array_equal(by_bytes.val_window_bytes(context, n), by_bpe.val_window_bytes(context, n))


def test_a_learnt_bpe_is_cached_and_its_tokenizer_json_reuses_the_corpus_cache(tmp_path) -> None:
    corpus = corpus_of(tmp_path / "c", many_texts())
    recipe = from_config(BPETokenizerConfig(vocab_size=300))
    split = build_split(
        corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache", tokenizer=recipe
    )
    path = split.tokenizer.path
    assert path.name == "tokenizer.json" and path.parent.parent == tmp_path / "cache" / "bpe"
    mtime = path.stat().st_mtime_ns
    again = build_split(
        corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache", tokenizer=recipe
    )
    assert again.tokenizer.path == path and path.stat().st_mtime_ns == mtime  # not retrained
    loaded = from_config(BPETokenizerConfig(path=str(path)))
    reused = build_split(
        corpus, val_fraction=0.25, max_bytes=None, cache_dir=tmp_path / "cache", tokenizer=loaded
    )
    assert reused.meta["path"] == split.meta["path"]


def test_bpe_learns_on_the_training_split_only(tmp_path) -> None:
    corpus = corpus_of(tmp_path / "c", many_texts())
    val_doc = next(p for p, _ in corpus.documents() if _is_val(p, 0.25))
    Path(val_doc).write_text("zqzq " * 200)  # 'z' and 'q' occur nowhere else
    split = build_split(
        corpus,
        val_fraction=0.25,
        max_bytes=None,
        cache_dir=tmp_path / "cache",
        tokenizer=BPERecipe(BPETokenizerConfig(vocab_size=400)),
    )
    assert "zqzq" in split.tokenizer.decode(list(split.val))
    merged = [t for t in split.tokenizer.tok.get_vocab() if len(t) > 1 and set(t) & set("zq")]
    assert merged == []  # no merge was learnt from the validation document


def test_bad_tokenizer_settings_are_one_line_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        from_config(BPETokenizerConfig(vocab_size=256))
    with pytest.raises(ConfigError, match="tokenizer.path"):
        from_config(BPETokenizerConfig(path=str(tmp_path / "missing.json")))
    import tokenizers

    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    (tmp_path / "wl.json").write_text(word_level.to_str())
    with pytest.raises(ConfigError, match="byte-level BPE"):
        BPETokenizer(tmp_path / "wl.json")
    (tmp_path / "junk.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ConfigError, match="tokenizer.path"):
        BPETokenizer(tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        tokenizer_for(compose(["tokenizer=bpe", "tokenizer.kind=sentencepiece"]))


def test_teachers_that_cannot_share_a_bpe_refuse_it() -> None:
    with pytest.raises(ConfigError, match="tokenizer='bpe'.*teacher=hf"):
        tokenizer_for(compose(["teacher=hf", "teacher.path=/nowhere", "tokenizer=bpe"]))
    env = TeacherEnv(split=None, vocab_size=1024, context=32, cache_dir=None, device=None)
    with pytest.raises(
        ConfigError,
        match="model.vocab_size=1024.*ngram teacher reads bytes.*tokenizer=bpe use teacher=trained",
    ):
        NGramTeacher(NGramTeacher.Config(), env)
    assert isinstance(tokenizer_for(compose([])), ByteTokenizer)


def test_export_hf_carries_the_bpe_as_itself(tmp_path) -> None:
    """``archlab export --hf`` of a tokenizer=bpe student: AutoTokenizer loads the same BPE (same ids both
    ways) and the config's EOS is <|endoftext|>."""
    transformers = pytest.importorskip("transformers")
    import torch

    from archlab.hf_dir import write_dir
    from archlab.model import build_student

    tok = BPERecipe(BPETokenizerConfig(vocab_size=300)).fit([t.encode() for t in TEXTS], "d", 3, tmp_path)
    torch.manual_seed(0)
    small = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=32"]
    student = build_student(compose([*small, f"model.vocab_size={tok.vocab_size}"]))
    write_dir(student, tok, tmp_path / "hf", force=False)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    text = "def add(a, b): Grüße 日本 🙂 return a + b"
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text) and hf.decode(ids) == text and len(hf) == tok.vocab_size
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tok.eod == hf.eos_token_id and config["vocab_size"] == tok.vocab_size
