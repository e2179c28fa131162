"""What the SmolVLA and pi0/pi05 feature caches share: both cache ``embed_image`` per camera slot, and both patch the
same two points of a lerobot policy, the method that prepares a batch's camera images (``prepare_images`` in SmolVLA,
``_preprocess_images`` in pi0/pi05) and the ``embed_image`` of the model that holds the vision tower."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

EMPTY_CAMERA = ""
"""The slot name of a configured camera the batch lacks (the policy adds a -1 image with a zero mask for it)."""


def unwrapped(policy):
    """The policy itself, or the module a DDP wrapper holds."""
    return getattr(policy, "module", policy)


def trainable_problems(modules: dict[str, torch.nn.Module]) -> list[str]:
    """``"its <name> has <n> trainable parameters"`` for each of ``modules`` with any (empty: all frozen)."""
    problems = []
    for name, module in modules.items():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        if trainable:
            problems.append(f"its {name} has {trainable} trainable parameters")
    return problems


@contextmanager
def substituted_embeddings(
    inner, prepare: str, embedder, features: Tensor, slots: list[str]
) -> Iterator[None]:
    """Within the block, ``inner.<prepare>(batch)`` returns the cached slots of ``features`` ``(B, S, N, D)`` (already
    on the policy's device and in ``embed_image``'s output dtype) with a mask True for a camera and False for an
    empty one, as the policy's own method would, and ``embedder.embed_image`` passes them through."""
    size = features.shape[0]

    def prepare_images(batch):
        masks = [
            torch.full((size,), slot != EMPTY_CAMERA, dtype=torch.bool, device=features.device)
            for slot in slots
        ]
        return [features[:, s] for s in range(len(slots))], masks

    setattr(inner, prepare, prepare_images)
    embedder.embed_image = lambda image: image
    try:
        yield
    finally:
        delattr(inner, prepare)
        del embedder.embed_image


@contextmanager
def captured_embeddings(embedder) -> Iterator[list[Tensor]]:
    """Within the block, every ``embedder.embed_image`` output (one per camera slot per prefix fill, in call order) is
    appended to the yielded list."""
    original = embedder.embed_image
    outputs: list[Tensor] = []

    def embed_image(image: Tensor) -> Tensor:
        out = original(image)
        outputs.append(out)
        return out

    embedder.embed_image = embed_image
    try:
        yield outputs
    finally:
        del embedder.embed_image
