"""One writer per pair store: a second ``generate`` (fresh, --resume or --overwrite) or ``merge`` into a store that
another process is writing is refused with the holder named, before it changes anything; a lock left by a process
that was killed is taken over; a multi-process generate still works (only its main process locks)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate import GenerateConfig, generate
from reflowpairs.merge import merge_stores
from reflowpairs.pairstore import PairStore
from reflowpairs.storelock import StoreLock

runner = CliRunner()

_HOLD = """
import sys, time
from reflowpairs.storelock import StoreLock
lock = StoreLock.acquire(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def held_by_other_process(store: Path, command: str = "generate") -> Iterator[subprocess.Popen]:
    """Another process holding the writer lock on ``store`` (as a running generate would), killed on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(store), command], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under ``root`` with its size, mtime and (files) bytes."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            p.read_bytes() if p.is_file() else None,
        )
        for p in sorted(root.rglob("*"))
    }


def _cfg(world, out: Path, **overrides) -> GenerateConfig:
    """The settings of the ``tiny_store`` fixture, so --resume accepts its copies."""
    settings = {
        "teacher": str(world.teacher_dir),
        "dataset": world.repo_id,
        "dataset_root": world.dataset_root,
        "out": out,
        "episodes": [0, 1, 2, 3, 4, 5],
        "samples_per_frame": 2,
        "batch_size": 8,
        "shard_size": 64,
        "device": "cpu",
    }
    return GenerateConfig(**(settings | overrides))


def _assert_names(
    err: ReflowPairsError, store: Path, holder: subprocess.Popen, command: str = "generate"
) -> None:
    text = f"{err.what} {err.hint}"
    assert (
        f"{store} is being written by `reflowpairs {command}` (pid {holder.pid} on host {socket.gethostname()}, since 20"
        in text
    )
    assert "stopped before changing anything" in text and f"kill {holder.pid}" in text and "--resume" in text


@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_second_generate_is_refused_naming_the_writer_and_changes_nothing(
    tiny_world, tiny_store, tmp_path, mode
):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    with held_by_other_process(store) as holder:
        before = _snapshot(store)
        with pytest.raises(ReflowPairsError) as caught:
            generate(_cfg(tiny_world, store, **{mode: True}))
        _assert_names(caught.value, store, holder)
        assert _snapshot(store) == before


def test_lock_is_taken_before_the_teacher_is_loaded(tiny_world, tmp_path):
    """A refused writer does no work: with a teacher path that does not exist, the lock is what it reports."""
    out = tmp_path / "pairs"
    with held_by_other_process(out) as holder:
        with pytest.raises(ReflowPairsError) as caught:
            generate(_cfg(tiny_world, out, teacher=str(tmp_path / "no-such-teacher")))
        _assert_names(caught.value, out, holder)
        assert [p.name for p in out.iterdir()] == [".lock"]


def test_two_generate_runs_into_one_store(tiny_world, tmp_path):
    """The issue as a user met it: a second `generate --resume` while the first runs. It is refused with the first
    run's pid (no `Directory not empty ... free disk space`), and the first run finishes a sound store."""
    out = tmp_path / "pairs"
    cmd = [
        sys.executable,
        "-m",
        "reflowpairs",
        "generate",
        "--teacher",
        str(tiny_world.teacher_dir),
        "--dataset",
        tiny_world.repo_id,
        "--dataset-root",
        str(tiny_world.dataset_root),
        "--out",
        str(out),
        "--episodes",
        "0-4",
        "--samples-per-frame",
        "2",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--num-steps",
        "4",
        "--device",
        "cpu",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 180
        while first.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if json.loads((out / "manifest.json").read_text())["shards"]:
                    break
            time.sleep(0.01)
        assert first.poll() is None, "the first run finished before a second could start"
        second = runner.invoke(app, ["generate", *cmd[4:], "--resume"])
        text = " ".join(second.output.split())
        assert second.exit_code == 1, second.output
        assert f"is being written by `reflowpairs generate` (pid {first.pid} on host" in text
        assert "Directory not empty" not in text and "Traceback" not in second.output
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    store = PairStore(out)
    assert store.manifest["complete"] is True
    assert all(store.verify_shard(i) == [] for i in range(len(store.shards)))
    assert not (out / ".lock").exists() and not list((out / "shards").glob(".tmp-*"))


def test_lock_of_a_killed_process_is_taken_over(tiny_world, tmp_path):
    """A writer killed with SIGKILL leaves OUT/.lock behind (its record names it); the next run is not blocked."""
    out = tmp_path / "pairs"
    with held_by_other_process(out) as holder:
        pass  # killed on leaving the block, as `kill -9` would
    assert holder.returncode == -signal.SIGKILL
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    assert StoreLock.holder(out) is None
    generate(_cfg(tiny_world, out, episodes=[0], samples_per_frame=1))
    assert PairStore(out).manifest["complete"] is True
    assert not (out / ".lock").exists()


def test_generate_releases_the_lock_when_it_fails(tiny_world, tmp_path):
    """A run that stops on an error leaves no lock file and, when --out was new, no directory."""
    with pytest.raises(ReflowPairsError, match="out of range"):
        generate(_cfg(tiny_world, tmp_path / "a" / "pairs", episodes=[0, 99]))
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    out.mkdir()
    with pytest.raises(ReflowPairsError, match="does not exist"):
        generate(_cfg(tiny_world, out, teacher=str(tmp_path / "no-such-teacher")))
    assert list(out.iterdir()) == []


def test_merge_into_a_store_being_written_is_refused(tiny_store, tmp_path):
    out = tmp_path / "merged"
    with held_by_other_process(out, "merge") as holder:
        with pytest.raises(ReflowPairsError) as caught:
            merge_stores([tiny_store], out)
        _assert_names(caught.value, out, holder, "merge")
        assert [p.name for p in out.iterdir()] == [".lock"]


def test_merge_of_a_slice_still_being_written_is_refused(tiny_store, tmp_path):
    store = Path(shutil.copytree(tiny_store, tmp_path / "slice"))
    with held_by_other_process(store) as holder:
        before = _snapshot(store)
        with pytest.raises(ReflowPairsError) as caught:
            merge_stores([store], tmp_path / "merged")
        _assert_names(caught.value, store, holder)
        assert _snapshot(store) == before
    assert not (tmp_path / "merged").exists()
    merge_stores([store], tmp_path / "merged")  # the same merge once the writer has gone
    assert PairStore(tmp_path / "merged").manifest["num_pairs"] == PairStore(store).manifest["num_pairs"]
    assert not (tmp_path / "merged" / ".lock").exists()


def test_multi_process_generate_refused_on_every_rank(tiny_world, tiny_store, tmp_path):
    """Under torchrun only rank 0 takes the lock; when it is held, every rank stops with the message (no hang)."""
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [
        "generate",
        "--teacher",
        str(tiny_world.teacher_dir),
        "--dataset",
        tiny_world.repo_id,
        "--dataset-root",
        str(tiny_world.dataset_root),
        "--out",
        str(store),
        "--episodes",
        "0-5",
        "--samples-per-frame",
        "2",
        "--batch-size",
        "8",
        "--shard-size",
        "64",
        "--device",
        "cpu",
        "--resume",
    ]
    with held_by_other_process(store) as holder:
        before = _snapshot(store)
        proc = subprocess.run(
            [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "reflowpairs", *args],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert proc.returncode != 0
        text = " ".join(proc.stderr.split())
        assert text.count(f"is being written by `reflowpairs generate` (pid {holder.pid}") == 2, proc.stderr[
            -3000:
        ]
        assert (
            "reflowpairs/generate.py" not in proc.stderr
        )  # the ranks print one paragraph (torchrun adds its own report)
        assert _snapshot(store) == before
