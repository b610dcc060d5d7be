"""A student as a stock transformers model: what ``archlab export RUN --hf DIR`` assembles.

Every part of the student says where it sits in a transformers model through the ``HFExport`` capability
(``archlab.slots``): ``hf_export() -> HFPart``, the model types it fits with the config fields it sets in
each (``"*"``: any type), and its tensors under transformers' names, relative to its place:
    embedding           model.embed_tokens.weight                                     (the core)
    layer i, attention  model.layers.{i}.self_attn.  its pre-norm model.layers.{i}.input_layernorm.
    layer i, ffn        model.layers.{i}.mlp.        its pre-norm model.layers.{i}.post_attention_layernorm.
    final norm          model.norm.        head, residual, position: the top level (``lm_head.weight``)
The model type is the one every part fits; a field two parts set must have one value. The position plugin
counts only if an attention part ``reads_position`` (MLA rotates with its own tables). Every projection's
linear part counts too (a quantised one fits only the type its ``quantization_config`` serves), its
tensors placed by the sublayer through ``linear_tensors``. A part without the
hook, or whose hook raises ``NotExportable``, stops the export with one line naming its slot and plugin.
The core names no plugin: the mapping of each lives beside it, in its ``hf_export``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from archlab import registry
from archlab.errors import ArchlabError
from archlab.slots import HFExport, offers

ANY = "*"
#: What a refusal tells the user to do instead: the archlab lm-eval model scores any student.
INSTEAD = "evaluate this student with `archlab eval RUN --tasks ... --model archlab` instead"
#: Where a sublayer slot and its pre-norm sit in each layer of a transformers decoder.
SUBLAYER_PLACES = {"attention": ("self_attn", "input_layernorm"), "ffn": ("mlp", "post_attention_layernorm")}


@dataclass
class HFPart:
    """One part's place in a transformers model: ``config`` maps each model type it fits to the config
    fields it sets there; ``tensors`` are named relative to the part's place."""

    config: dict[str, dict[str, Any]]
    tensors: dict[str, Tensor] = field(default_factory=dict)
    reads_position: bool = False  # an attention part that rotates through the position plugin


class NotExportable(ArchlabError):
    """A part of the student that no stock transformers class holds; ``slot`` and ``module`` name it."""

    def __init__(self, slot: str, module: nn.Module, why: str = "") -> None:
        self.slot, self.module, self.why = slot, module, why
        super().__init__(why or f"{type(module).__name__} offers no hf_export()")


def plugin_name(slot: str, module: nn.Module) -> str:
    """The entry-point name of ``slot`` whose class ``module`` is (its class name if none is)."""
    for name, plugin in registry.plugins(slot).items():
        if plugin.error is None and plugin.load() is type(module):
            return name
    return type(module).__name__


def refusal(exc: NotExportable) -> ArchlabError:
    """The one line a user reads: slot, plugin, why, and what to do instead."""
    name = plugin_name(exc.slot, exc.module)
    return ArchlabError(
        f"archlab export --hf: {exc.slot}={name} has no stock transformers counterpart ({exc.why or exc}); "
        + INSTEAD
    )


def part_of(slot: str, module: nn.Module) -> HFPart:
    """``module.hf_export()``; ``NotExportable`` when the module offers no such hook."""
    if not offers(module, HFExport):
        raise NotExportable(slot, module)
    return module.hf_export()


def linear_tensors(module: nn.Module, name: str) -> dict[str, Tensor]:
    """A projection's tensors as ``{name}.weight`` (and ``{name}.bias``, a quantised layer's scale, ...),
    through the linear plugin's hook, so that a linear plugin without one refuses the export. A projection
    that normalises its own input gives that norm's gain as ``{name}.rms_norm.weight``."""
    return {f"{name}.{key}": value for key, value in part_of("linear", module).tensors.items()}


def split_rows(tensors: dict[str, Tensor], name: str, parts: dict[str, int]) -> dict[str, Tensor]:
    """The tensors ``{name}.*`` of one fused projection as ``parts`` (new name -> rows, in order): weight
    and bias split along their output rows, every other tensor (a per-tensor scale, the input's norm) the
    same in each part. archlab's fused qkv or [gate; up] as transformers' separate ones."""
    out = {}
    for key, value in tensors.items():
        if not key.startswith(f"{name}."):
            continue
        key = key.removeprefix(f"{name}.")
        pieces = (
            value.split(list(parts.values()), dim=0)
            if key in ("weight", "bias")
            else [value.clone() for _ in parts]
        )
        out.update({f"{new}.{key}": piece for new, piece in zip(parts, pieces, strict=True)})
    return out


def _places(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(slot, tensor prefix, module) of every part of ``model`` that the export reads."""
    places = []
    for name, sublayer, norm in zip(model.sublayer_names, model.sublayers, model.norms, strict=True):
        layer, slot = name[1:].split(".")
        if slot not in SUBLAYER_PLACES:
            raise NotExportable(slot, sublayer, f"transformers decoders have no {slot} sublayer")
        inner, norm_name = SUBLAYER_PLACES[slot]
        places.append((slot, f"model.layers.{layer}.{inner}.", sublayer))
        places.append(("norm", f"model.layers.{layer}.{norm_name}.", norm))
    places += [("norm", "model.norm.", model.final_norm), ("residual", "", model.residual)]
    return [*places, ("head", "", model.head)]


def _linear_parts(model: nn.Module) -> list[tuple[str, HFPart]]:
    """The part of every projection in ``model``: its model types and config fields count too (a quantised
    projection's ``quantization_config``, its norm's eps); its tensors came through ``linear_tensors``."""
    names = {p.load(): name for name, p in registry.plugins("linear").items() if p.error is None}
    linears = [m for m in model.modules() if type(m) in names]
    return [(f"linear={names[type(m)]}", part_of("linear", m)) for m in linears]


def _merge(chosen: str, parts: list[tuple[str, HFPart]]) -> dict[str, Any]:
    """The config fields every part (labelled ``slot=plugin``) sets for model type ``chosen``; two parts
    disagreeing is an error."""
    fields: dict[str, tuple[str, Any]] = {}
    for slot, part in parts:
        for key, value in {**part.config.get(ANY, {}), **part.config.get(chosen, {})}.items():
            if key in fields and fields[key][1] != value:
                other, old = fields[key]
                raise ArchlabError(
                    f"archlab export --hf: {other} sets {key}={old!r} and {slot} sets {key}={value!r}; "
                    "a transformers config holds one value"
                )
            fields[key] = (slot, value)
    return {key: value for key, (_, value) in fields.items()}


def _model_type(parts: list[tuple[str, HFPart]]) -> str:
    """The one model type every part (labelled ``slot=plugin``) fits."""
    typed = [(slot, set(part.config) - {ANY}) for slot, part in parts if set(part.config) != {ANY}]
    common = set.intersection(*(types for _, types in typed)) if typed else set()
    if len(common) != 1:
        said = "; ".join(sorted({f"{slot} fits {', '.join(sorted(types))}" for slot, types in typed}))
        raise ArchlabError(f"archlab export --hf: no one transformers model type holds this student ({said})")
    return common.pop()


def assemble(model: nn.Module) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """(model type, config fields, tensors) of ``model`` as a transformers causal LM, or ``ArchlabError``
    naming the slot and plugin that no stock class holds."""
    try:
        if getattr(model, "value_residual", False):
            raise ArchlabError(
                "archlab export --hf: model.value_residual=true has no stock transformers counterpart; "
                + INSTEAD
            )
        parts, tensors, labels = [], {"model.embed_tokens.weight": model.embed.weight}, {}
        for slot, prefix, module in _places(model):
            part = part_of(slot, module)
            label = labels.setdefault(type(module), f"{slot}={plugin_name(slot, module)}")
            parts.append((label, part))
            tensors.update({prefix + key: value for key, value in part.tensors.items()})
        if any(part.reads_position for _, part in parts):
            label = f"position={plugin_name('position', model.position)}"
            parts.append((label, part_of("position", model.position)))
        parts += _linear_parts(model)
    except NotExportable as exc:
        raise refusal(exc) from None
    chosen = _model_type(parts)
    d = model.dims
    fields = {"vocab_size": d.vocab_size, "hidden_size": d.d_model, "num_hidden_layers": d.n_layers}
    fields |= {"num_attention_heads": d.n_heads, "max_position_embeddings": d.context}
    fields |= _merge(chosen, parts)
    return chosen, fields, {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
