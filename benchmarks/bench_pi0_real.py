"""The real default pi0 (PaliGemma gemma_2b + gemma_300m expert + SigLIP, ~3.3 B parameters), random weights, built
offline: X_1 of reflowpairs' prefix-cached engine against lerobot's own ``predict_action_chunk`` on the same frames
and noises, their times side by side, and one reflow training step (``train_step`` with pi0's family loss), with
the process's peak memory. Not a test: it needs ~10-30 GB and minutes of CPU (figures in RESULTS.md).

    python benchmarks/bench_pi0_real.py --frames 2 --k 2 --dtype bfloat16

The batch is built directly in the model's preprocessed form (images in [0, 1] at 224 x 224, the state, random
token ids of the PaliGemma vocabulary): the gated PaliGemma tokenizer is not needed to measure the model.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def build_policy(dtype: str, cameras: int, state_dim: int, action_dim: int, train_expert_only: bool):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    inputs = {
        f"observation.images.cam{i}": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)) for i in range(cameras)
    }
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (state_dim,))
    config = PI0Config(
        dtype=dtype,
        device="cpu",
        push_to_hub=False,
        train_expert_only=train_expert_only,
        input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (action_dim,))},
    )
    torch.manual_seed(0)
    return PI0Policy(config)


def make_batch(policy, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A preprocessed observation batch of ``frames`` frames (what the pi0 preprocessor hands the policy)."""
    config = policy.config
    gen = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for key, feature in config.input_features.items():
        if key.startswith("observation.images."):
            batch[key] = torch.rand(frames, *feature.shape, generator=gen)
        else:
            batch[key] = torch.randn(frames, *feature.shape, generator=gen)
    length = config.tokenizer_max_length
    batch["observation.language.tokens"] = torch.randint(2, 257_000, (frames, length), generator=gen)
    mask = torch.zeros(frames, length, dtype=torch.bool)
    mask[:, :20] = True  # a 20-token prompt, the rest padding (as the tokenizer pads to max_length)
    batch["observation.language.attention_mask"] = mask
    return batch


def lerobot_x1(policy, batch: dict, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``predict_action_chunk`` per frame, the frame repeated K times with its K noises: ``(B, K, T, A)``."""
    frames, k = noise.shape[:2]
    out = []
    for f in range(frames):
        frame = {key: value[f : f + 1].expand(k, *value.shape[1:]) for key, value in batch.items()}
        policy.reset()
        out.append(policy.predict_action_chunk(frame, noise=noise[f], num_steps=num_steps))
    return torch.stack(out).float()


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    from reflowpairs.policies import family
    from reflowpairs.solvers import SolverConfig
    from reflowpairs.train.optim import build_optimisation
    from reflowpairs.train.step import train_step

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--cameras", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    policy = build_policy(
        args.dtype, args.cameras, state_dim=14, action_dim=14, train_expert_only=True
    ).eval()
    params = sum(p.numel() for p in policy.parameters())
    print(
        f"pi0 default ({args.dtype}): {params / 1e9:.2f} B parameters, built in {time.perf_counter() - start:.0f} s"
    )
    fam = family("pi0")
    (chunk, max_dim), (_, action_dim) = fam.pair_shapes(policy.config)
    batch = make_batch(policy, args.frames)
    noise = torch.randn(args.frames, args.k, chunk, max_dim, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        t0 = time.perf_counter()
        engine_x1 = fam.make_engine(policy, args.frames).sample(
            batch, noise, SolverConfig("euler", args.num_steps)
        )
        t_engine = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference = lerobot_x1(policy, batch, noise, args.num_steps)
        t_lerobot = time.perf_counter() - t0
    diff = (engine_x1.float() - reference).abs()
    print(
        f"generate, {args.frames} frames x K={args.k}, {args.num_steps} Euler steps: engine {t_engine:.1f} s, "
        f"lerobot predict_action_chunk {t_lerobot:.1f} s (x{t_lerobot / t_engine:.2f}); "
        f"X_1 max |diff| {diff.max().item():.2e}, mean {diff.mean().item():.2e} (X_1 std {reference.std().item():.2f})"
    )
    print(f"peak memory so far: {peak_gib():.1f} GiB")
    if args.skip_train:
        return

    policy.train()
    settings = {"lr": 2.5e-5, "warmup_steps": 0, "grad_clip": 1.0}
    opt = build_optimisation(policy, 10, settings, "pi0 (random weights)")
    x1 = engine_x1[:, 0].float()  # one pair per frame
    t = torch.full((args.frames,), 0.7)

    def loss_fn(model, data):
        return fam.reflow_loss(model, data, noise[:, 0], x1, t)

    t0 = time.perf_counter()
    stats = train_step(policy, batch, loss_fn, opt)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(
        f"train step (train_expert_only, {trainable / 1e9:.2f} B trainable, batch {args.frames}): "
        f"{time.perf_counter() - t0:.1f} s, loss {float(stats.loss):.4f}, grad norm {float(stats.grad_norm):.3f}"
    )
    print(f"peak memory: {peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
