"""Teacher slot ``hf``: a causal LM from a local Hugging Face checkpoint directory (transformers).

The directory holds the model's config, weights and tokenizer files, as written by
``save_pretrained``; nothing is fetched from a hub (``local_files_only=True``). With this
teacher the corpus is tokenised by the teacher's tokenizer (each document followed by
its EOS token) and students get the teacher's vocabulary (the width of its logits), so
the two distributions share one support. Bits per byte count the UTF-8 bytes that the
target tokens decode to, so they stay comparable with byte-level runs.
Requires the ``hf`` extra: ``pip install 'archlab[hf]'``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from archlab.errors import ConfigError
from archlab.teacher import TeacherEnv
from archlab.tokenizer import token_dtype


def _checkpoint_dir(path: str) -> Path:
    folder = Path(path).expanduser()
    if not path or not (folder / "config.json").is_file():
        raise ConfigError("teacher.path", path, "a local Hugging Face checkpoint directory with config.json")
    return folder.resolve()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("teacher", "hf", "transformers installed: pip install 'archlab[hf]'") from None
    return transformers


def _files_digest(folder: Path, patterns: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for file in sorted(f for pattern in patterns for f in folder.glob(pattern)):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


class HFTokenizer:
    """The teacher's tokenizer; the vocabulary is the width of the teacher's logits."""

    def __init__(self, folder: Path) -> None:
        transformers = _transformers()
        self.tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tok.eos_token_id is None:
            raise ConfigError("teacher.path", str(folder), "a tokenizer with an EOS token (ends documents)")
        self.vocab_size = transformers.AutoConfig.from_pretrained(folder, local_files_only=True).vocab_size
        self.name = f"hf:{_files_digest(folder, ('*token*', '*.model', 'vocab*', 'merges*'))}"

    def encode_documents(self, docs: list[bytes]) -> np.ndarray:
        texts = [doc.decode("utf-8", errors="replace") for doc in docs]
        ids = [i for encoded in self.tok(texts)["input_ids"] for i in [*encoded, self.tok.eos_token_id]]
        return np.asarray(ids, dtype=token_dtype(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        return self.tok(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def count_bytes(self, ids: np.ndarray) -> int:
        return len(self.tok.decode(np.asarray(ids).tolist(), skip_special_tokens=True).encode("utf-8"))


class HFTeacher:
    @dataclass
    class Config:
        path: str = ""  # local checkpoint directory (config.json, weights, tokenizer files)
        dtype: str = "float32"  # float32 | bfloat16 | float16, for the teacher's forward pass

    @classmethod
    def tokenizer(cls, cfg: Config) -> HFTokenizer:
        return HFTokenizer(_checkpoint_dir(cfg.path))

    def __init__(self, cfg: Config, env: TeacherEnv) -> None:
        self.folder = _checkpoint_dir(cfg.path)
        if cfg.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("teacher.dtype", cfg.dtype, "float32, bfloat16 or float16")
        self.dtype, self.env = getattr(torch, cfg.dtype), env
        config = _transformers().AutoConfig.from_pretrained(self.folder, local_files_only=True)
        self.vocab_size = config.vocab_size
        weights = _files_digest(self.folder, ("*.safetensors", "*.bin", "config.json"))
        self._identity = {"plugin": "hf", "weights": weights, "dtype": cfg.dtype, "corpus": env.corpus_key}
        self.model = None

    def identity(self) -> dict:
        return self._identity

    def prepare(self) -> None:
        if self.model is None:
            model_cls = _transformers().AutoModelForCausalLM
            model = model_cls.from_pretrained(self.folder, local_files_only=True, dtype=self.dtype)
            self.model = model.to(self.env.device).eval().requires_grad_(False)

    @torch.no_grad()
    def log_probs(self, tokens: Tensor) -> Tensor:
        logits = self.model(input_ids=tokens.to(self.env.device)).logits
        return torch.log_softmax(logits.float(), dim=-1)
