"""head=medusa against independent computations: the heads' losses written out position by position
(label shift, 0.8^k weights, distillation), init equality with the base head, accounting, Medusa-1
freezing through trainer.train_only, exact greedy decoding with MLA, and the CLI end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from archlab_plugins.head.medusa import MedusaHead

from archlab import cli, registry
from archlab.config import compose
from archlab.errors import ConfigError
from archlab.generate import generate
from archlab.loggers import RunInfo
from archlab.model import build_student
from archlab.optim import freeze_except
from archlab.soft_targets import SoftTargets
from archlab.speculative import generate_speculative
from archlab.trainer import Trainer

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context=32", "head=medusa"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def student(*overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_student(compose([*SMALL, *overrides]))


def perturb(model, std: float = 0.5) -> None:
    """Non-zero head weights (init makes every head the base head), so heads differ from each other."""
    with torch.no_grad():
        for name, p in model.head.named_parameters():
            if name.startswith(("heads.", "deltas.")):
                p.normal_(std=std)


def test_discovery(capsys) -> None:
    assert registry.get("head", "medusa") is MedusaHead
    assert cli.main(["plugins"]) == 0
    assert "medusa" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides", [(), ("head.projection=own",), ("head.tied=false", "head.num_layers=2")]
)
def test_every_head_equals_the_base_head_at_init(overrides) -> None:
    model = student(*overrides)
    h = torch.randn(2, 5, 32)
    drafts = model.head.draft_logits(h)
    assert drafts.shape == (2, 5, 4, 256)
    for k in range(4):
        assert torch.equal(drafts[:, :, k], model.head(h, model.new_context(torch.zeros(2, 5).long())))


def test_heads_and_layers_have_separate_weights() -> None:
    model = student("head.num_layers=2", "head.projection=own")
    weights = [p for n, p in model.head.named_parameters() if n.startswith(("heads.", "deltas."))]
    assert len(weights) == 4 * (2 * 2 + 1)
    assert len({p.data_ptr() for p in weights}) == len(weights)


def reference_loss(drafts, tokens, decay: float = 0.8):
    """Σ_k decay^k · mean_t −log q^(k)_t(tokens[t + k + 1]), looping over every (b, t) pair."""
    b, t, K, _ = drafts.shape
    total = 0.0
    for k in range(1, K + 1):
        terms = [
            -drafts[i, s, k - 1].double().log_softmax(-1)[tokens[i, s + k + 1]]
            for i in range(b)
            for s in range(t)
            if s + k + 1 < tokens.shape[1]
        ]
        total += decay**k * torch.stack(terms).mean()
    return total


def test_head_i_pairs_logits_at_t_with_token_t_plus_2_plus_i() -> None:
    model = student("head.loss_weight=0.5")
    perturb(model)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    ctx = model.new_context(x)
    hidden = []
    hook = model.final_norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    model(x, ctx)
    hook.remove()
    model.aux_losses(ctx, y)
    value, weight = ctx.losses["medusa"]
    drafts = model.head.draft_logits(hidden[0]).detach()
    assert weight == 0.5
    assert abs(float(value.detach()) - float(reference_loss(drafts, tokens))) < 1e-5
    top1 = (drafts[:, :-1, 0].argmax(-1) == tokens[:, 2:]).double().mean()
    assert ctx.metrics["medusa/head1_top1"] == pytest.approx(float(top1))
    assert set(ctx.metrics) >= {f"medusa/head{k}_{m}" for k in range(1, 5) for m in ("loss", "top1")}


def test_distilled_head_loss_is_kl_to_the_teacher_at_the_same_token() -> None:
    model = student("head.distill=true", "head.num_heads=2")
    perturb(model)
    x = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    teacher = torch.randn(1, 8, 256).log_softmax(-1)  # teacher[t] is the distribution of x_{t+1}
    ctx = model.new_context(x)
    hidden = []
    hook = model.final_norm.register_forward_hook(lambda _m, _i, out: hidden.append(out))
    model(x, ctx)
    hook.remove()
    model.aux_losses(ctx, x, SoftTargets.from_logprobs(teacher, 256))  # complete: k = V
    drafts = model.head.draft_logits(hidden[0]).detach().double()
    expected = 0.0
    for k in (1, 2):  # head k at t predicts x_{t+k+1}, whose teacher distribution is teacher[t + k]
        terms = [
            F.kl_div(
                drafts[0, s, k - 1].log_softmax(-1),
                teacher[0, s + k].double(),
                log_target=True,
                reduction="sum",
            )
            for s in range(8 - k)
        ]
        expected += 0.8**k * torch.stack(terms).mean()
    assert abs(float(ctx.losses["medusa"][0].detach()) - float(expected)) < 1e-4


@pytest.mark.parametrize("overrides", [(), ("head.projection=own", "head.tied=false", "head.num_layers=3")])
def test_num_params_matches_the_built_module(overrides) -> None:
    model = student(*overrides)
    cfg = registry.configured("head", compose([*SMALL, *overrides]).head)[1]
    assert cfg.num_params(model.dims) == sum(p.numel() for p in model.head.parameters())


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("head.num_heads=0", "head.num_heads"),
        ("head.projection=copy", "head.projection"),
        ("head.decay=0", "head.decay"),
        ("head.loss_weight=-1", "head.loss_weight"),
    ],
)
def test_bad_config_is_refused(override, key) -> None:
    with pytest.raises(ConfigError, match=key):
        student(override)


def tiny_run(tmp_path, *overrides: str, head: str = "medusa", name: str = "run"):
    cfg = compose(
        [
            *(o for o in SMALL if not o.startswith("head=")),
            f"head={head}",
            "trainer.max_steps=3",
            "trainer.batch_size=2",
            "trainer.eval_tokens=128",
            "trainer.progress=false",
            "trainer.warmup_fraction=0",
            "logger=none",
            "teacher=none",
            "objective=ce",
            "data.max_bytes=100000",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ]
    )
    return Trainer(cfg, RunInfo(run_dir=tmp_path / name, name=name))


@pytest.mark.slow  # two training runs
def test_medusa_1_trains_only_heads_on_a_trained_backbone_and_eval_reports_head_accuracy(tmp_path) -> None:
    backbone = tiny_run(tmp_path, head="lm", name="backbone")
    backbone.run()
    trained = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    trainer = tiny_run(
        tmp_path, f"trainer.init_from={tmp_path / 'backbone'}", "trainer.train_only=[head.heads]"
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(torch.equal(before[n], p) for n, p in trained.items())  # init_from: every backbone tensor
    summary = trainer.run()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("head.heads.") for n in changed)
    assert 0 <= summary["val/medusa/head1_top1"] <= 1 and math.isfinite(summary["val/aux/medusa"])
    with pytest.raises(ConfigError, match="trainer.train_only"):
        freeze_except(student(), ["heads"])  # no such module: head.heads is


@pytest.mark.parametrize("absorb", [True, False])
def test_greedy_with_mla_is_plain_greedy(absorb) -> None:
    model = student("attention=mla", f"attention.absorb={absorb}", "model.n_layers=2").eval()
    perturb(model, std=0.2)
    with torch.no_grad():
        model.embed.weight.normal_(std=1.0)  # decisive argmaxes
    prompt = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(2))
    tokens, stats = generate_speculative(model, prompt, 16, widths=(3, 2))
    assert torch.equal(tokens, generate(model, prompt, 16))
    assert 1 <= stats.mean_accepted_length <= 3


@pytest.mark.slow
def test_train_then_generate_with_medusa_from_the_cli(tmp_path) -> None:
    tiny_run(tmp_path, "model.context=64").run()
    cmd = [sys.executable, "-m", "archlab.cli", "generate", str(tmp_path / "run"), "--prompt", "def f("]
    result = subprocess.run(
        [*cmd, "--max-new-tokens", "20", "--draft", "--draft-tree", "2,2", "--compare"],
        capture_output=True,
        text=True,
        env={**os.environ},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "tokens per base forward" in result.stderr and "identical to plain greedy: yes" in result.stderr
    bad = subprocess.run(
        [*cmd, "--medusa", "--medusa-tree", "4,0"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "--draft-tree='4,0' is not allowed" in bad.stderr
    assert "--medusa is now --draft" in bad.stderr  # the old flags still work, for one release
