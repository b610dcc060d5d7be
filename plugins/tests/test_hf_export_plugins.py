"""``archlab export --hf`` for the first-party plugins: MLA and MoE load as transformers' DeepseekV3 (or
Mixtral), relu2 as Arcee, with archlab's logits (max abs diff <= 1e-5 in fp32) and greedy tokens; the
plugins no stock class holds are refused with their slot and name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archlab.config import compose
from archlab.errors import ArchlabError
from archlab.hf_dir import write_dir
from archlab.model import build_student
from archlab.testing.hf import hf_round_trip, scrambled
from archlab.tokenizer import ByteTokenizer

pytest.importorskip("transformers")

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.context=32"]
MLA = [
    "attention=mla",
    "attention.kv_lora_rank=16",
    "attention.qk_nope_head_dim=8",
    "attention.v_head_dim=12",
]
AUX_FREE = ["ffn=moe", "ffn.router=aux_free", "ffn.n_experts=6", "ffn.top_k=2"]


def student(*overrides: str):
    torch.manual_seed(0)
    model = scrambled(build_student(compose([*SMALL, *overrides])))
    with torch.no_grad():  # a selection bias that changes which experts are chosen (DeepSeek-V3's b)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(1)))
    return model


@pytest.mark.slow  # 5-17 s each on 2 shared cores: importing and building DeepseekV3 / Mixtral dominates
@pytest.mark.parametrize(
    ("overrides", "architecture"),
    [
        (MLA, "DeepseekV3ForCausalLM"),  # every layer dense: first_k_dense_replace = n_layers
        ([*MLA, "attention.q_lora_rank=12", *AUX_FREE, "ffn.route_scale=2.5"], "DeepseekV3ForCausalLM"),
        ([*MLA, *AUX_FREE, "ffn.n_shared_experts=0", "ffn.renormalize=false"], "DeepseekV3ForCausalLM"),
        (
            ["ffn=moe", "ffn.n_experts=6", "ffn.n_shared_experts=0", "attention.n_kv_heads=2"],
            "MixtralForCausalLM",
        ),
        (["ffn=relu2", "ffn.bias=true"], "ArceeForCausalLM"),
    ],
    ids=["mla-dense", "mla-qlora-moe-aux-free", "mla-moe-unshared", "gqa-moe-softmax-mixtral", "relu2-arcee"],
)
def test_a_plugin_student_has_the_same_logits_and_greedy_tokens_in_transformers(
    overrides, architecture, tmp_path: Path
) -> None:
    trip = hf_round_trip(student(*overrides), tmp_path / "hf")
    assert trip.architecture == architecture
    assert trip.max_abs_logit > 1.0
    assert trip.max_logit_diff <= 1e-5, f"max abs logit diff {trip.max_logit_diff:.3g}"
    assert trip.same_greedy_tokens, (trip.archlab_tokens, trip.hf_tokens)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["residual=attnres"], "residual=attnres"),
        (["residual=denseformer"], "residual=denseformer"),
        (["residual=hyper"], "residual=hyper"),
        (["head=medusa"], "head=medusa"),
        (["memory=engram", "memory.layers=[1]"], "memory=engram"),
        (["ffn=moe", "ffn.router=expert_choice"], "router=expert_choice"),
        ([*AUX_FREE, "ffn.capacity_factor=1.25", *MLA], "capacity_factor=1.25"),
        (["ffn=moe"], "router=softmax_topk"),  # softmax routing and shared experts: no one class has both
    ],
)
def test_a_plugin_without_a_stock_class_is_refused_naming_slot_and_plugin(
    overrides, named, tmp_path: Path
) -> None:
    with pytest.raises(ArchlabError) as info:
        write_dir(build_student(compose([*SMALL, *overrides])), ByteTokenizer(), tmp_path / "hf", force=False)
    assert named in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "hf").exists()
