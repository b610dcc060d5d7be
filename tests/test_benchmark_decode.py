"""The decode benchmark still runs end to end (tiny settings, no timing assertions)."""

from __future__ import annotations

import json

import pytest

from archlab import registry

BENCHMARK = "decode"
HAS_MLA = "mla" in registry.plugins("attention")
# head_dim 8: MLA's default ranks (sized for head_dim 32) would outweigh the whole tiny student
MLA_SMALL = [
    "mla:attention.kv_lora_rank=16",
    "mla:attention.qk_nope_head_dim=8",
    "mla:attention.qk_rope_head_dim=4",
    "mla:attention.v_head_dim=8",
]
SHAPE = [
    "--contexts",
    "32",
    "64",
    "--steps",
    "3",
    "--warmup",
    "1",
    "--repeats",
    "1",
    "--d-model",
    "64",
    "--n-layers",
    "1",
    "--n-heads",
    "8",
]
TINY = [*SHAPE, *(arg for item in MLA_SMALL for arg in ("--set", item))]


@pytest.fixture(scope="module")
def results(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "result.json"
    return bench.main([*TINY, "--json", str(out)]), out


def test_benchmark_runs_and_writes_json(results):
    r, out = results
    expected = ["mha", "gqa", "mqa", *(["mla"] if HAS_MLA else [])]
    assert list(r["variants"]) == expected
    assert r["contexts"] == [32, 64] and r["dims"]["context"] == 64
    for v in r["variants"].values():
        for L, c in v["contexts"].items():
            assert c["ms_per_token"] > 0 and c["tokens_per_s"] > 0 and c["ms_min"] > 0
            assert c["kv_bytes"] == v["kv_bytes_per_token"] * int(L) > 0
        assert v["no_cache"]["context"] == 32
        assert v["no_cache"]["tokens_per_s"] > 0 and v["no_cache"]["cache_speedup"] > 0
        assert v["kv_bytes_per_token"] == v["kv_bytes_per_token_cache"] > 0
    saved = json.loads(out.read_text())
    assert saved["variants"]["mha"]["params_non_embedding"] == r["mha_params_non_embedding"]


def test_parameter_counts_match_within_tolerance(results):
    r, _ = results
    reference = r["mha_params_non_embedding"]
    for name, v in r["variants"].items():
        assert abs(v["params_non_embedding"] / reference - 1) <= r["tolerance"] == 0.02, name
        assert v["params_vs_mha"] == pytest.approx(v["params_non_embedding"] / reference - 1)
        assert v["ffn_hidden"] > 0
    hidden = {name: v["ffn_hidden"] for name, v in r["variants"].items()}
    assert hidden["mha"] < hidden["gqa"] < hidden["mqa"]  # smaller attention, wider FFN


def test_kv_bytes_per_token_order(results):
    kv = {name: v["kv_bytes_per_token"] for name, v in results[0]["variants"].items()}
    assert kv["mqa"] < kv["gqa"] < kv["mha"]
    if HAS_MLA:
        assert kv["mla"] < kv["gqa"]
    # d_model 64, 8 heads of 8, one layer, float32: K and V of 8 / 2 / 1 KV heads
    assert (kv["mha"], kv["gqa"], kv["mqa"]) == (4 * 2 * 8 * 8, 4 * 2 * 2 * 8, 4 * 2 * 1 * 8)


def test_report_is_one_table(bench, results):
    text = bench.format_report(results[0])
    assert "tok/s@32" in text and "KV@64" in text and "no-cache@32" in text
    for name in results[0]["variants"]:
        assert f"\n  {name} " in text


def test_variants_and_sets_are_parsed(bench):
    args = bench.parse_args([*TINY, "--variants", "mqa", "mha", "--set", "gqa:attention.bias=true"])
    assert args.variants == ["mqa", "mha"]
    assert args.sets["gqa"] == ["attention.bias=true"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--set", "nope:attention.bias=true"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--contexts", "8", "--steps", "8"])  # no room for a prompt
    assert bench.gqa_kv_heads(8) == 2 and bench.gqa_kv_heads(4) == 2 and bench.gqa_kv_heads(16) == 4


def test_unmatchable_variant_is_refused(bench):
    if not HAS_MLA:
        pytest.skip("attention plugin mla is not installed")
    # MLA's default ranks hold more parameters than the whole d_model 64 mha student
    with pytest.raises(SystemExit, match="more non-embedding parameters"):
        bench.build_variants(bench.parse_args([*SHAPE, "--variants", "mla"]))
