"""The prefix-cached sampler vs the exact one (`generate --exact`: lerobot's `predict_action_chunk` per frame), side by
side in one run, for a float32 and a bfloat16 teacher (VLM text layers and expert in bfloat16, as real SmolVLA
checkpoints are).

For each teacher dtype it generates the same frames with both samplers (interleaved, repeated; torch threads pinned)
and prints pairs/s of each, the speed ratio (what --exact costs), and how far the fast X_1 is from the exact X_1
(max and mean |difference|, against the spread of X_1): the agreement to expect per dtype.

    python benchmarks/bench_exact.py --size small --k 4 --episodes 0,1 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_generate import SIZES, build_world

from reflowpairs.dataset import quiet_dataset_logs

quiet_dataset_logs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--episodes", default="0,1", help="tiny-world episodes to run over (24 frames each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="teacher parameter dtypes to compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.store.reader import PairStore

    episodes = [int(e) for e in args.episodes.split(",")]
    print(
        f"SmolVLA {args.size}; device {args.device}; {args.threads} torch thread(s); episodes {episodes}; K={args.k}; "
        f"batch {args.batch_size}; {args.num_steps} Euler steps; {args.repeats} interleaved repeats"
    )
    for dtype in args.dtypes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench-exact-{dtype}-"))
        dataset, teacher_dir = build_world(root, args.size, None if dtype == "float32" else dtype)
        runs, rates, stores = 0, {"prefix-cached": [], "exact": []}, {}
        for _ in range(args.repeats):
            for exact in (False, True):
                runs += 1
                out = root / f"store{runs}"
                result = generate(
                    GenerateConfig(
                        teacher=str(teacher_dir),
                        dataset=dataset.repo_id,
                        dataset_root=dataset.root,
                        out=out,
                        episodes=episodes,
                        samples_per_frame=args.k,
                        batch_size=args.batch_size,
                        num_steps=args.num_steps,
                        device=args.device,
                        exact=exact,
                        shard_size=10**6,
                    )
                )
                name = "exact" if exact else "prefix-cached"
                rates[name].append(result.new_pairs / result.seconds)
                stores[name] = out
        fast, exact = (PairStore(stores[n]).read_pairs(0) for n in ("prefix-cached", "exact"))
        assert np.array_equal(fast.obs_index, exact.obs_index) and np.array_equal(fast.sample, exact.sample)
        diff = np.abs(fast.x1 - exact.x1)
        med = {n: statistics.median(v) for n, v in rates.items()}
        print(f"\nteacher parameters: {dtype}")
        for name, values in rates.items():
            print(
                f"  {name:14s} {med[name]:9.1f} pairs/s  (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"
            )
        print(
            f"  ratio prefix-cached / exact: {med['prefix-cached'] / med['exact']:.2f}x (what --exact costs)"
        )
        print(
            f"  |X_1 prefix-cached - X_1 exact|: max {diff.max():.2e}, mean {diff.mean():.2e} (X_1 std {exact.x1.std():.3f})"
        )


if __name__ == "__main__":
    main()
