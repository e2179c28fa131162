"""Implicit X_0 (`generate --x0 implicit`): bytes per pair saved, and what regenerating X_0 costs a reader.

Side by side in one run:

- bytes on disk per pair of the same run's pairs stored with X_0 (explicit) and without it (implicit), both backends,
  for the bundled tiny world (X_0 (8, 6), X_1 (8, 2)) and for a tiny world at SmolVLA's real action shapes (chunk 50,
  max_action_dim 32, a 6-d action as on SO-100 arms: X_0 (50, 32), X_1 (50, 6)); the implicit/explicit ratio, and
  the raw (uncompressed) ratio the shapes give;
- X_0 regeneration on one CPU core at (50, 32): pairs/s of ``noise.pair_noise`` in blocks (``PairStore.read``) and
  one pair at a time (the training reader's per-item path), next to the rates training consumes (``--train-rates``:
  pairs per second a training step takes, ~100 on CPU and a few thousand on a GPU at SmolVLA's size);
- pairs/s of ``PairStore.read`` of whole shards, explicit (decode X_0) vs implicit (regenerate it).

    python benchmarks/bench_x0.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reflowpairs.dataset import quiet_dataset_logs

quiet_dataset_logs()


def shard_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "shards").rglob("*") if p.is_file())


def rate(fn, pairs: int, repeats: int) -> float:
    """Best pairs/s over ``repeats`` calls of ``fn`` (each handles ``pairs`` pairs)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = max(best, pairs / (time.perf_counter() - start))
    return best


def store_sizes(world, out: Path, episodes: list[int], samples_per_frame: int) -> dict[str, float]:
    """Bytes per pair of the same run stored explicit/implicit in each backend."""
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.store.reader import PairStore

    sizes = {}
    for backend in ("zarr", "parquet"):
        for mode in ("explicit", "implicit"):
            store = out / f"{backend}-{mode}"
            generate(
                GenerateConfig(
                    teacher=str(world.teacher_dir),
                    dataset=world.repo_id,
                    dataset_root=world.dataset_root,
                    out=store,
                    episodes=episodes,
                    samples_per_frame=samples_per_frame,
                    num_steps=2,
                    device="cpu",
                    backend=backend,
                    x0=mode,
                )
            )
            sizes[f"{backend}-{mode}"] = shard_bytes(store) / len(PairStore(store))
    return sizes


def print_sizes(title: str, sizes: dict[str, float], x0_shape, x1_shape) -> None:
    raw_x0, raw_rest = 4 * int(np.prod(x0_shape)), 4 * int(np.prod(x1_shape)) + 8 + 4
    print(f"\n{title}: X_0 {tuple(x0_shape)}, X_1 {tuple(x1_shape)}")
    print(
        f"  raw bytes/pair: explicit {raw_x0 + raw_rest}, implicit {raw_rest}, ratio {raw_rest / (raw_x0 + raw_rest):.3f}"
    )
    for backend in ("zarr", "parquet"):
        e, i = sizes[f"{backend}-explicit"], sizes[f"{backend}-implicit"]
        print(f"  {backend:8s} bytes/pair on disk: explicit {e:8.1f}, implicit {i:8.1f}, ratio {i / e:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4000, help="pairs regenerated per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=4, help="episodes of the tiny world per store")
    parser.add_argument("--samples-per-frame", type=int, default=4)
    parser.add_argument(
        "--train-rates", default="100,3000", help="pairs/s training consumes (CPU, GPU), for comparison"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    from reflowpairs.noise import initial_noise, pair_noise
    from reflowpairs.store.reader import PairStore
    from reflowpairs.tiny.world import TinyDatasetSpec, TinyTeacherSpec, build_tiny_world

    # regeneration speed at SmolVLA's shape, one core
    shape, n = (50, 32), args.pairs
    obs, sample = np.arange(n, dtype=np.int64) // 4, np.arange(n, dtype=np.int64) % 4
    block = rate(lambda: pair_noise(0, obs, sample, shape), n, args.repeats)
    single = rate(
        lambda: [pair_noise(0, obs[r : r + 1], sample[r : r + 1], shape) for r in range(n)], n, args.repeats
    )
    reference = rate(
        lambda: [initial_noise(0, int(obs[r]), int(sample[r]), shape) for r in range(n)], n, args.repeats
    )
    cpu, gpu = (float(v) for v in args.train_rates.split(","))
    print(f"X_0 regeneration at {shape}, 1 CPU thread:")
    print(f"  pair_noise, blocks of {n}: {block:10,.0f} pairs/s ({1e6 / block:5.1f} us/pair)")
    print(
        f"  pair_noise, one at a time: {single:10,.0f} pairs/s ({1e6 / single:5.1f} us/pair)  (training reader, per item)"
    )
    print(f"  initial_noise per pair:    {reference:10,.0f} pairs/s (what generate draws with)")
    print(
        f"  per-item rate / training consumption: {single / cpu:,.0f}x CPU ({cpu:,.0f} pairs/s), {single / gpu:,.1f}x GPU ({gpu:,.0f} pairs/s) per reader process"
    )

    root = Path(tempfile.mkdtemp(prefix="bench-x0-"))
    episodes = list(range(args.episodes))
    tiny = build_tiny_world(root / "tiny", teacher_spec=TinyTeacherSpec(train_steps=30))
    print_sizes(
        "tiny world",
        store_sizes(tiny, root / "tiny-stores", episodes, args.samples_per_frame),
        (8, 6),
        (8, 2),
    )
    real = build_tiny_world(
        root / "real",
        dataset_spec=TinyDatasetSpec(state_dim=6),
        teacher_spec=TinyTeacherSpec(chunk_size=50, max_action_dim=32, max_state_dim=32, train_steps=30),
    )
    sizes = store_sizes(real, root / "real-stores", episodes, args.samples_per_frame)
    print_sizes("tiny world at SmolVLA's action shapes", sizes, (50, 32), (50, 6))

    print("\nPairStore.read of whole shards (all columns), X_0 (50, 32):")
    for backend in ("zarr", "parquet"):
        rates = {}
        for mode in ("explicit", "implicit"):
            store = PairStore(root / "real-stores" / f"{backend}-{mode}")
            rates[mode] = rate(
                lambda store=store: [store.read(i) for i in range(len(store.shards))],
                len(store),
                args.repeats,
            )
        print(
            f"  {backend:8s} explicit {rates['explicit']:10,.0f} pairs/s, implicit {rates['implicit']:10,.0f} pairs/s "
            f"(implicit/explicit {rates['implicit'] / rates['explicit']:.2f})"
        )


if __name__ == "__main__":
    main()
