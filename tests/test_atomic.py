"""reflowpairs.atomic: the fsync helpers behind every write-then-rename, and the early writability check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reflowpairs.atomic import TMP_PREFIX, check_writable, fsync_dir, fsync_tree, replace_atomically
from reflowpairs.errors import ReflowPairsError


@pytest.fixture
def fsynced(monkeypatch):
    """Record the path of every descriptor ``os.fsync`` is called on, in order (the real fsync still runs)."""
    paths: list[Path] = []
    real = os.fsync

    def recording_fsync(fd):
        paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to name descriptors")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else set()


def test_fsync_dir_syncs_that_directory_and_closes_it(tmp_path, fsynced):
    before = _open_fds()
    fsync_dir(tmp_path)
    assert fsynced == [tmp_path.resolve()]
    assert _open_fds() == before, "fsync_dir leaked a file descriptor"


def test_fsync_dir_on_a_missing_path_raises_and_leaks_nothing(tmp_path):
    before = _open_fds()
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
    assert _open_fds() == before


def test_fsync_dir_closes_the_descriptor_when_fsync_fails(tmp_path, monkeypatch):
    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    before = _open_fds()
    with pytest.raises(OSError, match="Input/output error"):
        fsync_dir(tmp_path)
    assert _open_fds() == before, "the descriptor must be closed even when fsync fails"


def test_fsync_tree_on_a_file_syncs_just_that_file(tmp_path, fsynced):
    (tmp_path / "other").write_text("x")
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"\0" * 10)
    fsync_tree(target)
    assert fsynced == [target.resolve()]


def test_fsync_tree_syncs_everything_deepest_first_then_the_root(tmp_path, fsynced):
    root = tmp_path / "ckpt"
    (root / "pretrained_model").mkdir(parents=True)
    (root / "training_state" / "deeper").mkdir(parents=True)
    files = [
        root / "pretrained_model" / "config.json",
        root / "pretrained_model" / "model.safetensors",
        root / "training_state" / "deeper" / "rng.safetensors",
        root / "top.json",
    ]
    for path in files:
        path.write_text("x")
    fsync_tree(root)
    root = root.resolve()
    expected = {
        root,
        root / "pretrained_model",
        root / "training_state",
        root / "training_state" / "deeper",
        *(p.resolve() for p in files),
    }
    assert set(fsynced) == expected and len(fsynced) == len(expected), "every entry exactly once"
    assert fsynced[-1] == root, "the root itself is synced last"
    depth = [len(p.relative_to(root).parts) for p in fsynced]
    assert depth == sorted(depth, reverse=True), (
        "deepest entries first, so a directory is synced after its contents"
    )


def test_fsync_tree_on_an_empty_directory(tmp_path, fsynced):
    fsync_tree(tmp_path)
    assert fsynced == [tmp_path.resolve()]


def test_check_writable_creates_out_with_parents_and_leaves_no_probe(tmp_path):
    out = tmp_path / "a" / "b" / "pairs"
    check_writable(out)
    assert out.is_dir()
    assert list(out.iterdir()) == []


def test_check_writable_keeps_existing_contents(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    check_writable(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_check_writable_on_a_file_is_a_clear_error(tmp_path):
    out = tmp_path / "pairs"
    out.write_text("not a directory")
    with pytest.raises(ReflowPairsError) as info:
        check_writable(out)
    assert info.value.what.startswith(f"Cannot write to `out` {out} (")
    assert "File exists" in info.value.what
    assert "nothing was written" in info.value.hint
    assert isinstance(info.value.__cause__, OSError)
    assert out.read_text() == "not a directory"


def test_check_writable_under_a_file_is_a_clear_error(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("x")
    out = parent / "pairs"
    with pytest.raises(ReflowPairsError, match=rf"Cannot write to `out` {out} \(Not a directory\)"):
        check_writable(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


_READ_ONLY_CHECK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from reflowpairs.atomic import check_writable
    from reflowpairs.errors import ReflowPairsError
    try:
        check_writable(Path(sys.argv[1]))
    except ReflowPairsError as err:
        print("REFUSED", err)
        sys.exit(3)
    print("WROTE")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("sub", ["", "pairs"], ids=["out-itself", "new-out-inside"])
def test_check_writable_on_a_read_only_directory_is_a_clear_error(tmp_path, sub):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(readonly, 0o555)
    out = readonly / sub if sub else readonly
    cmd = [sys.executable, "-c", _READ_ONLY_CHECK, str(out)]
    if os.geteuid() == 0:
        # As root, chmod does not stop writes; a user namespace maps us to 'nobody', for whom it does.
        if shutil.which("unshare") is None:
            pytest.skip("running as root and unshare(1) is missing: chmod cannot make a directory read-only")
        cmd = ["unshare", "--user", *cmd]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if os.geteuid() == 0 and "unshare" in proc.stderr and "Operation not permitted" in proc.stderr:
            pytest.skip("user namespaces are not allowed here")
        assert proc.returncode == 3, proc.stdout + proc.stderr
        text = " ".join(proc.stdout.split())
        assert f"REFUSED Cannot write to `out` {out} (Permission denied)." in text
        assert "Choose a writable directory with free space; nothing was written." in text
        assert list(readonly.iterdir()) == [], "a refused check must leave nothing behind"
    finally:
        os.chmod(readonly, 0o755)


def test_replace_atomically_fsyncs_the_file_then_its_directory(tmp_path, fsynced):
    target = tmp_path / "out.json"
    target.write_text("old")
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_text("new")

    replace_atomically(target, write)
    assert seen == [tmp_path / f"{TMP_PREFIX}out.json"]
    assert target.read_text() == "new" and not seen[0].exists()
    assert fsynced == [seen[0].resolve(), tmp_path.resolve()]  # the temp file's data, then the rename


def test_replace_atomically_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_atomically(target, fail)
    assert target.read_text() == "old"
