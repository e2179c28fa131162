"""Stage-2 memory: peak memory of `reflowpairs train` (with and without the feature cache) vs ordinary fine-tuning vs online reflow (teacher + student).

Each side runs in a fresh process (so peaks do not mix) for a few steps on the same checkpoint and batch size. The
``ordinary`` side is lerobot's own step (``lerobot_train.update_policy``'s order: ``zero_grad`` after ``step``), the
``reflowpairs`` side is ``reflowpairs train``'s, the ``cached`` side ``reflowpairs train`` on the store's feature cache
(no image decoded, no frozen vision encoder run; ``benchmarks/_sides.py``).

- on CUDA: ``torch.cuda.max_memory_allocated``, the peak;
- on CPU: the peak of tensor memory (``peak_tensors_mb``: every CPU allocation and free the torch profiler records,
  from before the policy is loaded to after the last step, summed in order; the largest sum); the bytes of all live
  tensors after the steps (``live_tensors_mb``: parameters, optimiser state, data, counted by unique storage); and
  the process's peak RSS. RSS includes ~1 GB of imported libraries (and the profiler's records), so it only
  separates the sides with a model large enough to dominate it: use ``--size large`` (~100 M parameters).

Prints each side's figures and the ratios reflowpairs / ordinary (goal: peak within 2% of lerobot's own step),
cached / ordinary (goal: peak at most 0.8x) and online / reflowpairs.

    python benchmarks/bench_memory.py --size large --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _sides import SIDES, Side, World, build_world  # noqa: E402


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python (parameters, grads, optimiser state, data)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001, S112 - some objects refuse introspection
            continue
    return total


def peak_of(events: list[tuple[int, int]]) -> int:
    """The largest running sum of ``(time_ns, bytes)`` allocation (+) and free (-) events, in time order."""
    running = peak = 0
    for _, nbytes in sorted(events):
        running += nbytes
        peak = max(peak, running)
    return peak


def child(side_name: str, world: World, batch_size: int, device: str, steps: int) -> dict:
    torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    activities = [] if cuda else [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=not cuda) as prof:
        side = Side(side_name, world, batch_size, device)
        for _ in range(steps):
            side.step()
    result = {"side": side_name, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if side_name == "cached":  # what the cached side still holds though its forward never runs them
        from reflowpairs.cached_features import cache_family

        frozen = cache_family(side.policy).frozen_feature_modules(side.policy)
        result["frozen_feature_weights_mb"] = (
            sum(p.numel() * p.element_size() for m in frozen.values() for p in m.parameters()) / 2**20
        )
    if cuda:
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        memory = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        ]
        result["peak_tensors_mb"] = peak_of(memory) / 2**20
        result["live_tensors_mb"] = live_tensor_bytes() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "small", "large", "smolvla-shaped"], default="large")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="comma-separated subset of " + ",".join(SIDES)
    )
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        world = World(
            **{k: Path(v) if k != "repo_id" else v for k, v in json.loads(args.world.read_text()).items()}
        )
        print(json.dumps(child(args.child, world, args.batch_size, args.device, args.steps)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    world = build_world(root, args.size)
    spec = root / "world.json"
    spec.write_text(json.dumps({k: str(v) for k, v in world.__dict__.items()}))
    results = {}
    chosen = [name for name in SIDES if name in args.sides.split(",") or name == "ordinary"]
    for side in chosen:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                side,
                "--world",
                str(spec),
                "--size",
                args.size,
                "--device",
                args.device,
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = ["cuda_peak_mb"] if args.device.startswith("cuda") else ["peak_tensors_mb", "live_tensors_mb"]
    print(
        f"SmolVLA {args.size}; device {args.device}; batch {args.batch_size}; {args.steps} steps per side, each in its own process"
    )
    for side, r in results.items():
        print(
            f"  {side:12s} "
            + "   ".join(f"{key} {r[key]:9.1f}" for key in keys)
            + f"   peak RSS {r['peak_rss_mb']:8.1f} MB"
        )
    if "cached" in results and "frozen_feature_weights_mb" in results["cached"]:
        held = results["cached"]["frozen_feature_weights_mb"]
        print(
            f"  the cached side still holds the frozen vision model + connector it never runs: {held:.1f} MB of "
            f"weights ({held / results['ordinary'][keys[0]]:.1%} of the ordinary {keys[0]})"
        )
    for what in (*keys, "peak_rss_mb"):
        peak = what in ("cuda_peak_mb", "peak_tensors_mb")
        ratios = []
        for side, base, goal in (
            ("reflowpairs", "ordinary", "1.02"),
            ("cached", "ordinary", "0.8"),
            ("online", "reflowpairs", None),
        ):
            if side in results and base in results:
                ratio = results[side][what] / results[base][what]
                ratios.append(
                    f"{side} / {base} {ratio:.3f}x" + (f" (goal <= {goal})" if goal and peak else "")
                )
        print(f"  {what}: " + "; ".join(ratios))


if __name__ == "__main__":
    main()
