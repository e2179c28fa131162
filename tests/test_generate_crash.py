"""Stage 1 under faults: SIGKILL at several points, Ctrl-C, a full disk and a read-only --out.
Every listed shard stays sound, and --resume finishes with exactly the pairs of an uninterrupted run."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from reflowpairs.generate import GenerateConfig, generate
from reflowpairs.pairstore import PairStore

from .test_generate import assert_same_pairs, read_plain

SETTINGS = [
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


def _cmd(world, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reflowpairs",
        "generate",
        "--teacher",
        str(world.teacher_dir),
        "--dataset",
        world.repo_id,
        "--dataset-root",
        str(world.dataset_root),
        "--out",
        str(out),
        *SETTINGS,
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _listed_shards(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["shards"])
    except (OSError, ValueError):  # not there yet, or caught between write and rename of the temp file
        return 0


def _default_sigint() -> None:
    """The child gets Ctrl-C as a terminal delivers it, even when this suite runs as a background job (a
    non-interactive shell starts those with SIGINT ignored, and Python then leaves it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_and_signal(cmd: list[str], out: Path, after_shards: int, sig: int) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + 120
    while _listed_shards(out) < after_shards and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "generation finished before it could be interrupted"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _assert_sound_but_incomplete(out: Path) -> None:
    store = PairStore(out)
    assert store.manifest["complete"] is False
    assert len(store.shards) >= 1
    for i in range(len(store.shards)):
        assert store.verify_shard(i) == [], store.shards[i]["path"]
    obs, sample = store.index()
    assert (
        len(set(zip(obs.tolist(), sample.tolist(), strict=True))) == len(obs) == store.manifest["num_pairs"]
    )


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ref") / "pairs"
    generate(
        GenerateConfig(
            teacher=str(tiny_world.teacher_dir),
            dataset=tiny_world.repo_id,
            dataset_root=tiny_world.dataset_root,
            out=out,
            episodes=[0, 1, 2, 3, 4],
            samples_per_frame=2,
            batch_size=16,
            shard_size=1000,
            num_steps=4,
            device="cpu",
        )
    )
    return read_plain(out)


def test_sigkill_at_several_points_then_resume_gives_identical_pairs(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "pairs"
    for after_shards, resume in ((2, ()), (12, ("--resume",)), (30, ("--resume",))):
        result = _start_and_signal(_cmd(tiny_world, out, *resume), out, after_shards, signal.SIGKILL)
        assert result.returncode == -signal.SIGKILL
        _assert_sound_but_incomplete(out)
    done = subprocess.run(_cmd(tiny_world, out, "--resume"), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    assert "Resuming" in done.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]
    assert_same_pairs(uninterrupted, read_plain(out))


def test_ctrl_c_saves_and_says_how_to_resume(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "pairs"
    result = _start_and_signal(_cmd(tiny_world, out), out, 3, signal.SIGINT)
    assert result.returncode == 130
    assert "--resume" in result.stderr and "Traceback" not in result.stderr
    _assert_sound_but_incomplete(out)
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".tmp-")]
    done = subprocess.run(_cmd(tiny_world, out, "--resume"), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    assert_same_pairs(uninterrupted, read_plain(out))


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_fails_cleanly_and_keeps_listed_shards(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "pairs"
    # The manifest grows with every shard; a 6 kB file-size limit makes its rewrite fail part-way through the run.
    proc = subprocess.run(
        _cmd(tiny_world, out), capture_output=True, text=True, env=_env(), preexec_fn=_limit_file_size(6000)
    )
    assert proc.returncode == 1, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "Writing the pair store" in text and "File too large" in text and "--resume" in text
    assert "Traceback" not in proc.stderr
    _assert_sound_but_incomplete(out)
    done = subprocess.run(_cmd(tiny_world, out, "--resume"), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    assert_same_pairs(uninterrupted, read_plain(out))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_read_only_out_is_refused_before_any_work(tiny_world):
    # As root, chmod does not stop writes; a user namespace maps us to 'nobody', for whom it does.
    base = Path(tempfile.mkdtemp(prefix="reflowpairs-ro-"))
    try:
        os.chmod(base, 0o755)
        world = base / "world"
        shutil.copytree(tiny_world.root, world)
        readonly = base / "readonly"
        readonly.mkdir(mode=0o555)
        os.chmod(readonly, 0o555)
        hf_home = base / "hf"
        hf_home.mkdir(mode=0o777)
        os.chmod(hf_home, 0o777)
        out = readonly / "pairs"
        cmd = [
            "unshare",
            "--user",
            sys.executable,
            "-m",
            "reflowpairs",
            "generate",
            "--teacher",
            str(world / "teacher"),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(world / "dataset"),
            "--out",
            str(out),
            *SETTINGS,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**_env(), "HF_HOME": str(hf_home), "HOME": str(hf_home)}
        )
        if "Operation not permitted" in proc.stderr and "unshare" in proc.stderr:
            pytest.skip("user namespaces are not allowed here")
        assert proc.returncode == 1, proc.stderr
        text = " ".join(proc.stderr.split())
        assert f"Cannot write to --out {out}" in text and "Permission denied" in text
        assert "Traceback" not in proc.stderr
        assert list(readonly.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
