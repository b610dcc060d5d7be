"""``archlab new-plugin SLOT NAME [--dir DIR]``: a new, pip-installable plugin distribution.

    DIR/pyproject.toml                      archlab-NAME: the entry point and the presets entry point
    DIR/archlab_NAME/NAME.py                a minimal correct plugin of SLOT with a typed Config
    DIR/archlab_NAME/conf/SLOT/NAME_X.yaml  a Hydra preset (``SLOT=NAME_X``)
    DIR/tests/test_NAME.py                  archlab's conformance suite for SLOT
    DIR/README.md

After ``pip install -e DIR`` the plugin is listed by ``archlab plugins``, trains with
``archlab train SLOT=NAME`` and passes its tests, with no edit to archlab. The module
templates are ``archlab/templates/<slot>.py.tmpl``.
"""

from __future__ import annotations

import argparse
import keyword
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

from archlab import registry, slots
from archlab.errors import ConfigError


@dataclass(frozen=True)
class SlotTemplate:
    """What the scaffold writes for one slot: the class-name suffix and one preset (suffix, fields)."""

    suffix: str
    preset: str
    fields: dict[str, object]


TEMPLATES = {
    "attention": SlotTemplate("Attention", "bias", {"bias": True}),
    "ffn": SlotTemplate("FFN", "wide", {"hidden_mult": 6.0}),
    "residual": SlotTemplate("Residual", "half", {"init_scale": 0.5}),
    "linear": SlotTemplate("Linear", "small_init", {"init_scale": 0.5}),
    "norm": SlotTemplate("Norm", "eps5", {"eps": 1e-5}),
    "position": SlotTemplate("Position", "long", {"theta": 500000.0}),
    "head": SlotTemplate("Head", "softcap", {"softcap": 30.0}),
    "memory": SlotTemplate("Memory", "wide", {"table_dim": 64}),
}
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


def check_name(slot: str, name: str) -> None:
    """Refuse unknown slots, names that are not lowercase identifiers, and names already installed."""
    if slot not in TEMPLATES:
        known = slot in slots.names()
        raise ConfigError(
            "SLOT",
            slot,
            ("a slot with a template (it has none yet), " if known else "a model slot with a template, ")
            + f"one of: {', '.join(TEMPLATES)}",
        )
    if not NAME_PATTERN.fullmatch(name) or keyword.iskeyword(name):
        raise ConfigError("NAME", name, "a lowercase Python identifier, not a keyword (e.g. gated_attn)")
    installed = registry.plugins(slot)
    if name in installed:
        raise ConfigError(
            "NAME",
            name,
            f"a name not yet installed for slot {slot} ({name} is {installed[name].entry_point.value} "
            f"from {installed[name].distribution}; installed: {', '.join(sorted(installed))})",
        )


def class_name(slot: str, name: str) -> str:
    """``gated`` in slot attention -> ``GatedAttention``."""
    return "".join(part.capitalize() for part in name.split("_")) + TEMPLATES[slot].suffix


def yaml_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def render(slot: str, name: str) -> dict[str, str]:
    """Relative path -> text of every file of the new distribution."""
    template, pkg = TEMPLATES[slot], f"archlab_{name}"
    preset = f"{name}_{template.preset}"
    subs = {"slot": slot, "name": name, "cls": class_name(slot, name), "pkg": pkg, "preset": preset}
    subs["dist"] = f"archlab-{name.replace('_', '-')}"
    source = files("archlab.templates")

    def fill(template_name: str) -> str:
        return Template(source.joinpath(template_name).read_text()).substitute(subs)

    fields = "".join(f"{key}: {yaml_value(value)}\n" for key, value in template.fields.items())
    return {
        "pyproject.toml": fill("pyproject.toml.tmpl"),
        "README.md": fill("README.md.tmpl"),
        f"{pkg}/__init__.py": f'"""archlab plugin {slot}={name}."""\n',
        f"{pkg}/{name}.py": fill(f"{slot}.py.tmpl"),
        f"{pkg}/conf/__init__.py": "",
        f"{pkg}/conf/{slot}/{preset}.yaml": f"defaults:\n  - {name}\n  - _self_\n{fields}",
        f"tests/test_{name}.py": fill("test.py.tmpl"),
    }


def scaffold(slot: str, name: str, directory: Path) -> list[Path]:
    """Check the name, then write the distribution into ``directory`` (new or empty)."""
    check_name(slot, name)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError("--dir", str(directory), "a new or empty directory")
    written = []
    for rel, text in render(slot, name).items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="archlab new-plugin",
        description="Write a new pip-installable plugin distribution: entry point, module with a typed "
        "Config, a Hydra preset and a conformance test.",
    )
    parser.add_argument("slot", help=f"one of: {', '.join(TEMPLATES)}")
    parser.add_argument("name", help="the plugin's name, as in SLOT=NAME (a lowercase identifier)")
    parser.add_argument("--dir", type=Path, help="where to write it (default: ./archlab-NAME)")
    opts = parser.parse_args(args)
    directory = opts.dir or Path(f"archlab-{opts.name.replace('_', '-')}")
    written = scaffold(opts.slot, opts.name, directory)
    print("\n".join(f"wrote {path}" for path in written))
    print(
        f"\nnext: pip install -e {directory} && archlab plugins && pytest {directory}/tests\n"
        f"      archlab train {opts.slot}={opts.name} trainer.max_steps=20 logger.backend=none"
    )
    return 0
