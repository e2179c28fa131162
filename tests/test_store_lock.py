"""One writer per pair store: a second ``generate`` (fresh, --resume or --overwrite) or ``merge`` into a store that
another process is writing is refused with the holder named, before it changes anything; a lock left by a process
that was killed is taken over; a multi-process generate still works (only its main process locks)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.run import generate
from reflowpairs.store import PairStore
from reflowpairs.store.lock import StoreLock
from reflowpairs.store.merge import merge_stores

from .helpers import (
    INTERRUPTIBLE_RUN,
    Child,
    cli,
    generate_args,
    generate_config,
    listed_shards,
    reflowpairs_cmd,
    run_child,
    snapshot,
    tiny_store_settings,
    torchrun_cmd,
)

_HOLD = """
import sys, time
from reflowpairs.store.lock import StoreLock
lock = StoreLock.acquire(sys.argv[1], sys.argv[2])
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def held_by_other_process(store: Path, command: str = "generate") -> Iterator[Child]:
    """Another process holding the writer lock on ``store`` (as a running generate would), killed on exit. It says
    ``locked`` once it holds the lock: that line is what the test waits for."""
    with Child([sys.executable, "-c", _HOLD, str(store), command]) as holder:
        holder.wait_for_line(r"^locked$", timeout=120)
        yield holder


def _cfg(world, out: Path, **overrides) -> GenerateConfig:
    """The settings of the ``tiny_store`` fixture, so --resume accepts its copies."""
    return generate_config(world, out, **tiny_store_settings(**overrides))


def _assert_names(err: ReflowPairsError, store: Path, holder: Child, command: str = "generate") -> None:
    text = f"{err.what} {err.hint}"
    assert (
        f"{store} is being written by `reflowpairs {command}` (pid {holder.pid} on host {socket.gethostname()}, since 20"
        in text
    )
    # the library names the setting (`resume`); the CLI words it as --resume
    assert "stopped before changing anything" in text and f"kill {holder.pid}" in text and "`resume`" in text


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_second_generate_is_refused_naming_the_writer_and_changes_nothing(
    tiny_world, tiny_store, tmp_path, mode
):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    with held_by_other_process(store) as holder:
        before = snapshot(store)
        with pytest.raises(ReflowPairsError) as caught:
            generate(_cfg(tiny_world, store, **{mode: True}))
        _assert_names(caught.value, store, holder)
        assert snapshot(store) == before


@pytest.mark.slow
def test_lock_is_taken_before_the_teacher_is_loaded(tiny_world, tmp_path):
    """A refused writer does no work: with a teacher path that does not exist, the lock is what it reports."""
    out = tmp_path / "pairs"
    with held_by_other_process(out) as holder:
        with pytest.raises(ReflowPairsError) as caught:
            generate(_cfg(tiny_world, out, teacher=str(tmp_path / "no-such-teacher")))
        _assert_names(caught.value, out, holder)
        assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.slow
def test_two_generate_runs_into_one_store(tiny_world, tmp_path):
    """The issue as a user met it: a second `generate --resume` while the first runs. It is refused with the first
    run's pid (no `Directory not empty ... free disk space`), and the first run finishes a sound store."""
    out = tmp_path / "pairs"
    args = generate_args(tiny_world, out, *INTERRUPTIBLE_RUN)
    with Child(reflowpairs_cmd(*args)) as first:
        first.wait_until(
            lambda: listed_shards(out) >= 1, f"the first run to list a shard in {out}/manifest.json"
        )
        assert first.running(), "the first run finished before a second could start"
        second = cli(*args, "--resume", exit_code=1)
        text = " ".join(second.output.split())
        assert f"is being written by `reflowpairs generate` (pid {first.pid} on host" in text
        assert "Directory not empty" not in text and "Traceback" not in second.output
        stderr = first.finish(timeout=300).stderr
    assert first.returncode == 0, stderr
    store = PairStore(out)
    assert store.manifest["complete"] is True
    assert all(store.verify_shard(i) == [] for i in range(len(store.shards)))
    assert not (out / ".lock").exists() and not list((out / "shards").rglob(".tmp-*"))


@pytest.mark.slow
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


@pytest.mark.slow
def test_merge_into_a_store_being_written_is_refused(tiny_store, tmp_path):
    out = tmp_path / "merged"
    with held_by_other_process(out, "merge") as holder:
        with pytest.raises(ReflowPairsError) as caught:
            merge_stores([tiny_store], out)
        _assert_names(caught.value, out, holder, "merge")
        assert [p.name for p in out.iterdir()] == [".lock"]


@pytest.mark.slow
def test_merge_of_a_slice_still_being_written_is_refused(tiny_store, tmp_path):
    store = Path(shutil.copytree(tiny_store, tmp_path / "slice"))
    with held_by_other_process(store) as holder:
        before = snapshot(store)
        with pytest.raises(ReflowPairsError) as caught:
            merge_stores([store], tmp_path / "merged")
        _assert_names(caught.value, store, holder)
        assert snapshot(store) == before
    assert not (tmp_path / "merged").exists()
    merge_stores([store], tmp_path / "merged")  # the same merge once the writer has gone
    assert PairStore(tmp_path / "merged").manifest["num_pairs"] == PairStore(store).manifest["num_pairs"]
    assert not (tmp_path / "merged" / ".lock").exists()


@pytest.mark.slow
def test_multi_process_generate_refused_on_every_rank(tiny_world, tiny_store, tmp_path):
    """Under torchrun only rank 0 takes the lock; when it is held, every rank stops with the message (no hang)."""
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    args = generate_args(
        tiny_world,
        store,
        *("--episodes", "0-5", "--samples-per-frame", "2", "--batch-size", "8", "--shard-size", "64"),
        *("--device", "cpu", "--resume"),
    )  # the settings of the tiny_store fixture
    with held_by_other_process(store) as holder:
        before = snapshot(store)
        proc = run_child(torchrun_cmd(*args), timeout=300)
        assert proc.returncode != 0
        text = " ".join(proc.stderr.split())
        assert text.count(f"is being written by `reflowpairs generate` (pid {holder.pid}") == 2, proc.stderr[
            -3000:
        ]
        assert (
            "reflowpairs/generate/" not in proc.stderr
        )  # the ranks print one paragraph (torchrun adds its own report)
        assert snapshot(store) == before
