"""Closed-loop ``reflowpairs eval --env.type`` from the CLI on PushT (lerobot's ``pusht`` env, gym-pusht) with a
PushT-shaped tiny SmolVLA teacher and a reflowpairs student trained from it: the report, the shared seeds, the
resume-skip of finished cells, and each error message. Few episodes, short episodes: the machinery, not success."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from .helpers import cli

pytest.importorskip("gym_pusht")

FAST_GENERATE = ("--episodes", "0", "--samples-per-frame", "1", "--num-steps", "2")
FAST_TRAIN = ("--steps", "2", "--batch-size", "4", "--device", "cpu")
EPISODES = 3
SHORT = ("--env.episode_length", "6", "--n-episodes", str(EPISODES), "--eval.batch_size", "2", "--seed", "7")


@pytest.fixture(scope="module")
def pusht(tmp_path_factory) -> dict[str, Path]:
    """A tiny PushT dataset, a SmolVLA teacher trained on it (2 steps) and a student (generate + train, 2 steps)."""
    from reflowpairs.tiny.world import (
        PUSHT_REPO_ID,
        TinyTeacherSpec,
        build_pusht_dataset,
        build_tiny_teacher,
        build_tiny_vlm,
    )

    root = tmp_path_factory.mktemp("pusht")
    dataset = build_pusht_dataset(root / "dataset", num_episodes=2, episode_length=12)
    teacher = build_tiny_teacher(
        build_tiny_vlm(root / "vlm"), dataset, root / "teacher", TinyTeacherSpec(train_steps=2, batch_size=4)
    )
    data = ("--dataset", PUSHT_REPO_ID, "--dataset-root", str(root / "dataset"), "--device", "cpu")
    cli("generate", "--teacher", str(teacher), *data, "--out", str(root / "pairs"), *FAST_GENERATE)
    cli("train", "--pairs", str(root / "pairs"), "--out", str(root / "student"), *FAST_TRAIN)
    student = root / "student" / "checkpoints" / "last" / "pretrained_model"
    return {"root": root, "teacher": teacher, "student": student}


def _eval(pusht, out: Path, *extra: str, exit_code: int = 0, students: tuple[str, ...] | None = None):
    students = students if students is not None else (f"rf={pusht['student']}", f"same={pusht['teacher']}")
    args = ["eval", "--teacher", str(pusht["teacher"]), "--env.type", "pusht", *SHORT]
    for student in students:
        args += ["--student", student]
    return cli(*args, "--num-steps", "1,2", "--device", "cpu", "--out", str(out), *extra, exit_code=exit_code)


@pytest.mark.slow
def test_closed_loop_eval_on_pusht(pusht, tmp_path, monkeypatch):
    monkeypatch.setenv("REFLOWPAIRS_PROGRESS", "lines")
    out = tmp_path / "eval"
    result = _eval(pusht, out)
    report = json.loads((out / "closed_loop.json").read_text())
    assert report["env"] == {"type": "pusht", "options": {"episode_length": "6"}}
    cells = {(c["model"], c["num_steps"]): c for c in report["cells"]}
    # the teacher at the asked step counts and its own full count (config num_steps: 10), each student at 1 and 2
    assert set(cells) == {
        ("teacher", 1),
        ("teacher", 2),
        ("teacher", 10),
        ("rf", 1),
        ("rf", 2),
        ("same", 1),
        ("same", 2),
    }
    assert report["reference"]["num_steps"] == 10 and report["models"]["rf"]["step_field"] == "num_steps"
    for cell in cells.values():
        assert [e["seed"] for e in cell["episodes"]] == [7, 8, 9]  # every cell runs the same episodes
        assert all(1 <= e["length"] <= 6 for e in cell["episodes"])
        assert cell["n_episodes"] == EPISODES and cell["chunk_calls"] >= 1 and cell["latency_ms"] > 0
        assert cell["success_low"] <= cell["success_rate"] <= cell["success_high"]
        assert (out / "cells" / f"{cell['model']}-{cell['num_steps']}.json").is_file()
    # the teacher's own checkpoint as a student: the same episodes, the same noises, so the same rollouts
    for steps in (1, 2):
        assert cells[("same", steps)]["episodes"] == cells[("teacher", steps)]["episodes"]
    assert {(p["model"], p["num_steps"]) for p in report["paired"]} == set(cells) - {("teacher", 10)}
    for p in report["paired"]:
        assert p["both"] + p["only_model"] + p["only_teacher"] + p["neither"] == EPISODES
    assert set(report["verdict"]) == {"teacher", "rf", "same"}
    for name in ("closed_loop.md", "success_vs_steps.png", "eval_options.yaml"):
        assert (out / name).stat().st_size > 0
    assert (out / "success_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert "success [95% CI]" in result.stdout and "fewest steps" in result.stdout
    total = 7 * EPISODES
    assert f"rollouts {total}/{total}" in result.output  # one progress display across all cells


@pytest.mark.slow
def test_rerun_skips_finished_cells_and_refuses_other_settings(pusht, tmp_path, monkeypatch):
    monkeypatch.setenv("REFLOWPAIRS_PROGRESS", "lines")
    out = tmp_path / "eval"
    students = (f"rf={pusht['student']}",)
    _eval(pusht, out, students=students)
    cells = sorted((out / "cells").glob("*.json"))
    assert [c.name for c in cells] == [
        "rf-1.json",
        "rf-2.json",
        "teacher-1.json",
        "teacher-10.json",
        "teacher-2.json",
    ]
    first = json.loads((out / "closed_loop.json").read_text())
    (out / "cells" / "rf-2.json").unlink()  # as if the run had crashed during that cell
    stamps = {c.name: c.stat().st_mtime_ns for c in cells if c.exists()}
    result = _eval(pusht, out, students=students)
    assert f"rollouts {EPISODES}/{EPISODES}" in result.output  # only the missing cell ran
    assert {c.name: c.stat().st_mtime_ns for c in cells if c.name in stamps} == stamps
    again = json.loads((out / "closed_loop.json").read_text())
    # seeded: the re-run cell gives the same episodes (its timings differ)
    assert [c["episodes"] for c in again["cells"]] == [c["episodes"] for c in first["cells"]]
    repeated = cli("eval", "--config", str(out / "eval_options.yaml"))  # the options file repeats the run
    assert "rollouts" not in repeated.output and (out / "closed_loop.json").is_file()
    changed = _eval(pusht, out, "--n-episodes", "2", students=students, exit_code=1)
    assert "was made with other settings" in changed.output and "n_episodes: 3 there, 2 now" in changed.output


def test_unknown_env_type_lists_the_known_ones_and_the_plugin_convention(tmp_path):
    result = cli(
        "eval",
        "--teacher",
        str(tmp_path / "t"),
        "--env.type",
        "nosuchworld",
        "--out",
        str(tmp_path),
        exit_code=1,
    )
    text = " ".join(result.output.split())
    assert "no env type 'nosuchworld'" in text and "pusht" in text and "aloha" in text
    assert "lerobot_env_" in text and "register_subclass" in text


def test_unknown_env_field_and_bad_value_are_named(tmp_path):
    base = ("eval", "--teacher", str(tmp_path / "t"), "--env.type", "pusht", "--out", str(tmp_path))
    text = " ".join(cli(*base, "--env.no_such_field", "3", exit_code=1).output.split())
    assert "no field no_such_field" in text and "episode_length" in text
    text = " ".join(cli(*base, "--env.episode_length=abc", exit_code=1).output.split())
    assert "episode_length" in text and "abc" in text
    text = " ".join(
        cli("eval", "--teacher", "t", "--env.episode_length", "3", "--out", "x", exit_code=2).output.split()
    )
    assert "--env.type" in text


@pytest.mark.slow
def test_env_features_that_do_not_fit_the_policy_are_refused(pusht, tmp_path):
    # PushT's state-only observations: no camera image, which the teacher takes as observation.image
    result = _eval(
        pusht, tmp_path / "eval", "--env.obs_type", "environment_state_agent_pos", students=(), exit_code=1
    )
    text = " ".join(result.output.split())
    assert "does not fit the pusht env" in text and "observation.image" in text
    assert not (tmp_path / "eval" / "cells").exists()


@pytest.mark.slow
def test_missing_env_package_names_the_pip_extra(pusht, tmp_path):
    if importlib.util.find_spec("gym_aloha") is not None:  # pragma: no cover - where gym-aloha is installed
        pytest.skip("gym-aloha is installed")
    result = _eval(
        pusht, tmp_path / "eval", "--env.type", "aloha", students=(), exit_code=1
    )  # the last type wins
    text = " ".join(result.output.split())
    assert "gym_aloha" in text and 'pip install "lerobot[aloha]"' in text


def test_open_loop_still_needs_dataset_and_student(tmp_path):
    text = " ".join(
        cli("eval", "--teacher", "t", "--student", "s", "--out", str(tmp_path), exit_code=2).output.split()
    )
    assert "--dataset" in text and "--env.type" in text
    text = " ".join(
        cli("eval", "--teacher", "t", "--dataset", "d", "--out", str(tmp_path), exit_code=2).output.split()
    )
    assert "--student" in text


@pytest.mark.parametrize(
    ("option", "named"),
    [(("--n-episodes", "0"), "n-episodes"), (("--eval.batch_size", "0"), "--eval.batch_size")],
)
def test_bad_episode_count_or_env_batch_is_a_clear_error(tmp_path, option, named):
    result = cli(
        "eval", "--teacher", "x", "--env.type", "pusht", *option, "--out", str(tmp_path / "x"), exit_code=1
    )
    text = " ".join(result.output.split())
    assert named in text and "is 0" in text
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "option",
    [
        ("--dataset", "lerobot/pusht"),
        ("--max-frames", "5"),
        ("--samples-per-frame", "2"),
        ("--allow-mismatch",),
    ],
)
def test_open_loop_options_are_refused_with_env_type(tmp_path, option):
    result = cli(
        "eval", "--teacher", "x", "--env.type", "pusht", *option, "--out", str(tmp_path), exit_code=2
    )
    text = " ".join(result.output.replace("│", " ").split())
    assert option[0] in text and "not with --env.type" in text


@pytest.mark.slow
def test_rerun_with_a_changed_checkpoint_under_the_same_label_is_refused(pusht, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    student = tmp_path / "student"
    shutil.copytree(pusht["student"], student)
    out = tmp_path / "eval"
    args = ("--num-steps", "1")
    _eval(pusht, out, *args, students=(f"rf={student}",))
    stats = next(student.glob("policy_postprocessor_step_*.safetensors"))
    tensors = load_file(stats)
    save_file({k: v * 2 + 1 for k, v in tensors.items()}, stats)  # other normaliser stats, same weights
    result = _eval(pusht, out, *args, students=(f"rf={student}",), exit_code=1)
    text = " ".join(result.output.split())
    assert "was made with other settings" in text and "checkpoint_fingerprint" in text and "rf-" in text
