"""The public surface for plugin authors: import from here (and ``archlab.testing``), nothing else.

Everything named in ``__all__`` keeps its name and meaning within an ``API_VERSION``; the rest
of ``archlab`` may change between releases. First-party plugins (``plugins/archlab_plugins``)
are held to this by an import-linter contract (``[tool.importlinter]`` in pyproject.toml),
checked by the test command.

What is here, by use:

- **Shapes and the forward call**: ``ModelDims`` (a student's sizes, given to every plugin's
  constructor), ``ForwardContext`` (the per-forward context: positions, attention kernel,
  KV cache, auxiliary losses and metrics) and ``KVCache``.
- **Building blocks**: ``RMSNorm``; ``LMHead`` (the baseline head, to wrap); rotary tables
  ``rope_tables`` / ``apply_rotary`` / ``rotate_half``; ``causal_mask`` (bottom-right aligned);
  ``RESIDUAL_OUTPUT_ROLES`` (linear roles initialised as residual outputs).
- **Distillation maths** on cached top-k teacher targets (``SoftTargets``): ``bucketed`` (the student's
  distribution on the teacher's top-k plus one "rest" bucket) and ``kl``.
- **Diagnostics**: ``DepthWeights``, what a residual plugin's ``depth_weights()`` returns.
- **Errors**: ``ConfigError(key, value, allowed)`` for a config value that is not allowed,
  ``PluginError`` and their base ``ArchlabError``.
- **Capabilities** (``archlab.slots``): the optional hooks a plugin may offer, each a
  runtime-checkable ``Protocol`` (``SupportsKVCache``, ``PackedState``, ...), and ``offers(obj,
  protocol)``, the one way to ask whether something offers one.
- **Export to transformers** (``archlab export --hf``): ``HFPart`` (what a plugin's ``hf_export()``
  returns), ``NotExportable``, ``linear_tensors`` (a projection's tensors, through the linear plugin),
  ``split_rows`` (a fused projection as separate ones), ``part_of`` (a sub-module's part); see
  docs/export.md.
- **Plugins of a part slot** (an MoE layer choosing its router): ``get_plugin(slot, name)``
  and ``installed_plugins(slot)``.
"""

from __future__ import annotations

from archlab.baselines.head import LMHead
from archlab.baselines.norm import RMSNorm
from archlab.baselines.objective import bucketed, kl
from archlab.baselines.position import apply_rotary, rope_tables, rotate_half
from archlab.context import ForwardContext, KVCache, ModelDims
from archlab.errors import ArchlabError, ConfigError, PluginError
from archlab.hf_export import HFPart, NotExportable, linear_tensors, part_of, split_rows
from archlab.kernels import causal_mask
from archlab.model import RESIDUAL_OUTPUT_ROLES
from archlab.plots import DepthWeights
from archlab.registry import get as get_plugin
from archlab.registry import plugins as installed_plugins
from archlab.slots import (
    ActiveParams,
    AttentionFlops,
    AuxLoss,
    BringsTokenizer,
    DeclaresCausality,
    DepthWeightsReport,
    DraftHeads,
    HFExport,
    KVCacheAccounting,
    NormalizesInput,
    PackedState,
    SparseParams,
    StepEndHook,
    SumsAcrossRanks,
    SupportsKVCache,
    SupportsTreeMask,
    SupportsValueResidual,
    ValidatesConfig,
    WeightBytes,
    offers,
)
from archlab.soft_targets import SoftTargets

API_VERSION = 1
"""The version of this surface: a name in ``__all__`` keeps its name and meaning while it stays the same."""

__all__ = [
    "API_VERSION",
    "ActiveParams",
    "AuxLoss",
    "AttentionFlops",
    "BringsTokenizer",
    "DeclaresCausality",
    "DepthWeightsReport",
    "DraftHeads",
    "HFExport",
    "HFPart",
    "NotExportable",
    "KVCacheAccounting",
    "NormalizesInput",
    "PackedState",
    "SparseParams",
    "StepEndHook",
    "SumsAcrossRanks",
    "SupportsKVCache",
    "SupportsTreeMask",
    "SupportsValueResidual",
    "ValidatesConfig",
    "WeightBytes",
    "offers",
    "RESIDUAL_OUTPUT_ROLES",
    "ArchlabError",
    "ConfigError",
    "DepthWeights",
    "ForwardContext",
    "KVCache",
    "LMHead",
    "ModelDims",
    "PluginError",
    "RMSNorm",
    "SoftTargets",
    "apply_rotary",
    "bucketed",
    "causal_mask",
    "get_plugin",
    "installed_plugins",
    "kl",
    "linear_tensors",
    "part_of",
    "rope_tables",
    "rotate_half",
    "split_rows",
]
