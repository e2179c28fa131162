"""Reflow a tiny SmolVLA for the PushT environment and run the 1-step student in lerobot's own evaluation loop.

    tiny PushT dataset (real gym-pusht rollouts) -> teacher (lerobot's flow-matching loss)
      -> reflowpairs generate -> reflowpairs train (the student is saved to sample in 1 step)
      -> lerobot-eval --policy.path=<student> --env.type=pusht (no step-count flag: the checkpoint says 1)

Everything is offline and runs on CPU in a few minutes. The student is an ordinary lerobot checkpoint: lerobot-eval
loads it with no reflowpairs code involved.

    python examples/pusht_reflow.py --out pusht_out
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def run(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    print(f"\n$ {shlex.join(args)}", flush=True)
    return subprocess.run(args, check=True, cwd=cwd, capture_output=True, text=True)


def build_teacher(out: Path, train_steps: int = 40) -> tuple[Path, Path]:
    """The PushT dataset and a briefly trained SmolVLA teacher for it, under ``out``."""
    from reflowpairs.tiny.world import (
        TinyTeacherSpec,
        build_pusht_dataset,
        build_tiny_teacher,
        build_tiny_vlm,
    )

    dataset = build_pusht_dataset(out / "dataset")
    vlm = build_tiny_vlm(out / "vlm")
    teacher = build_tiny_teacher(
        vlm, dataset, out / "teacher", TinyTeacherSpec(train_steps=train_steps, batch_size=16)
    )
    return out / "dataset", teacher


def reflow_student(out: Path, dataset_root: Path, teacher: Path, train_steps: int = 20) -> Path:
    """generate + train with the real CLI; returns the student's pretrained_model/ directory."""
    from reflowpairs.tiny.world import PUSHT_REPO_ID

    rp = str(BIN / "reflowpairs")
    run(
        [
            rp,
            "generate",
            "--teacher",
            str(teacher),
            "--dataset",
            PUSHT_REPO_ID,
            "--dataset-root",
            str(dataset_root),
            "--out",
            str(out / "pairs"),
            "--samples-per-frame",
            "2",
            "--device",
            "cpu",
        ]
    )
    run(
        [
            rp,
            "train",
            "--pairs",
            str(out / "pairs"),
            "--out",
            str(out / "student"),
            "--steps",
            str(train_steps),
            "--batch-size",
            "8",
            "--device",
            "cpu",
        ]
    )
    return out / "student" / "checkpoints" / "last" / "pretrained_model"


def lerobot_eval(student: Path, out: Path, episode_length: int = 50) -> subprocess.CompletedProcess:
    """lerobot's own evaluation loop on the PushT env, with the student as saved (1 ODE step, from its config.json)."""
    return run(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={student}",
            "--env.type=pusht",
            "--eval.n_episodes=2",
            "--eval.batch_size=2",
            "--eval.use_async_envs=false",
            "--policy.device=cpu",
            f"--env.episode_length={episode_length}",
            f"--output_dir={out / 'eval'}",
        ],
        cwd=out,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("pusht_out"))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dataset_root, teacher = build_teacher(out)
    student = reflow_student(out, dataset_root, teacher)
    result = lerobot_eval(student, out)
    summary = [
        line
        for line in result.stderr.splitlines() + result.stdout.splitlines()
        if "Overall Aggregated Metrics" in line or "avg_sum_reward" in line
    ]
    print("\n".join(summary[:2]))
    print(
        f"\nlerobot-eval ran the 1-step student {student} to completion; videos and metrics in {out / 'eval'}"
    )


if __name__ == "__main__":
    main()
