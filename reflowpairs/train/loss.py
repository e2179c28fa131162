"""Stage 2's loss: the policy's own flow-matching training loss with a stored pair substituted (lerobot's
convention: t=1 noise, t=0 action, ``x_t = t*X_0 + (1-t)*X_1``, target ``u = X_0 - X_1``), MSE (lerobot's) or
pseudo-Huber (rectified flow++), on decoded observations or on a store's cached image features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from reflowpairs.cached_features import AppliedFeatureCache, cache_family
from reflowpairs.pairdata import drop_action_keys
from reflowpairs.policies import family
from reflowpairs.policies.interface import FEATURE_KEY

PSEUDO_HUBER_C = 0.00054  # c = 0.00054 sqrt(d) (Song & Dhariwal 2023, used by rectified flow++)


def pseudo_huber(per_sample_mse: Tensor, dims: int) -> Tensor:
    """Mean over the batch of ``sqrt(||r||^2 + c^2) - c`` with ``c = 0.00054 sqrt(dims)``, from each sample's mean
    squared residual over its ``dims`` (chunk x action) entries (``||r||^2 = dims * mse``): quadratic for small
    residuals, linear for large ones, so a few hard pairs do not dominate (rectified flow++'s 1-step gains)."""
    c = PSEUDO_HUBER_C * dims**0.5
    return (torch.sqrt(per_sample_mse * dims + c * c) - c).mean()


def reflow_loss(
    policy,
    preprocessor,
    observation: dict[str, Any],
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    loss: str = "mse",
) -> tuple[Tensor, dict]:
    """The policy's own flow-matching training loss on stored pairs (lerobot convention).

    ``observation``: a collated raw dataset batch (action keys are dropped here, before the
    preprocessor, so the normaliser never sees an action); ``x0``: ``(B, T, max_action_dim)`` noise;
    ``x1``: ``(B, T, A)`` teacher actions, already normalised; ``t``: ``(B,)`` in (0, 1] on the policy's
    device. Returns ``(loss, {})`` from the policy family's ``reflow_loss`` (``reflowpairs.policies``;
    SmolVLA: ``policy.forward(batch, noise=x0, time=t)`` with ``batch["action"] = x1``; pi0/pi05: the model-level
    ``forward``). ``loss="mse"``: the mean of ``((x0 - x1) - v(x_t, t))**2`` over batch, chunk and action
    dimensions, lerobot's own loss; ``"pseudo-huber"``: ``pseudo_huber`` of the same forward's per-sample errors
    (``reduction="none"``)."""
    batch = preprocessor(drop_action_keys(observation))
    fam = family(
        getattr(policy, "module", policy).config.type
    )  # under DDP, the wrapper's module holds the config
    if loss == "mse":
        value = fam.reflow_loss(policy, batch, x0, x1, t, reduction="mean")
    else:
        value = pseudo_huber(
            fam.reflow_loss(policy, batch, x0, x1, t, reduction="none"), x1.shape[1] * x1.shape[2]
        )
    return value, {}


LossFn = Callable[[torch.nn.Module, Any], Tensor]
"""``loss_fn(model, batch)``: the scalar training loss of ``batch`` under ``model`` (``train_step`` runs it under
its autocast). ``reflow_batch_loss`` is stage 2's; the tiny teacher's is lerobot's plain ``policy.forward``."""


def reflow_batch_loss(preprocessor, loss: str = "mse") -> LossFn:
    """Stage 2's ``LossFn``: ``reflow_loss`` (``loss``: mse or pseudo-huber) of a batch of stored pairs with its
    times (``observation``, ``x0``, ``x1``, ``t``; see ``train_step``)."""

    def loss_fn(model, batch: dict[str, Any]) -> Tensor:
        value, _ = reflow_loss(
            model, preprocessor, batch["observation"], batch["x0"], batch["x1"], batch["t"], loss
        )
        return value

    return loss_fn


def cached_features_loss(cache: AppliedFeatureCache, preprocessor, loss: str = "mse") -> LossFn:
    """Stage 2's ``LossFn`` on a batch whose observation carries the store's cached features under ``FEATURE_KEY``
    (``AppliedFeatureCache.frames``): ``reflow_loss`` with the family's ``embed_image`` substituted by them."""
    slots = list(cache.index["slots"])

    def loss_fn(model, batch: dict[str, Any]) -> Tensor:
        observation = dict(batch["observation"])
        features = observation.pop(FEATURE_KEY)
        with cache_family(model).substituted_features(model, features, slots):
            value, _ = reflow_loss(
                model, preprocessor, observation, batch["x0"], batch["x1"], batch["t"], loss
            )
        return value

    return loss_fn
