"""Pair-store cost: bytes per pair of each backend, and read throughput vs what training consumes.

For the same pairs written as zarr and as Parquet: bytes on disk per pair; pairs/s of a full sequential read
(`PairStore.read_pairs` shard by shard); pairs/s of the training read path (`PairDataset` + `PairSampler` in
shuffled order, arrays only, and with the observations fetched from the LeRobotDataset); and, for comparison, the
pairs/s a `reflowpairs train` step consumes on the chosen device (batch size / seconds per step). The read path is
not the bottleneck when its pairs/s is well above the training figure.

    python benchmarks/bench_store.py --size small --device cpu
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _sides import Side, World, build_world  # noqa: E402


def store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "shards").rglob("*") if p.is_file())


# The real SmolVLA's vision side (SmolVLM2-500M-Video-Instruct's config): 512 px images in 16 px patches, pixel
# shuffle by 4 in the connector, text width 960: (512 / 16 / 4)^2 = 64 image tokens of 960 values per camera.
REAL_SMOLVLA_IMAGE_TOKENS = (512 // 16 // 4) ** 2
REAL_SMOLVLA_WIDTH = 960


def report_feature_cache(store: Path, pairs: int, frames: int = 20_000, cameras: int = 2) -> None:
    """The feature cache (docs/feature-cache.md): bytes/frame of this store's cache, measured on disk, and the size of
    a cache for ``frames`` frames of ``cameras`` cameras at the real SmolVLA's shapes, computed from bytes/frame."""
    from reflowpairs.store_features import bytes_per_frame, cached_frames, features_dir, read_index

    index = read_index(store)
    if index is not None:
        on_disk = sum(p.stat().st_size for p in features_dir(store).rglob("*") if p.is_file())
        cached = cached_frames(index)
        print(
            f"\nfeature cache of this store: {index['bytes_per_frame']:,} bytes/frame ({index['dtype']}, shape "
            f"{index['shape']}), {on_disk / max(cached, 1):,.0f} bytes/frame on disk ({cached} frames, {pairs} pairs)"
        )
    shape = (cameras, REAL_SMOLVLA_IMAGE_TOKENS, REAL_SMOLVLA_WIDTH)
    for dtype in ("float32", "bfloat16"):
        per_frame = bytes_per_frame(shape, dtype)
        print(
            f"feature cache at the real SmolVLA's shapes, {cameras} cameras x {REAL_SMOLVLA_IMAGE_TOKENS} tokens x "
            f"{REAL_SMOLVLA_WIDTH}, {dtype}: {per_frame:,} bytes/frame; {frames:,} frames: {frames * per_frame / 1e9:.1f} GB"
        )


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = fn()
        out.append(n / (time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "large"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples-per-frame", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from reflowpairs.dataset import frame_indices, open_dataset
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.pairdata import PairDataset, PairSampler, position_lookup
    from reflowpairs.store.reader import PairStore

    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    world = build_world(root, args.size, samples_per_frame=args.samples_per_frame)
    stores = {"zarr": world.store, "parquet": root / "pairs_parquet"}
    generate(
        GenerateConfig(
            teacher=str(world.teacher),
            dataset=world.repo_id,
            dataset_root=world.dataset_root,
            out=stores["parquet"],
            episodes=[0, 1, 2, 3],
            samples_per_frame=args.samples_per_frame,
            num_steps=2,
            device="cpu",
            backend="parquet",
        )
    )
    full = open_dataset(world.repo_id, world.dataset_root)
    lookup = position_lookup(frame_indices(full))
    n = len(PairStore(world.store))
    print(
        f"{n} pairs (X_0 {PairStore(world.store).x0_shape}, X_1 {PairStore(world.store).x1_shape}); batch {args.batch_size}"
    )

    for backend, path in stores.items():
        store = PairStore(path)

        def sequential(store: PairStore = store) -> int:
            return sum(len(store.read_pairs(i)) for i in range(len(store.shards)))

        def arrays_only(store: PairStore = store) -> int:
            data = PairDataset(store, full, lookup, cache_shards=5)
            count = 0
            for pair_id in itertools.islice(
                iter(PairSampler(data.counts, 0, 4)), n
            ):  # the sampler is endless
                shard, row = data.locate(pair_id)
                _ = data.shard(shard)["x1"][row]
                count += 1
            return count

        def with_observations(store: PairStore = store) -> int:
            data = PairDataset(store, full, lookup, cache_shards=5)
            loader = torch.utils.data.DataLoader(
                data, batch_size=args.batch_size, sampler=PairSampler(data.counts, 0, 4)
            )
            count = 0
            for batch in loader:
                count += len(batch["x0"])
                if count >= min(n, 20 * args.batch_size):
                    break
            return count

        print(
            f"\n{backend}: {store_bytes(path) / n:,.0f} bytes/pair on disk "
            f"(raw float32 {4 * (store.x0_shape[0] * store.x0_shape[1] + store.x1_shape[0] * store.x1_shape[1]) + 12} bytes)"
        )
        for name, fn in (
            ("sequential read", sequential),
            ("shuffled, arrays only", arrays_only),
            ("shuffled, with observations", with_observations),
        ):
            rates = timed(fn, args.repeats)
            print(
                f"  {name:28s} {statistics.median(rates):12,.0f} pairs/s (min {min(rates):,.0f}, max {max(rates):,.0f})"
            )

    report_feature_cache(world.store, n)

    side = Side(
        "reflowpairs",
        World(world.dataset_root, world.repo_id, world.teacher, world.store),
        args.batch_size,
        args.device,
    )
    side.step()
    start = time.perf_counter()
    for _ in range(5):
        side.step()
    per_step = (time.perf_counter() - start) / 5
    print(
        f"\ntraining consumes {args.batch_size / per_step:,.0f} pairs/s ({per_step * 1000:.1f} ms/step at batch {args.batch_size}, "
        f"{args.device}, data loading included)"
    )


if __name__ == "__main__":
    main()
