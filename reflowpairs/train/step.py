"""One optimiser step in lerobot's order (``train_step``), the only one stage 2, the benchmarks and the tiny teachers'
training take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reflowpairs.errors import ReflowPairsError
from reflowpairs.train.loss import LossFn
from reflowpairs.train.optim import Optimisation


@dataclass(frozen=True)
class StepStats:
    """What one ``train_step`` did: the loss it computed, the gradient norm before clipping, the lr it used."""

    loss: float
    grad_norm: float
    lr: float


class NonFiniteLossError(ReflowPairsError):
    """``train_step`` computed a NaN or infinite loss; nothing was updated (raised before ``backward``)."""

    def __init__(self, loss: float):
        super().__init__(f"The loss became non-finite ({loss}).")
        self.loss = loss


def train_step(
    model: torch.nn.Module,
    batch: Any,
    loss_fn: LossFn,
    opt: Optimisation,
    autocast_dtype: torch.dtype | None = None,
    accelerator: Any = None,
) -> StepStats:
    """One optimiser step in lerobot's order (``lerobot_train.update_policy``), the only one stage 2, the
    benchmarks and the tiny teacher's training take:

    1. forward: ``loss = loss_fn(model, batch)``, a scalar, under ``torch.autocast`` with ``autocast_dtype``
       (None: no autocast, plain float32); a non-finite loss raises ``NonFiniteLossError`` before anything changes;
    2. ``loss.backward()``;
    3. ``opt.masters.step``: gradients moved onto the float32 masters, total-norm clip to ``opt.grad_clip``,
       ``optimizer.step()``, the masters rounded into the model's low-precision parameters, ``zero_grad``;
    4. ``opt.scheduler.step()`` when there is a schedule.

    ``batch`` is whatever ``loss_fn`` reads: for stage 2 (``reflow_batch_loss``) a dict with ``observation`` (a
    collated raw dataset batch of B frames), ``x0`` ``(B, T, max_action_dim)``, ``x1`` ``(B, T, A)`` and ``t``
    ``(B,)`` on the model's device. ``model`` may be a ``DistributedDataParallel`` wrapper of the policy whose
    parameters ``opt.masters`` holds (``accelerator.prepare_model``). With an ``accelerator`` of several processes,
    the non-finite check is agreed by all of them (every process raises, none is left waiting in ``backward``),
    ``backward`` is ``accelerator.backward`` (lerobot-train's), and the returned loss is the mean over processes
    (the global batch's). Returns the loss, the gradient norm before clipping and the lr the step used
    (``optimizer.param_groups[0]["lr"]`` before the scheduler moved it)."""
    device_type = opt.masters.model_params[0].device.type
    with torch.autocast(
        device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
    ):
        loss = loss_fn(model, batch)
    several = accelerator is not None and accelerator.num_processes > 1
    value = loss.detach().float()
    if several:
        value = accelerator.reduce(value.reshape(1), reduction="mean")[0]  # a NaN anywhere makes the mean NaN
    if not torch.isfinite(value):
        raise NonFiniteLossError(float(value))
    if several:
        accelerator.backward(loss)
    else:
        loss.backward()
    lr = opt.optimizer.param_groups[0]["lr"]
    grad_norm = opt.masters.step(opt.optimizer, float(opt.grad_clip))
    if opt.scheduler is not None:
        opt.scheduler.step()
    return StepStats(float(value), float(grad_norm), lr)
