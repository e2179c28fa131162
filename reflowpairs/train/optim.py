"""The optimiser and lr schedule of a run: the policy's lerobot presets, adjusted for the run (``plan_optimizer``), built
over float32 master copies (``build_optimisation``), and the schedule's value at a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from reflowpairs.errors import ReflowPairsError
from reflowpairs.train.masters import MasterWeights, trainable_named_parameters


@dataclass
class OptimPlan:
    """The optimiser and schedule a run uses, with lerobot's short-run rescaling already applied."""

    optimizer: Any  # lerobot OptimizerConfig (AdamWConfig for SmolVLA)
    scheduler: Any  # lerobot LRSchedulerConfig (CosineDecayWithWarmupSchedulerConfig) or None
    preset_warmup_steps: int | None
    preset_decay_steps: int | None

    def describe(self) -> dict[str, Any]:
        sched = self.scheduler
        return {
            "optimizer": self.optimizer.type,
            "lr": self.optimizer.lr,
            "weight_decay": self.optimizer.weight_decay,
            "grad_clip": self.optimizer.grad_clip_norm,
            "scheduler": sched.type if sched is not None else None,
            "warmup_steps": getattr(sched, "num_warmup_steps", None),
            "decay_steps": getattr(sched, "num_decay_steps", None),
            "decay_lr": getattr(sched, "decay_lr", None),
            "preset_warmup_steps": self.preset_warmup_steps,
            "preset_decay_steps": self.preset_decay_steps,
        }


def plan_optimizer(
    policy_config, steps: int, lr: float | None, warmup_steps: int | None, grad_clip: float | None
) -> OptimPlan:
    """The policy's lerobot optimiser/scheduler presets, adjusted for this run.

    - ``lr`` replaces the preset's ``lr`` and the schedule's ``peak_lr``; the preset's ``decay_lr`` is
      kept (as with lerobot-train's ``--policy.optimizer_lr``), capped at ``lr``.
    - lerobot's ``CosineDecayWithWarmupSchedulerConfig.build`` rescales warmup and decay when
      ``steps < num_decay_steps`` (warmup -> ``int(warmup * steps / decay)``, decay -> ``steps``). That
      rule is applied here, so the returned config holds the *effective* values (and ``build`` finds
      nothing left to rescale); ``warmup_steps``, when given, is taken as the effective warmup as is.
    - ``grad_clip`` replaces ``grad_clip_norm``."""
    optimizer = policy_config.get_optimizer_preset()
    scheduler = policy_config.get_scheduler_preset()
    if lr is not None:
        optimizer.lr = float(lr)
    if grad_clip is not None:
        optimizer.grad_clip_norm = float(grad_clip)
    preset_warmup = getattr(scheduler, "num_warmup_steps", None)
    preset_decay = getattr(scheduler, "num_decay_steps", None)
    if scheduler is not None:
        if hasattr(scheduler, "peak_lr"):
            scheduler.peak_lr = optimizer.lr
            scheduler.decay_lr = min(scheduler.decay_lr, optimizer.lr)
        if preset_decay is not None and steps < preset_decay:
            scheduler.num_warmup_steps = int((preset_warmup or 0) * steps / preset_decay)
            scheduler.num_decay_steps = steps
        if warmup_steps is not None:
            scheduler.num_warmup_steps = int(warmup_steps)
    return OptimPlan(optimizer, scheduler, preset_warmup, preset_decay)


@dataclass
class Optimisation:
    """What updates a model: ``optimizer`` steps ``masters.params`` (float32 masters of the low-precision trainable
    parameters, the float32 ones themselves), gradients clipped to ``grad_clip`` (total norm); ``scheduler`` (any
    object with ``step()``, e.g. a lerobot preset's ``LambdaLR``) is stepped after every update, or None. ``plan``
    is the lerobot preset plan it was built from (``build_optimisation``), None for a hand-built one."""

    masters: MasterWeights
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_clip: float
    plan: OptimPlan | None = None


def build_optimisation(policy, steps: int, settings: dict[str, Any], init_source: str) -> Optimisation:
    """The policy's lerobot optimiser and schedule (``plan_optimizer`` with ``settings``' ``lr``, ``warmup_steps``,
    ``grad_clip``) over float32 master copies of its trainable parameters, for a ``steps``-step run."""
    plan = plan_optimizer(
        policy.config, steps, settings["lr"], settings["warmup_steps"], settings["grad_clip"]
    )
    named = trainable_named_parameters(policy)
    if not named:
        raise ReflowPairsError(f"The policy in {init_source} has no trainable parameters under its config.")
    masters = MasterWeights(named)
    optimizer = plan.optimizer.build(masters.params)
    scheduler = plan.scheduler.build(optimizer, steps) if plan.scheduler is not None else None
    return Optimisation(masters, optimizer, scheduler, float(plan.optimizer.grad_clip_norm), plan)


def sync_lr_to_schedule(optimizer, scheduler) -> None:
    """Set the optimiser's lr to the schedule's value at the schedule's current step (a ``LambdaLR``, as lerobot's
    presets build). A run resumed with a larger ``--steps`` has a new schedule, but the restored optimiser state still
    holds the old schedule's last lr, which the first resumed step would otherwise use. The scheduler's own record of
    its last lr (``get_last_lr()``) is left as restored: nothing reads it before the next ``scheduler.step()``, which
    sets it from the same formula."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)


def scheduled_lr(plan: OptimPlan, steps: int, step: int) -> float:
    """The lr that optimiser step ``step`` (1-based, as ``train_log.jsonl`` counts) uses under ``plan`` in a
    ``steps``-step run: the preset's lr times the schedule's factor after ``step - 1`` scheduler steps."""
    if plan.scheduler is None:
        return float(plan.optimizer.lr)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.optimizer.lr)
    scheduler = plan.scheduler.build(optimizer, steps)
    return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1))
