"""The whole pipeline on the bundled tiny world, through the real CLI, offline, on CPU.

    dataset + teacher (tiny-world) -> generate -> validate -> train -> eval

Run with ``make demo`` (or ``python examples/demo.py --out demo_out``). Each step is the command a user would type;
they are printed before they run.
"""

from __future__ import annotations

import argparse
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
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    if not (world / "teacher" / "config.json").exists():
        run([*rp, "tiny-world", str(world)])
    run([*rp, "generate", "--teacher", str(world / "teacher"), *data, "--episodes", TRAIN_EPISODES,
         "--out", str(out / "pairs"), "--samples-per-frame", "8", "--num-steps", "10", "--format", "zarr",
         "--device", "cpu"])
    print(f"\nDone. Tiny world: {world}\nPair store: {out / 'pairs'} (see docs/pair-store.md)")


if __name__ == "__main__":
    main()
