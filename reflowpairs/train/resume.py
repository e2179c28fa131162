"""Resuming a run: which checkpoint (``resume_checkpoint``), whether the run may continue from it (its process count,
its end, its lr schedule) and restoring its optimiser, schedule and float32 master copies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reflowpairs.checkpoint import (
    MASTER_FILE,
    checkpoints_dir,
    last_checkpoint,
    load_master_params,
    load_training_state,
)
from reflowpairs.errors import ReflowPairsError
from reflowpairs.train.config import TrainConfig
from reflowpairs.train.optim import Optimisation, plan_optimizer, scheduled_lr, sync_lr_to_schedule


def resume_checkpoint(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run), after refusing an ``out`` that does not fit."""
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(
            f"`out` {out} exists and is not a directory.", "Set `out` to a directory for the run."
        )
    has_run = checkpoints_dir(out).is_dir() and any(
        p for p in checkpoints_dir(out).iterdir() if not p.name.startswith(".")
    )
    if not resume:
        if has_run:  # a log without any checkpoint (a run killed before its first save) is simply restarted
            raise ReflowPairsError(
                f"`out` {out} already holds a training run.",
                "Set `resume` to continue it from checkpoints/last, or choose another `out`.",
            )
        return None
    checkpoint = last_checkpoint(out)
    if checkpoint is None:
        raise ReflowPairsError(
            f"`resume` was set but {out} has no checkpoints/last to resume from.",
            "Unset `resume` to start a new run there, or point `out` at an earlier run.",
        )
    return checkpoint


@dataclass
class ScheduleChange:
    """How resuming a run planned for ``old_steps`` with ``--steps new_steps`` changes its lr schedule."""

    old_steps: int
    new_steps: int
    old: dict[str, Any]  # OptimPlan.describe() of each plan
    new: dict[str, Any]
    step: int  # the first resumed step
    lr_before: float  # its lr under the old plan
    lr_after: float  # and under the new one

    def describe(self) -> str:
        def sched(d: dict[str, Any]) -> str:
            return f"warmup {d['warmup_steps']:,}, decay over {d['decay_steps']:,}"

        def lr(x: float) -> str:
            return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e")

        return (
            f"planned for {self.old_steps:,} steps ({sched(self.old)}), now {self.new_steps:,} ({sched(self.new)}): "
            f"the lr at step {self.step:,} goes from {lr(self.lr_before)} to {lr(self.lr_after)}"
        )


def schedule_change(
    policy_config, settings: dict[str, Any], old_steps: int, new_steps: int, start_step: int
) -> ScheduleChange | None:
    """None when a run resumed at ``start_step`` with ``--steps new_steps`` keeps the schedule it was planned
    with for ``old_steps`` (lerobot's schedule depends on the run length only below the preset's decay horizon);
    otherwise what changes."""
    plan = {
        n: plan_optimizer(policy_config, n, settings["lr"], settings["warmup_steps"], settings["grad_clip"])
        for n in (old_steps, new_steps)
    }
    old, new = plan[old_steps].describe(), plan[new_steps].describe()
    if old == new:
        return None
    step = start_step + 1
    return ScheduleChange(
        old_steps,
        new_steps,
        old,
        new,
        step,
        scheduled_lr(plan[old_steps], old_steps, step),
        scheduled_lr(plan[new_steps], new_steps, step),
    )


def check_resume_steps(
    cfg: TrainConfig, state: dict[str, Any], policy_config, settings: dict[str, Any]
) -> ScheduleChange | None:
    """Refuse a resume past its end, or one whose ``--steps`` changes the lr schedule (unless
    ``--allow-schedule-change``); returns the change that is allowed, if any."""
    start_step, old_steps = int(state["step"]), int(state["steps"])
    if start_step >= cfg.steps:
        raise ReflowPairsError(
            f"The run in {cfg.out} is already at step {start_step}, and `steps` is {cfg.steps}.",
            "Set a larger `steps` to train further.",
        )
    change = schedule_change(policy_config, settings, old_steps, cfg.steps, start_step)
    if change is not None and not cfg.allow_schedule_change:
        keep = f", or resume with `steps` {old_steps} to keep it" if start_step < old_steps else ""
        raise ReflowPairsError(
            f"Resuming the run in {cfg.out} with `steps` {cfg.steps} would change its lr schedule mid-run: "
            f"{change.describe()}.",
            f"Set `allow_schedule_change` to continue on the {cfg.steps:,}-step schedule{keep}.",
        )
    return change


def restore_training_state(opt: Optimisation, checkpoint: Path, warnings: list[str]) -> int:
    """Restore optimiser, scheduler, RNG state and float32 master copies from ``checkpoint``; returns its step."""
    start_step = load_training_state(checkpoint, opt.optimizer, opt.scheduler)
    if opt.scheduler is not None:
        sync_lr_to_schedule(opt.optimizer, opt.scheduler)
    if opt.masters.has_copies:
        saved = load_master_params(checkpoint)
        if saved is None:  # a checkpoint written before master copies: they start from its rounded weights
            warnings.append(
                f"{checkpoint} holds no float32 master copies ({MASTER_FILE}); they start from its saved weights."
            )
        else:
            try:
                opt.masters.load_state_dict(saved)
            except ValueError as err:
                raise ReflowPairsError(
                    f"Cannot restore {MASTER_FILE} of {checkpoint}: {err}.",
                    "The checkpoint was written for other trainable parameters; start a new run in another `out`.",
                ) from err
    return start_step


def check_world(cfg: TrainConfig, state: dict[str, Any], world: int) -> None:
    """Refuse to resume with another process count: the global batch (``batch_size`` per process times the
    processes) and each process's share of the data are those of the run's own process count."""
    batch = int(state["settings"]["batch_size"])
    recorded = state.get("world")
    if recorded is None:  # runs from before this field: samples_seen = steps * batch_size * processes
        step = int(state.get("step", 0))
        recorded = int(state["samples_seen"]) // (step * batch) if step > 0 else world
    if int(recorded) != world:
        raise ReflowPairsError(
            f"Cannot resume the run in {cfg.out} on {world} process{'es' if world > 1 else ''}: it was trained on "
            f"{recorded} (global batch {recorded} x {batch} = {int(recorded) * batch} pairs per step, each process "
            "on its own part of the store).",
            f"Resume it with {recorded} process{'es' if int(recorded) > 1 else ''} (the same launcher settings), or "
            "start a new run in another `out`.",
        )
