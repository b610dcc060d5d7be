"""A corpus sampled from a model: sequence-level KD and simple self-distillation (SSD).

Sequence-level KD (Kim & Rush 2016, arXiv 1606.07947): train the student with plain cross-entropy on
the teacher's own outputs instead of matching its per-token distributions. SSD ("Embarrassingly Simple
Self-Distillation Improves Code Generation"): the sampled model is the student itself, sampled with
temperature and truncation, and fine-tuned on those samples (``trainer.init_from`` its own run).

    archlab teacher sample CKPT --prompts N --temperature T --top-p P [--top-k K] [--samples-per-prompt S]
                           [--prompt-len L] [--max-new-tokens M] [--seed X] --out DIR

Each of the N prompts is the first L tokens of a window of the checkpoint's own training stream
(positions 0..N−1 of the stream of ``--seed``); the model continues each S times (KV cache when its
token mixers keep one). A document is the prompt's last document (the text after its last
end-of-document byte) plus the continuation up to its first end-of-document byte; empty ones are
skipped and counted. ``DIR`` gets ``sample_NNNNNN.txt`` per document and ``manifest.json`` (the
checkpoint's path, step and weights SHA-256, the source corpus, every knob, the seed, each document's
size and SHA-256), written into a temporary directory and published with fsync + rename
(``archlab.durable``): a killed command leaves no half corpus. Train on it as on any local text:
``corpus=files 'corpus.paths=[DIR/*.txt]'``; ``read_manifest`` checks a directory against its manifest.
Departure: end-of-document splitting is for byte-level checkpoints; others are decoded whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from archlab import __version__, checkpoint, durable
from archlab.config import with_corpus
from archlab.errors import ArchlabError, ConfigError
from archlab.tokenizer import EOD, ByteTokenizer, Tokenizer

MANIFEST = "manifest.json"
FORMAT = 1


@dataclass
class SampleSettings:
    """The knobs of one sampled corpus (all recorded in its manifest)."""

    prompts: int = 64
    samples_per_prompt: int = 1
    prompt_len: int = 32
    max_new_tokens: int = 0  # 0 = up to the model's context
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    batch_size: int = 16  # sequences sampled at once

    def validate(self, context: int) -> None:
        checks = (
            ("--prompts", self.prompts >= 1, "a positive integer"),
            ("--samples-per-prompt", self.samples_per_prompt >= 1, "a positive integer"),
            ("--prompt-len", 1 <= self.prompt_len < context, f"an integer in [1, {context}) (model.context)"),
            (
                "--max-new-tokens",
                0 <= self.max_new_tokens <= context - self.prompt_len,
                "0 to context − prompt",
            ),
            ("--temperature", 0 <= self.temperature < math.inf, "a finite number >= 0 (0 = greedy)"),
            ("--top-k", self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("--top-p", 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("--seed", 0 <= self.seed < 2**64, "an integer in [0, 2**64)"),
            ("--batch-size", self.batch_size >= 1, "a positive integer"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(key, getattr(self, key[2:].replace("-", "_")), allowed)


def document(ids: list[int], prompt_len: int, tokenizer: Tokenizer) -> bytes:
    """The text of one sample: the prompt's last document and the continuation up to its first end."""
    if tokenizer.name != ByteTokenizer.name:
        return tokenizer.decode(ids).encode("utf-8")
    prompt, continuation = bytes(ids[:prompt_len]), bytes(ids[prompt_len:])
    return prompt.rsplit(EOD, 1)[-1] + continuation.split(EOD, 1)[0]


def sample_documents(
    model, prompts: torch.Tensor, n_new: int, s: SampleSettings, tokenizer: Tokenizer
) -> list[bytes]:
    """prompts (n, p) -> n · samples_per_prompt documents, prompt-major, from one seeded generator."""
    from archlab.onpolicy import Sampling, continuations

    sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    rows = prompts.repeat_interleave(s.samples_per_prompt, dim=0)
    generator = torch.Generator(prompts.device).manual_seed(s.seed)
    docs = []
    for first in range(0, len(rows), s.batch_size):
        out = continuations(model, rows[first : first + s.batch_size], n_new, sampling, generator)
        docs += [document(seq.tolist(), prompts.shape[1], tokenizer) for seq in out.cpu()]
    return docs


def sample_corpus(
    ckpt_path: str | Path,
    out: Path,
    s: SampleSettings,
    device: torch.device,
    corpus_overrides: list[str] = (),
) -> dict:
    """Sample the corpus ``s`` describes from ``ckpt_path`` into the new directory ``out``; its manifest.
    Prompts are prefixes of the checkpoint's training windows, or of another corpus's
    (``corpus_overrides``, ``archlab.config.with_corpus``)."""
    from archlab.data import train_batch
    from archlab.run_tokens import load_split

    out = Path(out).expanduser().absolute()
    if out.exists():
        raise ConfigError(
            "--out", str(out), "a directory that does not exist yet (a corpus is never overwritten)"
        )
    ckpt = checkpoint.find(ckpt_path, key="CHECKPOINT")
    cfg = checkpoint.saved_config(ckpt)
    context = cfg.model.context
    s.validate(context)
    split = load_split(with_corpus(cfg, list(corpus_overrides), key="OVERRIDES"))
    x, _ = train_batch(split.train, context=context, seed=s.seed, first=0, count=s.prompts)
    model = checkpoint.load_student(ckpt, device)
    n_new = s.max_new_tokens or context - s.prompt_len
    docs = sample_documents(model, x[:, : s.prompt_len].to(device), n_new, s, split.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        records = []
        for i, data in enumerate(docs):
            if data:
                name = f"sample_{i:06d}.txt"
                (tmp / name).write_bytes(data)
                records.append(
                    {
                        "file": name,
                        "prompt": i // s.samples_per_prompt,
                        "bytes": len(data),
                        "sha256": durable.sha256_file(tmp / name),
                    }
                )
        manifest = {
            "format": FORMAT,
            "archlab": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "checkpoint": {
                "path": str(ckpt.absolute()),
                "step": checkpoint.step_of(ckpt),
                "model_sha256": durable.sha256_file(ckpt / "model.safetensors"),
            },
            "source_corpus": {"source": split.meta["source"], "content_sha256": split.content_hash},
            "tokenizer": split.tokenizer.name,
            "settings": {**dataclasses.asdict(s), "max_new_tokens": n_new},
            "documents": records,
            "skipped_empty": len(docs) - len(records),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        durable.publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a sampled corpus, after checking every document against its size and SHA-256."""
    folder = Path(folder).expanduser()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ArchlabError(f"{folder} is not a sampled corpus: {folder / MANIFEST}: {exc}") from None
    for record in manifest["documents"]:
        path = folder / record["file"]
        if (
            not path.is_file()
            or path.stat().st_size != record["bytes"]
            or durable.sha256_file(path) != record["sha256"]
        ):
            raise ArchlabError(f"{path} does not match {folder / MANIFEST} (missing, truncated or changed)")
    return manifest


def main(args: list[str]) -> int:
    """``archlab teacher sample CKPT ... --out DIR``."""
    p = argparse.ArgumentParser(
        prog="archlab teacher sample",
        description="Write a corpus sampled from a checkpoint (sequence-level KD, or SSD).",
    )
    p.add_argument("checkpoint", help="a run dir, its checkpoints/ dir, or one checkpoint dir")
    p.add_argument("--out", required=True, type=Path, help="the new corpus directory (must not exist)")
    defaults = SampleSettings()
    for f in dataclasses.fields(SampleSettings):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
        )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "corpus_overrides",
        nargs="*",
        metavar="OVERRIDES",
        help="prompts from another corpus: corpus=NAME corpus.FIELD=VALUE data.FIELD=VALUE "
        "(default: the checkpoint's corpus and data)",
    )
    opts = vars(p.parse_intermixed_args(args))
    from archlab.trainer import resolve_device

    device = resolve_device(opts.pop("device"), key="--device")
    ckpt, out, corpus_overrides = opts.pop("checkpoint"), opts.pop("out"), opts.pop("corpus_overrides")
    manifest = sample_corpus(ckpt, out, SampleSettings(**opts), device, corpus_overrides)
    n, skipped, where = len(manifest["documents"]), manifest["skipped_empty"], Path(out).absolute()
    print(f"{n} documents ({skipped} empty skipped) from {manifest['checkpoint']['path']} in {where}")
    print(f"train on them: archlab train corpus=files 'corpus.paths=[{where}/*.txt]'")
    return 0
