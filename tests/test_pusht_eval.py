"""A reflowed student runs in lerobot's own evaluation loop, unchanged, at 1 ODE step (examples/pusht_reflow.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gym_pusht")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pusht_reflow.py"


def _example():
    spec = importlib.util.spec_from_file_location("pusht_reflow", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_lerobot_eval_runs_the_one_step_student_on_pusht(tmp_path):
    example = _example()
    dataset_root, teacher = example.build_teacher(tmp_path, train_steps=20)
    student = example.reflow_student(tmp_path, dataset_root, teacher, train_steps=4)
    config = json.loads((student / "config.json").read_text())
    assert config["num_steps"] == 1  # train's default: the student samples in 1 step, with no flag anywhere
    teacher_config = json.loads((teacher / "config.json").read_text())
    assert {k: v for k, v in config.items() if k not in ("num_steps", "pretrained_path", "device")} == {
        k: v for k, v in teacher_config.items() if k not in ("num_steps", "pretrained_path", "device")
    }
    result = example.lerobot_eval(student, tmp_path, episode_length=20)
    assert "num_steps" not in " ".join(result.args)  # lerobot-eval takes the step count from the checkpoint
    log = result.stdout + result.stderr
    assert "End of eval" in log and "'n_episodes': 2" in log
    assert (tmp_path / "eval" / "eval_info.json").is_file()
