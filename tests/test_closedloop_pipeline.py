"""``reflowpairs pipeline --env.type pusht``: the round's student and the teacher are also evaluated in closed loop
(teacher at 1 step and its full count, the student at the eval step counts), and the summary shows success."""

from __future__ import annotations

import json

import pytest

from .helpers import cli

pytest.importorskip("gym_pusht")


@pytest.mark.slow
def test_pipeline_evaluates_every_student_in_closed_loop(tmp_path, monkeypatch):
    from reflowpairs.tiny.world import (
        PUSHT_REPO_ID,
        TinyTeacherSpec,
        build_pusht_dataset,
        build_tiny_teacher,
        build_tiny_vlm,
    )

    monkeypatch.setenv("REFLOWPAIRS_PROGRESS", "lines")
    dataset = build_pusht_dataset(tmp_path / "dataset", num_episodes=2, episode_length=12)
    teacher = build_tiny_teacher(
        build_tiny_vlm(tmp_path / "vlm"),
        dataset,
        tmp_path / "teacher",
        TinyTeacherSpec(train_steps=2, batch_size=4),
    )
    out = tmp_path / "recipe"
    args = ["pipeline", "--teacher", str(teacher), "--dataset", PUSHT_REPO_ID, "--out", str(out)]
    args += ["--dataset-root", str(tmp_path / "dataset"), "--episodes", "0", "--eval-episodes", "1"]
    args += ["--rounds", "1", "--samples-per-frame", "1", "--num-steps", "2", "--train-steps", "2"]
    args += ["--batch-size", "4", "--spot-check", "1", "--eval-num-steps", "1,2", "--eval-max-frames", "2"]
    args += ["--device", "cpu", "--env.type", "pusht", "--env.episode_length=5", "--eval.n_episodes", "2"]
    result = cli(*args)
    report = json.loads((out / "closed_loop" / "closed_loop.json").read_text())
    assert [(c["model"], c["num_steps"]) for c in report["cells"]] == [
        ("teacher", 1),
        ("teacher", 10),
        ("round1", 1),
        ("round1", 2),
    ]
    assert all(c["n_episodes"] == 2 for c in report["cells"])
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["closed_loop"]["verdict"].keys() == {"teacher", "round1"}
    assert "success [95% CI]" in result.stdout and "closed_loop.md" in result.stdout
    # the comparison the pipeline prints and writes holds success beside the open-loop error
    comparison = json.loads((out / "comparison" / "comparison.json").read_text())
    cells = {(c["model"], c["num_steps"]): c for c in report["cells"]}
    with_success = {(r["model"], r["num_steps"]) for r in comparison["rows"] if "success_rate" in r}
    assert with_success == {("teacher", 1), ("round1", 1), ("round1", 2)}  # the open-loop rows with a cell
    for row in comparison["rows"]:
        if (row["model"], row["num_steps"]) in with_success:
            cell = cells[(row["model"], row["num_steps"])]
            assert row["mse_ref_norm"] is not None or row["model"] == "teacher"
            assert (row["success_rate"], row["success_low"], row["success_high"]) == (
                cell["success_rate"],
                cell["success_low"],
                cell["success_high"],
            )
    assert {(c["model"], c["num_steps"]) for c in comparison["closed_loop"]["cells"]} == set(cells)
    md = (out / "comparison" / "comparison.md").read_text()
    assert "success [95% CI], closed loop" in md and "teacher at 10 steps" in md
    assert "success: closed loop in pusht, 2 episodes per cell" in " ".join(result.stdout.split())
    again = cli(*args)  # a rerun: every stage and every closed-loop cell is kept
    assert "rollouts" not in again.output


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (("--env.type", "nosuch"), "no env type 'nosuch'"),
        (("--env.type", "pusht", "--env.no_such_field", "3"), "no field no_such_field"),
        (("--env.type", "pusht", "--eval.n_episodes", "0"), "is 0"),
    ],
)
def test_pipeline_checks_the_env_before_any_round(tmp_path, env, expected):
    out = tmp_path / "recipe"
    args = [
        "pipeline",
        "--teacher",
        str(tmp_path / "teacher"),
        "--dataset",
        "lerobot/pusht",
        "--out",
        str(out),
    ]
    result = cli(*args, "--device", "cpu", *env, exit_code=1)
    text = " ".join(result.output.split())
    assert expected in text and "Traceback" not in result.output
    assert not (out / "round1").exists() and "round1/generate" not in result.output  # no generate ran
