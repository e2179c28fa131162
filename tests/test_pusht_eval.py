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


FAST_GENERATE = ("--episodes", "0", "--samples-per-frame", "1", "--num-steps", "2")
FAST_TRAIN = ("--steps", "2", "--batch-size", "4", "--device", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["pi0"])  # pi05 passes too (another ~100 s on 2 shared cores)
def test_lerobot_eval_runs_a_one_step_pi_student_on_pusht(tmp_path, variant):
    """A tiny pi0/pi05 teacher on PushT -> generate -> train -> ``lerobot-eval --policy.path=<student>
    --policy.num_inference_steps=1`` in lerobot's own evaluation loop. lerobot-eval is started through
    ``python -m reflowpairs.tiny.pi_patch lerobot-eval ...``, the documented fixture that installs the tiny size patch the
    student's marker names in that process (without it lerobot would build the 3 B model)."""
    import sys

    from reflowpairs.tiny import pi_patch
    from reflowpairs.tiny.pi import TinyPiSpec, build_tiny_pi_teacher
    from reflowpairs.tiny.world import PUSHT_REPO_ID, build_pusht_dataset

    from .helpers import cli, run_child

    dataset_root = tmp_path / "dataset"
    build_pusht_dataset(dataset_root, num_episodes=2, episode_length=12)
    teacher = build_tiny_pi_teacher(
        tmp_path / "teacher", variant, PUSHT_REPO_ID, dataset_root, spec=TinyPiSpec(train_steps=2)
    )
    data = ("--dataset", PUSHT_REPO_ID, "--dataset-root", str(dataset_root), "--device", "cpu")
    cli("generate", "--teacher", str(teacher), *data, "--out", str(tmp_path / "pairs"), *FAST_GENERATE)
    cli("train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "student"), *FAST_TRAIN)
    student = tmp_path / "student" / "checkpoints" / "last" / "pretrained_model"
    assert pi_patch.read_marker(student) == pi_patch.read_marker(
        teacher
    )  # the student carries the patch it needs
    assert json.loads((student / "config.json").read_text())["type"] == variant

    args = [
        f"--policy.path={student}",
        "--policy.num_inference_steps=1",
        "--policy.device=cpu",
        "--env.type=pusht",
        "--env.episode_length=8",
        "--eval.n_episodes=1",
        "--eval.batch_size=1",
        "--eval.use_async_envs=false",
        f"--output_dir={tmp_path / 'eval'}",
    ]
    done = run_child([sys.executable, "-m", "reflowpairs.tiny.pi_patch", "lerobot-eval", *args], cwd=tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "End of eval" in log and "'n_episodes': 1" in log
    assert (tmp_path / "eval" / "eval_info.json").is_file()
