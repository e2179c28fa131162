"""Pair-store costs as the store grows (issue #15): stores of 10^4, 10^5 and 10^6 pairs at the small model's pair
shapes, written through the real ``PairStoreWriter`` (X_1 from a cheap random stand-in, X_0 the real noise, since
``validate`` checks it; obs_index frames of the tiny world's dataset, many samples per frame), and timed:

- write per shard at the start vs the end of each run (the whole shard, and its listing alone), and the one
  ``manifest.json`` rewrite that folds the journal at the end (what every shard cost under format version 1);
- files and folders per million pairs;
- ``inspect`` (``store.inspect.summarize``), ``validate`` without spot check;
- ``train`` start-up to the first step (the library's ``train``, 1 step, batch 8, no loader workers, CPU);
- shuffled read throughput of the training reader (``PairDataset`` + ``PairSampler``, arrays only) with 2 DataLoader
  workers.

It prints each curve and the ratios the issue's goals are about: per-shard write time within 1.5x between the smallest
and the largest store, validate linear in pairs (seconds per pair within 1.5x).

    python benchmarks/bench_scale.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from reflowpairs.dataset import quiet_dataset_logs  # noqa: E402

quiet_dataset_logs()


def build_template(root: Path, backend: str) -> tuple[Path, Path, str]:
    """The tiny world's dataset, an untrained small SmolVLA, and a one-episode store of it whose manifest is the
    template of the synthetic stores (teacher, dataset, pair shapes). Returns (template store, dataset root, repo)."""
    from reflowpairs.dataset import open_dataset
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.tiny.world import (
        TINY_REPO_ID,
        VLMSpec,
        build_tiny_dataset,
        build_tiny_vlm,
        save_untrained_policy,
    )

    vlm = build_tiny_vlm(root / "vlm", VLMSpec.small())
    build_tiny_dataset(root / "dataset")
    teacher = save_untrained_policy(vlm, open_dataset(TINY_REPO_ID, root / "dataset"), root / "teacher")
    generate(
        GenerateConfig(
            teacher=str(teacher),
            dataset=TINY_REPO_ID,
            dataset_root=root / "dataset",
            out=root / "template",
            episodes=[0],
            samples_per_frame=1,
            num_steps=1,
            device="cpu",
            backend=backend,
        )
    )
    return root / "template", root / "dataset", TINY_REPO_ID


def count_entries(path: Path) -> tuple[int, int, int]:
    """(files, folders, most entries in one folder) under ``path``."""
    files = folders = widest = 0
    for entry in [path, *path.rglob("*")]:
        if entry.is_dir():
            folders += entry != path
            widest = max(widest, sum(1 for _ in entry.iterdir()))
        else:
            files += 1
    return files, folders, widest


def write_store(template: Path, out: Path, pairs: int, shard_size: int, frames: np.ndarray) -> dict:
    """Write a store of about ``pairs`` pairs (every frame of ``frames``, K = ceil(pairs / frames) samples each)."""
    from reflowpairs.noise import pair_noise
    from reflowpairs.store.manifest import StoreManifest
    from reflowpairs.store.pairs import Pairs
    from reflowpairs.store.writer import PairStoreWriter

    k = -(-pairs // len(frames))
    base = StoreManifest.read(template)
    generation = base.generation | {"samples_per_frame": k, "episodes": None, "num_frames": len(frames)}
    manifest = base.emptied(out, drop=("partition",), store_id=uuid.uuid4().hex, generation=generation)
    out.mkdir(parents=True)
    writer = PairStoreWriter(manifest, shard_size, k)
    per_shard = writer.pairs_per_shard // k  # frames per shard
    listing: list[float] = []
    real_append = manifest.append_shard

    def timed_append(entry: dict) -> None:
        start = time.perf_counter()
        real_append(entry)
        listing.append(time.perf_counter() - start)

    manifest.append_shard = timed_append
    folding: list[float] = []
    real_complete = manifest.set_complete

    def timed_complete(complete: bool | None = None) -> None:
        start = time.perf_counter()
        real_complete(complete)
        folding.append(time.perf_counter() - start)

    manifest.set_complete = timed_complete
    rng = np.random.default_rng(0)
    seed = int(manifest.seed)
    shard_seconds, generating = [], 0.0
    for first in range(0, len(frames), per_shard):
        start = time.perf_counter()
        obs = np.repeat(frames[first : first + per_shard], k)
        sample = np.tile(np.arange(k, dtype=np.int64), len(obs) // k)
        block = Pairs(
            x0=pair_noise(seed, obs, sample, manifest.x0_shape),
            x1=rng.standard_normal((len(obs), *manifest.x1_shape), dtype=np.float32),
            obs_index=obs,
            sample=sample,
        )
        generating += time.perf_counter() - start
        start = time.perf_counter()
        writer.add(block)  # exactly one shard (a last, shorter one waits for close)
        if len(block) == writer.pairs_per_shard:
            shard_seconds.append(time.perf_counter() - start)
    writer.close(complete=True)  # writes a last short shard, if any, and folds the journal into manifest.json
    return {
        "pairs": int(manifest.data["num_pairs"]),
        "shards": len(manifest.shards),
        "k": k,
        "shard": shard_seconds,
        "listing": listing,
        "fold": folding[-1],
        "x0_seconds": generating,
    }


def edge(values: list[float], last: bool = False) -> float:
    """Median of the first (or last) tenth of ``values`` (at least 5 of them)."""
    n = max(5, len(values) // 10)
    part = values[-n:] if last else values[:n]
    return statistics.median(part) if part else float("nan")


class ArraysOnly(torch.utils.data.Dataset):
    """The training reader's arrays for a pair id (no observation): the store side of a training batch."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, pair_id: int) -> dict[str, torch.Tensor]:
        shard, row = self.data.locate(int(pair_id))
        columns = self.data.shard(shard)
        return {"x0": torch.from_numpy(columns["x0"][row]), "x1": torch.from_numpy(columns["x1"][row])}


def shuffled_read(store_path: Path, dataset, lookup, pairs: int, workers: int) -> float:
    from reflowpairs.pairdata import PairDataset, PairSampler
    from reflowpairs.store.reader import PairStore

    data = PairDataset(PairStore(store_path), dataset, lookup, cache_shards=4)
    loader = torch.utils.data.DataLoader(
        ArraysOnly(data), batch_size=256, sampler=PairSampler(data.counts, 0, 4), num_workers=workers
    )
    count, start = 0, None
    for batch in loader:  # timed from the first batch on: the workers' start-up is not the store's
        if start is None:
            start = time.perf_counter()
            continue
        count += len(batch["x1"])
        if count >= pairs:
            break
    return count / (time.perf_counter() - start)


def train_startup(store: Path, out: Path) -> tuple[float, float]:
    """Seconds from calling ``train`` to its plan (everything before the loop: store check, model, optimiser) and to
    the end of its first step."""
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    marks: dict[str, float] = {}
    start = time.perf_counter()
    train(
        TrainConfig(
            pairs=store, out=out, steps=1, batch_size=8, num_workers=0, device="cpu", save_every=1000
        ),
        on_plan=lambda plan: marks.setdefault("plan", time.perf_counter() - start),
        progress=lambda step, total, loss: marks.setdefault("step", time.perf_counter() - start),
    )
    return marks["plan"], marks["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="store sizes in pairs, comma-separated")
    parser.add_argument("--backend", choices=["zarr", "parquet"], default="zarr")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument(
        "--read-pairs", type=int, default=20_000, help="pairs read in the shuffled-read timing"
    )
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    from reflowpairs.dataset import frame_indices, open_dataset
    from reflowpairs.pairdata import position_lookup
    from reflowpairs.store.inspect import summarize
    from reflowpairs.validate.checks import validate
    from reflowpairs.validate.config import ValidateConfig

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    template, dataset_root, repo_id = build_template(root, args.backend)
    dataset = open_dataset(repo_id, dataset_root)
    frames = frame_indices(dataset)
    lookup = position_lookup(frames)
    from reflowpairs.store.manifest import StoreManifest

    shapes = StoreManifest.read(template)
    print(
        f"{args.backend} stores at the small model's pair shapes (X_0 {shapes.x0_shape}, X_1 {shapes.x1_shape}), "
        f"shard_size {args.shard_size}, over the tiny world's {len(frames)} frames; work in {root}"
    )
    rows = []
    for size in sizes:
        store = root / f"store-{size}"
        w = write_store(template, store, size, args.shard_size, frames)
        files, folders, widest = count_entries(store / "shards")
        start = time.perf_counter()
        summarize(store)
        inspect_s = time.perf_counter() - start
        start = time.perf_counter()
        summarize(store, statistics=True)
        stats_s = time.perf_counter() - start
        start = time.perf_counter()
        report = validate(ValidateConfig(store))
        validate_s = time.perf_counter() - start
        bad = [f"{c.name}: {c.detail}" for c in report.checks if c.result not in ("pass", "skip")]
        plan_s = step_s = float("nan")
        if not args.skip_train:
            plan_s, step_s = train_startup(store, root / f"train-{size}")
        rate = shuffled_read(store, dataset, lookup, min(args.read_pairs, w["pairs"]), workers=2)
        rows.append(
            w
            | {
                "files": files,
                "folders": folders,
                "widest": widest,
                "inspect": inspect_s,
                "stats": stats_s,
                "validate": validate_s,
                "status": report.status,
                "problems": bad,
                "plan": plan_s,
                "step": step_s,
                "read": rate,
            }
        )
        r = rows[-1]
        print(
            f"\n{r['pairs']:,} pairs, {r['shards']} shards (K={r['k']}): "
            f"write/shard first tenth {edge(r['shard']) * 1e3:.1f} ms, last tenth {edge(r['shard'], last=True) * 1e3:.1f} ms; "
            f"listing/shard first tenth {edge(r['listing']) * 1e3:.2f} ms, last tenth {edge(r['listing'], last=True) * 1e3:.2f} ms; "
            f"fold {r['fold'] * 1e3:.1f} ms\n"
            f"  files {files:,} ({files * 1e6 / r['pairs']:,.0f}/M pairs), folders {folders:,} "
            f"({folders * 1e6 / r['pairs']:,.0f}/M pairs), most entries in one folder {widest}\n"
            f"  inspect {inspect_s:.3f} s (--stats {stats_s:.2f} s), validate {validate_s:.2f} s ({report.status}"
            + (f": {'; '.join(bad)}" if bad else "")
            + f"), train start-up {plan_s:.2f} s to plan, {step_s:.2f} s to first step; "
            f"shuffled read (2 workers) {rate:,.0f} pairs/s",
            flush=True,
        )

    print(
        "\npairs       shards  write/shard(start,end) ms  list/shard ms  fold ms  inspect s  --stats s  validate s  "
        "us/pair(val)  train plan s  first step s  read pairs/s  files/M"
    )
    for r in rows:
        print(
            f"{r['pairs']:>10,}  {r['shards']:>6}  {edge(r['shard']) * 1e3:>9.1f} {edge(r['shard'], last=True) * 1e3:>9.1f}"
            f"       {edge(r['listing'], last=True) * 1e3:>9.2f}  {r['fold'] * 1e3:>7.1f}  {r['inspect']:>9.3f}  {r['stats']:>9.2f}"
            f"  {r['validate']:>10.2f}  {r['validate'] / r['pairs'] * 1e6:>12.2f}  {r['plan']:>12.2f}"
            f"  {r['step']:>12.2f}  {r['read']:>12,.0f}  {r['files'] * 1e6 / r['pairs']:>7,.0f}"
        )
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        write_ratio = edge(b["shard"], last=True) / edge(a["shard"], last=True)
        within = edge(b["shard"], last=True) / edge(b["shard"])
        validate_ratio = (b["validate"] / b["pairs"]) / (a["validate"] / a["pairs"])
        startup_ratio = b["step"] / a["step"]
        print(
            f"\nratios {b['pairs']:,} vs {a['pairs']:,} pairs:\n"
            f"  write per shard at the end of the run: {write_ratio:.2f}x (goal <= 1.5x); end vs start of the "
            f"largest run: {within:.2f}x\n"
            f"  validate seconds per pair: {validate_ratio:.2f}x (goal: linear, about 1x)\n"
            f"  train start-up to the first step: {startup_ratio:.2f}x (goal <= 1.5x; the training side of #15)"
        )
        print(
            "goals: write "
            + ("met" if write_ratio <= 1.5 else "NOT met")
            + ", validate "
            + ("linear" if validate_ratio <= 1.5 else "NOT linear")
            + ", train start-up "
            + ("met" if startup_ratio <= 1.5 else "NOT met")
        )


if __name__ == "__main__":
    main()
