"""The reference ladder's family (archlab.ladder): every shipped rung file follows the rule, every count it
states is the built module's, and the default student's shape is one of the rungs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from archlab import ladder
from archlab.config import compose
from archlab.metrics import model_metrics
from archlab.model import build_student

RUNG_DIR = Path(ladder.__file__).parents[1] / "conf" / "rung"


def non_embedding(cfg) -> int:
    return model_metrics(build_student(cfg), torch.float32)["params/non_embedding"]


def test_the_shipped_rungs_are_the_rule_s() -> None:
    assert sorted(p.stem for p in RUNG_DIR.glob("*.yaml")) == [ladder.rung_name(k) for k in ladder.RUNGS]


@pytest.mark.parametrize("k", ladder.RUNGS)
def test_each_rung_file_is_the_rule_and_states_the_built_count(k: int) -> None:
    text = (RUNG_DIR / f"{ladder.rung_name(k)}.yaml").read_text()
    model = yaml.safe_load(text)["model"]
    # the rule written plainly: k layers, k heads of 32, d_model = 32·k
    assert model == {"d_model": 32 * k, "n_layers": k, "n_heads": k}
    n = non_embedding(compose([f"+rung={ladder.rung_name(k)}"]))
    assert text == ladder.rung_yaml(k, n)  # the comment's count is the module's
    # dense pre-norm blocks: 4d² attention, a SwiGLU FFN of 3·d·h (h = 8/3·d rounded up to a multiple of
    # 8) and 2 RMSNorm gains per layer, one final norm
    d = 32 * k
    hidden = 8 * math.ceil(8 * d / 3 / 8)
    assert n == k * (4 * d * d + 3 * d * hidden + 2 * d) + d


def test_the_default_student_is_the_baseline_rung() -> None:
    tiny = compose([]).model
    assert ladder.rung_shape(ladder.BASELINE_RUNG) == ladder.Shape(tiny.d_model, tiny.n_layers, tiny.n_heads)
    assert non_embedding(compose([])) == non_embedding(compose([f"+rung=k{ladder.BASELINE_RUNG}"]))


def test_rungs_grow_about_geometrically() -> None:
    sizes = [non_embedding(compose([f"+rung={ladder.rung_name(k)}"])) for k in ladder.RUNGS]
    assert sizes == sorted(sizes) and sizes[-1] / sizes[0] > 20
