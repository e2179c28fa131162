"""Stage-2 cost: seconds per training step of `reflowpairs train` (with and without the feature cache) vs ordinary lerobot fine-tuning vs online reflow.

Same checkpoint, same batch size, same device, one process. The sides are interleaved (every repeat runs a block of
--steps steps of each side, after one warm-up step per block) and torch threads are pinned. Prints the median
seconds per step of each side with its spread, and the ratios reflowpairs / ordinary (goal: at most 1.1),
cached / ordinary (the feature cache, #14: goal at most 0.4 on --size smolvla-shaped) and online / reflowpairs (how
much the predecessor's online reflow costs more); then the cache's bytes per frame and its read throughput (frames/s
through ``FeatureReader``, cold shards) against what the cached side consumes (frames/s).

    python benchmarks/bench_train.py --size small --batch-size 16 --device cpu   # camera from MP4 video (--frames)
    python benchmarks/bench_train.py --size smolvla-shaped --batch-size 8 --steps 2 --repeats 2 --sides ordinary,cached
    python benchmarks/bench_train.py --size pi0-small --batch-size 8 --steps 3 --repeats 3 --sides ordinary,cached

A pi size (``pi0-small``, ``pi05-small``; ``-tiny`` for smoke runs) is ``bench_generate``'s untrained tiny pi teacher
of that size (``pi_specs``). Its student config sets ``train_expert_only: true`` (the cache applies: PaliGemma frozen),
and the store is generated with that config; ``ordinary`` is lerobot's fine-tuning of the checkpoint as built
(lerobot's pi defaults: everything trains), ``ordinary-frozen`` the same with ``train_expert_only: true``
(goal for the cache: cached / ordinary at most 0.5 on pi0-small).
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
from _sides import SIDES, Side, World, build_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", choices=["tiny", "small", "large", "smolvla-shaped", *PI_SIZES], default="small"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES)
    )
    parser.add_argument("--episodes", default="0,1,2,3", help="episodes the store is generated from")
    parser.add_argument(
        "--frames",
        choices=["video", "png"],
        default="video",
        help="how the dataset stores its camera: MP4 video (as real datasets; the sides that read images decode it) "
        "or PNG frames",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bfloat16: every side's step runs under torch.autocast (as lerobot's use_amp and reflowpairs train's "
        "default precision on CUDA)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chosen = [name for name in SIDES if name in args.sides.split(",")]
    if "ordinary" not in chosen:
        chosen.insert(0, "ordinary")

    episodes = [int(e) for e in args.episodes.split(",")]
    if args.size in PI_SIZES:  # the pi student with PaliGemma frozen; ordinary lerobot fine-tuning both ways
        world, frozen = build_pi_world(Path(tempfile.mkdtemp(prefix="bench-train-")), args.size, episodes)
        sides = {
            name: Side(name, frozen if name != "ordinary" else world, args.batch_size, args.device)
            for name in chosen
        }
        sides = {
            "ordinary": sides.pop("ordinary"),
            "ordinary-frozen": Side("ordinary", frozen, args.batch_size, args.device),
            **sides,
        }
    else:
        world = build_world(
            Path(tempfile.mkdtemp(prefix="bench-train-")),
            args.size,
            episodes=episodes,
            videos=args.frames == "video",
        )
        sides = {name: Side(name, world, args.batch_size, args.device) for name in chosen}
    n_params = sum(p.numel() for p in sides["ordinary"].policy.parameters())
    frames = "MP4 video" if args.frames == "video" and args.size not in PI_SIZES else "PNG files"
    print(
        f"student: {sides['ordinary'].policy.config.type} {args.size}, {n_params / 1e6:.2f} M parameters ({sum(p.numel() for p in sides['ordinary'].params) / 1e6:.2f} M trainable); "
        f"device {args.device}, {args.dtype}; {args.threads} torch thread(s); batch {args.batch_size}; "
        f"camera frames from {frames}; "
        f"{args.repeats} repeats x {args.steps} steps per side, interleaved"
    )
    times: dict[str, list[float]] = {name: [] for name in sides}
    autocast = torch.autocast(
        torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"
    )
    for _ in range(args.repeats):
        for name, side in sides.items():
            with autocast:
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
    if "reflowpairs" in med:
        print(f"  ratio reflowpairs / ordinary: {med['reflowpairs'] / med['ordinary']:.3f}x  (goal <= 1.1)")
    if "cached" in med:
        print(
            f"  ratio cached / ordinary:      {med['cached'] / med['ordinary']:.3f}x  (feature cache; goal <= 0.4 on smolvla-shaped, <= 0.5 on pi0-small)"
        )
        if "ordinary-frozen" in med:
            print(
                f"  ratio cached / ordinary-frozen: {med['cached'] / med['ordinary-frozen']:.3f}x  (lerobot's fine-tuning with train_expert_only, as the student)"
            )
        _cache_figures(sides["cached"], args.batch_size / med["cached"])
    if "online" in med and "reflowpairs" in med:
        print(
            f"  ratio online / reflowpairs:   {med['online'] / med['reflowpairs']:.2f}x  (online reflow's extra cost)"
        )


PI_SIZES = ("pi0-small", "pi05-small", "pi0-tiny", "pi05-tiny")


def build_pi_world(root: Path, size: str, episodes: list[int]) -> tuple[World, World]:
    """``(as built, frozen)``: ``bench_generate``'s tiny pi teacher of ``size`` over the tiny world's dataset, and a
    copy whose config sets ``train_expert_only: true``, whose pair store (``cache_features``) both worlds share."""
    import json
    import shutil

    from bench_generate import build_world as build_pi_teacher

    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.tiny.world import TINY_REPO_ID

    _, teacher = build_pi_teacher(root, size)
    frozen = root / "teacher-frozen"
    shutil.copytree(teacher, frozen)
    config = json.loads((frozen / "config.json").read_text())
    (frozen / "config.json").write_text(json.dumps({**config, "train_expert_only": True}, indent=2))
    store = root / "pairs"
    generate(
        GenerateConfig(
            teacher=str(frozen),
            dataset=TINY_REPO_ID,
            dataset_root=root / "dataset",
            out=store,
            episodes=episodes,
            samples_per_frame=2,
            num_steps=2,
            device="cpu",
            cache_features=True,
        )
    )
    return World(root / "dataset", TINY_REPO_ID, teacher, store), World(
        root / "dataset", TINY_REPO_ID, frozen, store
    )


def _cache_figures(side, consumed: float) -> None:
    """Bytes per frame of the feature cache, and its read throughput (a fresh reader: shards read cold) against the
    frames per second the cached side consumes."""
    from reflowpairs.store_features import FeatureReader, cached_obs_index

    index = side.cache.index
    obs = cached_obs_index(side.cache.store, index)
    reader = FeatureReader(side.cache.store, index)
    start = time.perf_counter()
    for o in obs:
        reader[int(o)]
    rate = len(obs) / (time.perf_counter() - start)
    per_frame = index["bytes_per_frame"]
    print(
        f"  feature cache: {per_frame:,} bytes/frame ({index['dtype']}, {index['shape']}); read {rate:,.0f} frames/s "
        f"({rate * per_frame / 1e6:,.1f} MB/s) vs {consumed:,.1f} frames/s consumed by the cached side"
    )


if __name__ == "__main__":
    main()
