"""Typed config schemas, and every installed plugin turned into a Hydra config-group option.

For each plugin of each slot, ``register_configs`` stores a structured config in
Hydra's ConfigStore under ``<slot>/<name>``: the plugin's ``Config`` dataclass plus a
``plugin`` field naming it. So ``attention=mha attention.n_kv_heads=2`` selects the
plugin and Hydra type-checks the override, with no YAML written by the author.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from archlab import registry, slots, typos
from archlab.bpe import BPETokenizerConfig
from archlab.distill_checks import sample_tokens, validate_in_context, validate_on_policy
from archlab.errors import ConfigError
from archlab.kernels import check_backend
from archlab.model import dims_from, linear_factory, slot_choices
from archlab.slots import ValidatesConfig, offers


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    context: int = 256
    vocab_size: int = 256
    attention_backend: str = "auto"  # auto | xformers | sdpa | eager (see archlab.kernels)
    linear_overrides: dict[str, str] = field(default_factory=dict)  # role prefix -> linear plugin
    value_residual: bool = False  # mix layer 1's attention values into later layers (ResFormer)
    # seed of the parameter initialisation; null: the run's ``seed`` (which also fixes the data order), so a
    # study can draw a new initialisation while keeping the data order of a paired run
    init_seed: int | None = None


class Schedule(Enum):
    cosine = "cosine"  # linear warmup, cosine decay to min_lr_ratio · lr
    wsd = "wsd"  # warmup, stable, linear decay over the last decay_fraction of steps


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast for matmuls; weights and optimizer state stay fp32


@dataclass
class TrainerConfig:
    max_steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.1  # linear warmup over this fraction of max_steps
    schedule: Schedule = Schedule.cosine
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: Precision = Precision.fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # none | ddp | fsdp: DistributedDataParallel or FSDP2 over torchrun's processes (archlab.distributed);
    # batch_size and grad_accum are per process, so the global batch is batch_size × grad_accum × world size
    parallel: str = "none"
    # run the student under torch.compile (its module compiled in place: checkpoints keep eager names)
    compile: bool = False
    eval_every: int = 100
    eval_tokens: int = 131072
    log_every: int = 10
    ckpt_every: int = 100
    resume: str | None = None  # null | auto (this run dir) | a run dir or checkpoint dir
    progress: bool = True
    # module-name prefixes whose parameters train (e.g. [head] for heads on a frozen backbone); [] = all
    train_only: list[str] = field(default_factory=list)
    init_from: str | None = None  # a run or checkpoint dir: start from its tensors of matching name and shape

    def validate(self) -> None:
        positive = (
            "max_steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "eval_tokens",
            "log_every",
            "ckpt_every",
        )
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key}", getattr(self, key), "a positive integer")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("trainer.lr", self.lr, "a positive, finite learning rate")
        for key in ("warmup_fraction", "min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"trainer.{key}", getattr(self, key), "a number in [0, 1]")
        for key in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ConfigError(f"trainer.{key}", getattr(self, key), "a finite number >= 0 (0 = off)")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise ConfigError("trainer.parallel", self.parallel, "none, ddp or fsdp")


@dataclass
class DataConfig:
    val_fraction: float = 0.02
    # read about this many bytes of the corpus (null: all), in whole documents: each split stops taking
    # documents once it holds its share, so it may exceed that share by part of its last document
    max_bytes: int | None = None
    cache_dir: str = "${oc.env:ARCHLAB_CACHE,'~/.cache/archlab'}"


@dataclass
class BytesTokenizerConfig:
    """``tokenizer=bytes`` (the default): UTF-8 bytes are the tokens (``archlab.tokenizer``)."""

    kind: str = "bytes"


@dataclass
class DistillConfig:
    top_k: int = 32  # teacher ids and log-probs cached per token; the tail is one "rest" bucket
    build_batch_size: int = 16  # windows per teacher forward while building the soft-target cache
    lock_timeout: float = 3600.0  # seconds to wait for another process's build of the same soft targets
    # on-policy distillation (GKD, archlab.onpolicy): the probability λ that a step learns on the student's
    # own continuations of prompts, scored by the teacher online; 0 = only the cached, teacher-forced targets
    on_policy: float = 0.0
    prompt_len: int = 32  # tokens of each training window kept as the prompt
    sample_tokens: int = 0  # tokens the student samples after the prompt; 0 = up to model.context
    sample_temperature: float = 1.0  # 0 = greedy
    sample_top_k: int = 0  # 0 = off
    sample_top_p: float = 1.0  # 1 = off

    def validate(self) -> None:
        for key in ("top_k", "build_batch_size", "prompt_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distill.{key}", getattr(self, key), "a positive integer")
        if self.lock_timeout < 0:
            raise ConfigError("distill.lock_timeout", self.lock_timeout, "a number of seconds >= 0")
        checks = (
            ("on_policy", 0.0 <= self.on_policy <= 1.0, "a probability in [0, 1]"),
            ("sample_tokens", self.sample_tokens >= 0, "an integer >= 0 (0 = up to model.context)"),
            ("sample_temperature", 0.0 <= self.sample_temperature < math.inf, "a finite number >= 0"),
            ("sample_top_k", self.sample_top_k >= 0, "an integer >= 0 (0 = off)"),
            ("sample_top_p", 0.0 < self.sample_top_p <= 1.0, "a number in (0, 1]"),
        )
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"distill.{key}", getattr(self, key), allowed)


#: DistillConfig fields added after trained teachers were first cached: a teacher trains with objective=ce,
#: so they cannot change it, and its identity leaves them out to keep the cached teachers' hashes.
ON_POLICY_FIELDS = (
    "on_policy",
    "prompt_len",
    "sample_tokens",
    "sample_temperature",
    "sample_top_k",
    "sample_top_p",
)


@dataclass
class NoTeacher:
    """``teacher=none``: train on hard labels only (objective=ce)."""

    plugin: str = "none"


class LoggerBackend(Enum):
    wandb = "wandb"
    none = "none"  # only the jsonl metrics file and summary.json


@dataclass
class DensityConfig:
    """``density.ladder``: a reference-ladder fit (``ladder_fit.json`` of ``archlab study``, or the
    ``fit.json`` of ``archlab report --ladder``); when set, the run's summary gets ``density/*``."""

    ladder: str | None = None

    def validate(self) -> None:
        if self.ladder is not None and not Path(self.ladder).expanduser().is_file():
            raise ConfigError("density.ladder", self.ladder, "an existing ladder fit JSON file, or null")


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.wandb
    project: str = "archlab"
    entity: str | None = None
    mode: str = "${oc.env:WANDB_MODE,offline}"  # offline runs sync later with `wandb sync`
    group: str | None = None  # null: the multirun sweep dir name, or none for single runs
    name: str | None = None  # null: derived from the Hydra job's overrides
    tags: list[str] = field(default_factory=list)


def node_class(slot: str, name: str, plugin: type) -> type:
    """The plugin's Config dataclass extended with ``plugin: str = name``."""
    return dataclasses.make_dataclass(
        f"{slot}_{name}_node", [("plugin", str, field(default=name))], bases=(plugin.Config,)
    )


def register_configs() -> None:
    """Store the schemas and every plugin's config in Hydra's ConfigStore (a broken one's as a bare
    ``plugin`` name, which validation then reports)."""
    cs = ConfigStore.instance()
    model = OmegaConf.structured(ModelConfig)
    OmegaConf.set_struct(model.linear_overrides, False)  # roles are open keys: {ffn: X} needs no '+'
    cs.store(group="model", name="_schema", node=model, provider="archlab")
    cs.store(group="trainer", name="_schema", node=TrainerConfig, provider="archlab")
    cs.store(group="data", name="default", node=DataConfig, provider="archlab")
    cs.store(group="distill", name="default", node=DistillConfig, provider="archlab")
    cs.store(group="tokenizer", name="bytes", node=BytesTokenizerConfig, provider="archlab")
    cs.store(group="tokenizer", name="bpe", node=BPETokenizerConfig, provider="archlab")
    cs.store(group="density", name="default", node=DensityConfig, provider="archlab")
    cs.store(group="teacher", name="none", node=NoTeacher, provider="archlab")
    cs.store(group="logger", name="wandb", node=LoggerConfig, provider="archlab")
    cs.store(group="logger", name="none", node=LoggerConfig(backend=LoggerBackend.none), provider="archlab")
    for slot in slots.names("sublayer", "model", "pipeline"):
        loadable = registry.loadable(slot)
        for name, announced in registry.plugins(slot).items():
            # a broken plugin stays selectable, so that choosing it reports its error, not "could not find"
            node = node_class(slot, name, loadable[name]) if name in loadable else {"plugin": name}
            cs.store(group=slot, name=name, node=node, provider=announced.distribution)


def validate(cfg: DictConfig) -> None:
    """Every check that can fail before training: shapes, plugin configs, trainer values."""
    seed = cfg.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ConfigError("seed", seed, "an integer in [0, 2**64)")
    _refuse_unread_keys(cfg)
    dims = dims_from(cfg)
    linear_factory(cfg, slot_choices(cfg)["linear"])
    check_backend(cfg.model.attention_backend)
    OmegaConf.to_object(cfg.trainer).validate()
    OmegaConf.to_object(cfg.distill).validate()
    OmegaConf.to_object(cfg.density).validate()
    tokenizer_config(cfg)
    objective, objective_cfg = registry.configured("objective", cfg.objective)
    if offers(objective_cfg, ValidatesConfig):
        objective_cfg.validate(dims)
    if cfg.teacher.plugin == "none":
        if objective.needs_teacher:
            raise ConfigError(
                "teacher",
                "none",
                f"a teacher plugin for objective={cfg.objective.plugin}, "
                f"one of: {', '.join(sorted(registry.plugins('teacher')))}; or objective=ce",
            )
    else:
        registry.configured("teacher", cfg.teacher)
    if cfg.distill.on_policy > 0:
        validate_on_policy(cfg, dims, objective)
    if cfg.teacher.plugin != "none":
        validate_in_context(cfg, dims, sample_tokens(cfg))  # teacher=self's in-context options


def tokenizer_config(cfg: DictConfig) -> BytesTokenizerConfig | BPETokenizerConfig:
    """The run's ``tokenizer`` section, checked; bytes for a config saved before it existed."""
    node = cfg.get("tokenizer")
    kinds = {"bytes": BytesTokenizerConfig, "bpe": BPETokenizerConfig}
    kind = "bytes" if node is None else node.get("kind")
    if kind not in kinds:
        raise ConfigError("tokenizer.kind", kind, "bytes or bpe (tokenizer=bytes or tokenizer=bpe)")
    spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(kinds[kind]), node or {}))
    if isinstance(spec, BPETokenizerConfig):
        spec.validate()
    return spec


def _refuse_unread_keys(cfg: DictConfig) -> None:
    """Refuse a key that Hydra's ``+key=`` added to a dataclass section (trainer, model, ...): nothing reads
    it, so the run would silently ignore it. Plugin slots are checked against their plugin's ``Config``
    (``registry.configured``). A top-level key that is neither ``seed``, a slot nor a section
    (``+seedd=1``, ``+trainr.lr=1``) is refused the same way."""
    known = [k for k in cfg if k == "seed" or isinstance(cfg._get_node(k), DictConfig)]
    for section in cfg:
        node = cfg._get_node(section)
        schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if section != "seed" and not (schema and ("plugin" in node or dataclasses.is_dataclass(schema))):
            others = [k for k in known if k != section]
            allowed = f"a top-level key of the config{typos.nearest(str(section), others, 'its keys')}"
            raise ConfigError(str(section), cfg[section], allowed)
        if isinstance(node, DictConfig) and "plugin" not in node and dataclasses.is_dataclass(schema):
            typos.refuse_unread_keys(section, node, schema, section)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The archlab config for ``overrides``, composed outside the CLI (notebooks, tests, benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():  # inside `archlab train`: Hydra already holds our configs
        return hydra_compose("config", overrides=list(overrides))
    with initialize_config_module("archlab.conf", version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def with_corpus(cfg: DictConfig, overrides: list[str], *, key: str) -> DictConfig:
    """A copy of ``cfg`` read against another corpus: its ``corpus`` composed from the ``corpus``
    overrides (``corpus=files``, ``corpus.paths=[...]``), its ``data`` updated by the ``data.`` ones
    (``data.val_fraction=...``; the cache dir and the rest stay). ``key`` names the overrides in errors."""
    wrong = [o for o in overrides if not o.lstrip("+").startswith(("corpus", "data."))]
    if wrong:
        allowed = "corpus and data overrides only (corpus=NAME, corpus.FIELD=VALUE, data.FIELD=VALUE)"
        raise ConfigError(key, wrong[0], allowed)
    corpus = [o for o in overrides if o.lstrip("+").startswith("corpus")]
    data = [o.lstrip("+").removeprefix("data.") for o in overrides if o.lstrip("+").startswith("data.")]
    cfg = cfg.copy()
    with open_dict(cfg):
        if corpus:
            cfg.corpus = compose(corpus).corpus
        if data:
            cfg.data = OmegaConf.merge(cfg.data, OmegaConf.from_dotlist(data))
    return cfg
