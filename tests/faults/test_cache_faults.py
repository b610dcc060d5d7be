"""Faults in the corpus-token and soft-target caches (issue 18): nothing lost, nothing silently wrong.

Damaged files and meta.json are rebuilt with a warning; a build killed at any point
leaves no cache that a later run trusts wrongly; a lock held by another process is
waited on by name and given up on after ``distill.lock_timeout``; published caches
follow the umask, are readable when read-only, and a build that cannot fit is refused.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from archlab.baselines.corpus import FilesCorpus
from archlab.config import compose
from archlab.data import TokenSplit, build_split
from archlab.errors import ArchlabError, ConfigError
from archlab.soft_targets import TargetCache, TargetRequest, build_or_load, cache_key

REQ = TargetRequest(
    context=16, top_k=8, temperature=2.0, seed=3, train_windows=20, val_windows=5, batch_size=6
)
KILLED = 77  # exit status of a build killed at an injected point
DATA_FILES = ("train.bin", "val.bin", "meta.json")
SOFT_FILES = (
    "train_index.bin",
    "train_ids.bin",
    "train_logprobs.bin",
    "val_ids.bin",
    "val_logprobs.bin",
    "val_nats.bin",
    "meta.json",
)
HERE = Path(__file__).parent


class BigramTeacher:
    """A fixed random bigram model: next-byte log-probs depend on the current byte only."""

    vocab_size = 256

    def __init__(self) -> None:
        self.table = torch.log_softmax(torch.randn(256, 256, generator=torch.Generator().manual_seed(0)), -1)
        self.prepared = 0

    def identity(self) -> dict:
        return {"plugin": "bigram-test"}

    def prepare(self) -> None:
        self.prepared += 1

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


class SlowTeacher(BigramTeacher):
    """The same teacher (same cache key), whose preparation announces itself and then takes a minute."""

    def prepare(self) -> None:
        print("preparing", flush=True)
        time.sleep(60)


def make_corpus(root: Path, salt: str = "") -> FilesCorpus:
    """Thirty small text files under ``root`` (``salt`` changes their content)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}{salt} says hello\n" * (i + 20))
    return FilesCorpus(FilesCorpus.Config(paths=[str(root)]))


def corpus_split(corpus_root: Path, cache: Path, salt: str = "") -> TokenSplit:
    return build_split(make_corpus(corpus_root, salt), val_fraction=0.25, max_bytes=None, cache_dir=cache)


def soft_path(teacher, split: TokenSplit, cache: Path, req: TargetRequest = REQ) -> Path:
    return cache / "soft_targets" / cache_key(teacher.identity(), split, req)


def same_targets(a: TargetCache, b: TargetCache) -> bool:
    n, m = REQ.train_windows, REQ.val_windows
    return all(
        x.ids.equal(y.ids) and x.logprobs.equal(y.logprobs)
        for x, y in ((a.train(0, n), b.train(0, n)), (a.val(0, m), b.val(0, m)))
    )


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.fixture
def ref(tmp_path) -> TokenSplit:
    """The corpus split, built in a cache of its own: what every later build must give."""
    return corpus_split(tmp_path / "corpus", tmp_path / "ref-cache")


# 1. the corpus cache is verified on every load


@pytest.mark.parametrize("name", ["train.bin", "val.bin"])
@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip", "{name} does not match its checksum"),
        ("truncate", "{name} has {n} bytes, meta.json says {m}"),
    ],
)
def test_a_damaged_token_file_is_rebuilt_with_one_warning(
    tmp_path, ref, caplog, name, damage, reason
) -> None:
    split = corpus_split(tmp_path / "corpus", tmp_path / "cache")
    file = Path(split.meta["path"]) / name
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data[:-3] if damage == "truncate" else data))
    with caplog.at_level(logging.INFO):
        again = corpus_split(tmp_path / "corpus", tmp_path / "cache")
    why = reason.format(name=name, n=len(data) - 3, m=len(data))
    assert warnings_of(caplog) == [f"corpus cache {file.parent}: {why}; rebuilding"]
    assert bytes(again.train) == bytes(ref.train) and bytes(again.val) == bytes(ref.val)
    key = file.parent.name  # the damaged cache replaced, nothing left beside it but the lock
    assert sorted(p.name for p in file.parent.parent.iterdir()) == [key, f"{key}.lock"]


def test_the_corpus_meta_records_size_and_sha256_of_each_token_file(ref) -> None:
    for name in ("train.bin", "val.bin"):
        data = (Path(ref.meta["path"]) / name).read_bytes()
        assert ref.meta["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# 2. soft targets are keyed by the corpus content, not its path


def test_the_soft_target_key_follows_the_corpus_content_not_its_path(tmp_path, ref) -> None:
    teacher = BigramTeacher()
    elsewhere = corpus_split(tmp_path / "corpus", tmp_path / "other-cache")
    changed = corpus_split(tmp_path / "changed", tmp_path / "other-cache", salt="!")
    assert elsewhere.meta["path"] != ref.meta["path"]
    assert cache_key(teacher.identity(), elsewhere, REQ) == cache_key(teacher.identity(), ref, REQ)
    assert cache_key(teacher.identity(), changed, REQ) != cache_key(teacher.identity(), ref, REQ)


# 3. a corrupt meta.json is a corrupt cache

CORRUPT_META = {
    "garbage": lambda meta, key: b"\xff\xfe\x00 not json",
    "empty": lambda meta, key: b"",
    "missing key": lambda meta, key: json.dumps({k: v for k, v in meta.items() if k != key}).encode(),
    "wrong type": lambda meta, key: json.dumps({**meta, key: str(meta[key])}).encode(),
}


@pytest.mark.parametrize("kind", CORRUPT_META)
def test_a_corrupt_corpus_meta_json_is_rebuilt(tmp_path, ref, caplog, kind) -> None:
    path = Path(corpus_split(tmp_path / "corpus", tmp_path / "cache").meta["path"])
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_bytes(
        CORRUPT_META[kind](meta, "train_tokens" if kind == "wrong type" else "dtype")
    )
    with caplog.at_level(logging.INFO):
        again = corpus_split(tmp_path / "corpus", tmp_path / "cache")
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"corpus cache {path}: meta.json") and warning.endswith("; rebuilding")
    assert bytes(again.train) == bytes(ref.train) and again.meta == meta
    caplog.clear()
    corpus_split(tmp_path / "corpus", tmp_path / "cache")
    assert warnings_of(caplog) == []  # rebuilt for good


@pytest.mark.parametrize("kind", CORRUPT_META)
def test_a_corrupt_soft_target_meta_json_is_rebuilt(tmp_path, ref, caplog, kind) -> None:
    teacher = BigramTeacher()
    first = build_or_load(teacher, ref, REQ, tmp_path / "cache", progress=False)
    meta = json.loads((first.path / "meta.json").read_text())
    (first.path / "meta.json").write_bytes(CORRUPT_META[kind](meta, "train_rows"))
    with caplog.at_level(logging.INFO):
        again = build_or_load(teacher, ref, REQ, tmp_path / "cache", progress=False)
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"soft-target cache {first.path}: meta.json") and warning.endswith(
        "; rebuilding"
    )
    assert teacher.prepared == 2 and same_targets(first, again)


# 4. durable publication, and partial builds cleaned up


@pytest.mark.parametrize("kind", ["corpus", "soft"])
def test_a_build_fsyncs_its_files_and_dir_then_renames_then_fsyncs_the_parent(
    tmp_path, ref, monkeypatch, kind
):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", f"{src} -> {dst}"))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    if kind == "corpus":
        path, files = Path(corpus_split(tmp_path / "corpus", tmp_path / "cache").meta["path"]), DATA_FILES
    else:
        path, files = (
            build_or_load(BigramTeacher(), ref, REQ, tmp_path / "cache", progress=False).path,
            SOFT_FILES,
        )
    [(i, tmp)] = [(i, p.split(" -> ")[0]) for i, (e, p) in enumerate(events) if e == "rename"]
    assert {p for e, p in events[:i] if e == "fsync"} == {f"{tmp}/{name}" for name in files} | {tmp}
    assert events[i + 1 :] == [("fsync", str(path.parent))] and events[i] == ("rename", f"{tmp} -> {path}")


def test_stale_temp_dirs_of_the_same_key_are_removed_by_the_next_build(tmp_path, ref) -> None:
    teacher = BigramTeacher()
    soft = soft_path(teacher, ref, tmp_path / "cache")
    corpus = Path(corpus_split(tmp_path / "corpus", tmp_path / "cache").meta["path"])
    stale = [p.with_name(f".tmp-{p.name}-killed") for p in (corpus, soft)]
    others = [p.with_name(".tmp-0123456789abcdef0123-building") for p in (corpus, soft)]
    for d in stale + others:
        d.mkdir(parents=True)
        (d / "train.bin").write_bytes(b"partial")
    corpus_split(tmp_path / "corpus", tmp_path / "cache")
    build_or_load(teacher, ref, REQ, tmp_path / "cache", progress=False)
    assert not any(d.exists() for d in stale)
    assert all(d.exists() for d in others)  # another key's builder may still be writing it


# 5. a build killed at any point


def _die_at(k: int, under: Path, tell: int) -> None:
    """Kill this process (os._exit, no cleanup) at its k-th file-system event under ``under``,
    first writing the event and its path to the pipe ``tell``."""
    events = {"open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree"}
    seen = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal seen
        path = (
            os.fsdecode(args[0]) if event in events and isinstance(args[0], (str, bytes, os.PathLike)) else ""
        )
        if path.startswith(f"{under}{os.sep}"):
            seen += 1
            if seen == k:
                os.write(tell, f"{event} {Path(path).relative_to(under)}".encode())
                os._exit(KILLED)

    sys.addaudithook(hook)


def _killed_build(k: int, cache: Path, build) -> tuple[int, str]:
    """(exit status, event it was killed at) of ``build(cache)`` in a child killed at event k."""
    read, write = os.pipe()
    if (pid := os.fork()) == 0:
        try:
            os.close(read)
            _die_at(k, cache, write)
            build(cache)
            os._exit(0)
        finally:
            os._exit(1)  # the build raised: never run on as a copy of the driver
    os.close(write)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    with os.fdopen(read) as pipe:
        return code, pipe.read()


def _damage(cache: Path) -> None:
    """Flip a byte of the first data file of the cache built under ``cache``."""
    file = sorted(cache.glob("*/*/*.bin"))[0]
    data = bytearray(file.read_bytes())
    data[0] ^= 0x01
    file.write_bytes(bytes(data))


def kill_driver(kind: str, damaged: bool, root: Path) -> list[dict]:
    """Build the ``kind`` cache (replacing a damaged one if ``damaged``) in a forked child killed at
    its k-th file-system event, k = 1, 2, ... until a child finishes; after each, build it again
    here and check the result. Forks, so it runs in a subprocess of its own."""
    torch.set_num_threads(1)  # no thread pool across fork
    teacher = BigramTeacher()
    split = corpus_split(root / "corpus", root / "corpus-cache")
    builders = {
        "corpus": lambda cache: corpus_split(root / "corpus", cache),
        "soft": lambda cache: build_or_load(teacher, split, REQ, cache, progress=False),
    }
    build, expected = builders[kind], builders[kind](root / "ref")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("archlab").addHandler(handler)
    report = []
    for k in itertools.count(1):
        cache = root / f"k{k}"
        if damaged:
            build(cache)
            _damage(cache)
        code, event = _killed_build(k, cache, build)
        published = [p.name for p in cache.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
        records.clear()
        got = build(cache)
        same = (
            same_targets(got, expected)
            if kind == "soft"
            else bytes(got.train) == bytes(expected.train) and bytes(got.val) == bytes(expected.val)
        )
        left = [p.name for p in cache.glob("*/.tmp-*")]
        warnings = [r.getMessage() for r in records]
        report.append(
            dict(k=k, code=code, event=event, published=published, same=same, left=left, warnings=warnings)
        )
        if code != KILLED:
            return report
    raise AssertionError("unreachable")


@pytest.mark.parametrize("damaged", [False, True], ids=["fresh", "replacing-damaged"])
@pytest.mark.parametrize("kind", ["corpus", "soft"])
def test_a_build_killed_at_any_point_leaves_no_corrupt_cache(tmp_path, kind, damaged) -> None:
    code = (
        f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import test_cache_faults as t; "
        f"print(json.dumps(t.kill_driver({kind!r}, {damaged}, t.Path({str(tmp_path)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    killed, last = report[:-1], report[-1]
    assert last["code"] == 0 and len(killed) >= 10 and all(r["code"] == KILLED for r in killed)
    events = [tuple(r["event"].split(" ", 1)) for r in killed]
    sub, data = {"corpus": ("corpus", DATA_FILES), "soft": ("soft_targets", SOFT_FILES)}[kind]
    for name in data:  # killed as each file is created in the temporary dir (so after the one before)
        assert any(e == "open" and p.startswith(f"{sub}/.tmp-") and p.endswith(name) for e, p in events)
    rename = next(i for i, (e, p) in enumerate(events) if e == "os.rename" and p.startswith(f"{sub}/.tmp-"))
    assert events[rename + 1] == ("open", sub)  # killed after the rename, before the parent's fsync
    allowed = "does not match its checksum; rebuilding"  # the damaged cache, when still there
    bad = [r for r in report if not r["same"] or r["left"] or any(allowed not in w for w in r["warnings"])]
    assert bad == []
    if not damaged:  # kills before the rename left nothing published, those after it a complete cache
        assert killed[0]["published"] == [] and killed[-1]["published"] != []
        assert all(r["warnings"] == [] for r in report)


# 6. waiting on another process's lock


def hold_the_build(root: Path) -> None:
    """Start the soft-target build with a teacher that takes a minute to prepare (in a subprocess)."""
    split = corpus_split(root / "corpus", root / "cache")
    build_or_load(SlowTeacher(), split, REQ, root / "cache", progress=False)


def test_waiting_for_a_build_held_by_another_process_names_it_and_times_out(tmp_path, ref, caplog) -> None:
    split = corpus_split(tmp_path / "corpus", tmp_path / "cache")
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_cache_faults as t; "
        f"t.hold_the_build(t.Path({str(tmp_path)!r}))"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "preparing\n"
        lock = f"{soft_path(BigramTeacher(), split, tmp_path / 'cache')}.lock"
        impatient = TargetRequest(**{**REQ.__dict__, "lock_timeout": 0.5})
        with caplog.at_level(logging.INFO), pytest.raises(ArchlabError) as e:
            build_or_load(BigramTeacher(), split, impatient, tmp_path / "cache", progress=False)
        assert f"PID {holder.pid} ({lock})" in str(e.value) and "distill.lock_timeout" in str(e.value)
        waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
        assert waiting == [f"waiting for the soft-target build held by PID {holder.pid} ({lock})"]
    finally:
        holder.kill()
        holder.wait()
    teacher = BigramTeacher()  # the killed holder's lock is gone with it
    build_or_load(teacher, split, impatient, tmp_path / "cache", progress=False)
    assert teacher.prepared == 1


def test_distill_lock_timeout_is_a_config_key_of_seconds() -> None:
    assert compose().distill.lock_timeout == 3600.0
    with pytest.raises(ConfigError, match="distill.lock_timeout"):
        OmegaConf.to_object(compose(["distill.lock_timeout=-1"]).distill).validate()


# 7. published caches follow the umask


@pytest.mark.parametrize("umask", [0o002, 0o022])
def test_published_caches_follow_the_umask(tmp_path, ref, umask) -> None:
    old = os.umask(umask)
    try:
        corpus = Path(corpus_split(tmp_path / "corpus", tmp_path / "cache").meta["path"])
        soft = build_or_load(BigramTeacher(), ref, REQ, tmp_path / "cache", progress=False).path
    finally:
        os.umask(old)
    for path in (corpus, soft):
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
        assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o666 & ~umask}


# 8. a read-only cache


def _check_read_only(tmp_path: Path, ref: TokenSplit) -> None:
    """With the caches built and their directories read-only: reads work, builds are clear errors."""
    teacher = BigramTeacher()
    assert bytes(corpus_split(tmp_path / "corpus", tmp_path / "cache").train) == bytes(ref.train)
    build_or_load(teacher, ref, REQ, tmp_path / "cache", progress=False)
    assert teacher.prepared == 0
    with pytest.raises(ArchlabError, match="not writable.*data.cache_dir.*ARCHLAB_CACHE") as e:
        corpus_split(tmp_path / "changed", tmp_path / "cache", salt="!")
    assert f"{tmp_path / 'cache' / 'corpus'}" in str(e.value) and "not built yet" in str(e.value)
    other = TargetRequest(**{**REQ.__dict__, "top_k": 4})
    with pytest.raises(ArchlabError, match="not writable.*data.cache_dir.*ARCHLAB_CACHE") as e:
        build_or_load(teacher, ref, other, tmp_path / "cache", progress=False)
    assert str(soft_path(teacher, ref, tmp_path / "cache", other)) in str(e.value)
    _damage(tmp_path / "cache")  # its lock file may be writable; a rebuild still needs the directory
    with pytest.raises(ArchlabError, match=r"does not match its checksum\) but is not writable"):
        corpus_split(tmp_path / "corpus", tmp_path / "cache")


def _build_both(tmp_path: Path, ref: TokenSplit) -> None:
    corpus_split(tmp_path / "corpus", tmp_path / "cache")
    build_or_load(BigramTeacher(), ref, REQ, tmp_path / "cache", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_cache_is_read_and_not_built(tmp_path, ref) -> None:
    _build_both(tmp_path, ref)
    dirs = [tmp_path / "cache" / "corpus", tmp_path / "cache" / "soft_targets"]
    for d in dirs:
        d.chmod(0o555)
    try:
        _check_read_only(tmp_path, ref)
    finally:
        for d in dirs:
            d.chmod(0o755)


def test_a_cache_whose_lock_cannot_be_created_is_read_and_not_built(tmp_path, ref, monkeypatch) -> None:
    """As the chmod test, for root too: the lock raises what filelock raises in a read-only directory."""
    _build_both(tmp_path, ref)

    class ReadOnlyLock:
        def __init__(self, path) -> None:
            self.lock_file = str(path)

        def acquire(self, timeout: float) -> None:
            raise PermissionError(errno.EACCES, "Permission denied", self.lock_file)

    monkeypatch.setattr("archlab.cachedir.FileLock", ReadOnlyLock)
    _check_read_only(tmp_path, ref)


# 9. a soft-target build that cannot fit on the disk


def test_a_soft_target_build_larger_than_the_free_space_is_refused(tmp_path, ref, monkeypatch) -> None:
    rows = REQ.train_windows + 6  # validation windows come in whole build batches of 6
    need = (
        rows * REQ.context * REQ.top_k * (1 + 2) + rows * 8
    )  # uint8 ids, fp16 logprobs; int64 index, f64 nats
    assert need == 10192
    monkeypatch.setattr(
        "shutil.disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=0, free=need - 1)
    )
    teacher = BigramTeacher()
    with pytest.raises(ArchlabError, match=r"needs 10\.2 kB .* only 10\.2 kB is free") as e:
        build_or_load(teacher, ref, REQ, tmp_path / "cache", progress=False)
    assert all(key in str(e.value) for key in ("trainer.max_steps", "distill.top_k"))
    assert str(soft_path(teacher, ref, tmp_path / "cache")) in str(e.value)
    assert teacher.prepared == 0 and list((tmp_path / "cache" / "soft_targets").glob(".tmp-*")) == []
    monkeypatch.setattr(
        "shutil.disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=0, free=need)
    )
    build_or_load(teacher, ref, REQ, tmp_path / "cache", progress=False)
    assert teacher.prepared == 1
