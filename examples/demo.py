"""The whole pipeline on the bundled tiny world, through the real CLI, offline, on CPU.

    dataset + teacher (tiny-world) -> generate -> validate -> train -> eval

generate stores the feature cache too (``--cache-features``, docs/feature-cache.md), so train reads the frames'
image embeddings instead of decoding images and running the frozen vision encoder.

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

TRAIN_EPISODES = "0-7"  # the store covers these; eval uses the held-out ones
HELD_OUT_EPISODES = "8,9"


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
    repo = "reflowpairs/tiny_reach"
    data = ["--dataset", repo, "--dataset-root", str(world / "dataset")]
    os.environ["OMP_NUM_THREADS"] = (
        "1"  # the tiny model is fastest, and steadiest on shared cores, with one thread
    )
    pairs, student, report = out / "pairs", out / "student", out / "report"

    if not (world / "teacher" / "config.json").exists():
        run([*rp, "tiny-world", str(world)])
    run(
        [
            *rp,
            "generate",
            "--teacher",
            str(world / "teacher"),
            *data,
            "--episodes",
            TRAIN_EPISODES,
            "--out",
            str(pairs),
            "--samples-per-frame",
            "8",
            "--num-steps",
            "10",
            "--format",
            "zarr",
            "--cache-features",  # each frame's image embeddings: train skips decoding and the vision encoder
            "--device",
            "cpu",
        ]
    )
    run(
        [
            *rp,
            "validate",
            str(pairs),
            "--dataset-root",
            str(world / "dataset"),
            "--spot-check",
            "16",
            "--device",
            "cpu",
        ]
    )
    run(
        [
            *rp,
            "train",
            "--pairs",
            str(pairs),
            "--out",
            str(student),
            "--steps",
            "800",
            "--batch-size",
            "64",
            "--lr",
            "1e-3",
            "--num-workers",
            "1",
            "--save-every",
            "400",
            "--device",
            "cpu",
        ]
    )
    run(
        [
            *rp,
            "eval",
            "--student",
            str(student / "checkpoints" / "last" / "pretrained_model"),
            "--teacher",
            str(world / "teacher"),
            *data,
            "--episodes",
            HELD_OUT_EPISODES,
            "--num-steps",
            "1,2,4,10",
            "--pairs",
            str(pairs),
            "--out",
            str(report),
            "--device",
            "cpu",
        ]
    )

    headline = json.loads((report / "report.json").read_text())["headline"]
    student_model = student / "checkpoints" / "last" / "pretrained_model"
    saved_steps = json.loads((student_model / "config.json").read_text())[
        "num_steps"
    ]  # --student-num-steps: 1 by default
    print(
        f"\nDone. Tiny world: {world}\nPair store: {pairs} (see docs/pair-store.md)"
        f"\nStudent: {student_model} (an ordinary lerobot checkpoint; it samples in {saved_steps} step(s) by default)"
        f"\nReport: {report / 'report.md'}\nPlot: {report / 'steps_vs_error.png'}"
    )
    ratio = headline["ratio"]
    verdict = "meets" if ratio <= 0.5 else "MISSES"
    print(
        f"\nOn held-out episodes {HELD_OUT_EPISODES}: the student's 1-step error to the teacher's 10-step reference is "
        f"{ratio:.2f} x the teacher's own 1-step error ({verdict} the goal of <= 0.5)."
    )
    if ratio > 0.5:
        sys.exit(1)


if __name__ == "__main__":
    main()
