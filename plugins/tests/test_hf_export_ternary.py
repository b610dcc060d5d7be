"""``archlab export --hf`` of ternary students (``linear=ternary linear.subln=true``) as BitNetForCausalLM.

A quantised network is discontinuous: float noise of ~1e-7 between the two implementations (transformers'
float32 RoPE tables, its q/k/v and gate/up as separate matmuls, weight_scale applied after the matmul)
moves an activation across an int8 rounding edge now and then, and every later position of that row then
differs by ~1e-2. So the logits are compared row by row before the first position where any projection's
int8 codes differ, which must be a code at a rounding edge; there the max abs diff must be <= 1e-5 (fp32),
on at least half the positions. Greedy ``generate`` must give ``archlab.generate``'s tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from archlab_plugins.linear.ternary import TernaryLinear
from torch import Tensor, nn

from archlab import cli
from archlab.config import compose
from archlab.errors import ArchlabError
from archlab.hf_dir import write_dir
from archlab.hf_export import assemble
from archlab.loggers import RunInfo
from archlab.model import build_student
from archlab.testing.hf import hf_round_trip, scrambled
from archlab.tokenizer import ByteTokenizer
from archlab.trainer import Trainer

transformers = pytest.importorskip("transformers")

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=32"]
TERNARY = ["linear=ternary", "linear.subln=true"]
#: One transformers projection per archlab one (q_proj reads qkv's input, gate_proj up's), in call order.
HF_READS = ("q_proj", "o_proj", "gate_proj", "down_proj")


def student(*overrides: str) -> nn.Module:
    torch.manual_seed(0)
    return scrambled(build_student(compose([*SMALL, *TERNARY, *overrides])))


def scaled_inputs(model: nn.Module, tokens: Tensor, takes) -> tuple[Tensor, list[Tensor]]:
    """(logits, x·127/max|x| of every quantised projection input, in call order): the value whose
    rounding is the projection's int8 code. ``takes(name, module)`` picks the projections, and the input
    of a projection with its own norm is read after it."""
    seen = []

    def hook(module, args, out) -> None:
        x = module.normalized(args[0]) if isinstance(module, TernaryLinear) else args[0]
        seen.append(x * (127 / x.abs().amax(-1, keepdim=True).clamp_min(1e-5)))  # as both quantisers do

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if takes(name, m)]
    with torch.no_grad():
        out = model(tokens)
    for handle in handles:
        handle.remove()
    return getattr(out, "logits", out), seen


def agreeing_prefix_diff(model: nn.Module, folder: Path, tokens: Tensor) -> tuple[float, float]:
    """(max |logit diff| over each row's positions before its first differing int8 code, share of the
    positions compared); asserts that each first differing code sits at a rounding edge."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    ours, ours_x = scaled_inputs(model, tokens, lambda name, m: isinstance(m, TernaryLinear))
    theirs, hf_x = scaled_inputs(hf.eval(), tokens, lambda name, m: name.rsplit(".", 1)[-1] in HF_READS)
    assert len(ours_x) == len(hf_x) == 4 * model.dims.n_layers
    diffs, compared = [], 0
    for row in range(tokens.shape[0]):
        flips = [
            ((a[row].round() != b[row].round()).any(-1), a[row], b[row])
            for a, b in zip(ours_x, hf_x, strict=True)
        ]
        first = min((int(f.nonzero()[0]) for f, _, _ in flips if f.any()), default=tokens.shape[1])
        for flipped, a, b in flips:  # the first differing code: noise at a rounding edge, not a layout
            if first < tokens.shape[1] and flipped[first]:
                edge = a[first].round() != b[first].round()
                assert (a[first] - b[first])[edge].abs().max() < 1e-3, "a code differs away from an edge"
                break
        diffs.append((ours[row, :first] - theirs[row, :first]).abs().max().item() if first else 0.0)
        compared += first
    return max(diffs), compared / tokens.numel()


@pytest.mark.slow  # ~10 s each on 2 shared cores: transformers compiles BitNet's ActQuant (torch.compile)
@pytest.mark.parametrize(
    "overrides",
    [
        (),  # MHA, RoPE, RMSNorm, SwiGLU, tied head
        ("attention.n_kv_heads=2", "head.tied=false", "attention.bias=true"),  # GQA, bias as b / γ
        ("attention.n_kv_heads=1", "norm.eps=1e-5", "linear.norm_eps=1e-5", "position.theta=500"),
    ],
    ids=["mha-tied", "gqa-untied-bias", "mqa-eps-theta"],
)
def test_a_ternary_student_has_the_same_logits_and_greedy_tokens_as_bitnet(overrides, tmp_path: Path) -> None:
    model = student(*overrides)
    trip = hf_round_trip(model, tmp_path / "hf")
    assert trip.architecture == "BitNetForCausalLM"
    assert trip.max_abs_logit > 1.0  # the comparison is at a scale where a wrong layout shows
    assert trip.same_greedy_tokens, (trip.archlab_tokens, trip.hf_tokens)
    tokens = torch.randint(0, 256, (4, model.dims.context), generator=torch.Generator().manual_seed(2))
    diff, compared = agreeing_prefix_diff(model, tmp_path / "hf", tokens)
    assert compared >= 0.5, f"int8 codes differ early: only {compared:.0%} of the positions compared"
    assert diff <= 1e-5, f"max abs logit diff {diff:.3g} before the first differing int8 code"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["linear.subln=false"], "linear.subln=false"),
        (["linear.activation_bits=4"], "linear.activation_bits=4"),
        (["linear.eps=1e-4"], "linear.eps=0.0001"),
        (["linear.norm_eps=1e-5"], "rms_norm_eps=1e-05"),  # the block norms say 1e-6: one field
        (["head.tied=false", "model.linear_overrides={head: ternary}"], "role head"),
        (["model.linear_overrides={attention: dense}"], "linear=ternary fits bitnet"),
        (
            ["model.linear_overrides={attention.qkv: dense}"],
            "missing ['model.layers.0.self_attn.k_proj.weight_scale'",
        ),
        (["ffn.bias=true"], "ffn.bias=false"),
        (["ffn.activation=gelu"], "ffn.activation=swiglu"),
        (["ffn=relu2"], "ffn=relu2 fits arcee"),
        (["ffn=moe", "ffn.n_shared_experts=0"], "linear=ternary fits bitnet"),
        (["attention=mla"], "linear=ternary fits bitnet"),
    ],
)
def test_a_ternary_student_without_a_bitnet_layout_is_refused_in_one_line(
    overrides, named, tmp_path: Path
) -> None:
    with pytest.raises(ArchlabError) as info:
        write_dir(
            build_student(compose([*SMALL, *TERNARY, *overrides])),
            ByteTokenizer(),
            tmp_path / "hf",
            force=False,
        )
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow  # two 3-step training runs
def test_the_cli_exports_a_trained_subln_run_and_refuses_a_bitlinear_one_with_exit_2(
    tmp_path: Path, capsys
) -> None:
    train = [
        "trainer.max_steps=3",
        "trainer.batch_size=2",
        "trainer.eval_tokens=128",
        "trainer.progress=false",
    ]
    train += ["logger=none", "teacher=none", "objective=ce", "data.max_bytes=100000"]
    for name, subln in (("subln", "true"), ("bitlinear", "false")):
        cfg = compose(
            [
                *SMALL,
                *train,
                f"data.cache_dir={tmp_path / 'cache'}",
                "linear=ternary",
                f"linear.subln={subln}",
            ]
        )
        Trainer(cfg, RunInfo(run_dir=tmp_path / name, name=name)).run()
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "subln"), "--hf", str(tmp_path / "hf")]) == 0
    assert "BitNetForCausalLM" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "bitlinear"), "--hf", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("archlab: error:") and "linear.subln=false" in err and "\n" not in err
    assert not (tmp_path / "hf2").exists()


def test_a_student_reloaded_from_its_packed_file_exports_the_same_tensors() -> None:
    model = student("attention.bias=true")
    _, _, before = assemble(model)
    for module in model.modules():
        if isinstance(module, TernaryLinear):
            module.load_packed_state(module.packed_state())  # W̃ as the weight, γ frozen
    _, _, after = assemble(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [
        k for k in before if not torch.equal(before[k], after[k])
    ]
    assert set(before["model.layers.0.self_attn.q_proj.weight"].unique().tolist()) <= {-1.0, 0.0, 1.0}
