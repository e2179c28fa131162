"""`reflowpairs eval` with a student `reflowpairs train` wrote: the teacher it was trained from is checked, and the
episodes it trained on are left out unless asked for (and then the report says so)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from reflowpairs.cli.app import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.config import EvalConfig
from reflowpairs.eval.open_loop import evaluate
from reflowpairs.eval.report import frames_text, markdown, report_notes
from reflowpairs.eval.student_training import choose_episodes, read_student_state, training_frames

from .helpers import runner

TRAINED = [0, 1, 2, 3, 4, 5]  # the episodes of tiny_store
HELD_OUT = [6, 7, 8, 9]


@pytest.fixture(scope="module")
def trained_student(tiny_store, tmp_path_factory) -> Path:
    """A student `reflowpairs train` wrote from the tiny teacher on tiny_store (2 steps: it only needs its state)."""
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    out = tmp_path_factory.mktemp("trained") / "run"
    result = train(
        TrainConfig(
            pairs=tiny_store, out=out, steps=2, batch_size=8, num_workers=0, device="cpu", save_every=100
        )
    )
    return result.checkpoint / "pretrained_model"


@pytest.fixture(scope="module")
def other_teacher(tiny_world, tmp_path_factory) -> Path:
    """Teacher B: the tiny teacher with noise added to its action head (same features, another fingerprint)."""
    from reflowpairs.teacher import load_policy

    loaded = load_policy(tiny_world.teacher_dir, "cpu")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in loaded.policy.model.action_out_proj.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("teacher_b") / "teacher"
    loaded.policy.save_pretrained(out)
    loaded.preprocessor.save_pretrained(out)
    loaded.postprocessor.save_pretrained(out)
    return out


def _cfg(world, student: Path, tmp_path: Path, **overrides) -> EvalConfig:
    settings = {
        "student": str(student),
        "teacher": str(world.teacher_dir),
        "dataset": world.repo_id,
        "dataset_root": world.dataset_root,
        "out": tmp_path / "report",
        "num_steps": [1, 10],
        "max_frames": 2,
        "samples_per_frame": 1,
        "latency_repeats": 1,
        "device": "cpu",
    }
    settings.update(overrides)
    return EvalConfig(**settings)


def _meta(world):
    from reflowpairs.dataset import dataset_fingerprint, open_metadata

    meta = open_metadata(world.repo_id, world.dataset_root)
    return meta, dataset_fingerprint(meta)


# --- the teacher ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_student_of_another_teacher_is_refused(tiny_world, trained_student, other_teacher, tmp_path):
    from reflowpairs.teacher import fingerprint_checkpoint

    cfg = _cfg(tiny_world, trained_student, tmp_path, teacher=str(other_teacher), episodes=[9])
    with pytest.raises(ReflowPairsError) as err:
        evaluate(cfg)
    message = str(err.value)
    own = fingerprint_checkpoint(str(tiny_world.teacher_dir))["fingerprint"][:12]
    given = fingerprint_checkpoint(str(other_teacher))["fingerprint"][:12]
    assert (
        f"was trained from teacher {own}" in message
        and f"`teacher` {other_teacher} is teacher {given}" in message
    )
    assert f"Set `teacher` to {tiny_world.teacher_dir} (the checkpoint it was trained from)" in message
    assert "`allow_mismatch`" in message
    assert not cfg.out.exists()


@pytest.mark.slow
def test_allow_mismatch_runs_and_labels_the_report_cli(tiny_world, trained_student, other_teacher, tmp_path):
    """Through the CLI, with progress bars forced on: the run is labelled, the bar does not stay on screen,
    and a "next:" line follows the summary."""
    out = tmp_path / "report"
    args = [
        "eval",
        "--student",
        str(trained_student),
        "--teacher",
        str(other_teacher),
        "--dataset",
        tiny_world.repo_id,
        "--dataset-root",
        str(tiny_world.dataset_root),
        "--episodes",
        "9",
        "--num-steps",
        "1,10",
        "--out",
        str(out),
        "--max-frames",
        "2",
        "--samples-per-frame",
        "1",
        "--latency-repeats",
        "1",
        "--device",
        "cpu",
        "--allow-mismatch",
    ]
    result = runner.invoke(app, args, env={"REFLOWPAIRS_PROGRESS": "1"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["checks"]["teacher"]["matches"] is False and report["checks"]["allow_mismatch"] is True
    assert report["student"]["training"]["teacher_matches"] is False
    assert report["labels"] == ["TEACHER MISMATCH (--allow-mismatch)"]
    assert report_notes(report)[0].startswith(
        "TEACHER MISMATCH (--allow-mismatch): the student was trained from teacher"
    )
    assert (
        "TEACHER MISMATCH" in result.output
        and "**TEACHER MISMATCH (--allow-mismatch)**" in (out / "report.md").read_text()
    )
    flat = " ".join(result.output.split())  # the console wraps long lines
    assert (
        "frames: 2 x 1 noises from episodes 9 (--episodes): held out (the student trained on episodes 0-5"
        in flat
    )
    # one transient bar: nothing of it is left after the table
    assert "held-out frames" not in result.output and "latency ━" not in result.output
    lines = result.output.splitlines()
    summary = next(
        i for i, line in enumerate(lines) if line.startswith("student 1-step error / teacher 1-step error")
    )
    nxt = next(i for i, line in enumerate(lines) if line.startswith("next: "))
    assert nxt > summary and f"next: {report['next']['command']}" in result.output  # one line: copy-pasteable


def test_plain_checkpoint_student_is_evaluated_with_a_note(tiny_world, tmp_path):
    """A student with no training state (here the teacher itself) can be evaluated; the report says what is unchecked."""
    assert read_student_state(str(tiny_world.teacher_dir)) is None
    meta, fp = _meta(tiny_world)
    training = training_frames(None, None, meta, fp)
    assert training["status"] == "unrecorded" and training["episodes"] is None
    cfg = _cfg(tiny_world, tiny_world.teacher_dir, tmp_path)
    assert choose_episodes(cfg, meta.total_episodes, training) == list(range(10))  # all: nothing is known


@pytest.mark.slow
def test_damaged_training_state_is_named(tiny_world, trained_student, tmp_path):
    copy_dir = tmp_path / "ckpt"
    shutil.copytree(trained_student.parent, copy_dir)
    (copy_dir / "training_state" / "reflow_state.json").write_text("{not json")
    with pytest.raises(ReflowPairsError) as err:
        evaluate(_cfg(tiny_world, copy_dir / "pretrained_model", tmp_path, episodes=[9]))
    assert str(err.value).startswith(
        f"`student`: {copy_dir / 'training_state' / 'reflow_state.json'} is not valid JSON"
    )
    assert "evaluate a copy of pretrained_model/ on its own" in str(err.value)


# --- the frames -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_held_out_episodes_by_default(tiny_world, trained_student, tmp_path):
    """No --episodes: every episode the student's store does not cover (the store holds episodes 0-5)."""
    report = evaluate(_cfg(tiny_world, trained_student, tmp_path, max_frames=3))
    frames = report["frames"]
    assert frames["episodes"] == HELD_OUT and report["dataset"]["episodes"] == HELD_OUT
    assert frames["selection"] == "held_out" and report["settings"]["episodes"] is None
    training = frames["training"]
    assert training["status"] == "known" and training["episodes"] == TRAINED and training["included"] == []
    assert training["num_frames"] == 6 * 24
    assert all(i >= 6 * 24 for i in frames["obs_index"])  # 24 frames per episode: none of episodes 0-5
    assert report["checks"]["teacher"]["matches"] is True and report["labels"] == []
    assert report_notes(report) == []
    text = frames_text(report)
    assert text.startswith(
        "frames: 3 x 1 noises from episodes 6-9: held out (the student trained on episodes 0-5"
    )
    assert text in markdown(report)


@pytest.mark.slow
def test_episodes_the_student_trained_on_are_refused(tiny_world, trained_student, tmp_path):
    cfg = _cfg(tiny_world, trained_student, tmp_path, episodes=[4, 5, 8])
    with pytest.raises(ReflowPairsError) as err:
        evaluate(cfg)
    message = str(err.value)
    assert (
        "`episodes` includes 4-5, which the student" in message and "holds frames of episodes 0-5" in message
    )
    assert "Choose held-out episodes (6-9)" in message and "`include_training_frames`" in message
    assert not cfg.out.exists()


@pytest.mark.slow
def test_include_training_frames_labels_the_report(tiny_world, trained_student, tmp_path):
    report = evaluate(
        _cfg(tiny_world, trained_student, tmp_path, episodes=[4, 8], include_training_frames=True)
    )
    assert report["frames"]["episodes"] == [4, 8] and report["frames"]["training"]["included"] == [4]
    assert report["labels"] == ["TRAINING FRAMES INCLUDED (--include-training-frames)"]
    notes = report_notes(report)
    assert notes[0].startswith(
        "TRAINING FRAMES INCLUDED (--include-training-frames): of the evaluated episodes, "
        "the student trained on 4, so"
    )
    assert "INCLUDES training episodes 4 (--include-training-frames" in frames_text(report)
    assert "**TRAINING FRAMES INCLUDED (--include-training-frames)**" in markdown(report)


@pytest.mark.slow
def test_a_student_that_trained_on_every_episode(tiny_world, trained_student, tmp_path):
    meta, _ = _meta(tiny_world)
    training = {"status": "known", "episodes": list(range(10)), "store": "/s", "reason": ""}
    with pytest.raises(ReflowPairsError) as err:
        choose_episodes(_cfg(tiny_world, trained_student, tmp_path), meta.total_episodes, training)
    assert "trained on every episode of reflowpairs/tiny_reach (0-9, store /s)" in str(err.value)
    assert "`include_training_frames`" in str(err.value)
    allowed = _cfg(tiny_world, trained_student, tmp_path, include_training_frames=True)
    assert choose_episodes(allowed, meta.total_episodes, training) == list(range(10))


@pytest.mark.slow
def test_training_store_gone_or_moved(tiny_world, trained_student, tiny_store, tmp_path):
    """The store the state records is gone: refused without --episodes (message names the fix); --episodes are used
    as given, with a note; --pairs at the store's new location (same store id) finds the training episodes again."""
    meta, fp = _meta(tiny_world)
    state = read_student_state(str(trained_student))
    moved = copy.deepcopy(state)
    moved["store"]["path"] = str(tmp_path / "gone")
    training = training_frames(moved, None, meta, fp)
    assert training["status"] == "store_gone" and f"{tmp_path / 'gone'}" in training["reason"]
    with pytest.raises(ReflowPairsError) as err:
        choose_episodes(_cfg(tiny_world, trained_student, tmp_path), meta.total_episodes, training)
    message = str(err.value)
    assert "Cannot tell which frames the student" in message and "is gone" in message
    assert "Set `pairs` to the store's new location, or `episodes` to episodes you know" in message
    assert choose_episodes(
        _cfg(tiny_world, trained_student, tmp_path, episodes=[9]), meta.total_episodes, training
    ) == [9]
    report = {
        "frames": {
            "count": 1,
            "samples_per_frame": 1,
            "episodes": [9],
            "selection": "given",
            "training": {**training, "included": None},
        }
    }
    assert "episodes 9 were not checked against its training frames" in report_notes(report)[0]
    assert frames_text(report).endswith(
        f"not checked (the student's training store {tmp_path / 'gone'} (recorded in its "
        "reflow_state.json) is gone)"
    )
    found = training_frames(moved, tiny_store, meta, fp)
    assert found["status"] == "known" and found["episodes"] == TRAINED
    replaced = copy.deepcopy(moved)
    replaced["store"]["store_id"] = "another"
    replaced["store"]["path"] = str(tiny_store)
    assert "now holds another pair store" in training_frames(replaced, None, meta, fp)["reason"]


@pytest.mark.slow
def test_student_trained_on_another_dataset(tiny_world, trained_student, tmp_path):
    meta, _ = _meta(tiny_world)
    state = read_student_state(str(trained_student))
    training = training_frames(state, None, meta, "0" * 64)
    assert training["status"] == "other_dataset" and training["episodes"] == []
    assert choose_episodes(
        _cfg(tiny_world, trained_student, tmp_path), meta.total_episodes, training
    ) == list(range(10))
