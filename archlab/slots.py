"""Every slot and every optional capability, declared once.

``SLOTS`` is the table of slots: name, kind, how a plugin is built and called, its baseline. The
registry (entry-point groups), the config (Hydra groups), the model builder (sublayers), ``archlab
plugins``, the conformance suite and ``docs/plugins.md`` all read it, so a new *sublayer* slot is its
row here, its baseline plugin and its ``conf/config.yaml`` default.

Each capability is a runtime-checkable ``typing.Protocol`` (for type checkers and plugin
authors) plus one row of ``CAPABILITIES``; core code asks ``offers(module, SupportsKVCache)``
and never looks a hook up by name itself. A *flag* capability is a class attribute that
must be true (``supports_kv_cache = True``); a *method* capability is a callable member.
``docs/plugins.md`` lists the same table; a test fails when the two differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

#: Kinds of slot: a sublayer of every (or some) transformer layer, pre-normed and written back
#: through the residual plugin; another part of the student; a stage of the pipeline around it;
#: a part a plugin composes from its own config (an MoE layer's router: no Hydra group).
KINDS = ("sublayer", "model", "pipeline", "part")
SUBLAYER_BUILT, SUBLAYER_CALLED = "`cls(cfg, dims, *, linear)`", "`forward(x: (b,t,d), ctx) -> (b,t,d)`"


@dataclass(frozen=True)
class Slot:
    """One row of the slot table. Plugins of slot ``name`` are entry points of group ``archlab.<name>``,
    chosen by the Hydra group ``<name>`` (part slots: by a field of the plugin that uses them)."""

    name: str
    kind: str
    built_as: str
    called_as: str
    baseline: str  # the default plugin, shipped with archlab ("" for a part slot: its user picks)
    in_layers: str = "every"  # sublayer slots: in "every" layer, or the "listed" ``Config.layers``
    mixes_tokens: bool = False  # sublayer slots: reads other positions (decoding caches its state)

    @property
    def group(self) -> str:
        return f"archlab.{self.name}"


#: Listing order; sublayer slots run in this order inside each layer (memory, then attention, then ffn).
SLOTS: tuple[Slot, ...] = (
    Slot(
        "memory",
        "sublayer",
        SUBLAYER_BUILT + "; `Config.layers: list[int]`",
        SUBLAYER_CALLED,
        "none",
        in_layers="listed",
        mixes_tokens=True,
    ),
    Slot("attention", "sublayer", SUBLAYER_BUILT, SUBLAYER_CALLED, "mha", mixes_tokens=True),
    Slot("ffn", "sublayer", SUBLAYER_BUILT, SUBLAYER_CALLED, "mlp"),
    Slot(
        "residual",
        "model",
        "`cls(cfg, dims, *, n_sublayers, sublayer_names)`",
        "`begin(x0)`, `read(state, i)`, `write(state, i, y)`, `final(state)`",
        "prenorm",
    ),
    Slot(
        "linear",
        "model",
        "`cls(cfg, in_features, out_features, *, bias, init_std, role)`",
        "`forward(x)`",
        "dense",
    ),
    Slot("norm", "model", "`cls(cfg, dim)`", "`forward(x)`", "rmsnorm"),
    Slot("position", "model", "`cls(cfg, dims)`", "`rotate(x: (b,h,t,k), positions: (t,))`", "rope"),
    Slot(
        "head",
        "model",
        "`cls(cfg, dims, *, embedding, linear)`",
        "`forward(h: (b,t,d), ctx) -> (b,t,vocab)`",
        "lm",
    ),
    Slot(
        "corpus",
        "pipeline",
        "`cls(cfg)`",
        "`documents() -> Iterator[(id, bytes)]`, `describe() -> str`",
        "stdlib",
    ),
    Slot(
        "teacher",
        "pipeline",
        "`cls(cfg, env: TeacherEnv)`",
        "`vocab_size`, `identity() -> dict`, `prepare()`, `log_probs(tokens: (b,t)) -> (b,t,V)`",
        "ngram",
    ),
    Slot(
        "objective",
        "pipeline",
        "`cls(cfg)`; class attribute `needs_teacher`",
        "`__call__(logits, targets, teacher: SoftTargets or None, mask=None) -> scalar`",
        "kd",
    ),
    Slot(
        "router", "part", "`cls(cfg, *, d_model, n_experts, linear)`", "`forward(x: (b,t,d)) -> Routing`", ""
    ),
)


def names(*kinds: str) -> tuple[str, ...]:
    """Names of the slots of ``kinds`` (all kinds when none is given), in table order."""
    return tuple(s.name for s in SLOTS if not kinds or s.kind in kinds)


def slot(name: str) -> Slot:
    """The slot called ``name``."""
    for s in SLOTS:
        if s.name == name:
            return s
    raise KeyError(name)


def slot_table() -> str:
    """``SLOTS`` as the Markdown table ``docs/plugins.md`` carries (a test keeps them equal)."""
    rows = [
        "| slot | kind | entry-point group | built as | called as | baseline |",
        "|---|---|---|---|---|---|",
    ]
    for s in SLOTS:
        placed = " (in `Config.layers`)" if s.in_layers == "listed" else ""
        baseline = f"`{s.baseline}`" if s.baseline else "–"
        rows.append(
            f"| {s.name} | {s.kind}{placed} | `{s.group}` | {s.built_as} | {s.called_as} | {baseline} |"
        )
    return "\n".join(rows) + "\n"


@runtime_checkable
class SupportsKVCache(Protocol):
    """Appends what it keeps per token to ``ctx.cache`` and reads it back: ``generate`` decodes with
    the KV cache only when every token-mixing sublayer (attention, memory) offers it."""

    supports_kv_cache: bool


@runtime_checkable
class SupportsTreeMask(Protocol):
    """Honours ``ctx.attn_mask`` (a token tree's mask) when it computes attention itself:
    speculative decoding (``generate --draft``) requires it of every cached sublayer."""

    supports_tree_mask: bool


@runtime_checkable
class SupportsValueResidual(Protocol):
    """Calls ``ctx.value_residual(v)`` on its values: ``model.value_residual=true`` requires it of the
    attention plugin."""

    supports_value_residual: bool


@runtime_checkable
class NormalizesInput(Protocol):
    """A projection that normalises its own input (BitNet's BitLinear): a sublayer built only of such
    projections gets no pre-norm."""

    normalizes_input: bool


@runtime_checkable
class KVCacheAccounting(Protocol):
    """Elements it keeps in the KV cache per token: summed into ``kv_bytes_per_token``; the
    conformance suite checks it against what the cache really holds."""

    def kv_cache_elems_per_token(self) -> int: ...


@runtime_checkable
class AttentionFlops(Protocol):
    """Forward FLOPs per token of its attention scores and mixing at ``context`` (beyond its
    parameters' 2 N): added to ``flops_per_token``."""

    def attention_flops_per_token(self, context: int) -> int: ...


@runtime_checkable
class ActiveParams(Protocol):
    """Parameters one token touches in its subtree (a routed MoE layer): speaks for the subtree in
    ``params/active``."""

    def num_active_params(self) -> int: ...


@runtime_checkable
class SparseParams(Protocol):
    """Parameters of looked-up tables (Engram's n-gram tables): reported as ``params/sparse``."""

    def num_sparse_params(self) -> int: ...


@runtime_checkable
class WeightBytes(Protocol):
    """Bytes its weights take when stored compactly (ternary: 2 bits each): speaks for its subtree
    in ``weight_bytes``."""

    def weight_bytes(self) -> int: ...


@runtime_checkable
class PackedState(Protocol):
    """Its subtree's state in a compact form and back: ``archlab export --packed`` writes it."""

    def packed_state(self) -> dict[str, Tensor]: ...

    def load_packed_state(self, state: dict[str, Tensor]) -> None: ...


@runtime_checkable
class HFExport(Protocol):
    """Its place in a stock transformers model (``archlab.hf_export.HFPart``: the model types it fits, the
    config fields it sets, its tensors under transformers' names): ``archlab export --hf`` requires it of
    every part of the student and refuses, naming the slot and plugin, where one lacks it."""

    def hf_export(self) -> Any: ...


@runtime_checkable
class StepEndHook(Protocol):
    """Runs after every optimizer step (the aux-loss-free router's bias update)."""

    def on_step_end(self) -> None: ...


@runtime_checkable
class SumsAcrossRanks(Protocol):
    """Buffers it tallies from its own batch, named in ``rank_summed_buffers``: in a data-parallel run
    the trainer sums them over the ranks after each step's backward, before ``on_step_end`` acts on
    them (the aux-loss-free router's per-expert load), so every rank sees the global batch's tally."""

    rank_summed_buffers: tuple[str, ...]


@runtime_checkable
class DepthWeightsReport(Protocol):
    """A residual plugin's learnt mixing over depth: plotted to ``plots/depth_weights.png``."""

    def depth_weights(self) -> Any: ...


@runtime_checkable
class DraftHeads(Protocol):
    """A head with extra heads drafting later tokens (Medusa): speculative decoding uses them."""

    num_draft_heads: int

    def draft_logits(self, h: Tensor) -> Tensor: ...


@runtime_checkable
class AuxLoss(Protocol):
    """An auxiliary loss on labelled batches: after the forward of a training or validation batch the
    trainer calls ``aux_loss(ctx, targets, soft)`` (labels (b, t), the teacher's ``SoftTargets`` or
    None) and the module reports through ``ctx.add_loss`` / ``ctx.add_metric`` (Medusa's heads)."""

    def aux_loss(self, ctx: Any, targets: Tensor, soft: Any) -> None: ...


@runtime_checkable
class DeclaresCausality(Protocol):
    """``is_causal = False`` marks a module that reads later tokens (expert-choice routing):
    ``generate`` and the causality check refuse it."""

    is_causal: bool


@runtime_checkable
class BringsTokenizer(Protocol):
    """A teacher class with its own tokenizer (``tokenizer(cfg)``): the run's tokens and
    ``model.vocab_size`` become the teacher's."""

    def tokenizer(self, cfg: Any) -> Any: ...


@runtime_checkable
class ValidatesConfig(Protocol):
    """A plugin's ``Config`` that checks itself against the model's dimensions (``validate(dims)``,
    raising ``ConfigError``): called when the run is composed, before anything trains."""

    def validate(self, dims: Any) -> None: ...


@dataclass(frozen=True)
class Capability:
    """One row of the capability table: the protocol, how a plugin declares it, who offers it."""

    protocol: type
    declared: str  # as a plugin author writes it
    slots: tuple[str, ...]
    flag: str | None = None  # a flag capability: this attribute must also be true

    @classmethod
    def flagged(cls, protocol: type, member: str, slots: tuple[str, ...]) -> Capability:
        """A flag capability, declared ``member = True``."""
        return cls(protocol, f"`{member} = True`", slots, flag=member)

    @property
    def name(self) -> str:
        return self.protocol.__name__

    @property
    def doc(self) -> str:
        return " ".join((self.protocol.__doc__ or "").split())


CAPABILITIES = (
    Capability.flagged(SupportsKVCache, "supports_kv_cache", ("attention", "memory")),
    Capability.flagged(SupportsTreeMask, "supports_tree_mask", ("attention", "memory")),
    Capability.flagged(SupportsValueResidual, "supports_value_residual", ("attention",)),
    Capability.flagged(NormalizesInput, "normalizes_input", ("linear",)),
    Capability(KVCacheAccounting, "`kv_cache_elems_per_token()`", ("attention", "memory")),
    Capability(AttentionFlops, "`attention_flops_per_token(context)`", ("attention",)),
    Capability(ActiveParams, "`num_active_params()`", ("ffn", "any module")),
    Capability(SparseParams, "`num_sparse_params()`", ("memory", "any module")),
    Capability(WeightBytes, "`weight_bytes()`", ("linear",)),
    Capability(PackedState, "`packed_state()`, `load_packed_state(state)`", ("linear",)),
    Capability(
        HFExport,
        "`hf_export()`",
        ("attention", "ffn", "residual", "linear", "norm", "position", "head", "router"),
    ),
    Capability(StepEndHook, "`on_step_end()`", ("any module",)),
    Capability(SumsAcrossRanks, '`rank_summed_buffers = ("name", ...)`', ("any module",)),
    Capability(DepthWeightsReport, "`depth_weights()`", ("residual",)),
    Capability(DraftHeads, "`num_draft_heads: int`, `draft_logits(h)`", ("head",)),
    Capability(AuxLoss, "`aux_loss(ctx, targets, soft)`", ("any module",)),
    Capability(DeclaresCausality, "`is_causal = False`", ("any module",)),
    Capability(BringsTokenizer, "`tokenizer(cfg)` (class method)", ("teacher",)),
    Capability(ValidatesConfig, "`validate(dims)`", ("any plugin's Config",)),
)
_BY_PROTOCOL = {c.protocol: c for c in CAPABILITIES}


def capability_table() -> str:
    """``CAPABILITIES`` as the Markdown table ``docs/plugins.md`` carries (a test keeps them equal)."""
    rows = ["| Capability | Declared by | Offered by | What the core does with it |", "|---|---|---|---|"]
    for c in CAPABILITIES:
        rows.append(f"| `{c.name}` | {c.declared} | {', '.join(c.slots)} | {c.doc} |")
    return "\n".join(rows) + "\n"


def offers(obj: object, protocol: type) -> bool:
    """Whether ``obj`` (a module, or a plugin class) offers the capability ``protocol``: every member
    present, and a flag set."""
    capability = _BY_PROTOCOL[protocol]
    if not isinstance(obj, protocol):
        return False
    return capability.flag is None or bool(getattr(obj, capability.flag))


def offering(modules: Iterable[nn.Module], protocol: type) -> Iterator[Any]:
    """The modules that offer ``protocol``."""
    return (m for m in modules if offers(m, protocol))


def is_causal(module: nn.Module) -> bool:
    """False only for a module that declares ``is_causal = False``."""
    return not isinstance(module, DeclaresCausality) or bool(module.is_causal)
