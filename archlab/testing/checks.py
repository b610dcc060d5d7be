"""The conformance checks: invariants every plugin of a model slot keeps, on a tiny student.

Each check builds a tiny student (``TINY``) with the plugin under test in its slot and every
other slot at its default, and asserts one property of the student or of the plugin's own
modules inside it (``check_slot_contract`` calls them with the slot's signature). Checks
that do not apply are skipped with a reason, chosen only from what the plugin declares
(``is_causal = False``, ``supports_kv_cache``), never from its name. Failure messages say
what to fix. A check runs in seconds on a CPU (one thread, see ``suite.one_thread``).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from archlab import registry
from archlab.errors import ArchlabError
from archlab.generate import generate, supports_kv_cache
from archlab.metrics import model_metrics
from archlab.model import Student, build_student
from archlab.slots import ActiveParams, KVCacheAccounting, is_causal, offering, offers, slot

#: The tiny student every check builds (seconds on a CPU).
TINY = ("model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=32")
BATCH, TOKENS = 2, 16


@cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    from archlab.config import compose

    return compose(list(overrides))


@dataclass(frozen=True)
class Case:
    """One plugin (or preset) of one slot, with extra Hydra overrides for the tiny student."""

    slot: str
    name: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.slot}={self.name}"

    def config(self) -> DictConfig:
        return copy.deepcopy(_composed((*TINY, f"{self.slot}={self.name}", *self.overrides)))

    def plugin(self) -> type:
        """The plugin class (``name`` may be a preset of it)."""
        return registry.get(self.slot, self.config()[self.slot].plugin)

    def build(self, seed: int = 0) -> Student:
        torch.manual_seed(seed)
        return build_student(self.config())

    def instances(self, model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if isinstance(m, self.plugin())]


def tokens(seed: int = 0, batch: int = BATCH, length: int = TOKENS) -> Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_of(model: Student, x: Tensor) -> Tensor:
    """Next-token cross-entropy plus every auxiliary loss the plugins report, as the trainer adds them."""
    ctx = model.new_context(x[:, :-1])
    logits = model(x[:, :-1], ctx)
    model.aux_losses(ctx, x[:, 1:])  # as the trainer does, for AuxLoss plugins
    ce = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
    return ctx.add_aux_losses(ce)


def non_causal(model: nn.Module) -> str | None:
    names = sorted({type(m).__name__ for m in model.modules() if not is_causal(m)})
    return f"declares is_causal = False ({', '.join(names)})" if names else None


def assert_close(actual: Tensor, expected: Tensor, what: str, atol: float = 1e-5) -> None:
    diff = (actual.double() - expected.double()).abs()
    if diff.max() > atol:
        worst = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{what}: max |Δ| = {diff.max():.3g} at index {worst}, mean |Δ| = {diff.mean():.3g} (atol {atol})"
        )


# ---------------------------------------------------------------- applicability (None = applies)


@cache
def _capabilities(case: Case) -> tuple[str | None, bool]:
    """(why the student is not causal, or None; whether it decodes through the KV cache), built once."""
    model = case.build()
    return non_causal(model), supports_kv_cache(model)


def _causal_only(case: Case) -> str | None:
    return _capabilities(case)[0]


def _kv_cache_only(case: Case) -> str | None:
    not_causal, kv_cache = _capabilities(case)
    if not_causal or kv_cache:
        return not_causal
    return "the attention plugin does not declare supports_kv_cache = True"


# ---------------------------------------------------------------- checks


def check_config_roundtrip(case: Case) -> None:
    # The default Config survives dataclass -> YAML -> dataclass (what Hydra and checkpoints do).
    config = case.plugin().Config
    default = config()
    text = OmegaConf.to_yaml(OmegaConf.structured(default))
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config), OmegaConf.create(text)))
    assert back == default, (
        f"Config() -> YAML -> Config gave {back!r}, not {default!r}: use field types OmegaConf "
        "supports (int, float, bool, str, Enum, list/dict of those, `X | None`)"
    )


def check_builds_from_default_config(case: Case) -> None:
    # The plugin builds inside a student from its default config and is really part of it.
    model = case.build()
    if slot(case.slot).in_layers == "listed" and not case.instances(model):
        return  # a plugin of a slot placed by Config.layers (memory) may sit in no layer by default
    assert case.instances(model), (
        f"the student built with {case.label} holds no {case.plugin().__qualname__} module"
    )


def _probe_residual(model: Student, module: nn.Module) -> None:
    x = torch.randn(BATCH, TOKENS, model.dims.d_model)
    state = module.begin(x)
    for i in range(len(model.sublayers)):
        read = module.read(state, i)
        assert read.shape == x.shape, (
            f"read(state, {i}) returned {tuple(read.shape)}, expected (b, t, d) {tuple(x.shape)}"
        )
        state = module.write(state, i, torch.randn_like(x))
    h = module.final(state)
    assert h.shape == x.shape, f"final(state) returned {tuple(h.shape)}, expected (b, t, d) {tuple(x.shape)}"


def _probe_position(model: Student, module: nn.Module) -> None:
    d = model.dims
    x = torch.randn(BATCH, d.n_heads, TOKENS, d.head_dim)
    y = module.rotate(x, torch.arange(TOKENS))
    assert y.shape == x.shape, (
        f"rotate(x: (b, h, t, k), positions) returned {tuple(y.shape)}, expected {tuple(x.shape)}"
    )


#: Output shape a called module of each slot must return, from its input's shape (sublayers: the same).
_CALLED = {
    "linear": ("forward(x: (..., in)) -> (..., out)", lambda x, y, v: y[:-1] == x[:-1]),
    "norm": ("forward(x: (..., d)) -> (..., d)", lambda x, y, v: y == x),
    "head": ("forward(h: (b, t, d), ctx) -> (b, t, vocab)", lambda x, y, v: y == (*x[:-1], v)),
}
_SUBLAYER = ("forward(x: (b, t, d), ctx) -> (b, t, d)", lambda x, y, v: y == x)
_METHODS = {"residual": _probe_residual, "position": _probe_position}


def check_slot_contract(case: Case) -> None:
    # Each of the plugin's modules honours its slot's call contract (docs/plugins.md): shapes in -> out.
    model = case.build()
    modules = case.instances(model)
    if case.slot in _METHODS:
        for module in modules:
            _METHODS[case.slot](model, module)
        return
    contract, ok = _CALLED.get(case.slot, _SUBLAYER)
    seen: dict[nn.Module, tuple[tuple, tuple, torch.dtype, torch.dtype]] = {}

    def record(module: nn.Module, args: tuple, out: Tensor) -> None:
        seen[module] = (tuple(args[0].shape), tuple(out.shape), args[0].dtype, out.dtype)

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        model(tokens())
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(modules), (
        f"{len(modules) - len(seen)} of its modules were never called in forward"
    )
    for x, y, x_dtype, y_dtype in seen.values():
        assert ok(x, y, model.dims.vocab_size), f"input {x} gave output {y}; the contract is {contract}"
        assert y_dtype == x_dtype, f"a float32 input gave a {y_dtype} output"


def _slot_contract_applies(case: Case) -> str | None:
    if case.slot in (*_CALLED, *_METHODS):
        return None
    model = case.build()
    if not case.instances(model):
        return f"the default {case.label} builds no module"
    if all(m in list(model.sublayers) for m in case.instances(model)):
        return None
    return f"no contract known for slot {case.slot!r} outside the sublayer stack; model-level checks run"


def check_forward_fp32(case: Case) -> None:
    # (b, t) tokens -> (b, t, vocab) float32 logits, all finite.
    logits = case.build()(tokens())
    assert logits.shape == (BATCH, TOKENS, 256), f"logits shape {tuple(logits.shape)}, expected (2, 16, 256)"
    assert logits.dtype == torch.float32, f"logits dtype {logits.dtype} in a float32 student"
    assert torch.isfinite(logits).all(), "non-finite logits in float32"


def check_forward_bf16(case: Case) -> None:
    # Under bf16 autocast (trainer.precision=bf16) forward and backward stay finite.
    model = case.build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, tokens())
    assert torch.isfinite(loss), f"bf16 loss is {float(loss)}: keep reductions (softmax, norms) in float32"
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite bf16 gradients in {', '.join(bad)}"


def check_causal(case: Case) -> None:
    # Logits at positions < s are unchanged when only tokens >= s change.
    model, x = case.build(), tokens()
    s = TOKENS // 2
    changed = x.clone()
    changed[:, s:] = (x[:, s:] + 1) % 256
    assert_close(
        model(changed)[:, :s],
        model(x)[:, :s],
        f"logits before position {s} changed when only tokens from {s} on changed: the plugin reads "
        "later tokens (mask the future, e.g. use ctx.attend, which is causal), or declare is_causal = False",
    )


def check_batch_invariance(case: Case) -> None:
    # Row i alone gives the same logits as row i inside a batch.
    model, x = case.build(), tokens()
    batched = model(x)
    for i in range(BATCH):
        assert_close(
            model(x[i : i + 1])[0],
            batched[i],
            f"row {i} alone differs from row {i} in a batch of {BATCH}",
            atol=1e-4,
        )


def check_gradients_reach_every_parameter(case: Case) -> None:
    # Every trainable parameter gets a finite gradient from next-token loss + auxiliary losses.
    model = case.build()
    loss_of(model, tokens()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, (
        f"no gradient reached {', '.join(missing)}: a parameter unused in forward (delete it or use it), "
        "or a computation under torch.no_grad / .detach()"
    )
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {', '.join(bad)}"


def check_deterministic_under_seed(case: Case) -> None:
    # The same seed gives the same initial weights, logits and loss.
    a, b = case.build(seed=0), case.build(seed=0)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} differs between two builds with seed 0: draw from torch's RNG"
    torch.manual_seed(1)
    first = loss_of(a, tokens())
    torch.manual_seed(1)
    assert torch.equal(first, loss_of(b, tokens())), "two forwards with the same seed give different losses"


def check_state_dict_roundtrip(case: Case) -> None:
    # Weights saved as a checkpoint does (safetensors) load into a fresh student and give the same logits.
    from safetensors.torch import load_model, save_model

    saved, fresh = case.build(seed=0), case.build(seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.safetensors")
        save_model(saved, path)
        missing, unexpected = load_model(fresh, path, strict=True)
    assert not missing and not unexpected, f"missing keys {missing}, unexpected keys {unexpected}"
    x = tokens()
    assert_close(fresh(x), saved(x), "logits after loading the saved weights into another student")


def check_kv_cache(case: Case) -> None:
    # A prompt then one token at a time through the KV cache gives the full forward's logits, and
    # kv_cache_elems_per_token() matches what the cache holds.
    from archlab.context import KVCache

    model, x = case.build(), tokens(length=12)
    model.eval()
    full = model(x)
    cache = KVCache(model.dims.context)
    steps = [model(x[:, :8], cache=cache)] + [model(x[:, j : j + 1], cache=cache) for j in range(8, 12)]
    assert_close(
        torch.cat(steps, dim=1), full, "logits decoded through the KV cache vs the full forward", 1e-4
    )
    declared = sum(m.kv_cache_elems_per_token() for m in offering(model.modules(), KVCacheAccounting))
    held = cache.elements_per_token()
    assert declared == held, (
        f"kv_cache_elems_per_token() sums to {declared}, the cache holds {held} per token"
    )


def check_generation(case: Case) -> None:
    # Greedy generation works, and gives the same tokens with and without the KV cache.
    model = case.build()
    prompt = tokens(length=5)
    plain = generate(model, prompt, 6, use_cache=False)
    assert plain.shape == (BATCH, 11) and torch.equal(plain[:, :5], prompt), "generate() mangled the prompt"
    if supports_kv_cache(model):
        cached = generate(model, prompt, 6, use_cache=True)
        assert torch.equal(cached, plain), "greedy tokens differ with and without the KV cache"
    else:
        try:
            generate(model, prompt, 1, use_cache=True)
        except ArchlabError:
            return
        raise AssertionError("generate(use_cache=True) did not refuse a student without KV-cache support")


def check_aux_losses_reported(case: Case) -> None:
    # Auxiliary losses arrive through ctx.add_loss as finite scalars that carry gradient; metrics are finite.
    model, x = case.build(), tokens()
    ctx = model.new_context(x)
    model(x, ctx)
    for name, (value, weight) in ctx.losses.items():
        assert isinstance(value, Tensor) and value.dim() == 0, f"aux loss {name!r} is not a scalar tensor"
        assert torch.isfinite(value), f"aux loss {name!r} is {float(value)}"
        assert value.requires_grad, (
            f"aux loss {name!r} carries no gradient (computed under no_grad or detached)"
        )
        assert isinstance(weight, int | float), f"aux loss {name!r} has weight {weight!r}, expected a number"
    bad = {k: v for k, v in ctx.metrics.items() if not torch.isfinite(torch.tensor(v))}
    assert not bad, f"non-finite metrics {bad}"


def check_parameter_accounting(case: Case) -> None:
    # 0 < active <= total parameters; a plugin's own num_active_params() never exceeds what it holds.
    model = case.build()
    m = model_metrics(model, torch.float32)
    assert 0 < m["params/active"] <= m["params/total"], (
        f"params/active {m['params/active']} vs total {m['params/total']}"
    )
    assert m["params/active_non_embedding"] <= m["params/non_embedding"], (
        "active non-embedding > non-embedding"
    )
    assert m["weight_bytes"] > 0 and m["flops_per_token"] > 0, (
        f"weight_bytes / flops_per_token not positive: {m}"
    )
    for module in case.instances(model):
        if offers(module, ActiveParams):
            own = sum(p.numel() for p in module.parameters())
            active = module.num_active_params()
            assert 0 <= active <= own, (
                f"num_active_params() = {active}, but the module holds {own} parameters"
            )


def check_compiles(case: Case) -> None:
    # torch.compile gives the eager logits and a backward pass (slow: tens of seconds per plugin on a CPU).
    model, x = case.build(), tokens()
    compiled = torch.compile(model)
    out = compiled(x)
    assert_close(out, model(x), "torch.compile logits vs eager", atol=1e-4)
    out.float().sum().backward()


@dataclass(frozen=True)
class Check:
    """A named check and when it applies (``applies(case)`` returns None, or why it is skipped)."""

    fn: Callable[[Case], None]
    applies: Callable[[Case], str | None] = lambda case: None
    slow: bool = False

    @property
    def name(self) -> str:
        return self.fn.__name__


CHECKS: tuple[Check, ...] = (
    Check(check_config_roundtrip),
    Check(check_builds_from_default_config),
    Check(check_slot_contract, _slot_contract_applies),
    Check(check_forward_fp32),
    Check(check_forward_bf16),
    Check(check_causal, _causal_only),
    Check(check_batch_invariance, _causal_only),
    Check(check_gradients_reach_every_parameter),
    Check(check_deterministic_under_seed),
    Check(check_state_dict_roundtrip),
    Check(check_kv_cache, _kv_cache_only),
    Check(check_generation, _causal_only),
    Check(check_aux_losses_reported),
    Check(check_parameter_accounting),
    Check(check_compiles, slow=True),
)
