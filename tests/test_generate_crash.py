"""Stage 1 under faults: SIGKILL at several points, Ctrl-C, a full disk and a read-only --out.
Every listed shard stays sound, and --resume finishes with exactly the pairs of an uninterrupted run."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from .helpers import (
    INTERRUPTIBLE_RUN,
    assert_same_pairs,
    assert_sound_but_incomplete,
    child_env,
    generate_args,
    generate_store,
    read_plain,
    reflowpairs_cmd,
    run_child,
    signal_after_shards,
)


def _cmd(world, out: Path, *extra: str) -> list[str]:
    return reflowpairs_cmd(*generate_args(world, out, *INTERRUPTIBLE_RUN, *extra))


@pytest.fixture(scope="module")
def uninterrupted(tiny_world, tmp_path_factory) -> dict[str, np.ndarray]:
    out = generate_store(
        tiny_world,
        tmp_path_factory.mktemp("ref") / "pairs",
        episodes=[0, 1, 2, 3, 4],
        samples_per_frame=2,
        batch_size=16,
        shard_size=1000,
        num_steps=4,
    )
    return read_plain(out)


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_identical_pairs(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "pairs"
    for after_shards, resume in ((2, ()), (12, ("--resume",)), (30, ("--resume",))):
        result = signal_after_shards(_cmd(tiny_world, out, *resume), out, after_shards, signal.SIGKILL)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert_sound_but_incomplete(out)
    done = run_child(_cmd(tiny_world, out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert "Resuming" in done.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert not list((out / "shards").rglob(".tmp-*"))
    assert_same_pairs(uninterrupted, read_plain(out))


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_resume(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "pairs"
    result = signal_after_shards(_cmd(tiny_world, out), out, 3, signal.SIGINT)
    assert result.returncode == 130, result.stderr[-3000:]
    assert "--resume" in result.stderr and "Traceback" not in result.stderr
    assert_sound_but_incomplete(out)
    assert not list((out / "shards").rglob(".tmp-*"))
    done = run_child(_cmd(tiny_world, out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert_same_pairs(uninterrupted, read_plain(out))


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_full_disk_fails_cleanly_and_keeps_listed_shards(tiny_world, tmp_path, uninterrupted):
    out = tmp_path / "pairs"
    # The manifest grows with every shard; a 6 kB file-size limit makes its rewrite fail part-way through the run.
    proc = run_child(_cmd(tiny_world, out), preexec_fn=_limit_file_size(6000))
    assert proc.returncode == 1, proc.stderr
    text = " ".join(proc.stderr.split())
    assert "Writing the pair store" in text and "File too large" in text and "--resume" in text
    assert "Traceback" not in proc.stderr
    assert_sound_but_incomplete(out)
    done = run_child(_cmd(tiny_world, out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert_same_pairs(uninterrupted, read_plain(out))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_read_only_out_is_refused_before_any_work(tiny_world):
    # As root, chmod does not stop writes; a user namespace maps us to 'nobody', for whom it does.
    base = Path(tempfile.mkdtemp(prefix="reflowpairs-ro-"))
    try:
        os.chmod(base, 0o755)
        world = base / "world"
        shutil.copytree(tiny_world.root, world)
        copy = replace(
            tiny_world,
            root=world,
            vlm_dir=world / "vlm",
            dataset_root=world / "dataset",
            teacher_dir=world / "teacher",
        )
        readonly = base / "readonly"
        readonly.mkdir(mode=0o555)
        os.chmod(readonly, 0o555)
        hf_home = base / "hf"
        hf_home.mkdir(mode=0o777)
        os.chmod(hf_home, 0o777)
        out = readonly / "pairs"
        proc = run_child(
            ["unshare", "--user", *_cmd(copy, out)],
            env=child_env(HF_HOME=str(hf_home), HOME=str(hf_home)),
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
