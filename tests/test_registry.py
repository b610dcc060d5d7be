"""Plugin discovery through real entry points of real (temporary) distributions."""

from __future__ import annotations

import dataclasses
import sys

import pytest

import archlab
from archlab import registry
from archlab.errors import ConfigError, PluginError

#: What archlab's own pyproject.toml announces, slot by slot.
BASELINES = {
    "attention": {"mha"},
    "ffn": {"mlp"},
    "memory": {"none"},
    "residual": {"prenorm"},
    "linear": {"dense"},
    "norm": {"rmsnorm", "layernorm"},
    "position": {"rope", "none"},
    "head": {"lm"},
    "corpus": {"stdlib", "files", "hf"},
    "teacher": {"ngram", "self", "trained", "hf"},
    "objective": {"ce", "kd"},
}

GOOD_FFN = """
    from dataclasses import dataclass

    from torch import nn


    class GoodFFN(nn.Module):
        @dataclass
        class Config:
            width: int = 4

        def __init__(self, cfg, dims, *, linear):
            super().__init__()
            self.proj = linear(dims.d_model, dims.d_model, role="ffn.down")

        def forward(self, x, ctx):
            return self.proj(x)
"""

BROKEN_FFN = """
    raise ImportError("brokenffn needs the frobnicate package (pip install frobnicate)")
"""

NO_CONFIG_FFN = """
    class NoConfig:
        pass


    class NotADataclass:
        class Config:
            width = 4
"""


def test_baselines_come_from_archlab_entry_points() -> None:
    for slot, names in BASELINES.items():
        found = registry.plugins(slot)
        baselines = {name for name, p in found.items() if p.entry_point.dist.name == "archlab"}
        assert baselines == names, slot
        for name in names:
            plugin = found[name]
            assert plugin.entry_point.group == f"archlab.{slot}"
            assert plugin.distribution == f"archlab {archlab.__version__}"
            packages = {
                "teacher": ("archlab.teachers.",),
                "corpus": ("archlab.baselines.", "archlab.corpora."),
            }
            assert plugin.entry_point.value.startswith(packages.get(slot, ("archlab.baselines.",)))
            assert plugin.error is None
            assert dataclasses.is_dataclass(plugin.load().Config)


def test_relu2_comes_from_the_archlab_plugins_distribution() -> None:
    plugin = registry.plugins("ffn")["relu2"]
    assert plugin.entry_point.dist.name == "archlab-plugins"
    assert plugin.distribution.startswith("archlab-plugins ")
    assert plugin.entry_point.value == "archlab_plugins.ffn.relu2:ReLU2"
    cls = registry.get("ffn", "relu2")
    assert cls.__name__ == "ReLU2"
    assert cls.Config().hidden_mult == 4.0


def test_third_party_distribution_is_discovered_and_loads(make_dist) -> None:
    assert "goodffn" not in registry.plugins("ffn")
    make_dist(
        "thirdparty-ffn",
        {"archlab.ffn": {"goodffn": "goodffn_pkg.mod:GoodFFN"}},
        {"goodffn_pkg/__init__.py": "", "goodffn_pkg/mod.py": GOOD_FFN},
        version="2.3",
    )
    plugin = registry.plugins("ffn")["goodffn"]
    assert plugin.distribution == "thirdparty-ffn 2.3"
    assert plugin.error is None
    cls = registry.get("ffn", "goodffn")
    assert cls.__name__ == "GoodFFN"
    assert cls.Config().width == 4
    assert set(registry.loadable("ffn")) >= {"mlp", "relu2", "goodffn"}


def test_clear_cache_forgets_a_distribution_taken_off_the_path(make_dist) -> None:
    root = make_dist(
        "vanishing-ffn",
        {"archlab.ffn": {"vanishing": "vanishing_pkg.mod:GoodFFN"}},
        {"vanishing_pkg/__init__.py": "", "vanishing_pkg/mod.py": GOOD_FFN},
    )
    assert "vanishing" in registry.plugins("ffn")
    sys.path.remove(str(root))  # as if uninstalled (make_dist restores sys.path afterwards)
    assert "vanishing" in registry.plugins("ffn")  # cached until asked to forget
    registry.clear_cache()
    assert "vanishing" not in registry.plugins("ffn")


def test_import_error_is_reported_and_the_other_plugins_still_load(make_dist) -> None:
    make_dist(
        "broken-ffn",
        {"archlab.ffn": {"brokenffn": "brokenffn_pkg.mod:Broken"}},
        {"brokenffn_pkg/__init__.py": "", "brokenffn_pkg/mod.py": BROKEN_FFN},
        version="0.3",
    )
    make_dist(
        "fine-ffn",
        {"archlab.ffn": {"fineffn": "fineffn_pkg.mod:GoodFFN"}},
        {"fineffn_pkg/__init__.py": "", "fineffn_pkg/mod.py": GOOD_FFN},
    )
    broken = registry.plugins("ffn")["brokenffn"]  # announced, not yet imported
    assert "needs the frobnicate package" in broken.error
    assert broken.error.startswith("ImportError")

    with pytest.raises(PluginError) as exc_info:
        broken.load()
    message = str(exc_info.value)
    assert "ffn=brokenffn" in message
    assert "broken-ffn 0.3" in message
    assert "brokenffn_pkg.mod:Broken" in message
    assert "ImportError: brokenffn needs the frobnicate package" in message

    loadable = registry.loadable("ffn")
    assert "brokenffn" not in loadable
    assert {"mlp", "relu2", "fineffn"} <= set(loadable)
    with pytest.raises(PluginError, match="brokenffn"):
        registry.get("ffn", "brokenffn")


def test_strict_mode_raises_for_a_broken_plugin(make_dist, monkeypatch) -> None:
    make_dist(
        "broken-strict",
        {"archlab.ffn": {"brokenstrict": "brokenstrict_pkg.mod:Broken"}},
        {"brokenstrict_pkg/__init__.py": "", "brokenstrict_pkg/mod.py": BROKEN_FFN},
    )
    monkeypatch.setenv("ARCHLAB_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"ffn=brokenstrict .*broken-strict 1\.0.*ImportError"):
        registry.loadable("ffn")
    # Other slots are unaffected.
    assert set(registry.loadable("attention")) == {"mha", "mla"}
    monkeypatch.setenv("ARCHLAB_STRICT_PLUGINS", "0")
    assert "brokenstrict" not in registry.loadable("ffn")


def test_entry_point_naming_a_missing_attribute_is_reported(make_dist) -> None:
    make_dist(
        "typo-ffn",
        {"archlab.ffn": {"typoffn": "typoffn_pkg.mod:GoodFFNN"}},
        {"typoffn_pkg/__init__.py": "", "typoffn_pkg/mod.py": GOOD_FFN},
    )
    error = registry.plugins("ffn")["typoffn"].error
    assert error is not None
    assert error.startswith("AttributeError")
    assert "GoodFFNN" in error
    with pytest.raises(PluginError, match=r"typoffn_pkg\.mod:GoodFFNN.*typo-ffn 1\.0"):
        registry.get("ffn", "typoffn")
    assert "typoffn" not in registry.loadable("ffn")


def test_entry_point_naming_a_missing_module_is_reported(make_dist) -> None:
    make_dist("ghost-ffn", {"archlab.ffn": {"ghostffn": "ghostffn_pkg.nowhere:Ghost"}}, {})
    error = registry.plugins("ffn")["ghostffn"].error
    assert error.startswith("ModuleNotFoundError")
    assert "ghostffn_pkg" in error


@pytest.mark.parametrize("attr", ["NoConfig", "NotADataclass"])
def test_class_without_config_dataclass_is_reported_with_the_fix(make_dist, attr: str) -> None:
    make_dist(
        f"noconfig-{attr.lower()}",
        {"archlab.ffn": {"noconfig": f"noconfig_pkg.mod:{attr}"}},
        {"noconfig_pkg/__init__.py": "", "noconfig_pkg/mod.py": NO_CONFIG_FFN},
    )
    plugin = registry.plugins("ffn")["noconfig"]
    assert f"noconfig_pkg.mod:{attr} has no `Config` dataclass" in plugin.error
    assert "nested @dataclass named Config" in plugin.error
    with pytest.raises(PluginError, match="nested @dataclass named Config"):
        plugin.load()
    assert "noconfig" not in registry.loadable("ffn")


def test_two_distributions_claiming_one_name_break_only_that_name_naming_both(make_dist) -> None:
    files = {"dupffn_pkg/__init__.py": "", "dupffn_pkg/mod.py": GOOD_FFN}
    make_dist("dup-one", {"archlab.ffn": {"dupffn": "dupffn_pkg.mod:GoodFFN"}}, files)
    make_dist("dup-two", {"archlab.ffn": {"dupffn": "dupffn_pkg.other:GoodFFN"}}, {})
    with pytest.raises(PluginError) as exc_info:
        registry.get("ffn", "dupffn")  # even though dup-one's class would load
    message = str(exc_info.value)
    assert "two plugins claim ffn=dupffn" in message
    for part in ("dup-one 1.0", "dup-two 1.0", "'dupffn_pkg.mod:GoodFFN'", "'dupffn_pkg.other:GoodFFN'"):
        assert part in message
    assert registry.plugins("ffn")["dupffn"].error in message
    loadable = registry.loadable("ffn")  # the slot's other plugins still load
    assert "dupffn" not in loadable and {"mlp", "relu2"} <= set(loadable)


def test_a_third_party_claiming_a_baseline_name_breaks_that_name(make_dist) -> None:
    make_dist("shadow-mlp", {"archlab.ffn": {"mlp": "shadow_pkg.mod:GoodFFN"}}, {})
    with pytest.raises(PluginError, match="ffn=mlp") as exc_info:
        registry.get("ffn", "mlp")
    assert "'archlab.baselines.ffn:MLP' from archlab 0.1.0" in str(exc_info.value)
    assert "'shadow_pkg.mod:GoodFFN' from shadow-mlp 1.0" in str(exc_info.value)
    assert "relu2" in registry.loadable("ffn")


def test_get_unknown_name_lists_the_available_names() -> None:
    with pytest.raises(ConfigError) as exc_info:
        registry.get("ffn", "nope")
    err = exc_info.value
    assert err.key == "ffn"
    assert err.value == "nope"
    assert "ffn='nope'" in str(err)
    assert ", ".join(sorted(registry.plugins("ffn"))) in str(err)


def test_unknown_slot_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="one of the slots memory, attention, ffn"):
        registry.plugins("attentoin")


def test_preset_paths_come_from_entry_points(make_dist) -> None:
    assert "pkg://archlab_plugins.conf" in registry.preset_paths()
    make_dist(
        "extra-presets",
        {"archlab.presets": {"extra": "extra_presets_pkg.conf"}},
        {"extra_presets_pkg/__init__.py": "", "extra_presets_pkg/conf/__init__.py": ""},
    )
    assert "pkg://extra_presets_pkg.conf" in registry.preset_paths()
