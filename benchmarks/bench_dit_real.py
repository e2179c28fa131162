"""The default-size flow-matching Multi-task DiT (lerobot 0.6 defaults: hidden 512, 6 layers, horizon 32, with CLIP
ViT-B/16-sized vision and text towers), random weights, built offline: X_1 of reflowpairs' conditioning-shared engine
against DiT's own sampler (``sample_chunk``: ``conditional_sample`` with its noise draw pinned) on the same frames and
noises, their times side by side, and one reflow training step (``train_step`` with the family's loss), with the
process's peak memory. Not a test: it takes about a minute of CPU and ~2 GB (figures in docs/multi-task-dit.md).

    python benchmarks/bench_dit_real.py --frames 2 --k 4

``n_obs_steps`` is 1 (reflowpairs reads single frames); everything else is the config's default. The CLIP directory
(a random ``CLIPModel`` with ViT-B/16's sizes, ~150 M parameters) is written to a temporary directory; the batch is
built directly in the model's preprocessed form (random images and CLIP token ids), so no tokenizer is needed. The
adaLN-Zero modulations, zero at init, are given small random weights so the velocity depends on time and
conditioning as a trained model's does.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

STATE_DIM, ACTION_DIM = 14, 14


def build_clip(out_dir: Path) -> Path:
    """A random CLIP with openai/clip-vit-base-patch16's sizes (transformers' defaults with 16 px patches)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vision_config={"patch_size": 16})).save_pretrained(out_dir)
    return out_dir


def build_policy(clip_dir: Path):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.multi_task_dit.configuration_multi_task_dit import MultiTaskDiTConfig
    from lerobot.policies.multi_task_dit.modeling_multi_task_dit import MultiTaskDiTPolicy

    config = MultiTaskDiTConfig(
        objective="flow_matching",
        n_obs_steps=1,
        vision_encoder_name=str(clip_dir),
        text_encoder_name=str(clip_dir),
        device="cpu",
        push_to_hub=False,
        input_features={
            "observation.images.cam": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
            "observation.state": PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    )
    torch.manual_seed(0)
    policy = MultiTaskDiTPolicy(config)
    with torch.no_grad():
        for block in policy.noise_predictor.transformer_blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.02)
    return policy


def make_batch(policy, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A preprocessed observation batch of ``frames`` frames (what the DiT preprocessor hands the policy)."""
    gen = torch.Generator().manual_seed(seed)
    length = policy.config.tokenizer_max_length
    mask = torch.zeros(frames, length, dtype=torch.bool)
    mask[:, :12] = True  # a 12-token prompt, the rest padding (the tokenizer pads to max_length)
    return {
        "observation.images.cam": torch.randn(frames, 3, 224, 224, generator=gen),
        "observation.state": torch.randn(frames, STATE_DIM, generator=gen),
        "observation.language.tokens": torch.randint(0, 49_000, (frames, length), generator=gen),
        "observation.language.attention_mask": mask,
    }


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train_once(policy, fam, batch: dict, x0: torch.Tensor, x1: torch.Tensor) -> tuple[float, object]:
    """One reflow step (AdamW over the trainable parameters, as the tiny teachers train) at tau = 0.7."""
    from reflowpairs.train.masters import MasterWeights
    from reflowpairs.train.optim import Optimisation
    from reflowpairs.train.step import train_step

    masters = MasterWeights([(n, p) for n, p in policy.named_parameters() if p.requires_grad])
    opt = Optimisation(masters, torch.optim.AdamW(masters.params, lr=2e-5), None, grad_clip=10.0)
    t = torch.full((x0.shape[0],), 0.7)
    policy.train()
    start = time.perf_counter()
    stats = train_step(policy, batch, lambda model, data: fam.reflow_loss(model, data, x0, x1, t), opt)
    return time.perf_counter() - start, stats


def main() -> None:
    from reflowpairs.engine import repeat_frames, slice_frames
    from reflowpairs.policies import configured_num_steps, family
    from reflowpairs.solvers import SolverConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed rounds of each side (the best is shown)"
    )
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        policy = build_policy(build_clip(Path(tmp) / "clip")).eval()
    dit = sum(p.numel() for p in policy.noise_predictor.parameters())
    params = sum(p.numel() for p in policy.parameters())
    print(
        f"multi_task_dit default: {params / 1e6:.0f} M parameters ({dit / 1e6:.1f} M in the DiT), built in "
        f"{time.perf_counter() - start:.0f} s"
    )
    fam = family("multi_task_dit")
    (horizon, width), _ = fam.pair_shapes(policy.config)
    batch = make_batch(policy, args.frames)
    noise = torch.randn(args.frames, args.k, horizon, width, generator=torch.Generator().manual_seed(1))

    engine = fam.make_engine(policy, args.frames)

    def own_sampler() -> torch.Tensor:  # DiT's own sampler, per frame on the frame repeated K times
        with configured_num_steps(policy, args.num_steps):
            return torch.stack(
                [
                    fam.sample_chunk(
                        policy, repeat_frames(slice_frames(batch, f, f + 1, args.frames), 1, args.k), noise[f]
                    )
                    for f in range(args.frames)
                ]
            )

    times: dict[str, list[float]] = {"engine": [], "own": []}
    with torch.no_grad():
        for _ in range(args.repeats):  # alternated, so a slow spell of a shared machine hits both sides
            t0 = time.perf_counter()
            engine_x1 = engine.sample(batch, noise, SolverConfig("euler", args.num_steps))
            times["engine"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reference = own_sampler()
            times["own"].append(time.perf_counter() - t0)
    t_engine, t_own = min(times["engine"]), min(times["own"])
    diff = (engine_x1 - reference).abs()
    print(
        f"generate, {args.frames} frames x K={args.k}, {args.num_steps} Euler steps: engine {t_engine:.1f} s, "
        f"DiT's own sampler per frame {t_own:.1f} s (best of {args.repeats}) (x{t_own / t_engine:.2f}); X_1 max |diff| "
        f"{diff.max().item():.2e}, mean {diff.mean().item():.2e} (X_1 std {reference.std().item():.2f})"
    )
    print(f"peak memory so far: {peak_gib():.1f} GiB")
    if args.skip_train:
        return
    seconds, stats = train_once(policy, fam, batch, noise[:, 0], engine_x1[:, 0])
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    print(
        f"train step ({trainable / 1e6:.0f} M trainable, batch {args.frames}): {seconds:.1f} s, "
        f"loss {float(stats.loss):.4f}, grad norm {float(stats.grad_norm):.3f}"
    )
    print(f"peak memory: {peak_gib():.1f} GiB")


if __name__ == "__main__":
    main()
