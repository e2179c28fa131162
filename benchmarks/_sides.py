"""The three ways to train a student, built on the same checkpoint, data and batch size, for the benchmarks.

- ``ordinary``: lerobot's ordinary fine-tuning step: dataset action chunks -> preprocessor -> ``policy.forward``.
- ``reflowpairs``: a ``reflowpairs train`` step: stored pairs (``PairDataset`` + ``PairSampler``) joined with their
  observations -> ``reflow_loss`` (the policy's own forward with noise := X_0, action := X_1).
- ``online``: the predecessor's online reflow: a teacher in memory runs its 10-step ODE on every batch to make X_1,
  then the same student step.

Each side's ``step()`` runs one optimiser step (AdamW over the trainable parameters, as lerobot's preset).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logging.getLogger("lerobot.utils.import_utils").setLevel(logging.CRITICAL)

SIDES = ("ordinary", "reflowpairs", "online")


@dataclass
class World:
    dataset_root: Path
    repo_id: str
    teacher: Path
    store: Path


def build_world(root: Path, size: str, samples_per_frame: int = 2) -> World:
    """Tiny-world dataset, an untrained SmolVLA of ``size`` (tiny | small | large), and a pair store from it."""
    from reflowpairs.dataset import open_dataset
    from reflowpairs.generate import GenerateConfig, generate
    from reflowpairs.tinyworld import TINY_REPO_ID, VLMSpec, build_tiny_dataset, build_tiny_vlm, save_untrained_policy

    specs = {"tiny": VLMSpec(), "small": VLMSpec.small(), "large": VLMSpec.large()}
    vlm = build_tiny_vlm(root / "vlm", specs[size])
    build_tiny_dataset(root / "dataset")
    dataset = open_dataset(TINY_REPO_ID, root / "dataset")
    teacher = save_untrained_policy(vlm, dataset, root / "teacher")
    store = root / "pairs"
    generate(GenerateConfig(teacher=str(teacher), dataset=TINY_REPO_ID, dataset_root=root / "dataset", out=store,
                            episodes=[0, 1, 2, 3], samples_per_frame=samples_per_frame, num_steps=2, device="cpu"))
    return World(root / "dataset", TINY_REPO_ID, teacher, store)


class Side:
    """One training loop; ``step()`` does one optimiser step and returns the loss."""

    def __init__(self, name: str, world: World, batch_size: int, device: str, seed: int = 0):
        from reflowpairs.dataset import frame_indices, open_dataset
        from reflowpairs.engine import make_engine
        from reflowpairs.teacher import load_policy
        from reflowpairs.train import trainable_parameters

        torch.manual_seed(seed)
        self.name, self.device = name, device
        loaded = load_policy(str(world.teacher), device)
        self.policy, self.preprocessor = loaded.policy, loaded.preprocessor
        self.policy.train()
        self.params = trainable_parameters(self.policy)
        preset = self.policy.config.get_optimizer_preset()
        self.optimizer = torch.optim.AdamW(self.params, lr=preset.lr, betas=preset.betas, eps=preset.eps,
                                           weight_decay=preset.weight_decay)
        self.grad_clip = preset.grad_clip_norm
        chunk = self.policy.config.chunk_size
        if name == "reflowpairs":
            from reflowpairs.pairdata import PairDataset, PairSampler, position_lookup
            from reflowpairs.pairstore import PairStore

            full = open_dataset(world.repo_id, world.dataset_root)
            pairs = PairDataset(PairStore(world.store), full, position_lookup(frame_indices(full)), cache_shards=5)
            loader = torch.utils.data.DataLoader(pairs, batch_size=batch_size, sampler=PairSampler(pairs.counts, seed, 4))
        else:
            fps = open_dataset(world.repo_id, world.dataset_root).meta.fps
            data = open_dataset(world.repo_id, world.dataset_root, None,
                                delta_timestamps={"action": [i / fps for i in range(chunk)]})
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                                 generator=torch.Generator().manual_seed(seed))
        self.batches = itertools.cycle(loader) if name != "reflowpairs" else iter(loader)
        self.generator = torch.Generator().manual_seed(seed)
        self.teacher = None
        if name == "online":
            self.teacher = load_policy(str(world.teacher), device)  # the second policy in memory
            self.engine = make_engine(self.teacher.policy)

    def step(self) -> float:
        from reflowpairs.solvers import SolverConfig
        from reflowpairs.timesampling import sample_time
        from reflowpairs.train import reflow_loss

        batch = next(self.batches)
        if self.name == "ordinary":
            loss, _ = self.policy.forward(self.preprocessor(batch))
        else:
            if self.name == "reflowpairs":
                observation, x0, x1 = batch["observation"], batch["x0"], batch["x1"]
            else:
                observation = batch
                x0 = torch.randn(len(batch["index"]), *self.engine.noise_shape)
                with torch.no_grad():
                    x1 = self.engine.sample(self.teacher.preprocessor(observation), x0[:, None], SolverConfig("euler", 10))[:, 0]
            t = sample_time("beta", x0.shape[0], self.generator, self.device)
            loss, _ = reflow_loss(self.policy, self.preprocessor, observation, x0, x1, t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(loss.detach())
