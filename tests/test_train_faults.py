"""`reflowpairs train` under faults inside a checkpoint save, as a user meets them: a real Ctrl-C (SIGINT to the
process) and a real full disk (a small tmpfs as `out`). Each leaves `checkpoints/last` on the last complete
checkpoint, loadable by lerobot, removes the half-written copy, and `--resume` then ends on the same weights, bit for
bit, as a run that was never interrupted.

The child reaches a known point inside a save through the `REFLOWPAIRS_TEST_SAVE_GATE` hook
(`reflowpairs.checkpoint.TEST_SAVE_GATE`): it creates `GATE/inside-<step>` once `.tmp-<step>` exists and waits for
`GATE/go-<step>`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reflowpairs.checkpoint import TEST_SAVE_GATE

from .helpers import Child, child_env, reflowpairs_cmd, terminal_sigint

STEPS, SAVE_EVERY = 6, 2


pytestmark = pytest.mark.slow  # every test here runs `reflowpairs train` in a real process


def _train_cmd(store: Path, out: Path, *extra: str) -> list[str]:
    return reflowpairs_cmd(
        "train",
        "--pairs",
        str(store),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--save-every",
        str(SAVE_EVERY),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--lr",
        "1e-3",
        *extra,
    )


def _ctrl_c_until_gone(child: Child, half: Path) -> None:
    """Press Ctrl-C until ``half`` (a save's half-written copy) is gone, waiting up to 2 s after each, at most 20
    times: two signals sent back to back may arrive as one, and no more are sent once the save has given up."""
    for _ in range(20):
        child.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 2.0
        while half.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not half.exists():
            return


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tiny_store, tmp_path_factory) -> Path:
    """An uninterrupted run: the weights a resumed run must end on."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    _run(_train_cmd(tiny_store, out))
    return out


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"))


def _losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def _last_is_sound(out: Path) -> int:
    """``checkpoints/last`` is a complete checkpoint lerobot loads and no half-written copy is left; its step."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    root = out / "checkpoints"
    last = (root / "last").resolve()
    assert last.is_dir() and last.parent == root.resolve() and not last.name.startswith(".")
    SmolVLAPolicy.from_pretrained(last / "pretrained_model")
    assert [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))] == []
    return json.loads((last / "training_state" / "training_step.json").read_text())["step"]


def _resume_matches(store: Path, out: Path, reference: Path) -> None:
    """``train --resume`` finishes the run on the reference's weights and losses, bit for bit."""
    _run(_train_cmd(store, out, "--resume"))
    assert _losses(out) == _losses(reference)
    got, want = _weights(out), _weights(reference)
    assert got.keys() == want.keys()
    different = [name for name in want if not torch.equal(got[name], want[name])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def _wait_for(child: Child, gate: Path, step: int) -> None:
    child.wait_until(lambda: (gate / f"inside-{step}").exists(), f"the save of step {step} to start")


def _gated_child(store: Path, out: Path, gate: Path) -> Child:
    gate.mkdir()
    return Child(
        _train_cmd(store, out), env=child_env(**{TEST_SAVE_GATE: str(gate)}), preexec_fn=terminal_sigint
    )


def test_one_ctrl_c_inside_a_save_finishes_it_then_stops(tiny_store, reference, tmp_path):
    """The first Ctrl-C never cuts a save: the checkpoint in progress completes, the run stops after it."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    with _gated_child(tiny_store, out, gate) as child:
        _wait_for(child, gate, 2)
        (gate / "go-2").touch()
        _wait_for(child, gate, 4)
        child.send_signal(signal.SIGINT)
        time.sleep(1.0)  # let the handler run while the save waits (it only sets a flag)
        (gate / "go-4").touch()
        for later in (5, 6):  # were the signal taken after the save, the run would stop at a later save
            (gate / f"go-{later}").touch()
        done = child.finish()
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Interrupted" in done.stderr + done.stdout and "Traceback" not in done.stderr
    step = _last_is_sound(out)
    assert 4 <= step < STEPS
    _resume_matches(tiny_store, out, reference)


def test_a_second_ctrl_c_inside_a_save_stops_at_once_and_keeps_the_last_checkpoint(
    tiny_store, reference, tmp_path
):
    """Ctrl-C twice while checkpoint 4 is half written: the save is abandoned, its copy removed, `last` stays on
    checkpoint 2, and the CLI says so."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    with _gated_child(tiny_store, out, gate) as child:
        _wait_for(child, gate, 2)
        (gate / "go-2").touch()
        _wait_for(child, gate, 4)
        half = out / "checkpoints" / ".tmp-000004"
        assert half.is_dir()
        # Two signals sent back to back may arrive as one, so press Ctrl-C until the save gives up (its half-written
        # copy is removed: only a second Ctrl-C does that, the gate holds the save otherwise), and no more after.
        _ctrl_c_until_gone(child, half)
        done = child.finish()
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "the last checkpoint is" in " ".join(done.stdout.split() + done.stderr.split())
    assert _last_is_sound(out) == 2
    assert not (out / "checkpoints" / "000004").exists()
    _resume_matches(tiny_store, out, reference)


def test_a_second_ctrl_c_inside_the_save_that_the_first_one_asked_for(tiny_store, tmp_path):
    """Ctrl-C between steps asks for a save; a second one while that save runs abandons it: the run still ends as an
    interrupted *training* run (its own message, exit 130, no traceback), with no half-written checkpoint left."""
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    cmd = _train_cmd(tiny_store, out)
    cmd[cmd.index("--save-every") + 1] = "1000"  # no periodic save: the only save is the one Ctrl-C asks for
    with Child(cmd, env=child_env(**{TEST_SAVE_GATE: str(gate)}), preexec_fn=terminal_sigint) as child:
        log = out / "train_log.jsonl"
        child.wait_until(
            lambda: log.exists() and log.read_text().count("\n") >= 1, "the first step's log line"
        )
        child.send_signal(signal.SIGINT)
        child.wait_until(lambda: any(gate.glob("inside-*")), "the save Ctrl-C asked for to start")
        (step,) = [int(p.name.split("-")[1]) for p in gate.glob("inside-*")]
        half = out / "checkpoints" / f".tmp-{step:06d}"
        _ctrl_c_until_gone(child, half)  # as above: until the save gives up, and no more
        done = child.finish()
    text = " ".join(done.stdout.split() + done.stderr.split())
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"Interrupted at step {step}; no checkpoint had been written yet" in text, text[-2000:]
    assert not (out / "checkpoints" / "last").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == []


@pytest.fixture
def small_disk(tmp_path):
    """A fresh 64 MiB tmpfs mounted for the test (skipped where this process cannot mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and `mount` (a full disk cannot be made here)")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", f"reflowpairs-test-{uuid.uuid4().hex[:6]}", str(mount)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    """Write a file until the disk is full (ENOSPC at 1 MiB, then at 4 KiB writes: not a page is left); returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 20, 4096):
            block = b"\0" * size
            try:
                while True:
                    os.write(fd, block)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_inside_a_save_keeps_the_last_checkpoint(tiny_store, reference, small_disk):
    """`out` on a tmpfs that fills up while checkpoint 4 is written: the run stops with one clear error (no
    traceback) naming `out`, the failed write and the checkpoint kept; its half-written copy is removed. Once space is
    freed, `--resume` ends on the uninterrupted run's weights."""
    out, gate = small_disk / "run", small_disk.parent / "gate"
    with _gated_child(tiny_store, out, gate) as child:
        _wait_for(child, gate, 2)
        (gate / "go-2").touch()
        _wait_for(child, gate, 4)
        filler = _fill(small_disk)
        (gate / "go-4").touch()
        done = child.finish()
    text = " ".join(done.stderr.split() + done.stdout.split())
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"Writing checkpoint 4 to --out {out}" in text and "failed" in text, text[-2000:]
    assert "checkpoints/last still points at the last complete checkpoint (000002)" in text
    assert "--resume" in text
    filler.unlink()  # the user frees space
    assert _last_is_sound(out) == 2
    _resume_matches(tiny_store, out, reference)


def test_full_disk_errors_that_are_not_oserrors_are_told_apart_from_bugs(small_disk):
    """On a full disk safetensors raises SafetensorError and torch.save a RuntimeError: both count as a failed write
    (the save words them as one); a RuntimeError that is a bug (tensors sharing memory) does not."""
    from safetensors.torch import save_file

    from reflowpairs.checkpoint import _is_write_failure

    _fill(small_disk)
    errors = []
    for write in (
        lambda: save_file({"w": torch.zeros(1 << 16)}, str(small_disk / "w.safetensors")),
        lambda: torch.save({"w": torch.zeros(1 << 16)}, small_disk / "w.pt"),
    ):
        with pytest.raises(Exception) as caught:  # noqa: PT011 - the types are what this test looks at
            write()
        errors.append(caught.value)
    assert [type(e).__name__ for e in errors] == ["SafetensorError", "RuntimeError"]
    assert all(_is_write_failure(e) for e in errors), [str(e) for e in errors]
    shared = torch.ones(4)
    with pytest.raises(RuntimeError) as bug:
        save_file({"a": shared, "b": shared}, str(small_disk.parent / "shared.safetensors"))
    assert not _is_write_failure(bug.value) and not _is_write_failure(KeyboardInterrupt())
