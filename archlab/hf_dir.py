"""``archlab export RUN --hf DIR``: write a student as a directory ``transformers`` loads with stock classes.

DIR holds ``config.json`` (the model type ``archlab.hf_export.assemble`` chose), ``model.safetensors``
(fp32) and the run's tokenizer: archlab's byte tokenizer as a ``PreTrainedTokenizerFast`` (a byte-level BPE
of the 256 bytes and no merges, so ids == byte values, and its EOS and ``config.eos_token_id`` = 0, the NUL
that ends every document), a teacher's tokenizer as itself. The tensors are checked against the
transformers class built on the meta device (names and shapes), the directory is loaded back with
``AutoModelForCausalLM`` and its logits compared with the student's on random tokens, and only then is it
renamed into place (``archlab.durable``): a failed export leaves nothing at DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from archlab import durable
from archlab.bpe import EOD_TOKEN, BPETokenizer
from archlab.errors import ArchlabError, ConfigError
from archlab.hf_export import assemble
from archlab.tokenizer import EOD, ByteTokenizer

#: Largest |logit difference| the CLI accepts between the student and the loaded export (fp32).
TOLERANCE = 1e-4
#: A quantised export (a ``quantization_config``: int8 activations) cannot meet TOLERANCE: float noise of
#: 1e-7 (transformers' RoPE tables, its own matmul order) moves a few activations across a rounding edge,
#: and each such flip moves later logits by ~1e-2. The CLI asks it for the same top-1 token at this share of
#: the positions instead; a wrong layout agrees at chance level.
QUANTIZED_TOP1 = 0.9


#: The first transformers major version whose classes the mappings were checked against (5.25): its
#: configs take ``rope_parameters`` and its MoE blocks hold experts as 3-D tensors.
TRANSFORMERS_MAJOR = 5


def transformers_module():
    """transformers, or an ``ArchlabError`` saying what to install."""
    try:
        import transformers
    except ImportError:
        raise ArchlabError("archlab export --hf needs transformers: pip install 'archlab[hf]'") from None
    if int(transformers.__version__.split(".")[0]) < TRANSFORMERS_MAJOR:
        raise ArchlabError(
            f"archlab export --hf needs transformers>={TRANSFORMERS_MAJOR} (found "
            f"{transformers.__version__}): pip install 'transformers>={TRANSFORMERS_MAJOR}'"
        )
    return transformers


def byte_tokenizer():
    """archlab's byte tokenizer as a ``PreTrainedTokenizerFast``: byte-level pre-tokenisation (each byte one
    symbol, GPT-2's byte-to-unicode table) over a BPE vocabulary of the 256 symbols, id = byte value.

    Its ``eos_token`` is the NUL byte's symbol (id 0), so that tools reading the tokenizer rather than the
    config (lm-eval's ``HFLM``: its end-of-text, rolling-window prefix and padding ids) find it; with
    ``split_special_tokens`` that symbol's character in a text (U+0100, ``Ā``) stays its two UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol = bytes_to_unicode()
    tok = Tokenizer(models.BPE({symbol[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=symbol[EOD[0]],
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def hf_tokenizer(tokenizer) -> tuple[Any, dict[str, int | None]]:
    """The transformers tokenizer of the run's tokenizer and the special ids its config carries."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_tokenizer(), {"eos_token_id": EOD[0], "bos_token_id": None, "pad_token_id": None}
    if isinstance(tokenizer, BPETokenizer):  # tokenizer=bpe: its tokenizer.json, as itself
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.tok, eos_token=EOD_TOKEN, clean_up_tokenization_spaces=False
        )
        return tok, {"eos_token_id": tokenizer.eod, "bos_token_id": None, "pad_token_id": None}
    tok = getattr(tokenizer, "tok", None)  # a teacher's transformers tokenizer (teacher=hf)
    if tok is None or not hasattr(tok, "save_pretrained"):
        allowed = "bytes, bpe or a transformers tokenizer (teacher=hf)"
        raise ConfigError("tokenizer", tokenizer.name, allowed)
    ids = {key: getattr(tok, key) for key in ("eos_token_id", "bos_token_id", "pad_token_id")}
    return tok, ids


def check_layout(config, tensors: dict[str, Tensor]) -> None:
    """The tensors are exactly the persistent state of the transformers class (meta device, its linear
    layers replaced as the config's quantizer does on loading): same names, same shapes; a tied head's
    ``lm_head.weight`` is the embedding's."""
    transformers = transformers_module()
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    if getattr(config, "quantization_config", None):  # its projections as the quantizer loads them
        from transformers.quantizers import AutoHfQuantizer

        AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True).preprocess_model(hf)
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        wrong = sorted(k for k in got.keys() & expected.keys() if got[k] != expected[k])
        missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
        raise ArchlabError(
            f"archlab export --hf: the tensors do not fit {type(hf).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {[(k, got[k], expected[k]) for k in wrong[:5]]}"
        )


def compare_logits(student: nn.Module, folder: Path, tokens: Tensor) -> tuple[float, float]:
    """(max |logit difference|, share of positions with the same top-1 token) between ``student`` and the
    export at ``folder`` loaded in fp32."""
    transformers = transformers_module()
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        theirs, ours = hf.eval()(tokens).logits, student(tokens)
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return (theirs - ours).abs().max().item(), top1


def write_dir(student: nn.Module, tokenizer, out: Path, *, force: bool) -> dict[str, Any]:
    """Export ``student`` (with ``tokenizer``) to ``out``; returns what was written and the logit check."""
    transformers = transformers_module()
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError("--hf", str(out), "a new or empty directory (or pass --force to replace it)")
    model_type, fields, tensors = assemble(student)
    tok, ids = hf_tokenizer(tokenizer)
    config = transformers.AutoConfig.for_model(model_type, **fields, **ids, dtype="float32")
    config.architectures = [
        transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    ]
    check_layout(config, tensors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(
            0, student.dims.vocab_size, (2, min(64, student.dims.context)), generator=generator
        )
        diff, top1 = compare_logits(student, tmp, tokens)
        quantized = getattr(config, "quantization_config", None) is not None
        allowed = f"same top-1 token at >= {QUANTIZED_TOP1:.0%}, quantized" if quantized else f"{TOLERANCE:g}"
        if not (top1 >= QUANTIZED_TOP1 if quantized else diff <= TOLERANCE):
            raise ArchlabError(
                f"archlab export --hf: {config.architectures[0]} loaded from the export differs from the "
                f"student by {diff:.3g} in logits, same top-1 token at {top1:.1%} of positions (allowed "
                f"{allowed}); nothing written to {out}"
            )
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n_params = sum(t.numel() for t in tensors.values())
    report = {"dir": str(out), "class": config.architectures[0], "params": n_params, "max_logit_diff": diff}
    return report | {"top1": top1, "allowed": allowed}


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an ``out`` already there (empty, or --force) is moved aside
    first and removed after."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-")) / out.name
        os.rename(out, aside)
    durable.publish_dir(tmp, out)
    if aside is not None:
        shutil.rmtree(aside.parent, ignore_errors=True)


def format_report(r: dict[str, Any]) -> str:
    return (
        f"wrote {r['dir']}: {r['class']} ({r['params']:,} tensor elements, fp32) and its tokenizer\n"
        f"  loaded back with AutoModelForCausalLM: max |logit difference| {r['max_logit_diff']:.2e}, "
        f"same top-1 token at {r['top1']:.1%} of positions, on random tokens (allowed {r['allowed']})\n"
        f"  load it with: AutoModelForCausalLM.from_pretrained({json.dumps(r['dir'])})"
    )
