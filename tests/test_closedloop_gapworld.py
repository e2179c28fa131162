"""Closed-loop ``reflowpairs eval --env.type gapworld`` from the CLI on the bundled gap world (its lerobot_env_gapworld
plugin installed), with a briefly trained teacher and a reflowpairs student: the machinery, not success rates (the
success figures are the benchmark's)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from .helpers import cli

pytest.importorskip("lerobot_env_gapworld")


@pytest.mark.slow
def test_closed_loop_eval_on_the_gap_world(tmp_path, monkeypatch):
    from reflowpairs.tiny.gapworld.record import GapDatasetSpec
    from reflowpairs.tiny.gapworld.teacher import GAP_TEACHER, build_gap_world

    monkeypatch.setenv("REFLOWPAIRS_PROGRESS", "lines")
    spec = GapDatasetSpec(num_episodes=4)
    teacher_spec = dataclasses.replace(GAP_TEACHER, train_steps=4, batch_size=8)
    world = build_gap_world(tmp_path / "gap", dataset_spec=spec, teacher_spec=teacher_spec)
    data = ("--dataset", world.repo_id, "--dataset-root", str(world.dataset_root), "--device", "cpu")
    fast = ("--episodes", "0", "--samples-per-frame", "1", "--num-steps", "2")
    cli("generate", "--teacher", str(world.teacher_dir), *data, "--out", str(tmp_path / "pairs"), *fast)
    cli(
        "train",
        "--pairs",
        str(tmp_path / "pairs"),
        "--out",
        str(tmp_path / "student"),
        "--steps",
        "2",
        "--device",
        "cpu",
    )
    student = tmp_path / "student" / "checkpoints" / "last" / "pretrained_model"
    out = tmp_path / "eval"
    result = cli(
        "eval",
        "--teacher",
        str(world.teacher_dir),
        "--student",
        f"reflow={student}",
        "--env.type=gapworld",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--num-steps",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    )
    report = json.loads((out / "closed_loop.json").read_text())
    full = report["reference"]["num_steps"]
    assert [(c["model"], c["num_steps"]) for c in report["cells"]] == [
        ("teacher", 1),
        ("teacher", full),
        ("reflow", 1),
    ]
    seeds = [[e["seed"] for e in c["episodes"]] for c in report["cells"]]
    assert seeds == [seeds[0]] * 3 and len(seeds[0]) == 2
    assert all(c["chunk_calls"] >= 1 and c["mean_length"] >= 1 for c in report["cells"])
    assert "gapworld" in result.stdout and (out / "success_vs_steps.png").is_file()
