"""Helpers the test files share (no test file imports another): the command line and the settings of a ``generate``
run on a tiny world, child processes (run to their end, under torchrun, or watched while they run: a test waits for a
state of the child, with a deadline, before it acts on it, e.g. sends it a signal), checks of a store on disk, and
synthetic pairs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from typer.testing import CliRunner, Result

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.run import generate
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.pairs import Pairs
from reflowpairs.store.reader import PairStore

CHILD_TIMEOUT = 600  # seconds a child process may run to its end (the suite shares 2 cores)
READY_TIMEOUT = 180  # seconds a test waits for a state of a running child
STOP_TIMEOUT = 120  # seconds a signalled child may take to exit


# --- command lines ----------------------------------------------------------------------------------------------


INTERRUPTIBLE_RUN = (
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
)
"""``generate`` options (with ``generate_args``) for a run of 60 shards of 4 pairs: 120 frames of the tiny world x K=2
in batches of 2 frames, each shard listed in the manifest as it is written; long enough to interrupt part-way."""


def child_env(**extra: str) -> dict[str, str]:
    """A child process's environment: this one's with one OpenMP thread (tests share the cores), plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def reflowpairs_cmd(*args: str) -> list[str]:
    """``python -m reflowpairs ARGS``, with this interpreter."""
    return [sys.executable, "-m", "reflowpairs", *args]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node=NPROC -m reflowpairs ARGS`` (CPU processes, gloo)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "reflowpairs", *args]


def generate_args(world, out: Path, *options: str) -> list[str]:
    """``generate --teacher T --dataset D --dataset-root R --out OUT OPTIONS`` for a tiny world: the arguments of
    ``CliRunner().invoke(app, ...)``, ``reflowpairs_cmd(...)`` or ``torchrun_cmd(...)``."""
    return [
        "generate",
        "--teacher",
        str(world.teacher_dir),
        "--dataset",
        world.repo_id,
        "--dataset-root",
        str(world.dataset_root),
        "--out",
        str(out),
        *options,
    ]


def run_child(
    cmd: list[str], *, timeout: float = CHILD_TIMEOUT, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end, its stdout and stderr captured as text, in ``child_env()`` unless ``env`` is given."""
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=child_env() if env is None else env,
        timeout=timeout,
        **kwargs,
    )


# --- the CLI in this process -------------------------------------------------------------------------------------

runner = CliRunner()


def cli(*args: str, exit_code: int | None = 0) -> Result:
    """``reflowpairs ARGS`` run in this process (typer's ``CliRunner``), after checking that it exited with
    ``exit_code`` (the failure shows its output, and the traceback of an exception the command did not turn into a
    message); ``exit_code=None`` accepts any."""
    result = runner.invoke(app, list(args))
    if exit_code is not None:
        crash = result.exception if not isinstance(result.exception, SystemExit) else None
        trace = "".join(traceback.format_exception(crash)) if crash is not None else ""
        assert result.exit_code == exit_code, result.output + trace
    return result


def cli_json(*args: str, exit_code: int = 0) -> dict[str, Any]:
    """The JSON object a ``--json`` command prints on stdout (``args`` must include ``--json``)."""
    return json.loads(cli(*args, exit_code=exit_code).stdout)


def inspect_json(store: Path, *args: str) -> dict[str, Any]:
    """What ``reflowpairs inspect STORE --json ARGS`` reports (it must exit 0)."""
    return cli_json("inspect", str(store), "--json", *args)


# --- generate settings and stores -------------------------------------------------------------------------------


def generate_config(world, out: Path, **settings: Any) -> GenerateConfig:
    """A ``GenerateConfig`` for a tiny world: its teacher, dataset and dataset root, ``out``, the CPU, and
    ``settings`` (which may override any of these)."""
    base = {
        "teacher": str(world.teacher_dir),
        "dataset": world.repo_id,
        "dataset_root": world.dataset_root,
        "out": out,
        "device": "cpu",
    }
    return GenerateConfig(**(base | settings))


def tiny_store_settings(**overrides: Any) -> dict[str, Any]:
    """The settings of the ``tiny_store`` fixture (episodes 0-5, K=2, batches of 8, shards of 64 pairs), with
    ``overrides``: a run with them may ``resume`` a copy of that store."""
    settings = {"episodes": [0, 1, 2, 3, 4, 5], "samples_per_frame": 2, "batch_size": 8, "shard_size": 64}
    return settings | overrides


def generate_store(world, out: Path, **settings: Any) -> Path:
    """Generate a pair store into ``out`` (settings as for ``generate_config``); returns ``out``."""
    generate(generate_config(world, out, **settings))
    return out


SMALL_STORE = {"episodes": [0, 1], "samples_per_frame": 2, "batch_size": 8, "shard_size": 16}
"""The settings of ``small_store``: the tiny world's episodes 0 and 1 (48 frames), K=2, batches of 8 frames, shards
of 16 pairs."""


def small_store(world, out: Path, **overrides: Any) -> Path:
    """Generate a store of ``SMALL_STORE`` (with ``overrides``) into ``out``; returns ``out``."""
    return generate_store(world, out, **(SMALL_STORE | overrides))


def listed_shards(store: Path) -> int:
    """How many shards ``store``'s manifest lists (with its journal's, as ``StoreManifest.read`` folds them): 0 while
    there is no manifest (or when it is caught between the write and the rename of its temporary file)."""
    try:
        return len(StoreManifest.read(store).shards)
    except (OSError, ValueError, ReflowPairsError):
        return 0


def assert_sound_but_incomplete(store: Path) -> None:
    """An interrupted run's store: marked incomplete, at least one shard, every listed shard passing its checksums,
    and no pair twice."""
    opened = PairStore(store)
    assert opened.manifest["complete"] is False
    assert len(opened.shards) >= 1
    for i in range(len(opened.shards)):
        assert opened.verify_shard(i) == [], opened.shards[i]["path"]
    obs, sample = opened.index()
    pairs = set(zip(obs.tolist(), sample.tolist(), strict=True))
    assert len(pairs) == len(obs) == opened.manifest["num_pairs"]


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under ``root`` with its size, mtime and (files) bytes: equal snapshots mean nothing changed."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            p.read_bytes() if p.is_file() else None,
        )
        for p in sorted(root.rglob("*"))
    }


def read_plain(store: Path) -> dict[str, np.ndarray]:
    """Read a store with plain zarr / pyarrow, following docs/pair-store.md, not this package: ``x0``, ``x1``,
    ``obs_index`` and ``sample`` of every listed shard, sorted by (obs_index, sample)."""
    manifest = json.loads((store / "manifest.json").read_text())
    t0, d0 = manifest["x0"]["shape"]
    t1, d1 = manifest["x1"]["shape"]
    parts = []
    for shard in manifest["shards"]:
        path = store / shard["path"]
        if manifest["backend"] == "zarr":
            group = zarr.open_group(str(path), mode="r")
            assert group["x0"].dtype == np.float32 and group["obs_index"].dtype == np.int64
            assert group["sample"].dtype == np.int32 and group["x1"].dtype == np.float32
            part = {name: np.asarray(group[name][...]) for name in ("x0", "x1", "obs_index", "sample")}
        else:
            table = pq.read_table(path)
            assert str(table.schema.field("obs_index").type) == "int64"
            assert str(table.schema.field("sample").type) == "int32"
            for name, width in (("x0", t0 * d0), ("x1", t1 * d1)):
                kind = table.schema.field(name).type
                assert (
                    pa.types.is_fixed_size_list(kind)
                    and kind.list_size == width
                    and kind.value_type == pa.float32()
                )
            n = table.num_rows
            part = {
                "x0": np.stack(table.column("x0").to_numpy(zero_copy_only=False)).reshape(n, t0, d0),
                "x1": np.stack(table.column("x1").to_numpy(zero_copy_only=False)).reshape(n, t1, d1),
                "obs_index": table.column("obs_index").to_numpy(),
                "sample": table.column("sample").to_numpy(),
            }
        assert len(part["obs_index"]) == shard["num_pairs"]
        parts.append(part)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.lexsort((out["sample"], out["obs_index"]))
    return {k: v[order] for k, v in out.items()}


def assert_same_pairs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Two stores read with ``read_plain`` hold the same pairs (X_1 up to float rounding of batching)."""
    for key in ("obs_index", "sample", "x0"):
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(a["x1"], b["x1"], atol=1e-5, rtol=0)


def assert_identical_pairs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Two stores read with ``read_plain`` hold the same pairs, bit for bit."""
    for key in ("obs_index", "sample", "x0", "x1"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- synthetic pairs (no teacher) ---------------------------------------------------------------------------------

T, D0, D1, K = 3, 4, 2, 2
"""The shapes of ``synthetic_pairs``: chunks of T steps, X_0 D0 wide, X_1 D1 wide, K samples a frame."""


def synthetic_pairs(obs: list[int], seed: int = 0) -> Pairs:
    """K random pairs for each frame in ``obs`` (x0 (n, T, D0), x1 (n, T, D1), n = K * len(obs))."""
    rng = np.random.default_rng(seed)
    n = len(obs) * K
    return Pairs(
        x0=rng.standard_normal((n, T, D0)),
        x1=rng.standard_normal((n, T, D1)),
        obs_index=np.repeat(obs, K),
        sample=np.tile(np.arange(K), len(obs)),
    )


# --- the network ---------------------------------------------------------------------------------------------------


@contextmanager
def no_network() -> Iterator[None]:
    """Every socket connection attempt inside the block raises (what runs in it must not need the hub)."""
    real = socket.socket.connect

    def refuse(self, address):
        raise OSError(f"network access attempted in an offline test: {address}")

    socket.socket.connect = refuse
    try:
        yield
    finally:
        socket.socket.connect = real


# --- running children ---------------------------------------------------------------------------------------------


def terminal_sigint() -> None:
    """(A ``preexec_fn``.) The child gets Ctrl-C as a terminal delivers it, even when this suite runs as a background
    job (a non-interactive shell starts those with SIGINT ignored, and Python then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A running child process whose stdout and stderr two threads read line by line as they come (so a full pipe
    never stalls it, and a test can wait for a line). A test waits for a state of the child with ``wait_for_line``
    or ``wait_until`` (each with a deadline, failing with what it waited for and the child's stderr), then acts.
    As a context manager it kills the child on leaving the block if it still runs."""

    def __init__(
        self,
        cmd: list[str],
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ):
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env() if env is None else env,
            preexec_fn=preexec_fn,
        )
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._ended: set[str] = set()
        self._news = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(name, stream), daemon=True)
            for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str, stream) -> None:
        for line in stream:
            with self._news:
                self._lines[name].append(line)
                self._news.notify_all()
        with self._news:
            self._ended.add(name)
            self._news.notify_all()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self, stream: str = "stderr") -> str:
        """What the child has written to ``stream`` (``"stdout"`` or ``"stderr"``) so far."""
        with self._news:
            return "".join(self._lines[stream])

    def fail(self, message: str) -> None:
        """Fail the test with ``message``, the command and the end of the child's stderr."""
        pytest.fail(
            f"{message}\n$ {shlex.join(self.cmd)}\nreturn code: {self.proc.poll()}\n"
            f"stderr (end):\n{self.output('stderr')[-3000:]}"
        )

    def wait_for_line(
        self, pattern: str, *, stream: str = "stdout", timeout: float = READY_TIMEOUT
    ) -> re.Match[str]:
        """The match of regular expression ``pattern`` in the first line of ``stream`` that has one, waiting for
        lines at most ``timeout`` seconds; fails if the deadline passes or the stream ends (the child exited)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._news:
            while True:
                lines = self._lines[stream]
                for line in lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(lines)
                if stream in self._ended:
                    self.fail(f"The child's {stream} ended without a line matching {pattern!r}.")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.fail(f"No line matching {pattern!r} on the child's {stream} within {timeout:g} s.")
                self._news.wait(left)

    def wait_until(
        self,
        ready: Callable[[], bool],
        what: str,
        *,
        timeout: float = READY_TIMEOUT,
        interval: float = 0.005,
    ) -> None:
        """Return once ``ready()`` holds (a state the child makes: a file written, a shard listed), checking it every
        ``interval`` seconds and whenever the child prints; fails naming ``what`` when the child exits first or
        ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running()  # asked first: a child that made the state and then exited is ready
            if ready():
                return
            if exited:
                self.fail(f"The child exited before {what}.")
            if time.monotonic() > deadline:
                self.fail(f"Waited {timeout:g} s for {what}, in vain.")
            with self._news:
                self._news.wait(interval)

    def send_signal(self, sig: int) -> None:
        """Send ``sig``; fails if the child has already exited (it ended before the test could signal it)."""
        if not self.running():
            self.fail(f"The child exited before it could be sent {signal.Signals(sig).name}.")
        self.proc.send_signal(sig)

    def finish(self, timeout: float = CHILD_TIMEOUT) -> subprocess.CompletedProcess:
        """Wait (at most ``timeout`` seconds) for the child to exit; its return code and whole output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.fail(f"The child did not exit within {timeout:g} s.")
        self._join()
        return subprocess.CompletedProcess(
            self.cmd, self.proc.returncode, self.output("stdout"), self.output("stderr")
        )

    def kill(self) -> None:
        """SIGKILL the child if it still runs, and reap it."""
        if self.running():
            self.proc.kill()
        self.proc.wait()
        self._join()

    def _join(self) -> None:
        # the readers end with the pipes; a grandchild holding those open may keep them going, but not for ever
        for reader in self._readers:
            reader.join(timeout=STOP_TIMEOUT)


def signal_when(
    cmd: list[str],
    ready: Callable[[], bool],
    what: str,
    sig: int,
    *,
    timeout: float = READY_TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Start ``cmd``, wait until ``ready()`` holds (``what`` names that state in a failure), send it ``sig`` (the child
    takes SIGINT as from a terminal) and return the finished run."""
    with Child(cmd, env=env, preexec_fn=terminal_sigint) as child:
        child.wait_until(ready, what, timeout=timeout)
        child.send_signal(sig)
        return child.finish(timeout=STOP_TIMEOUT)


def signal_after_shards(cmd: list[str], out: Path, shards: int, sig: int) -> subprocess.CompletedProcess:
    """Start the ``generate`` run ``cmd`` writing ``out``, send it ``sig`` once its manifest lists ``shards``
    shards, and return the finished run."""
    return signal_when(
        cmd, lambda: listed_shards(out) >= shards, f"{out}/manifest.json to list {shards} shards", sig
    )
