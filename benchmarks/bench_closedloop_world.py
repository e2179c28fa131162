"""Closed-loop calibration of the bundled gap world (issue #24): success rates through lerobot's own rollout.

Builds the gap world (``reflowpairs tiny-world --world gap``: dataset + SmolVLA teacher trained with lerobot's
flow-matching loss), generates reflow pairs and trains a 1-step student with reflowpairs' own commands, then runs
every cell with ``reflowpairs eval --env.type gapworld`` (lerobot's own ``eval_policy`` rollout), each cell on
the same ``--episodes`` episodes (env seeds ``--seed`` ...) with the same torch seed for the noise:

- teacher at its full step count (10) and at 1 step (``num_steps`` set on the loaded config, as
  ``--policy.num_steps=1`` does);
- the student at 1 and 2 steps.

Prints each stage's wall time, a table and one JSON line per cell (success %, 95% Wilson interval, mean return,
mean episode length), and the three goals: teacher >= 80%; teacher at 1 step >= 25 points lower; student at 1 step
within 5 points of the teacher at 10.

    python benchmarks/bench_closedloop_world.py --out /tmp/closedloop  # the demo recipe (gapworld.teacher.GAP_REFLOW)
    python benchmarks/bench_closedloop_world.py --out /tmp/plain --distill-steps 0  # reflow alone
    python benchmarks/bench_closedloop_world.py --out /tmp/closedloop --world /tmp/closedloop/world  # reuse a world
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from reflowpairs.dataset import quiet_dataset_logs
from reflowpairs.tiny.gapworld.teacher import GAP_REFLOW

quiet_dataset_logs()
RP = [sys.executable, "-m", "reflowpairs"]


def run(cmd: list[str]) -> float:
    """Run ``cmd`` to its end (output shown), failing loudly; its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(
        cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--world", type=Path, help="an already built gap world (tiny-world --world gap)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="tiny-world --train-steps")
    parser.add_argument(
        "--k", type=int, default=GAP_REFLOW.samples_per_frame, help="generate --samples-per-frame"
    )
    parser.add_argument("--student-steps", type=int, default=GAP_REFLOW.train_steps)
    parser.add_argument("--student-batch", type=int, default=GAP_REFLOW.batch_size)
    parser.add_argument("--student-lr", type=float, default=GAP_REFLOW.lr)
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=GAP_REFLOW.distill_steps,
        help="then a distill stage as `pipeline --distill` runs it: train --init <student> --time-sampling "
        "noise-end --allow-mismatch on the same pairs, this many steps (0: none)",
    )
    parser.add_argument("--distill-lr", type=float, default=GAP_REFLOW.distill_lr)
    parser.add_argument("--student", type=Path, help="evaluate this student instead of training one")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument(
        "--batch", type=int, default=50, help="parallel envs (lerobot-eval's --eval.batch_size)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    world = args.world or args.out / "world"
    if not (world / "teacher" / "config.json").exists():
        steps = [] if args.teacher_steps is None else ["--train-steps", str(args.teacher_steps)]
        times["tiny-world --world gap"] = run([*RP, "tiny-world", str(world), "--world", "gap", *steps])
    teacher = world / "teacher"
    student = args.student
    if student is None:
        pairs, out = args.out / "pairs", args.out / "student"
        times["generate"] = run(
            [*RP, "generate", "--teacher", str(teacher), "--dataset", "reflowpairs/tiny_gap"]
            + [
                "--dataset-root",
                str(world / "dataset"),
                "--samples-per-frame",
                str(args.k),
                "--num-steps",
                "10",
            ]
            + ["--cache-features", "--out", str(pairs), "--device", "cpu"]
        )
        times["train"] = run(
            [*RP, "train", "--pairs", str(pairs), "--out", str(out), "--steps", str(args.student_steps)]
            + ["--batch-size", str(args.student_batch), "--lr", str(args.student_lr), "--num-workers", "1"]
            + ["--device", "cpu"]
        )
        student = out / "checkpoints" / "last" / "pretrained_model"
        if args.distill_steps:
            distilled = args.out / "distilled"
            times["train (distill)"] = run(
                [*RP, "train", "--pairs", str(pairs), "--out", str(distilled), "--init", str(student)]
                + ["--allow-mismatch", "--time-sampling", "noise-end", "--steps", str(args.distill_steps)]
                + [
                    "--batch-size",
                    str(args.student_batch),
                    "--lr",
                    str(args.distill_lr),
                    "--num-workers",
                    "1",
                ]
                + ["--device", "cpu"]
            )
            student = distilled / "checkpoints" / "last" / "pretrained_model"
    closed = args.out / "closed_loop"
    times["eval --env.type gapworld"] = run(
        [*RP, "eval", "--env.type", "gapworld", "--teacher", str(teacher), "--student", f"student={student}"]
        + ["--num-steps", "1,2", "--n-episodes", str(args.episodes), "--seed", str(args.seed)]
        + ["--eval.batch_size", str(args.batch), "--out", str(closed), "--device", "cpu"]
    )
    report = json.loads((closed / "closed_loop.json").read_text())
    cells = {
        f"{c['model']}@{c['num_steps']}": {
            "success_pct": 100 * c["success_rate"],
            "wilson95": [round(100 * c["success_low"], 1), round(100 * c["success_high"], 1)],
            "mean_return": c["mean_return"],
            "mean_length": c["mean_length"],
        }
        for c in report["cells"]
        if c["num_steps"] in (1, 2, 10)
    }
    times["total"] = sum(times.values())
    print("\nstage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    print(
        f"\n{'cell':<12} {'success %':>9} {'95% Wilson':>14} {'return':>7} {'length':>7}  ({args.episodes} episodes, seeds {args.seed}+)"
    )
    for name, cell in cells.items():
        low, high = cell["wilson95"]
        print(
            f"{name:<12} {cell['success_pct']:>9.1f} {f'[{low:.1f}, {high:.1f}]':>14} {cell['mean_return']:>7.2f}"
            f" {cell['mean_length']:>7.2f}"
        )
    t10, t1, s1 = (cells[k]["success_pct"] for k in ("teacher@10", "teacher@1", "student@1"))
    goals = {
        "teacher@10 >= 80": t10 >= 80,
        "teacher@10 - teacher@1 >= 25": t10 - t1 >= 25,
        "student@1 >= teacher@10 - 5": s1 >= t10 - 5,
    }
    print("\ngoals: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()))
    result = {
        "cells": cells,
        "times_s": times,
        "goals": goals,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "closedloop.json").write_text(json.dumps(result, indent=2))
    for name, cell in cells.items():
        print(json.dumps({"cell": name, **cell}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
