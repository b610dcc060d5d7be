"""Hydra composition of archlab configs: plugin dataclasses as typed config-group options."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from archlab import registry, slots
from archlab.baselines.ffn import Activation
from archlab.config import register_configs, validate
from archlab.errors import ConfigError, PluginError
from archlab.model import build_student

DEFAULT_PLUGINS = {
    "attention": "mha",
    "ffn": "mlp",
    "memory": "none",
    "residual": "prenorm",
    "linear": "dense",
    "norm": "rmsnorm",
    "position": "rope",
    "head": "lm",
}

MYFFN = """
    from dataclasses import dataclass

    from torch import nn

    from archlab.errors import ConfigError


    class MyFFN(nn.Module):
        @dataclass
        class Config:
            width: int = 4
            gain: float = 1.0

            def validate(self, dims):
                if self.width < 1:
                    raise ConfigError("ffn.width", self.width, "a positive integer")

        def __init__(self, cfg, dims, *, linear):
            super().__init__()
            self.up = linear(dims.d_model, cfg.width * dims.d_model, role="ffn.up")
            self.down = linear(cfg.width * dims.d_model, dims.d_model, role="ffn.down")

        def forward(self, x, ctx):
            return self.down(self.up(x).relu())
"""

Compose = Callable[..., DictConfig]


@pytest.fixture
def compose_cfg() -> Iterator[Compose]:
    """``compose_cfg(*overrides)``: register every installed plugin, then compose archlab's config."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()

    def compose_(*overrides: str) -> DictConfig:
        register_configs()
        with initialize_config_module(config_module="archlab.conf", version_base="1.3"):
            return compose("config", overrides=list(overrides))

    yield compose_
    GlobalHydra.instance().clear()


def composition_error(compose_cfg: Compose, *overrides: str) -> str:
    """The whole message chain of a failed composition (Hydra wraps OmegaConf's error)."""
    with pytest.raises(ConfigCompositionException) as exc_info:
        compose_cfg(*overrides)
    parts, exc = [], exc_info.value
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__
    return "\n".join(parts)


def test_default_composition_names_a_plugin_for_every_model_slot(compose_cfg) -> None:
    cfg = compose_cfg()
    assert set(slots.names("sublayer", "model")) == set(DEFAULT_PLUGINS)
    for slot in slots.names("sublayer", "model"):
        assert cfg[slot].plugin == DEFAULT_PLUGINS[slot], slot
    assert cfg.corpus.plugin == "stdlib"
    assert cfg.objective.plugin == "kd" and cfg.teacher.plugin == "ngram"  # the main job distils
    assert (cfg.model.d_model, cfg.model.n_heads) == (128, 4)
    assert cfg.ffn.activation is Activation.swiglu  # the plugin's own typed default
    validate(cfg)


def test_plugin_field_override_composes_and_validates(compose_cfg) -> None:
    cfg = compose_cfg("attention.n_kv_heads=2")
    assert cfg.attention.n_kv_heads == 2
    assert cfg.attention.plugin == "mha"
    validate(cfg)


def test_wrong_field_type_fails_at_compose_naming_the_key(compose_cfg) -> None:
    message = composition_error(compose_cfg, "attention.n_kv_heads=abc")
    assert "attention.n_kv_heads" in message
    assert "abc" in message


def test_unknown_field_fails_at_compose_naming_the_key(compose_cfg) -> None:
    message = composition_error(compose_cfg, "attention.n_kv_headz=2")
    assert "attention.n_kv_headz" in message


def test_unknown_plugin_fails_listing_the_available_options(compose_cfg) -> None:
    message = composition_error(compose_cfg, "attention=nope")
    assert "attention/nope" in message
    assert "Available options in 'attention'" in message
    assert "mha" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.n_heads=3", "model.n_heads"),
        ("attention.n_kv_heads=3", "attention.n_kv_heads"),
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.warmup_fraction=1.5", "trainer.warmup_fraction"),
        ("model.attention_backend=foo", "model.attention_backend"),
        ("ffn.multiple_of=0", "ffn.multiple_of"),
    ],
)
def test_validate_rejects_bad_values_naming_the_key(compose_cfg, override: str, key: str) -> None:
    cfg = compose_cfg(override)  # well-typed, so Hydra accepts it ...
    with pytest.raises(ConfigError) as exc_info:  # ... and archlab's checks refuse it
        validate(cfg)
    assert exc_info.value.key == key
    assert str(exc_info.value).startswith(f"{key}=")


def test_validate_explains_what_n_heads_must_divide(compose_cfg) -> None:
    with pytest.raises(ConfigError, match=r"model\.n_heads=3 .*divisor of model\.d_model=128"):
        validate(compose_cfg("model.n_heads=3"))
    with pytest.raises(ConfigError, match=r"attention\.n_kv_heads=3 .*divisor of model\.n_heads=4"):
        validate(compose_cfg("attention.n_kv_heads=3"))


def test_unknown_linear_override_is_a_validate_error(compose_cfg) -> None:
    cfg = compose_cfg("model.linear_overrides={ffn: nope}")
    with pytest.raises(ConfigError) as exc_info:
        validate(cfg)
    assert exc_info.value.key == "model.linear_overrides.ffn"
    assert "dense" in str(exc_info.value)


def test_linear_overrides_accept_a_dict_override_without_plus(compose_cfg) -> None:
    cfg = compose_cfg("model.linear_overrides={ffn: dense}")
    assert dict(cfg.model.linear_overrides) == {"ffn": "dense"}


def test_validate_checks_linear_override_names(compose_cfg) -> None:
    cfg = compose_cfg("model.linear_overrides={ffn: nope}")
    with pytest.raises(ConfigError) as exc_info:
        validate(cfg)
    assert exc_info.value.key == "model.linear_overrides.ffn"


def test_unknown_linear_override_is_refused_when_the_student_is_built(compose_cfg) -> None:
    assert build_student(compose_cfg("model.linear_overrides={ffn: dense}")) is not None
    with pytest.raises(ConfigError, match=r"model\.linear_overrides\.ffn='nope' .*one of: dense"):
        build_student(compose_cfg("model.linear_overrides={ffn: nope}"))


def test_third_party_plugin_becomes_a_typed_config_option(compose_cfg, make_dist) -> None:
    make_dist(
        "myffn-dist",
        {"archlab.ffn": {"myffn": "myffn_pkg.ffn:MyFFN"}},
        {"myffn_pkg/__init__.py": "", "myffn_pkg/ffn.py": MYFFN},
        version="0.4",
    )
    cfg = compose_cfg("ffn=myffn", "ffn.width=3")
    assert cfg.ffn.plugin == "myffn"
    assert cfg.ffn.width == 3
    assert cfg.ffn.gain == 1.0
    assert ConfigStore.instance().load("ffn/myffn.yaml").provider == "myffn-dist 0.4"
    validate(cfg)
    student = build_student(cfg)
    assert type(student.sublayers[1]).__name__ == "MyFFN"

    assert "ffn.width" in composition_error(compose_cfg, "ffn=myffn", "ffn.width=abc")
    assert "ffn.gain" in composition_error(compose_cfg, "ffn=myffn", "ffn.gain=[1]")
    with pytest.raises(ConfigError) as exc_info:
        validate(compose_cfg("ffn=myffn", "ffn.width=0"))
    assert exc_info.value.key == "ffn.width"


def test_broken_third_party_plugin_composes_and_validation_reports_its_error(compose_cfg, make_dist) -> None:
    make_dist(
        "cfgbroken-dist",
        {"archlab.ffn": {"cfgbroken": "cfgbroken_pkg.ffn:Broken"}},
        {"cfgbroken_pkg/__init__.py": "", "cfgbroken_pkg/ffn.py": "raise ImportError('missing dep')\n"},
    )
    assert compose_cfg("ffn=relu2").ffn.plugin == "relu2"
    with pytest.raises(PluginError, match=r"ffn=cfgbroken .*cfgbroken-dist 1\.0.*ImportError: missing dep"):
        validate(compose_cfg("ffn=cfgbroken"))


def test_archlab_plugins_yaml_preset_composes_through_the_search_path_plugin(compose_cfg) -> None:
    cfg = compose_cfg("ffn=relu2_wide")
    assert cfg.ffn.plugin == "relu2"
    assert cfg.ffn.hidden_mult == 6.0
    assert cfg.ffn.bias is False
    validate(cfg)
    assert compose_cfg("ffn=relu2_wide", "ffn.hidden_mult=5").ffn.hidden_mult == 5.0

    register_configs()
    with initialize_config_module(config_module="archlab.conf", version_base="1.3"):
        search_path = GlobalHydra.instance().config_loader().get_search_path().get_path()
        assert any(
            e.provider == "archlab-presets" and e.path == "pkg://archlab_plugins.conf" for e in search_path
        )


def test_presets_of_a_third_party_distribution_are_found(compose_cfg, make_dist) -> None:
    make_dist(
        "presets-dist",
        {
            "archlab.ffn": {"presetffn": "presetffn_pkg.ffn:MyFFN"},
            "archlab.presets": {"presetffn": "presetffn_pkg.conf"},
        },
        {
            "presetffn_pkg/__init__.py": "",
            "presetffn_pkg/ffn.py": MYFFN,
            "presetffn_pkg/conf/__init__.py": "",
            "presetffn_pkg/conf/ffn/presetffn_wide.yaml": "defaults:\n  - presetffn\n  - _self_\nwidth: 9\n",
            "presetffn_pkg/conf/ffn/mlp_gelu_narrow.yaml": (
                "defaults:\n  - mlp\n  - _self_\nactivation: gelu\nhidden_dim: 64\n"
            ),
            "presetffn_pkg/conf/attention/gqa2.yaml": "defaults:\n  - mha\n  - _self_\nn_kv_heads: 2\n",
            "presetffn_pkg/conf/ffn/typo.yaml": "defaults:\n  - mlp\n  - _self_\nhidden_dimm: 64\n",
        },
    )
    assert "pkg://presetffn_pkg.conf" in registry.preset_paths()

    own = compose_cfg("ffn=presetffn_wide")
    assert (own.ffn.plugin, own.ffn.width) == ("presetffn", 9)
    validate(own)

    cfg = compose_cfg("ffn=mlp_gelu_narrow", "attention=gqa2")
    assert cfg.ffn.plugin == "mlp"
    assert cfg.ffn.activation is Activation.gelu
    assert cfg.ffn.hidden_dim == 64
    assert (cfg.attention.plugin, cfg.attention.n_kv_heads) == ("mha", 2)
    validate(cfg)

    # Presets are typed by the plugin's dataclass too.
    assert "hidden_dimm" in composition_error(compose_cfg, "ffn=typo")
