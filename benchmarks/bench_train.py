"""Stage-2 cost: seconds per training step of `reflowpairs train` vs ordinary lerobot fine-tuning vs online reflow.

Same checkpoint, same batch size, same device, one process. The sides are interleaved (every repeat runs a block of
--steps steps of each side, after one warm-up step per block) and torch threads are pinned. Prints the median
seconds per step of each side with its spread, and the ratios reflowpairs / ordinary (goal: at most 1.1) and
online / reflowpairs (how much the predecessor's online reflow costs more).

    python benchmarks/bench_train.py --size small --batch-size 16 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _sides import SIDES, Side, build_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "large"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    world = build_world(Path(tempfile.mkdtemp(prefix="bench-train-")), args.size)
    sides = {name: Side(name, world, args.batch_size, args.device) for name in SIDES}
    n_params = sum(p.numel() for p in sides["ordinary"].policy.parameters())
    print(
        f"student: SmolVLA {args.size}, {n_params / 1e6:.2f} M parameters ({sum(p.numel() for p in sides['ordinary'].params) / 1e6:.2f} M trainable); "
        f"device {args.device}; {args.threads} torch thread(s); batch {args.batch_size}; "
        f"{args.repeats} repeats x {args.steps} steps per side, interleaved"
    )
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    for _ in range(args.repeats):
        for name, side in sides.items():
            side.step()  # warm-up: first batch of the block, caches
            start = time.perf_counter()
            for _ in range(args.steps):
                side.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, values in times.items():
        print(
            f"  {name:12s} {med[name] * 1000:8.1f} ms/step  (min {min(values) * 1000:.1f}, max {max(values) * 1000:.1f})"
        )
    print(f"  ratio reflowpairs / ordinary: {med['reflowpairs'] / med['ordinary']:.3f}x  (goal <= 1.1)")
    print(
        f"  ratio online / reflowpairs:   {med['online'] / med['reflowpairs']:.2f}x  (online reflow's extra cost)"
    )


if __name__ == "__main__":
    main()
