"""The student: assembled from the chosen plugins, whatever they are.

    x_0 = E[tokens]
    state = residual.begin(x_0)
    for each sublayer i (attention, ffn, attention, ffn, ...):
        state = residual.write(state, i, f_i(norm_i(residual.read(state, i)), ctx))
    logits = head(final_norm(residual.final(state)), ctx)

The core knows no plugin by name: it asks the registry for the class of each
slot and builds it with the slot's constructor signature (see ``docs/plugins.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig
from torch import Tensor, nn

from archlab import registry
from archlab.context import ForwardContext, KVCache, ModelDims, positions_for
from archlab.errors import ConfigError
from archlab.kernels import Kernel

#: Sublayer slots of one transformer layer, in order.
LAYER_SLOTS = ("attention", "ffn")
#: Roles whose projection writes into the residual stream; their init is scaled by 1/sqrt(2L).
RESIDUAL_OUTPUT_ROLES = ("out", "down")


@dataclass
class Choice:
    """One slot's plugin class and its config instance."""

    cls: type
    cfg: object


class LinearFactory:
    """Makes every projection of the student through the ``linear`` slot.

    ``role`` names the projection (``attention.qkv``, ``ffn.down``, ``head``, ...).
    ``overrides`` maps a role prefix to another linear plugin, e.g. ``{"ffn": ternary}``;
    the longest matching prefix wins. Output projections into the residual stream
    (last role part in ``RESIDUAL_OUTPUT_ROLES``) are initialised with std
    0.02/sqrt(2·n_layers) (GPT-2, Radford et al. 2019), all others with 0.02.
    """

    def __init__(self, default: Choice, overrides: dict[str, Choice], n_layers: int) -> None:
        self.default, self.overrides, self.n_layers = default, overrides, n_layers

    def choice(self, role: str) -> Choice:
        matches = [p for p in self.overrides if role == p or role.startswith(p + ".")]
        return self.overrides[max(matches, key=len)] if matches else self.default

    def __call__(self, in_features: int, out_features: int, *, bias: bool = False, role: str) -> nn.Module:
        choice = self.choice(role)
        std = 0.02
        if role.rsplit(".", 1)[-1] in RESIDUAL_OUTPUT_ROLES:
            std /= math.sqrt(2 * self.n_layers)
        return choice.cls(choice.cfg, in_features, out_features, bias=bias, init_std=std)


class Student(nn.Module):
    """A causal language model assembled from slot plugins."""

    def __init__(self, dims: ModelDims, choices: dict[str, Choice], linear: LinearFactory) -> None:
        super().__init__()
        self.dims = dims
        self.kernel = Kernel("sdpa", "default until the trainer selects one")
        self.embed = nn.Embedding(dims.vocab_size, dims.d_model)
        self.position = choices["position"].cls(choices["position"].cfg, dims)
        norm = choices["norm"]
        self.sublayers = nn.ModuleList()
        self.norms = nn.ModuleList()
        for _ in range(dims.n_layers):
            for slot in LAYER_SLOTS:
                self.sublayers.append(choices[slot].cls(choices[slot].cfg, dims, linear=linear))
                self.norms.append(norm.cls(norm.cfg, dims.d_model))
        residual = choices["residual"]
        self.residual = residual.cls(residual.cfg, dims, n_sublayers=len(self.sublayers))
        self.final_norm = norm.cls(norm.cfg, dims.d_model)
        head = choices["head"]
        self.head = head.cls(head.cfg, dims, embedding=self.embed, linear=linear)
        nn.init.normal_(self.embed.weight, std=0.02)

    def new_context(self, tokens: Tensor, cache: KVCache | None = None) -> ForwardContext:
        offset = cache.offset if cache is not None else 0
        return ForwardContext(
            positions=positions_for(tokens, offset),
            rotate=self.position.rotate,
            attend=self.kernel.fn,
            cache=cache,
        )

    def forward(
        self, tokens: Tensor, ctx: ForwardContext | None = None, *, cache: KVCache | None = None
    ) -> Tensor:
        """tokens: (b, t) int64 -> logits (b, t, vocab); with ``cache``, tokens continue the cached ones."""
        ctx = ctx if ctx is not None else self.new_context(tokens, cache)
        end = (ctx.cache.offset if ctx.cache is not None else 0) + tokens.shape[1]
        if end > self.dims.context:
            raise ValueError(f"{end} tokens exceed model.context={self.dims.context}")
        state = self.residual.begin(self.embed(tokens))
        for i, (norm, sublayer) in enumerate(zip(self.norms, self.sublayers, strict=True)):
            y = sublayer(norm(self.residual.read(state, i)), ctx)
            state = self.residual.write(state, i, y)
        if ctx.cache is not None:
            ctx.cache.offset += tokens.shape[1]
        return self.head(self.final_norm(self.residual.final(state)), ctx)


def dims_from(cfg: DictConfig) -> ModelDims:
    m = cfg.model
    return ModelDims(m.d_model, m.n_layers, m.n_heads, m.context, m.vocab_size)


def slot_choices(cfg: DictConfig) -> dict[str, Choice]:
    """The plugin class and config instance of every model slot, validated against the dims."""
    dims = dims_from(cfg)
    dims.validate()
    choices = {}
    for slot in registry.MODEL_SLOTS:
        choices[slot] = Choice(*registry.configured(slot, cfg[slot]))
        if hasattr(choices[slot].cfg, "validate"):
            choices[slot].cfg.validate(dims)
    return choices


def linear_factory(cfg: DictConfig, default: Choice) -> LinearFactory:
    overrides = {}
    available = registry.plugins("linear")
    for role, name in cfg.model.linear_overrides.items():
        if name not in available:
            raise ConfigError(
                f"model.linear_overrides.{role}", name, f"one of: {', '.join(sorted(available))}"
            )
        cls = available[name].load()
        overrides[role] = Choice(cls, cls.Config())
    return LinearFactory(default, overrides, cfg.model.n_layers)


def build_student(cfg: DictConfig) -> Student:
    """Build the student described by a composed archlab config (on the CPU, in float32)."""
    choices = slot_choices(cfg)
    return Student(dims_from(cfg), choices, linear_factory(cfg, choices["linear"]))
