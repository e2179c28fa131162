"""A bfloat16 teacher (as real SmolVLA checkpoints are: VLM text layers and action expert in bfloat16) through the
whole of stage 1: generate, validate --spot-check, a damaged copy, kill -9 + resume, another batching, two processes
and partitions + merge. Every way of making the store gives X_1 bit for bit equal to one uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from reflowpairs.validate.checks import validate
from reflowpairs.validate.config import ValidateConfig

from .helpers import (
    assert_identical_pairs,
    assert_sound_but_incomplete,
    cli,
    generate_args,
    read_plain,
    reflowpairs_cmd,
    run_child,
    signal_after_shards,
    torchrun_cmd,
)

SETTINGS = [
    "--episodes",
    "0-3",
    "--samples-per-frame",
    "2",
    "--num-steps",
    "4",
    "--shard-size",
    "8",
    "--device",
    "cpu",
]


def _args(world, out: Path, *extra: str) -> list[str]:
    return generate_args(world, out, *SETTINGS, *extra)


@pytest.fixture(scope="module")
def reference(bf16_world, tmp_path_factory) -> Path:
    """One uninterrupted run in calls of 4 frames (batches of 4)."""
    out = tmp_path_factory.mktemp("bf16ref") / "pairs"
    cli(*_args(bf16_world, out, "--batch-size", "4"))
    return out


def test_manifest_records_the_dtypes_the_teacher_computes_in(reference):
    generation = json.loads((reference / "manifest.json").read_text())["generation"]
    assert generation["dtype"] == "float32"  # no autocast asked for ...
    assert set(generation["parameter_dtypes"]) == {
        "bfloat16",
        "float32",
    }  # ... but the teacher computes in bf16
    assert generation["sampler"] == "prefix-cached" and generation["frames_per_call"] == 4


def test_validate_spot_check_passes_a_sound_bf16_store_and_catches_a_changed_x1(reference, tmp_path):
    report = validate(ValidateConfig(reference, spot_check=10**6, device="cpu", batch_size=3))
    spot = next(c for c in report.checks if c.name == "spot check")
    assert report.status == "sound", [c for c in report.checks if c.result == "fail"]
    assert "computed in bfloat16" in spot.detail and "atol 0.05" in spot.detail
    assert "max |X_1 difference| 0 <=" in spot.detail  # bit for bit, re-sampled in other batches

    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    shard = json.loads((damaged / "manifest.json").read_text())["shards"][1]["path"]
    x1 = zarr.open_group(str(damaged / shard), mode="r+")["x1"]
    values = x1[...]
    values[3] += 0.1  # more than bfloat16 noise, in one pair
    x1[...] = values
    report = validate(ValidateConfig(damaged, spot_check=10**6, device="cpu"))
    failed = {c.name: c.detail for c in report.checks if c.result == "fail"}
    assert report.status == "corrupt"
    assert "checksums" in failed and "1 of" in failed["spot check"] and shard in failed["spot check"]


@pytest.mark.slow
def test_another_batching_gives_identical_pairs(bf16_world, reference, tmp_path):
    """Batches of 8 frames, cut into calls of 4 by --tokens-per-call (4 frames x K=2 x chunk 8 = 64 tokens)."""
    out = tmp_path / "pairs"
    cli(*_args(bf16_world, out, "--batch-size", "8", "--tokens-per-call", "64"))
    assert_identical_pairs(read_plain(reference), read_plain(out))


def test_resume_with_another_call_size_is_refused(bf16_world, reference, tmp_path):
    out = tmp_path / "pairs"
    shutil.copytree(reference, out)
    result = cli(*_args(bf16_world, out, "--batch-size", "2", "--resume"), exit_code=1)
    assert "generation.frames_per_call: store has 4, this run has 2" in " ".join(result.output.split())


@pytest.mark.slow
def test_kill_and_resume_gives_identical_pairs(bf16_world, reference, tmp_path):
    out = tmp_path / "pairs"
    cmd = reflowpairs_cmd(*_args(bf16_world, out, "--batch-size", "4"))
    killed = signal_after_shards(cmd, out, shards=2, sig=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert_sound_but_incomplete(out)
    done = run_child([*cmd, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert_identical_pairs(read_plain(reference), read_plain(out))


@pytest.mark.slow
def test_two_processes_and_partitions_give_identical_pairs(bf16_world, reference, tmp_path):
    out = tmp_path / "two"
    proc = run_child(torchrun_cmd(*_args(bf16_world, out, "--batch-size", "4")), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical_pairs(read_plain(reference), read_plain(out))

    slices = []
    for i in range(2):
        part = tmp_path / f"slice{i}"
        cli(*_args(bf16_world, part, "--batch-size", "4", "--partition", f"{i}/2"))
        slices.append(str(part))
    cli("merge", *slices, "--out", str(tmp_path / "merged"))
    assert_identical_pairs(read_plain(reference), read_plain(tmp_path / "merged"))


@pytest.mark.slow
def test_exact_store_is_predict_action_chunk_and_passes_validate(bf16_world, reference, tmp_path):
    out = tmp_path / "exact"
    cli(*_args(bf16_world, out, "--episodes", "0", "--exact"))
    assert json.loads((out / "manifest.json").read_text())["generation"]["sampler"] == "exact"
    report = validate(ValidateConfig(out, spot_check=6, device="cpu", atol=1e-12))
    assert report.status == "sound", [c for c in report.checks if c.result == "fail"]
    exact, fast = read_plain(out), read_plain(reference)
    rows = np.isin(fast["obs_index"], exact["obs_index"])
    gap = np.abs(exact["x1"] - fast["x1"][rows]).max()
    assert 0 < gap < 2e-2  # the prefix-cached engine is lerobot's sampler up to bfloat16 rounding


@pytest.mark.slow
def test_train_and_eval_a_bf16_student(bf16_world, reference, tmp_path):
    """Stage 2 on the bf16 store: the student keeps the teacher's dtypes, moves at lerobot's fine-tuning lr, is saved
    to sample in 1 step, and eval runs it against its teacher on the episodes it never trained on (4-9)."""
    from safetensors.torch import load_file

    from reflowpairs.eval.config import EvalConfig
    from reflowpairs.eval.open_loop import evaluate
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    out = tmp_path / "student"
    result = train(
        TrainConfig(pairs=reference, out=out, steps=3, batch_size=8, lr=2e-5, num_workers=0, device="cpu")
    )
    student = result.checkpoint / "pretrained_model"
    teacher_w, student_w = (
        load_file(bf16_world.teacher_dir / "model.safetensors"),
        load_file(student / "model.safetensors"),
    )
    assert {k: (v.dtype, v.shape) for k, v in teacher_w.items()} == {
        k: (v.dtype, v.shape) for k, v in student_w.items()
    }
    expert = [k for k, v in teacher_w.items() if ".lm_expert." in k and v.dtype.itemsize == 2]
    assert any(not torch.equal(teacher_w[k], student_w[k]) for k in expert)  # bf16 weights moved at lr 2e-5
    assert json.loads((student / "config.json").read_text())["num_steps"] == 1

    data = evaluate(
        EvalConfig(
            student=str(student),
            teacher=str(bf16_world.teacher_dir),
            dataset=bf16_world.repo_id,
            dataset_root=bf16_world.dataset_root,
            out=tmp_path / "eval",
            num_steps=[1, 2],
            max_frames=6,
            samples_per_frame=2,
            latency_repeats=1,
            device="cpu",
        )
    )
    assert data["frames"]["episodes"] == [4, 5, 6, 7, 8, 9]
    assert {(row["model"], row["num_steps"]) for row in data["rows"]} >= {
        ("student", 1),
        ("teacher", 1),
        ("student", 2),
    }
    assert all(np.isfinite(row["mse_ref_norm"]) for row in data["rows"])
