"""The whole pipeline on the bundled closed-loop world, through the real CLI, offline, on CPU.

    dataset + teacher (tiny-world --world gap) -> generate -> validate -> train (reflow, then distill)
    -> eval (open loop, held-out frames) -> eval --env.type gapworld (closed loop, lerobot's own rollout)

The gap world (docs/closed-loop-world.md) is built so that one-step sampling fails: the expert passes a wall through
one of two gaps chosen at random, and the mean of the two (what a flow-matching teacher sampled in 1 step returns)
hits the wall. The recipe is the calibrated one (``reflowpairs.tiny.gapworld.teacher.GAP_REFLOW``, benchmarks/RESULTS.md
"Closed loop (#24)"). generate stores the feature cache too (``--cache-features``, docs/feature-cache.md), so train
reads the frames' image embeddings instead of decoding images and running the frozen vision encoder.

Run with ``make demo`` (or ``python examples/demo.py --out demo_out``). Each step is the command a user would type;
they are printed before they run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reflowpairs.tiny.gapworld.teacher import GAP_REFLOW

TRAIN_EPISODES = "0-89"  # the store covers these; open-loop eval uses the held-out ones
HELD_OUT_EPISODES = "90-99"
CLOSED_LOOP_EPISODES = 200  # per (model, step count) cell, env seeds 1000-1199 (lerobot's default start seed)
GOALS = (  # issue #24's goals on the bundled world, in success points
    ("teacher at 10 steps >= 80%", lambda t10, t1, s1: t10 >= 80),
    ("teacher at 1 step >= 25 points below its 10", lambda t10, t1, s1: t10 - t1 >= 25),
    ("student at 1 step within 5 points of teacher at 10", lambda t10, t1, s1: s1 >= t10 - 5),
)


def run(args: list[str]) -> None:
    print(f"\n$ {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run(args, check=True)
    print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--keep", action="store_true", help="reuse an existing tiny world in --out")
    args = parser.parse_args()
    out = args.out.resolve()
    world = out / "world"
    if not args.keep and out.exists():
        shutil.rmtree(out)
    rp = [str(Path(sys.executable).with_name("reflowpairs"))]
    data = ["--dataset", "reflowpairs/tiny_gap", "--dataset-root", str(world / "dataset")]
    cpu = ["--device", "cpu"]
    os.environ["OMP_NUM_THREADS"] = (
        "1"  # the tiny model is fastest, and steadiest on shared cores, with one thread
    )
    pairs, report, closed_loop = out / "pairs", out / "report", out / "closed_loop"
    reflow, student = out / "student-reflow", out / "student"
    reflow_model = reflow / "checkpoints" / "last" / "pretrained_model"
    student_model = student / "checkpoints" / "last" / "pretrained_model"
    recipe = GAP_REFLOW
    batch = ["--batch-size", str(recipe.batch_size), "--num-workers", "1"]

    if not (world / "teacher" / "config.json").exists():
        run([*rp, "tiny-world", str(world), "--world", "gap"])
    run(
        [*rp, "generate", "--teacher", str(world / "teacher"), *data, "--episodes", TRAIN_EPISODES]
        + ["--out", str(pairs), "--samples-per-frame", str(recipe.samples_per_frame)]
        + ["--num-steps", str(recipe.teacher_steps), "--format", "zarr", *cpu]
        + ["--cache-features"]  # each frame's image embeddings: train skips decoding and the vision encoder
    )
    run([*rp, "validate", str(pairs), "--dataset-root", str(world / "dataset"), "--spot-check", "16", *cpu])
    # reflow: the straight-line loss on the stored pairs, the student initialised from the teacher
    run(
        [*rp, "train", "--pairs", str(pairs), "--out", str(reflow), "--steps", str(recipe.train_steps)]
        + [*batch, "--lr", str(recipe.lr), *cpu]
    )
    # distill (as `pipeline --distill`): the reflowed student trained on the same pairs at t = 1 (noise) only
    run(
        [*rp, "train", "--pairs", str(pairs), "--out", str(student), "--init", str(reflow_model)]
        + ["--allow-mismatch", "--time-sampling", "noise-end", "--steps", str(recipe.distill_steps)]
        + [*batch, "--lr", str(recipe.distill_lr), *cpu]
    )
    run(
        [*rp, "eval", "--student", str(student_model), "--teacher", str(world / "teacher"), *data]
        + ["--episodes", HELD_OUT_EPISODES, "--num-steps", "1,2,4,10", "--pairs", str(pairs)]
        + ["--out", str(report), *cpu]
    )
    run(
        [*rp, "eval", "--env.type", "gapworld", "--teacher", str(world / "teacher")]
        + ["--student", f"reflow={reflow_model}", "--student", f"reflow-distill={student_model}"]
        + ["--num-steps", "1,2", "--n-episodes", str(CLOSED_LOOP_EPISODES), "--eval.batch_size", "50"]
        + ["--out", str(closed_loop), *cpu]
    )
    summarise(out, report, closed_loop, student_model)


def success(closed: dict, model: str, steps: int) -> float:
    """A closed-loop cell's success rate in percent."""
    for row in closed["cells"]:
        if row["model"] == model and row["num_steps"] == steps:
            return 100 * row["success_rate"]
    raise KeyError(f"no closed-loop cell {model} at {steps} steps")


def summarise(out: Path, report: Path, closed_loop: Path, student_model: Path) -> None:
    """Where everything is, the open-loop ratio (the demo fails above 0.5) and the closed-loop goals."""
    headline = json.loads((report / "report.json").read_text())["headline"]
    closed = json.loads((closed_loop / "closed_loop.json").read_text())
    saved_steps = json.loads((student_model / "config.json").read_text())["num_steps"]
    print(
        f"\nDone. Gap world: {out / 'world'}\nPair store: {out / 'pairs'} (see docs/pair-store.md)"
        f"\nStudent: {student_model} (an ordinary lerobot checkpoint; it samples in {saved_steps} step(s) by default)"
        f"\nOpen loop: {report / 'report.md'}\nClosed loop: {closed_loop / 'closed_loop.md'}, "
        f"{closed_loop / 'success_vs_steps.png'}"
    )
    ratio = headline["ratio"]
    print(
        f"\nOpen loop, held-out episodes {HELD_OUT_EPISODES}: the student's 1-step error to the teacher's 10-step "
        f"sample is {ratio:.2f} x the teacher's own 1-step error ({'meets' if ratio <= 0.5 else 'MISSES'} <= 0.5)."
    )
    t10, t1, s1 = (
        success(closed, "teacher", 10),
        success(closed, "teacher", 1),
        success(closed, "reflow-distill", 1),
    )
    print(
        f"Closed loop, {CLOSED_LOOP_EPISODES} episodes per cell: teacher {t10:.1f}% at 10 steps, {t1:.1f}% at 1 step; "
        f"student {s1:.1f}% at 1 step."
    )
    for text, holds in GOALS:
        print(f"  goal: {text}: {'met' if holds(t10, t1, s1) else 'MISSED'}")
    if ratio > 0.5:
        sys.exit(1)


if __name__ == "__main__":
    main()
