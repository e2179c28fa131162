"""The one training loop of the tiny teachers (SmolVLA in ``reflowpairs.tiny.world``, pi0/pi05 in
``reflowpairs.tiny.pi``): lerobot's ordinary flow-matching loss (``policy.forward`` on a preprocessed dataset batch,
lerobot drawing the noise and times), stepped by reflowpairs' own ``train_step`` (lerobot's order, float32 masters
of any bfloat16 parameter) with a plain AdamW over the trainable parameters, clipped to norm 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reflowpairs.train.masters import MasterWeights
from reflowpairs.train.optim import Optimisation
from reflowpairs.train.step import train_step


@dataclass(frozen=True)
class TinyTraining:
    """How a tiny teacher trains: ``steps`` steps of ``batch_size`` action chunks at learning rate ``lr``, shuffled
    by ``seed``; ``cosine``: a cosine schedule over the steps (else a constant rate)."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    cosine: bool


def flow_matching_loss(preprocessor):
    """``train_step``'s loss for a tiny teacher: lerobot's ordinary flow-matching loss (``policy.forward`` on a
    preprocessed dataset batch, lerobot drawing the noise and times) on a raw batch with its action chunk."""

    def loss(policy, batch):
        value, _ = policy.forward(preprocessor(batch))
        return value

    return loss


def fit_tiny_teacher(
    policy,
    preprocessor,
    dataset,
    chunk_size: int,
    training: TinyTraining,
    delta_timestamps: dict | None = None,
) -> dict:
    """Train ``policy`` in place on ``dataset`` (a LeRobotDataset; batches of ``chunk_size``-step action chunks, or
    the frames ``delta_timestamps`` asks for when given, e.g. lerobot's ``resolve_delta_timestamps`` of the config) as
    ``training`` says; returns ``{"steps", "final_loss"}`` (the last step's loss, None when no step ran). The
    policy is left in eval mode."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lazy: heavy (datasets, pyarrow)

    fps = dataset.meta.fps
    train_set = LeRobotDataset(
        dataset.repo_id,
        root=dataset.root,
        delta_timestamps=delta_timestamps or {"action": [i / fps for i in range(chunk_size)]},
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=training.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(training.seed),
    )
    masters = MasterWeights([(n, p) for n, p in policy.named_parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(masters.params, lr=training.lr, weight_decay=0.0)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=training.steps)
        if training.cosine
        else None
    )
    opt = Optimisation(masters, optimizer, schedule, grad_clip=1.0)
    loss_fn = flow_matching_loss(preprocessor)
    policy.train()
    step, stats = 0, None
    while step < training.steps:
        for batch in loader:
            stats = train_step(policy, batch, loss_fn, opt)
            step += 1
            if step >= training.steps:
                break
    policy.eval()
    return {"steps": step, "final_loss": None if stats is None else stats.loss}
