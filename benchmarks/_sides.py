"""The three ways to train a student, built on the same checkpoint, data and batch size, for the benchmarks.

- ``ordinary``: lerobot's ordinary fine-tuning step, as ``lerobot_train.update_policy`` does it: dataset action chunks
  -> preprocessor -> ``policy.forward`` -> backward -> ``clip_grad_norm_(policy.parameters())`` -> ``optimizer.step()``
  -> ``optimizer.zero_grad()`` -> ``lr_scheduler.step()``, with the optimiser and scheduler its presets build over
  ``policy.get_optim_params()`` (as ``make_optimizer_and_scheduler`` does).
- ``reflowpairs``: a ``reflowpairs train`` step, by the functions ``train()`` itself uses (``build_optimisation``,
  ``train_step`` with ``reflow_batch_loss``: float32 master copies of low-precision trainables, lerobot's order):
  stored pairs (``PairDataset`` + ``PairSampler``) joined with their observations -> ``reflow_loss`` (the policy's
  own forward with noise := X_0, action := X_1).
- ``cached``: ``reflowpairs train`` with the store's feature cache (``reflowpairs.cached_features``): the same step, but
  the observation's non-camera columns come straight from the parquet (no image decoded) and the frozen vision
  encoder + connector are replaced by the cached embeddings (``TrainingCache.frames`` / ``TrainingCache.loss_fn``).
- ``online``: the predecessor's online reflow: a teacher in memory runs its 10-step ODE on every batch to make X_1,
  then the same student step as ``reflowpairs``.

Each side's ``step()`` runs one optimiser step; no side uses autocast (as ``reflowpairs train --precision float32``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from reflowpairs.dataset import quiet_dataset_logs

quiet_dataset_logs()

SIDES = ("ordinary", "reflowpairs", "cached", "online")


@dataclass
class World:
    dataset_root: Path
    repo_id: str
    teacher: Path
    store: Path


def build_world(
    root: Path,
    size: str,
    samples_per_frame: int = 2,
    episodes: list[int] | None = None,
    videos: bool = False,
) -> World:
    """Tiny-world dataset (its camera as PNG frames, or MP4 video with ``videos``, as real datasets are), an untrained
    SmolVLA of ``size`` (tiny | small | large | smolvla-shaped: real token and layer counts, chunk 50, max_action_dim
    32), and a pair store from it with its feature cache (``cache_features``)."""
    from reflowpairs.dataset import open_dataset
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate
    from reflowpairs.tiny.world import (
        TINY_REPO_ID,
        TinyTeacherSpec,
        VLMSpec,
        build_tiny_dataset,
        build_tiny_vlm,
        save_untrained_policy,
    )

    specs = {
        "tiny": VLMSpec(),
        "small": VLMSpec.small(),
        "large": VLMSpec.large(),
        "smolvla-shaped": VLMSpec.smolvla_shaped(),
    }
    teacher_spec = (
        TinyTeacherSpec(chunk_size=50, max_action_dim=32, max_state_dim=32)
        if size == "smolvla-shaped"
        else TinyTeacherSpec()
    )
    vlm = build_tiny_vlm(root / "vlm", specs[size])
    build_tiny_dataset(root / "dataset", use_videos=videos)
    dataset = open_dataset(TINY_REPO_ID, root / "dataset")
    teacher = save_untrained_policy(vlm, dataset, root / "teacher", teacher_spec)
    store = root / "pairs"
    generate(
        GenerateConfig(
            teacher=str(teacher),
            dataset=TINY_REPO_ID,
            dataset_root=root / "dataset",
            out=store,
            episodes=[0, 1, 2, 3] if episodes is None else episodes,
            samples_per_frame=samples_per_frame,
            num_steps=2,
            device="cpu",
            cache_features=True,
        )
    )
    return World(root / "dataset", TINY_REPO_ID, teacher, store)


PLANNED_STEPS = 30_000  # the schedules' length (SmolVLA's decay horizon: nothing is rescaled)


class Side:
    """One training loop; ``step()`` does one optimiser step and returns the loss."""

    def __init__(self, name: str, world: World, batch_size: int, device: str, seed: int = 0):
        from reflowpairs.dataset import frame_indices, open_dataset
        from reflowpairs.policies import make_engine
        from reflowpairs.teacher import load_policy
        from reflowpairs.train.loss import reflow_batch_loss
        from reflowpairs.train.masters import trainable_parameters
        from reflowpairs.train.optim import build_optimisation

        torch.manual_seed(seed)
        self.name, self.device = name, device
        loaded = load_policy(str(world.teacher), device)
        self.policy, self.preprocessor = loaded.policy, loaded.preprocessor
        self.policy.train()
        self.params = trainable_parameters(self.policy)
        if name == "ordinary":  # lerobot's make_optimizer_and_scheduler with the policy's presets
            config = self.policy.config
            self.optimizer = config.get_optimizer_preset().build(self.policy.get_optim_params())
            self.scheduler = config.get_scheduler_preset().build(self.optimizer, PLANNED_STEPS)
            self.grad_clip = config.get_optimizer_preset().grad_clip_norm
        else:  # reflowpairs train's own: the presets, master copies of low-precision trainables
            self.opt = build_optimisation(
                self.policy,
                PLANNED_STEPS,
                {"lr": None, "warmup_steps": None, "grad_clip": None},
                str(world.teacher),
            )
            self.loss_fn = reflow_batch_loss(self.preprocessor)
        self.steps_done = 0
        chunk = self.policy.config.chunk_size
        if name in ("reflowpairs", "cached"):
            from reflowpairs.pairdata import PairDataset, PairSampler, position_lookup
            from reflowpairs.store.reader import PairStore

            store = PairStore(world.store)
            full = open_dataset(world.repo_id, world.dataset_root)
            frames = full
            if name == "cached":
                from reflowpairs.cached_features import cache_for_training as plan_training
                from reflowpairs.train.loss import cached_features_loss

                self.cache = plan_training(world.store, self.policy, store.meta, disabled=False)
                frames = self.cache.frames(full)
                self.loss_fn = cached_features_loss(self.cache, self.preprocessor)
            pairs = PairDataset(store, frames, position_lookup(frame_indices(full)), cache_shards=5)
            loader = torch.utils.data.DataLoader(
                pairs, batch_size=batch_size, sampler=PairSampler(pairs.counts, seed, 4)
            )
        else:
            fps = open_dataset(world.repo_id, world.dataset_root).meta.fps
            data = open_dataset(
                world.repo_id,
                world.dataset_root,
                None,
                delta_timestamps={"action": [i / fps for i in range(chunk)]},
            )
            loader = torch.utils.data.DataLoader(
                data,
                batch_size=batch_size,
                shuffle=True,
                drop_last=True,
                generator=torch.Generator().manual_seed(seed),
            )
        self.batches = itertools.cycle(loader) if name not in ("reflowpairs", "cached") else iter(loader)
        self.generator = torch.Generator().manual_seed(seed)
        self.teacher = None
        if name == "online":
            self.teacher = load_policy(str(world.teacher), device)  # the second policy in memory
            self.engine = make_engine(self.teacher.policy)

    def step(self) -> float:
        from reflowpairs.solvers import SolverConfig
        from reflowpairs.train.step import train_step
        from reflowpairs.train.timesampling import sample_time

        batch = next(self.batches)
        self.steps_done += 1
        if (
            self.name == "ordinary"
        ):  # lerobot_train.update_policy without accelerate (one process, no autocast)
            loss, _ = self.policy.forward(self.preprocessor(batch))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            value = float(loss.detach())
        else:
            if self.name == "online":
                x0 = torch.randn(len(batch["index"]), *self.engine.noise_shape)
                with torch.no_grad():
                    x1 = self.engine.sample(
                        self.teacher.preprocessor(batch), x0[:, None], SolverConfig("euler", 10)
                    )[:, 0]
                batch = {"observation": batch, "x0": x0, "x1": x1, "obs_index": batch["index"]}
            batch["t"] = sample_time("beta", batch["x0"].shape[0], self.generator, self.device)
            value = train_step(self.policy, batch, self.loss_fn, self.opt).loss
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return value
