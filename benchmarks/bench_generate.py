"""Stage-1 throughput: `reflowpairs generate` vs two plain lerobot loops, side by side in one run.

Sides, all over the same frames of the same dataset with the same teacher and the same X_0:

- plain_single: what a user writes first: one frame at a time, `policy.predict_action_chunk(batch, noise=...)` once
  per sample;
- plain_batched: the best plain loop: frames batched at --batch-size, still one `predict_action_chunk` per sample;
- reflowpairs: `reflowpairs.generate.generate(...)` end to end (data loading, the prefix-cached engine, shard
  writing to a temporary store).

The sides are interleaved and repeated (--repeats); torch threads are pinned (--threads). Prints pairs/s (median and
spread) and the ratios reflowpairs / plain_*, per K, then each of issue #7's goals that the run measured, met or
missed. With --dtype bfloat16 it also reports the max |X_1| difference to fp32 on the benchmark frames.

Beside each ratio over plain_batched it prints what prefix sharing can give at most, ``K(P+N*S)/(P+N*K*S)``: the
plain loop pays the prefix P once per sample, reflowpairs once per frame, and both pay N suffix steps of S per
sample. P and S are measured in the same run on the teacher's own engine (``prefix_and_step_costs``): P is one
prefix fill of a call's frames (``velocity_field``) per frame, S one ODE step of that call (frames x K samples) per
sample, each the median of --repeats timings. --size takes a comma-separated list (one run per size): the SmolVLA
sizes and the tiny pi0/pi05 architectures of ``reflowpairs.tiny.pi`` (``pi0-small``/``pi05-small``, where the prefix
is about half of a 10-step call; ``pi0-tiny``/``pi05-tiny`` for smoke runs), and issue #26's families
(``FAMILY_SIZES``: ``eo1-tiny``, ``dit-tiny`` at the tests' tiny shapes, ``eo1-small``, ``dit-small``; untrained).
lerobot's EO-1 and DiT samplers take no ``noise=``, so their plain loops call the family's
``sample_chunk(policy, batch, noise)`` (lerobot's own sampler with its noise draw pinned) once per sample on the
frame-batched call, and the bound is measured on the family's engine the same way: for EO-1 P is the prompt's
KV-cache fill and S one denoise step against it; for DiT P is the conditioning vector (``observation_encoder.encode``)
and S one ``noise_predictor`` call (the conditioning-sharing bound). ``--num-steps`` sets each family's step field (DiT's default is 100; the benchmark's 10).

    python benchmarks/bench_generate.py --size small --ks 1,4,16 --batch-size 32 --episodes 0,1,2,3 --device cpu
    python benchmarks/bench_generate.py --size pi0-small,pi05-small --ks 4,16 --batch-size 32 --skip-single
    python benchmarks/bench_generate.py --size eo1-tiny,dit-tiny --ks 4,16 --batch-size 16 --skip-single
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reflowpairs.dataset import quiet_dataset_logs

quiet_dataset_logs()

GOALS = [(4, "plain_single", 8.0), (4, "plain_batched", 1.3), (16, "plain_batched", 1.6)]
"""Issue #7's CPU goals for the small model: (K, side, least ratio reflowpairs / side)."""


SMOLVLA_SIZES = ("tiny", "small", "smolvla-shaped")
PI_SIZES = ("pi0-tiny", "pi05-tiny", "pi0-small", "pi05-small")
FAMILY_SIZES = ("eo1-tiny", "dit-tiny", "eo1-small", "dit-small")
"""Issue #26's families, untrained: ``-tiny`` at the tests' shapes, ``-small`` at 4x the widths, twice the layers
and chunk 16 (``build_family_teacher``); the plain loops call ``family.sample_chunk``."""
SIZES = SMOLVLA_SIZES + PI_SIZES + FAMILY_SIZES


def pi_specs(size: str):
    """``(variant, TinyPiSpec, TinyGemmaSpec)`` of a pi size. ``small``: PaliGemma-shaped at toy widths (VLM width
    256 over 8 layers, expert width 128, SigLIP-like tower of 4 layers at width 128 over 128 px images in 16 px
    patches: 64 image tokens + 48 prompt tokens), chunk 32 and 32 action dimensions as real pi checkpoints pad
    to; the prefix is about half of a 10-step call. ``tiny``: the tests' sizes. Untrained, a 1,024-token
    vocabulary (the tiny tokenizer's ids fit)."""
    from reflowpairs.tiny.pi import TinyPiSpec
    from reflowpairs.tiny.pi_patch import TinyGemmaSpec

    variant, scale = size.split("-")
    if scale == "tiny":
        return variant, TinyPiSpec(train_steps=0), TinyGemmaSpec(vocab_size=1024)
    spec = TinyPiSpec(
        chunk_size=32,
        max_action_dim=32,
        max_state_dim=32,
        image_size=128,
        tokenizer_max_length=48,
        train_steps=0,
    )
    gemma = TinyGemmaSpec(
        vlm_width=256,
        expert_width=128,
        depth=8,
        num_heads=8,
        num_kv_heads=1,
        head_dim=32,
        vision_hidden=128,
        vision_layers=4,
        vision_heads=4,
        patch_size=16,
        vocab_size=1024,
    )
    return variant, spec, gemma


def build_family_teacher(root: Path, size: str) -> Path:
    """An untrained teacher of a ``FAMILY_SIZES`` size over the tiny world's dataset at ``root / "dataset"``:
    EO-1 (``reflowpairs.tiny.eo1``: a tiny Qwen2.5-VL; tiny: width 32 over 2 layers, chunk 8; small: width 128 over
    4 layers, vision width 64 over 2 layers, chunk 16, actions padded to 32) or a flow-matching Multi-task DiT
    (``reflowpairs.tiny.dit``: a tiny CLIP; tiny: width 32 over 2 layers, horizon 8; small: DiT width 128 over 4
    layers, CLIP width 64 over 2 layers, horizon 16). Built offline, no training step."""
    from reflowpairs.tiny.world import TINY_REPO_ID

    small = size.endswith("-small")
    if size.startswith("eo1"):
        from reflowpairs.tiny.eo1 import TinyEO1Spec, TinyQwenSpec, build_tiny_eo1_teacher

        if not small:
            spec, qwen = TinyEO1Spec(train_steps=0), TinyQwenSpec()
        else:
            spec = TinyEO1Spec(chunk_size=16, max_action_dim=32, max_state_dim=32, train_steps=0)
            qwen = TinyQwenSpec(
                text_hidden=128,
                text_layers=4,
                text_heads=4,
                text_head_dim=32,
                mrope_section=(4, 6, 6),
                vision_hidden=64,
                vision_layers=2,
            )
        return build_tiny_eo1_teacher(root / "teacher", TINY_REPO_ID, root / "dataset", spec=spec, qwen=qwen)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lazy: heavy, as the other builders

    from reflowpairs.tiny.dit import TinyClipSpec, TinyDitSpec, build_tiny_clip, build_tiny_dit_teacher

    dit, clip_spec = TinyDitSpec(train_steps=0), TinyClipSpec()
    if small:
        dit = TinyDitSpec(
            horizon=16, n_action_steps=16, hidden_dim=128, num_layers=4, num_heads=4, train_steps=0
        )
        clip_spec = TinyClipSpec(hidden=64, layers=2)
    clip = build_tiny_clip(root / "clip", clip_spec)
    dataset = LeRobotDataset(TINY_REPO_ID, root=root / "dataset")
    return build_tiny_dit_teacher(clip, dataset, root / "teacher", dit)


def build_world(root: Path, size: str, teacher_dtype: str | None = None):
    """A dataset (the tiny world's) and an untrained teacher of the requested size: ``tiny``; ``small`` (9 M
    parameters, the prefix ~30% of a 10-step call, the issue's goals are for it); ``smolvla-shaped`` (SmolVLA's real
    token and layer counts at a quarter of its widths, chunk 50, max_action_dim 32: the prefix dominates).
    ``teacher_dtype="bfloat16"``: VLM text layers and expert in bfloat16, as real SmolVLA checkpoints are.
    A pi size (``PI_SIZES``): a tiny pi0/pi05 teacher of ``pi_specs(size)``, built offline by ``reflowpairs.tiny.pi``
    (its checkpoint's marker makes every loader apply the size patch)."""
    from reflowpairs.dataset import open_dataset
    from reflowpairs.tiny.world import (
        TINY_REPO_ID,
        TinyTeacherSpec,
        VLMSpec,
        build_tiny_dataset,
        build_tiny_vlm,
        save_untrained_policy,
    )

    if size in FAMILY_SIZES:
        build_tiny_dataset(root / "dataset")
        return open_dataset(TINY_REPO_ID, root / "dataset"), build_family_teacher(root, size)
    if size in PI_SIZES:
        from dataclasses import replace

        from reflowpairs.tiny.pi import build_tiny_pi_teacher

        build_tiny_dataset(root / "dataset")
        dataset = open_dataset(TINY_REPO_ID, root / "dataset")
        variant, spec, gemma = pi_specs(size)
        spec = replace(spec, dtype=teacher_dtype or "float32")
        teacher = build_tiny_pi_teacher(
            root / "teacher", variant, TINY_REPO_ID, root / "dataset", spec=spec, gemma=gemma
        )
        return dataset, teacher
    vlm_spec = {"tiny": VLMSpec(), "small": VLMSpec.small(), "smolvla-shaped": VLMSpec.smolvla_shaped()}[size]
    teacher_spec = (
        TinyTeacherSpec(chunk_size=50, max_action_dim=32, max_state_dim=32)
        if size == "smolvla-shaped"
        else TinyTeacherSpec()
    )
    vlm = build_tiny_vlm(root / "vlm", vlm_spec.with_dtype(teacher_dtype))
    build_tiny_dataset(root / "dataset")
    dataset = open_dataset(TINY_REPO_ID, root / "dataset")
    teacher = save_untrained_policy(vlm, dataset, root / "teacher", teacher_spec)
    return dataset, teacher


def plain_loop(
    policy,
    preprocessor,
    dataset,
    positions,
    noise_of,
    k: int,
    batch_size: int,
    device: str,
    dtype: str = "float32",
    family=None,
) -> int:
    """predict_action_chunk once per sample, frames batched ``batch_size`` at a time (1 = the naive loop), under
    the same autocast dtype as the reflowpairs side. ``family`` (a ``reflowpairs.policies`` family whose lerobot
    sampler takes no ``noise=``, EO-1 and DiT): its ``sample_chunk(policy, batch, noise)`` instead, lerobot's own
    sampler with its noise draw pinned, on the frame-batched call (``family.frame_batch`` first where it has one)."""
    compute = getattr(torch, dtype)  # the dtype's name (reflowpairs.generate.config.COMPUTE_DTYPES)
    pairs = 0
    for start in range(0, len(positions), batch_size):
        items = [dataset[p] for p in positions[start : start + batch_size]]
        batch = preprocessor(torch.utils.data.default_collate(items))
        noise = noise_of([int(i["index"]) for i in items], k)  # (B, K, T, D)
        if family is not None and hasattr(family, "frame_batch"):
            batch = family.frame_batch(batch)
        for s in range(k):
            policy.reset()
            with torch.autocast(
                torch.device(device).type, dtype=compute, enabled=compute is not torch.float32
            ):
                if family is None:
                    x1 = policy.predict_action_chunk(batch, noise=noise[:, s].to(device))
                else:
                    x1 = family.sample_chunk(policy, batch, noise[:, s].to(device))
            pairs += x1.shape[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return pairs


def prefix_and_step_costs(engine, batch: dict, k: int, repeats: int, steps: int = 3) -> tuple[float, float]:
    """``(P, S)`` in seconds, on the engine itself: P the prefix fill of one call's frames (``velocity_field``:
    embedding, the VLM forward that fills the KV cache, its repetition for the K samples) per frame; S one ODE
    step of that call (``velocity(x_t, t)`` over frames x K samples) per sample. Each is the median of ``repeats``
    timings (S: of ``steps`` consecutive steps). ``batch``: a preprocessed batch of exactly
    ``engine.frames_per_call`` frames."""
    frames = engine.frames_per_call
    x = torch.randn(frames * k, *engine.noise_shape, generator=torch.Generator().manual_seed(0))
    prefix, step = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        velocity = engine.velocity_field(batch, k)
        t1 = time.perf_counter()
        for i in range(steps):
            velocity(x, torch.full((frames * k,), 1.0 - i / 10))
        t2 = time.perf_counter()
        prefix.append((t1 - t0) / frames)
        step.append((t2 - t1) / (steps * frames * k))
    return statistics.median(prefix), statistics.median(step)


def sharing_bound(k: int, prefix: float, step: float, num_steps: int) -> float:
    """What prefix sharing can give at most over a loop that recomputes the prefix per sample:
    ``K(P + N*S) / (P + N*K*S)`` (P per frame, S per sample and step, N steps)."""
    return k * (prefix + num_steps * step) / (prefix + num_steps * k * step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", default="small", help=f"comma-separated, one run each, of: {', '.join(SIZES)}"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--episodes", default="0,1", help="tiny-world episodes to run over (24 frames each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="reflowpairs' DataLoader workers (the plain loops load inline)",
    )
    parser.add_argument(
        "--tokens-per-call",
        type=int,
        default=None,
        help="reflowpairs' suffix tokens per engine call (default: the device's; 0: the whole batch)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--skip-single", action="store_true", help="leave out the (slow) one-frame-at-a-time loop"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.size.split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown --size {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    for number, size in enumerate(sizes):
        if number:
            print()
        run_size(args, size)


def run_size(args: argparse.Namespace, size: str) -> None:
    """The whole benchmark for one teacher size."""
    from reflowpairs.dataset import open_dataset
    from reflowpairs.engine import resolve_frames_per_call
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.noise import batch_noise
    from reflowpairs.policies import family as family_of
    from reflowpairs.policies import make_engine, pair_shapes, step_field
    from reflowpairs.teacher import load_policy

    root = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    episodes = [int(e) for e in args.episodes.split(",")]
    full, teacher_dir = build_world(root, size)
    dataset = open_dataset(full.repo_id, full.root, episodes)
    teacher = load_policy(str(teacher_dir), args.device)
    policy, pre = teacher.policy, teacher.preprocessor
    setattr(policy.config, step_field(policy.config.type), args.num_steps)  # the plain loops' step count
    n_params = sum(p.numel() for p in policy.parameters())
    positions = list(range(len(dataset)))
    shape = pair_shapes(policy.config)[0]  # X_0's (T, D): (chunk, max_action_dim); DiT (horizon, action dim)
    family = family_of(policy.config.type) if size in FAMILY_SIZES else None
    shared = "conditioning" if policy.config.type == "multi_task_dit" else "prefix"

    def noise_of(indices, k):
        return batch_noise(0, indices, k, shape)

    print(
        f"teacher: {policy.config.type} {size}, {n_params / 1e6:.2f} M parameters, chunk {shape[0]}; "
        f"device {args.device}; {args.threads} torch thread(s); {len(positions)} frames; batch {args.batch_size}; "
        f"{args.num_steps} Euler steps; reflowpairs with {args.num_workers} DataLoader worker(s)"
    )
    runs = 0

    def run_reflowpairs(k: int) -> float:
        nonlocal runs
        runs += 1
        cfg = GenerateConfig(
            teacher=str(teacher_dir),
            dataset=dataset.repo_id,
            dataset_root=dataset.root,
            out=root / f"store{runs}",
            episodes=episodes,
            samples_per_frame=k,
            batch_size=args.batch_size,
            num_steps=args.num_steps,
            device=args.device,
            dtype=args.dtype,
            shard_size=4096,
            num_workers=args.num_workers,
            tokens_per_call=args.tokens_per_call,
        )
        result = generate(
            cfg
        )  # result.seconds covers its sampling loop (loading, engine, writing), not start-up
        return result.new_pairs / result.seconds

    def cost_meter(k: int):
        """One timing of (P, S) on the engine reflowpairs runs at this K (its frames per call), under the run's
        autocast."""
        call_frames = resolve_frames_per_call(
            args.tokens_per_call, args.batch_size, k, shape[0], torch.device(args.device)
        )
        engine = make_engine(policy, call_frames)
        items = [dataset[p] for p in positions[:call_frames]]
        call = pre(torch.utils.data.default_collate(items))
        compute = getattr(torch, args.dtype)

        def measure() -> tuple[float, float]:
            with torch.autocast(
                torch.device(args.device).type, dtype=compute, enabled=compute is not torch.float32
            ):
                return prefix_and_step_costs(engine, call, k, repeats=1)

        return measure

    ratios: dict[tuple[int, str], float] = {}
    for k in [int(x) for x in args.ks.split(",")]:
        sides = ["plain_batched", "reflowpairs"] + ([] if args.skip_single else ["plain_single"])
        rates: dict[str, list[float]] = {s: [] for s in sides}
        measure = cost_meter(k) if k > 1 else None
        costs: list[tuple[float, float]] = []
        for _ in range(args.repeats):
            for side in sides:  # interleaved: every repeat runs every side once, then times P and S
                if side == "reflowpairs":
                    rate = run_reflowpairs(k)
                else:
                    bs = 1 if side == "plain_single" else args.batch_size
                    t0 = time.perf_counter()
                    pairs = plain_loop(
                        policy, pre, dataset, positions, noise_of, k, bs, args.device, args.dtype, family
                    )
                    rate = pairs / (time.perf_counter() - t0)
                rates[side].append(rate)
            if measure is not None:
                costs.append(measure())
        med = {s: statistics.median(v) for s, v in rates.items()}
        print(f"\nK={k}")
        for side, values in rates.items():
            print(
                f"  {side:14s} {med[side]:9.1f} pairs/s  (min {min(values):.1f}, max {max(values):.1f}, n={len(values)})"
            )
        for side in sides:
            if side != "reflowpairs":
                ratios[k, side] = med["reflowpairs"] / med[side]
                print(f"  ratio reflowpairs / {side}: {ratios[k, side]:.2f}x")
        if costs:  # what prefix sharing can give at most, from P and S measured in this run
            prefix = statistics.median(c[0] for c in costs)
            step = statistics.median(c[1] for c in costs)
            bound = sharing_bound(k, prefix, step, args.num_steps)
            share = prefix / (prefix + args.num_steps * step)
            print(
                f"  {shared}-sharing bound K(P+N*S)/(P+N*K*S): {bound:.2f}x (P {prefix * 1e3:.2f} ms/frame, "
                f"S {step * 1e3:.3f} ms/sample-step, N {args.num_steps}: the {shared} is {share:.0%} of a "
                f"{args.num_steps}-step call); reflowpairs / plain_batched is "
                f"{ratios[k, 'plain_batched'] / bound:.0%} of it"
            )

    measured = [(k, side, goal) for k, side, goal in GOALS if (k, side) in ratios]
    if args.device != "cpu" or size != "small":
        print("\n(issue #7's goals are for --size small on --device cpu; not checked for this run)")
    elif measured:
        print("\ngoals (issue #7, CPU, small model):")
        for k, side, goal in measured:
            verdict = "met" if ratios[k, side] >= goal else "MISSED"
            print(
                f"  K={k:<2d} reflowpairs / {side:13s} {ratios[k, side]:5.2f}x  (goal >= {goal}x): {verdict}"
            )

    if args.dtype != "float32":
        from reflowpairs.store.reader import PairStore

        stores = sorted(root.glob("store*"))
        ref = GenerateConfig(
            teacher=str(teacher_dir),
            dataset=dataset.repo_id,
            dataset_root=dataset.root,
            out=root / "fp32",
            episodes=[0],
            samples_per_frame=1,
            num_steps=args.num_steps,
            device=args.device,
        )
        low = GenerateConfig(**{**ref.__dict__, "out": root / "low", "dtype": args.dtype})
        generate(ref)
        generate(low)
        a, b = PairStore(root / "fp32").read_pairs(0), PairStore(root / "low").read_pairs(0)
        print(
            f"\n{args.dtype} vs float32 X_1: max |diff| {abs(a.x1 - b.x1).max():.3e}, "
            f"mean |diff| {abs(a.x1 - b.x1).mean():.3e} (X_1 std {a.x1.std():.3f}); {len(stores)} stores"
        )


if __name__ == "__main__":
    main()
