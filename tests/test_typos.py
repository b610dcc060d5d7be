"""A mistyped override is answered with the nearest thing that exists (archlab.typos): one line, exit 2,
through the CLI, before any run starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from archlab import cli, typos

QUIET_HYDRA = ("hydra/job_logging=none", "hydra/hydra_logging=none")


def train_error(tmp_path: Path, capsys, *overrides: str) -> str:
    """``archlab train OVERRIDES``'s error line; checks it exits 2 with no traceback and trains nothing."""
    run_dir = tmp_path / "run"
    args = ["train", *QUIET_HYDRA, f"hydra.run.dir={run_dir}", "trainer.max_steps=1", *overrides]
    try:  # an error found by validation leaves the Hydra job as SystemExit; one of composition returns
        code = cli.main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert not (run_dir / "metrics.jsonl").exists()
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("attention=mlq", "attention=mlq: attention has no option 'mlq'; did you mean 'mla'?"),
        ("trainer.max_stepz=1", "no key 'max_stepz' in trainer; did you mean 'max_steps'?"),
        ("attentio=mla", "attentio: no key 'attentio' at the top level; did you mean 'attention'?"),
        ("+trainer.max_step=9", "trainer.max_step=9 is not allowed: expected a key of trainer; did you"),
        ("+attention.n_kv_head=1", "expected a key of the mha attention plugin; did you mean 'n_kv_heads'?"),
        ("+seedd=1", "seedd=1 is not allowed: expected a top-level key of the config; did you mean 'seed'?"),
        ("+trainr.lr=1", "expected a top-level key of the config; did you mean 'trainer'?"),
    ],
)
def test_a_typo_is_answered_with_the_nearest_name(override: str, said: str, tmp_path, capsys) -> None:
    assert said in train_error(tmp_path, capsys, override)


def test_a_key_is_matched_against_the_plugin_the_other_overrides_chose(tmp_path, capsys) -> None:
    """``ffn.routr`` exists nowhere in the default MLP; it is one edit from the MoE's ``router``."""
    assert "did you mean 'router'?" in train_error(tmp_path, capsys, "ffn=moe", "ffn.routr=softmax")


def test_with_nothing_near_every_key_is_listed(tmp_path, capsys) -> None:
    line = train_error(tmp_path, capsys, "trainer.zzzz=1")
    assert "did you mean" not in line and "its keys: max_steps, batch_size," in line


def test_a_key_added_to_a_dataclass_section_is_refused_not_ignored(tmp_path, capsys) -> None:
    """Hydra's ``+`` adds any key to a dataclass node; nothing would read ``trainer.foo``."""
    assert train_error(tmp_path, capsys, "+trainer.foo=1").startswith("archlab: error: trainer.foo=1 ")


@pytest.mark.parametrize(("a", "b", "edits"), [("kitten", "sitting", 3), ("mlq", "mla", 1), ("", "abc", 3)])
def test_edit_distance_is_levenshteins(a: str, b: str, edits: int) -> None:
    assert typos._edits(a, b) == typos._edits(b, a) == edits
