"""The student: assembled from the chosen plugins, whatever they are.

    x_0 = E[tokens]
    state = residual.begin(x_0)
    for each sublayer i ([memory,] attention, ffn, [memory,] attention, ffn, ...):
        state = residual.write(state, i, f_i(norm_i(residual.read(state, i)), ctx))
    logits = head(final_norm(residual.final(state)), ctx)

The core knows no plugin by name: it asks the registry for the class of each
slot and builds it with the slot's constructor signature (see ``docs/plugins.md``).
norm_i is an identity when every parameter of f_i sits in projections that normalise
their own input (``normalizes_input``, e.g. BitNet's BitLinear): the stream is then
normalised once, inside the projections (``normalizes_own_input``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from archlab import registry, slots
from archlab.baselines.linear import DenseLinear
from archlab.context import ForwardContext, KVCache, ModelDims, positions_for
from archlab.contracts import check_forward, construct, note_where
from archlab.errors import ConfigError
from archlab.kernels import Kernel
from archlab.slots import AuxLoss, NormalizesInput, SupportsValueResidual, ValidatesConfig, offering, offers

RESIDUAL_OUTPUT_ROLES = ("out", "down")
"""Roles whose projection writes into the residual stream; their init is scaled by 1/sqrt(2L)."""
#: Roles that stay full precision (the ``dense`` linear) unless ``model.linear_overrides`` names them, so
#: ``linear=ternary`` quantises the sublayers but not the LM head.
FULL_PRECISION_ROLES = ("head",)


@dataclass
class Choice:
    """One slot's plugin class and its config instance."""

    cls: type
    cfg: object


class LinearFactory:
    """Makes every projection of the student through the ``linear`` slot.

    ``role`` names the projection (``attention.qkv``, ``ffn.down``, ``head``, ...).
    ``overrides`` maps a role prefix to another linear plugin, e.g. ``{"ffn": ternary}``;
    the longest matching prefix wins. The plugin is built as
    ``cls(cfg, in, out, bias=, init_std=, role=)``. Output projections into the residual stream
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
        return construct(
            "linear", choice.cls, choice.cfg, in_features, out_features, bias=bias, init_std=std, role=role
        )


def normalizes_own_input(sublayer: nn.Module) -> bool:
    """True if every parameter of ``sublayer`` lives in a module that sets ``normalizes_input`` (e.g. a
    BitLinear with its own RMSNorm): then nothing reads the stream un-normalised and a block pre-norm
    would normalise twice. A sublayer with any other parameter (a router, an internal norm) keeps it."""
    owners = list(offering(sublayer.modules(), NormalizesInput))
    owned = {id(p) for m in owners for p in m.parameters()}
    params = list(sublayer.parameters())
    return bool(owners) and all(id(p) in owned for p in params)


class Student(nn.Module):
    """A causal language model assembled from slot plugins."""

    def __init__(
        self,
        dims: ModelDims,
        choices: dict[str, Choice],
        linear: LinearFactory,
        *,
        value_residual: bool = False,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.kernel = Kernel("sdpa", "default until the trainer selects one")
        self.embed = nn.Embedding(dims.vocab_size, dims.d_model)
        self.position = construct("position", choices["position"].cls, choices["position"].cfg, dims)
        norm = choices["norm"]
        self.sublayers = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.sublayer_names: list[str] = []  # "L<layer>.<slot>": residual plugins and plots label by them
        self.sublayer_layers: list[int] = []  # the transformer layer of each sublayer (ctx.layer)
        for layer in range(dims.n_layers):
            for slot in sublayer_slots(choices, layer):
                self.sublayers.append(
                    construct(slot, choices[slot].cls, choices[slot].cfg, dims, linear=linear)
                )
                check_forward(slot, self.sublayers[-1], "x: (b, t, d), ctx", 2)
                own = normalizes_own_input(self.sublayers[-1])  # then the pre-norm is an identity
                self.norms.append(
                    nn.Identity() if own else construct("norm", norm.cls, norm.cfg, dims.d_model)
                )
                self.sublayer_names.append(f"L{layer}.{slot}")
                self.sublayer_layers.append(layer)
        residual = choices["residual"]
        names = tuple(self.sublayer_names)
        self.residual = construct(
            "residual", residual.cls, residual.cfg, dims, n_sublayers=len(names), sublayer_names=names
        )
        self.final_norm = construct("norm", norm.cls, norm.cfg, dims.d_model)
        head = choices["head"]
        self.head = construct("head", head.cls, head.cfg, dims, embedding=self.embed, linear=linear)
        check_forward("head", self.head, "h: (b, t, d), ctx", 2)
        nn.init.normal_(self.embed.weight, std=0.02)
        # value residual (ResFormer, arXiv 2410.17897): (λ_{n,1}, λ_{n,2}) of attention layers n ≥ 2, init 0.5
        self.value_residual = value_residual
        n_lambdas = dims.n_layers - 1 if value_residual else 0
        self.value_lambdas = nn.ParameterList(nn.Parameter(torch.full((2,), 0.5)) for _ in range(n_lambdas))
        self.aux_modules = tuple(offering(self.modules(), AuxLoss))  # not registered twice: a tuple

    def aux_losses(self, ctx: ForwardContext, targets: Tensor, soft: object | None = None) -> None:
        """After a forward of a labelled batch: every ``AuxLoss`` module reports into ``ctx``."""
        for module in self.aux_modules:
            module.aux_loss(ctx, targets, soft)

    def new_context(self, tokens: Tensor, cache: KVCache | None = None) -> ForwardContext:
        offset = cache.offset if cache is not None else 0
        return ForwardContext(
            positions=positions_for(tokens, offset),
            rotate=self.position.rotate,
            attend=self.kernel.fn,
            cache=cache,
            tokens=tokens,
            value_lambdas=self.value_lambdas if self.value_residual else None,
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
            try:
                ctx.layer = self.sublayer_layers[i]
                y = sublayer(norm(self.residual.read(state, i)), ctx)
                state = self.residual.write(state, i, y)
            except Exception as exc:  # zero-cost until raised (Python 3.11); names the plugins involved
                name = self.sublayer_names[i]
                plugins = {name.split(".")[-1]: sublayer, "norm": norm, "residual": self.residual}
                note_where(exc, f"sublayer {name}", plugins)
                raise
        if ctx.cache is not None:
            ctx.cache.offset += tokens.shape[1]
        try:
            return self.head(self.final_norm(self.residual.final(state)), ctx)
        except Exception as exc:
            note_where(
                exc, "the head", {"head": self.head, "norm": self.final_norm, "residual": self.residual}
            )
            raise


def sublayer_slots(choices: dict[str, Choice], layer: int) -> list[str]:
    """The sublayer slots of transformer layer ``layer``, in order (``archlab.slots.SLOTS``): those in
    every layer, and those whose plugin lists ``layer`` in its ``Config.layers`` (memory)."""
    return [
        s.name
        for s in slots.SLOTS
        if s.kind == "sublayer" and (s.in_layers == "every" or layer in choices[s.name].cfg.layers)
    ]


def dims_from(cfg: DictConfig) -> ModelDims:
    m = cfg.model
    return ModelDims(m.d_model, m.n_layers, m.n_heads, m.context, m.vocab_size)


def slot_choices(cfg: DictConfig) -> dict[str, Choice]:
    """The plugin class and config instance of every model slot, validated against the dims."""
    dims = dims_from(cfg)
    dims.validate()
    choices = {}
    for slot in slots.names("sublayer", "model"):
        choices[slot] = Choice(*registry.configured(slot, cfg[slot]))
        if offers(choices[slot].cfg, ValidatesConfig):
            choices[slot].cfg.validate(dims)
    for listed in (s.name for s in slots.SLOTS if s.kind == "sublayer" and s.in_layers == "listed"):
        layers = choices[listed].cfg.layers
        if len(set(layers)) < len(layers) or not all(0 <= i < dims.n_layers for i in layers):
            raise ConfigError(f"{listed}.layers", layers, f"distinct layer indices in [0, {dims.n_layers})")
    if cfg.model.get("value_residual", False) and not offers(choices["attention"].cls, SupportsValueResidual):
        raise ConfigError(
            "model.value_residual",
            True,
            f"false: attention={cfg.attention.plugin} does not call ctx.value_residual (see docs/plugins.md)",
        )
    return choices


def linear_factory(cfg: DictConfig, default: Choice) -> LinearFactory:
    """The ``linear`` slot's choice, per-role overrides (sharing the slot's config when they name the slot's
    plugin, e.g. ``linear=ternary model.linear_overrides={attention: dense}``; else their defaults), and
    ``dense`` for the ``FULL_PRECISION_ROLES`` that no override names."""
    overrides = {role: Choice(DenseLinear, DenseLinear.Config()) for role in FULL_PRECISION_ROLES}
    available = registry.plugins("linear")
    for role, name in cfg.model.linear_overrides.items():
        if name not in available:
            raise ConfigError(
                f"model.linear_overrides.{role}", name, f"one of: {', '.join(sorted(available))}"
            )
        cls = available[name].load()
        overrides[role] = default if name == cfg.linear.plugin else Choice(cls, cls.Config())
    return LinearFactory(default, overrides, cfg.model.n_layers)


def build_student(cfg: DictConfig) -> Student:
    """Build the student described by a composed archlab config (on the CPU, in float32)."""
    choices = slot_choices(cfg)
    linear = linear_factory(cfg, choices["linear"])
    return Student(dims_from(cfg), choices, linear, value_residual=cfg.model.get("value_residual", False))
