"""Stage 2: train a student on stored pairs with the straight-line (reflow) loss, no teacher in memory.

The student starts as the teacher: the checkpoint the store's manifest names (``teacher.source``, or
``--init``), loaded once with ``reflowpairs.teacher.load_policy``; nothing else builds a policy and
nothing integrates an ODE. Each step takes a batch of stored pairs (``reflowpairs.pairdata``) and
computes, in lerobot's convention (t=1 noise, t=0 action, ``x_t = t*X_0 + (1-t)*X_1``, target
``u = X_0 - X_1``), the policy's *own* training loss with the stored pair substituted:

    batch = preprocessor(observation without action keys)      # images, state, language tokens
    batch["action"] = X_1                                        # (B, T, A), already normalised
    loss, _ = policy.forward(batch, noise=X_0, time=t)           # X_0: (B, T, max_action_dim)

``policy.prepare_action`` zero-pads X_1 to ``max_action_dim`` as lerobot pads actions; no
``action_is_pad`` is passed, so every chunk position counts; the loss is the MSE over the action's
own dimensions, exactly as lerobot trains. X_1 never passes the normaliser (it was stored normalised).

Trainable parameters are whatever the checkpoint's config leaves trainable (``train_expert_only``,
``freeze_vision_encoder``, ``train_state_proj``: lerobot sets ``requires_grad`` when it builds the
policy). Optimiser and schedule are the policy's lerobot presets (``get_optimizer_preset``,
``get_scheduler_preset``); see ``plan_optimizer`` for how ``--lr``/``--warmup-steps``/``--grad-clip``
change them and how lerobot's automatic warmup/decay rescaling is made explicit.

Before the first step every input is checked and nothing is written before the checks pass: the
store's manifest is complete and sound; the manifest's teacher and dataset fingerprints match the init
checkpoint and the dataset (unless ``--allow-mismatch``); the store's shapes match the policy. These checks
read the manifest only, so start-up (and ``--resume``) takes the same time for any store size. Each shard is
checked when it is first read, in the DataLoader workers (``reflowpairs.pairdata.read_checked``: row counts,
shapes, dtypes, sha256, origin, every ``obs_index`` a frame of the dataset); a damaged shard stops training with
an error naming it before any of its pairs reaches a step.

Processes: one, or several launched by ``torchrun`` / ``accelerate launch``. An ``accelerate.Accelerator`` (as in
``lerobot-train``) joins the process group, wraps the student in DDP, and says which process is the main one
(the only one that saves and logs) and reduces the loss across processes. Each process reads only its own shards
(``PairSampler`` with ``rank``/``world``). Precision stays this module's (``train_step``: float32 master copies of
low-precision parameters, our own autocast): accelerate's ``mixed_precision`` is left at ``"no"``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reflowpairs.atomic import check_writable
from reflowpairs.checkpoint import (
    MASTER_FILE,
    checkpoints_dir,
    clean_leftovers,
    last_checkpoint,
    last_link,
    load_master_params,
    load_training_state,
    pretrained_dir,
    read_json_object,
    read_state,
    save_checkpoint,
    student_config_json,
)
from reflowpairs.dataset import episodes_text
from reflowpairs.engine import pair_shapes
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairdata import (
    PairDataset,
    PairSampler,
    collate_pairs,
    drop_action_keys,
    position_lookup,
    raise_if_refused,
)
from reflowpairs.pairstore import PairStore
from reflowpairs.policies import family, json_step_field
from reflowpairs.threads import apply_threads
from reflowpairs.timesampling import TIME_SAMPLINGS, check_time_sampling, sample_time, step_generator

LOG_FILE = "train_log.jsonl"
PRECISIONS = ("auto", "float32", "bfloat16")

# Settings that decide which data, times and updates a run sees. ``None`` in ``TrainConfig`` means
# "the default" for a new run and "the checkpoint's value" for ``--resume``; a value given on resume
# that differs from the checkpoint's is refused (the run would not continue as if uninterrupted).
DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "seed": 0,
    "time_sampling": "beta",
    "shuffle_window": 4,
    "student_num_steps": 1,
    "loss": "mse",
}
INHERITED = (
    "batch_size",
    "seed",
    "time_sampling",
    "shuffle_window",
    "lr",
    "warmup_steps",
    "grad_clip",
    "student_num_steps",
    "loss",
)
TEACHER_NUM_STEPS = "teacher"  # --student-num-steps teacher: the saved config keeps the teacher's num_steps
LOW_PRECISION = (
    torch.bfloat16,
    torch.float16,
)  # trainable parameters of these dtypes get float32 master copies

Progress = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)``, called after every optimiser step."""


@dataclass
class TrainConfig:
    """Settings of ``reflowpairs train`` (``docs/train.md``). ``None`` means: the default (shown in
    ``DEFAULTS`` or the policy's lerobot preset) for a new run, the checkpoint's value on ``resume``."""

    pairs: Path
    out: Path
    steps: int = 10_000
    batch_size: int | None = None  # 32
    init: str | None = None  # None: the manifest's teacher.source
    dataset_root: Path | None = None  # None: the manifest's dataset.root
    lr: float | None = None  # None: the policy preset's optimizer_lr
    warmup_steps: int | None = None  # None: the preset's, rescaled as lerobot does for short runs
    grad_clip: float | None = None  # None: the preset's grad_clip_norm
    seed: int | None = None  # 0
    num_workers: int = 2
    device: str = "auto"
    save_every: int = 1000
    log_every: int = 1
    time_sampling: str | None = None  # "beta" (lerobot's own); "noise-end" (t = 1): one-step distillation
    loss: str | None = None  # "mse" (lerobot's own); "pseudo-huber" (rectified flow++)
    student_num_steps: int | str | None = (
        None  # 1: the saved config's num_steps; "teacher" keeps the teacher's
    )
    precision: str = "auto"  # auto: bfloat16 autocast on CUDA (when supported), float32 elsewhere
    shuffle_window: int | None = None  # 4 shards
    resume: bool = False
    allow_mismatch: bool = False
    allow_schedule_change: bool = False  # resume with a --steps that changes the lr schedule
    no_feature_cache: bool = (
        False  # decode images even when the store has a feature cache (reflowpairs.featurecache)
    )
    # torch intra-op threads of this process: None keeps the caller's torch.set_num_threads, a number sets it,
    # "auto" plans them around the DataLoader workers (what the command line uses; reflowpairs.threads)
    threads: int | str | None = None


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path  # the last checkpoint written (OUT/checkpoints/<step>)
    start_step: int
    step: int
    final_loss: float
    seconds: float
    warnings: list[str] = field(default_factory=list)
    saved_num_steps: int | None = (
        None  # the saved config.json's step count (its family's step field: num_steps, num_inference_steps)
    )
    teacher_num_steps: int | None = None  # the init checkpoint config.json's step count (its step field)
    init_source: str = ""
    dataset_repo_id: str | None = None
    dataset_root: Path | None = None
    held_out_episodes: list[int] = field(default_factory=list)  # dataset episodes the store has no pairs of
    pairs: Path | None = None

    @property
    def steps_per_second(self) -> float:
        done = self.step - self.start_step
        return done / self.seconds if self.seconds > 0 else 0.0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training at ``step``; ``checkpoint`` is the last complete checkpoint (None if there is
    none), holding ``saved_step``. After one Ctrl-C it holds every completed step."""

    def __init__(self, step: int, checkpoint: Path | None, saved_step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.saved_step = saved_step


# --- the loss ---------------------------------------------------------------------------------------


LOSSES = ("mse", "pseudo-huber")
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


# --- optimiser and schedule -------------------------------------------------------------------------


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


def trainable_parameters(policy) -> list[torch.nn.Parameter]:
    """Parameters the checkpoint's config leaves trainable (``requires_grad``, as lerobot set it)."""
    return [p for p in policy.get_optim_params() if p.requires_grad]


def trainable_named_parameters(policy) -> list[tuple[str, torch.nn.Parameter]]:
    """``trainable_parameters`` with their ``named_parameters`` names (the names of ``model.safetensors``)."""
    names = {id(p): name for name, p in policy.named_parameters()}
    return [(names[id(p)], p) for p in trainable_parameters(policy)]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class MasterWeights:
    """Float32 master copies of the trainable bfloat16/float16 parameters (classic mixed-precision training).

    A bfloat16 parameter holds 8 significant bits: an AdamW update smaller than half its spacing (about
    ``|w| * 2**-9``) rounds away, and at fine-tuning learning rates most updates do. So the optimiser steps
    float32 *masters* instead: ``params`` (what the optimiser is built on) holds, for each trainable parameter,
    the parameter itself when it is float32 and its float32 master when it is bfloat16/float16. The model keeps
    computing, and is saved, in its own dtypes: after each optimiser step every low-precision parameter is set
    to its master rounded to nearest (``Tensor.copy_``). Parameters without a master copy cost nothing extra.

    ``step`` is one update in lerobot's order (``lerobot_train.update_policy``: backward, clip, ``step``,
    ``zero_grad``), so no gradient lives through the next forward."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        self.names = [name for name, _ in named]
        self.model_params = [p for _, p in named]
        self.params: list[torch.nn.Parameter] = [
            torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) if p.dtype in LOW_PRECISION else p
            for p in self.model_params
        ]

    def _copies(self):
        """``(name, model parameter, float32 master)`` of each parameter that has a master copy."""
        return [
            (n, p, m)
            for n, p, m in zip(self.names, self.model_params, self.params, strict=True)
            if m is not p
        ]

    def dtype_counts(self) -> dict[str, int]:
        """Trainable elements per model dtype, e.g. ``{"bfloat16": 1200, "float32": 300}``."""
        counts: dict[str, int] = {}
        for p in self.model_params:
            counts[dtype_name(p.dtype)] = counts.get(dtype_name(p.dtype), 0) + p.numel()
        return counts

    @property
    def has_copies(self) -> bool:
        return bool(self._copies())

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float) -> Tensor:
        """After ``loss.backward()``: move the model's gradients onto the masters (as float32; the low-precision
        gradients are freed), clip on the masters, step the optimiser, round the masters into the model and clear
        every gradient. Returns the total gradient norm before clipping (``clip_grad_norm_``)."""
        for _, param, master in self._copies():
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
            param.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        optimizer.step()
        self._round_into_model()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _round_into_model(self) -> None:
        with torch.no_grad():
            for _, param, master in self._copies():
                param.copy_(master)

    def state_dict(self) -> dict[str, Tensor]:
        """The float32 masters by parameter name (empty when no parameter has a master copy)."""
        return {name: master.detach() for name, _, master in self._copies()}

    def load_state_dict(self, masters: dict[str, Tensor]) -> None:
        """Restore the masters (``state_dict``'s names and shapes) and round them into the model."""
        expected = {name: tuple(m.shape) for name, _, m in self._copies()}
        given = {name: tuple(t.shape) for name, t in masters.items()}
        if given != expected:
            missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
            reshaped = sorted(n for n in set(expected) & set(given) if expected[n] != given[n])
            raise ValueError(
                f"master copies differ from the trainable parameters: missing {missing[:3]}, "
                f"unexpected {extra[:3]}, other shapes {reshaped[:3]}"
            )
        with torch.no_grad():
            for name, _, master in self._copies():
                master.copy_(masters[name])
        self._round_into_model()


# --- one optimiser step -----------------------------------------------------------------------------

LossFn = Callable[[torch.nn.Module, Any], Tensor]
"""``loss_fn(model, batch)``: the scalar training loss of ``batch`` under ``model`` (``train_step`` runs it under
its autocast). ``reflow_batch_loss`` is stage 2's; the tiny teacher's is lerobot's plain ``policy.forward``."""


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


def reflow_batch_loss(preprocessor, loss: str = "mse") -> LossFn:
    """Stage 2's ``LossFn``: ``reflow_loss`` (``loss``: mse or pseudo-huber) of a batch of stored pairs with its
    times (``observation``, ``x0``, ``x1``, ``t``; see ``train_step``)."""

    def loss_fn(model, batch: dict[str, Any]) -> Tensor:
        value, _ = reflow_loss(
            model, preprocessor, batch["observation"], batch["x0"], batch["x1"], batch["t"], loss
        )
        return value

    return loss_fn


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


# --- input checks -----------------------------------------------------------------------------------


def _check_args(cfg: TrainConfig) -> None:
    for name, value, least in (
        ("steps", cfg.steps, 1),
        ("batch_size", cfg.batch_size, 1),
        ("save_every", cfg.save_every, 1),
        ("log_every", cfg.log_every, 1),
        ("num_workers", cfg.num_workers, 0),
        ("shuffle_window", cfg.shuffle_window, 1),
        ("warmup_steps", cfg.warmup_steps, 0),
        ("seed", cfg.seed, 0),
    ):
        if value is not None and value < least:
            raise ReflowPairsError(
                f"`{name}` must be at least {least}, got {value}.", f"Set `{name}` to {least} or more."
            )
    if isinstance(cfg.student_num_steps, str):
        parse_student_num_steps(cfg.student_num_steps)  # refuses anything but a number or "teacher"
    elif cfg.student_num_steps is not None and cfg.student_num_steps < 1:
        raise ReflowPairsError(
            f"`student_num_steps` must be at least 1, got {cfg.student_num_steps}.",
            "Set `student_num_steps` to a step count such as 1 or 2, or 'teacher' to keep the teacher's num_steps.",
        )
    for name, value in (("lr", cfg.lr), ("grad_clip", cfg.grad_clip)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ReflowPairsError(
                f"`{name}` must be a positive number, got {value}.", f"Set `{name}` above 0."
            )
    if cfg.time_sampling is not None:
        check_time_sampling(cfg.time_sampling)
    if cfg.loss is not None and cfg.loss not in LOSSES:
        raise ReflowPairsError(f"Unknown `loss` {cfg.loss!r}.", f"Set `loss` to one of: {', '.join(LOSSES)}.")
    if cfg.precision not in PRECISIONS:
        raise ReflowPairsError(
            f"`precision` must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}.",
            "Set `precision` to one of those.",
        )


def _check_out(out: Path, resume: bool) -> Path | None:
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


def sync_lr_to_schedule(optimizer, scheduler) -> None:
    """Set the optimiser's lr to the schedule's value at the schedule's current step (a ``LambdaLR``, as lerobot's
    presets build). A run resumed with a larger ``--steps`` has a new schedule, but the restored optimiser state still
    holds the old schedule's last lr, which the first resumed step would otherwise use."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    for group, base_lr, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, lambdas, strict=True):
        group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def scheduled_lr(plan: OptimPlan, steps: int, step: int) -> float:
    """The lr that optimiser step ``step`` (1-based, as ``train_log.jsonl`` counts) uses under ``plan`` in a
    ``steps``-step run: the preset's lr times the schedule's factor after ``step - 1`` scheduler steps."""
    if plan.scheduler is None:
        return float(plan.optimizer.lr)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=plan.optimizer.lr)
    scheduler = plan.scheduler.build(optimizer, steps)
    return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step - 1))


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


def parse_student_num_steps(text: str | None) -> int | str | None:
    """``--student-num-steps``: ``"2"`` -> 2, ``"teacher"`` -> ``"teacher"``, None -> None (the default)."""
    if text is None or text.strip().lower() == TEACHER_NUM_STEPS:
        return None if text is None else TEACHER_NUM_STEPS
    try:
        return int(text)
    except ValueError:
        raise ReflowPairsError(
            f"`student_num_steps` must be a whole number of steps or 'teacher', got {text!r}.",
            "Set `student_num_steps` to e.g. 1 (the default), or to 'teacher' to keep the teacher's num_steps.",
        ) from None


def _resolve_settings(cfg: TrainConfig, state: dict[str, Any] | None) -> dict[str, Any]:
    """The run's data/optimiser settings: given values, else the checkpoint's (resume), else defaults."""
    given = {name: getattr(cfg, name) for name in INHERITED}
    if isinstance(given["student_num_steps"], str):
        given["student_num_steps"] = parse_student_num_steps(given["student_num_steps"])
    if state is None:
        return {name: given[name] if given[name] is not None else DEFAULTS.get(name) for name in INHERITED}
    recorded = dict(state["settings"])
    if (
        recorded.get("student_num_steps") is None
    ):  # runs before --student-num-steps defaulted to 1: the teacher's
        recorded["student_num_steps"] = TEACHER_NUM_STEPS
    recorded.setdefault("loss", "mse")  # runs from before the loss setting trained on MSE
    differences = [
        f"{name}: the checkpoint has {recorded.get(name)!r}, this run asks for {given[name]!r}"
        for name in INHERITED
        if name != "student_num_steps" and given[name] is not None and given[name] != recorded.get(name)
    ]
    if differences:
        raise ReflowPairsError(
            "Cannot resume with other training settings: " + "; ".join(differences) + ".",
            "Leave those settings unset (a resumed run keeps its own), or start a new run in another `out`.",
        )
    return {name: given[name] if given[name] is not None else recorded.get(name) for name in INHERITED}


def check_store(path: Path) -> PairStore:
    """Open the store and check what its manifest says, without reading a shard: the manifest is sound
    (``StoreManifest.read``), the store is complete and holds pairs. Time independent of the store's size; the
    shards are checked as they are read (``reflowpairs.pairdata.read_checked``)."""
    store = PairStore(path)
    manifest = store.manifest
    if not manifest.get("complete", False):
        total = manifest.get("generation", {}).get("num_frames")
        done = manifest.get("num_frames", 0)
        raise ReflowPairsError(
            f"Pair store {path} is incomplete ({done} of {total if total is not None else '?'} frames): "
            "its generation was interrupted or is still running.",
            "Finish it with the same `reflowpairs generate ...` command plus --resume, then train.",
        )
    if not store.shards or len(store) == 0:
        raise ReflowPairsError(
            f"Pair store {path} holds no pairs.", "Generate pairs first with `reflowpairs generate`."
        )
    return store


def _mismatch(what: str, allow: bool, warnings: list[str]) -> None:
    if allow:
        warnings.append(what + " (allowed by --allow-mismatch)")  # a warning, printed as is: not an error
        return
    raise ReflowPairsError(
        what,
        "Train with the checkpoint and dataset the store was generated from, or set `allow_mismatch` "
        "if you know they are equivalent. Nothing was written.",
    )


@dataclass
class _Inputs:
    """Everything checked and loaded before the first step."""

    store: PairStore
    dataset: Any
    lookup: np.ndarray
    loaded: Any  # reflowpairs.teacher.LoadedPolicy: the student
    init_source: str
    init_fingerprint: dict[str, str]
    init_config: dict[str, Any]
    warnings: list[str]


def _prepare(
    cfg: TrainConfig, resume_from: Path | None, state: dict[str, Any] | None, device: str
) -> _Inputs:
    from reflowpairs.dataset import check_features, dataset_fingerprint, frame_indices, open_dataset
    from reflowpairs.teacher import checkpoint_file, fingerprint_checkpoint, is_local, load_policy, rename_map

    warnings: list[str] = []
    store = check_store(Path(cfg.pairs))
    manifest = store.manifest
    if state is not None and state["store"]["store_id"] != manifest.get("store_id"):
        raise ReflowPairsError(
            f"Cannot resume: the run in {cfg.out} trained on store {state['store']['store_id']} "
            f"({state['store']['path']}), but `pairs` {cfg.pairs} is store {manifest.get('store_id')}.",
            "Resume with the store the run started on, or start a new run in another `out`.",
        )

    # The init checkpoint: --init, else the manifest's teacher (or, on resume, what the run started from).
    if state is not None:
        init_source, init_fp, init_config = (
            state["init"]["source"],
            state["init"]["fingerprint"],
            state["init_config"],
        )
    else:
        init_source = cfg.init or manifest.get("teacher", {}).get("source")
        if init_source and is_local(
            init_source
        ):  # recorded as pretrained_path: independent of the working directory
            init_source = str(Path(init_source).expanduser().resolve())
        if not init_source:
            raise ReflowPairsError(
                f"The manifest of {cfg.pairs} names no teacher checkpoint.",
                "Set `init` to the teacher checkpoint (a path or hub repo id).",
            )
        try:
            config_path = checkpoint_file(init_source, "config.json")
        except ReflowPairsError as err:
            where = (
                "`init`"
                if cfg.init
                else f"The store's teacher ({manifest['teacher'].get('source')!r}, from its manifest)"
            )
            raise ReflowPairsError(
                f"{where}: {err.what}", "Set `init` to the teacher checkpoint's current location."
            ) from err
        try:
            init_config = read_json_object(
                config_path,
                "The checkpoint's config.json is damaged: set `init` to a good copy of the teacher checkpoint.",
            )
        except FileNotFoundError as err:
            raise ReflowPairsError(
                f"{config_path} is missing.", "Set `init` to a complete checkpoint."
            ) from err
        init_fp = fingerprint_checkpoint(init_source)
    store_teacher = manifest.get("teacher", {}).get("fingerprint")
    if store_teacher != init_fp["fingerprint"]:
        _mismatch(
            f"The init checkpoint {init_source} is not the teacher the store {cfg.pairs} was generated with "
            f"(teacher fingerprint: store has {str(store_teacher)[:12]}, init checkpoint has {init_fp['fingerprint'][:12]}).",
            cfg.allow_mismatch,
            warnings,
        )

    # The dataset: --dataset-root, else where the manifest says it was.
    recorded = manifest.get("dataset", {})
    root = cfg.dataset_root
    if root is None and recorded.get("root"):
        root = Path(recorded["root"])
        if not (root / "meta" / "info.json").is_file():
            raise ReflowPairsError(
                f"The store's dataset {recorded.get('repo_id')!r} was read from {root}, which holds no dataset now.",
                "Set `dataset_root` to where the dataset is now.",
            )
    dataset = open_dataset(recorded.get("repo_id"), root)
    if recorded.get("fingerprint") != dataset_fingerprint(dataset):
        _mismatch(
            f"The dataset at {dataset.root} is not the one the store {cfg.pairs} was generated from "
            f"(dataset fingerprint of its meta/ files: store has {str(recorded.get('fingerprint'))[:12]}, "
            f"dataset has {dataset_fingerprint(dataset)[:12]}).",
            cfg.allow_mismatch,
            warnings,
        )
    lookup = position_lookup(frame_indices(dataset))  # each shard's obs_index is checked against it when read

    # The one policy of this process: the student (the init checkpoint, or the checkpoint resumed from).
    source = str(pretrained_dir(resume_from)) if resume_from is not None else init_source
    loaded = load_policy(source, device, fingerprint=init_fp if resume_from is None else None)
    check_features(loaded.config, dataset.meta, rename_map(loaded.preprocessor))
    x0_shape, x1_shape = pair_shapes(loaded.config)
    if tuple(store.x0_shape) != x0_shape or tuple(store.x1_shape) != x1_shape:
        raise ReflowPairsError(
            f"Store {cfg.pairs} holds X_0 {list(store.x0_shape)} and X_1 {list(store.x1_shape)}, but the policy in "
            f"{source} takes noise {list(x0_shape)} and writes actions {list(x1_shape)}.",
            "Train the policy the store was generated from.",
        )
    return _Inputs(store, dataset, lookup, loaded, str(init_source), init_fp, init_config, warnings)


def _precision(name: str, device: str) -> torch.dtype | None:
    """The autocast dtype (None: plain float32). bfloat16 autocast is for CUDA only."""
    if name == "float32":
        return None
    cuda = device.startswith("cuda")
    if name == "bfloat16":
        if not cuda:
            raise ReflowPairsError(
                f"`precision` bfloat16 is for CUDA devices; this run is on {device}.",
                "Set `precision` to float32 or auto.",
            )
        return torch.bfloat16
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None


def _trim_log(path: Path, last_step: int) -> None:
    """Keep only log lines up to ``last_step`` (lines after the resumed checkpoint are redone); atomic. A last line
    that is not a record is a torn write of a killed run and is dropped; such a line before it is refused."""
    if not path.exists():
        return
    try:
        lines = path.read_bytes().splitlines()
    except OSError as err:
        raise ReflowPairsError(
            f"Cannot read {path} ({err.strerror or err}).", "Check its permissions."
        ) from err
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            step = record["step"] if isinstance(record, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError("no integer step")
        except (
            ValueError,
            KeyError,
            RecursionError,
        ) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if number == len(lines):
                break  # a torn last line of a killed run
            raise ReflowPairsError(
                f"{path} line {number} is not a train_log record ({type(err).__name__}: {err}).",
                f"Move {path.name} aside (or delete that line); the checkpoints are not affected.",
            ) from err
        if step <= last_step:
            kept.append(line.decode("utf-8"))
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _write_failed(out: Path, what: str, err: OSError, last: Path | None) -> ReflowPairsError:
    kept = (
        f"checkpoints/last still points at the last complete checkpoint ({last.name})"
        if last is not None
        else "no checkpoint was complete yet"
    )
    return ReflowPairsError(
        f"Writing {what} to `out` {out} failed ({err.strerror or err}); {kept}.",
        "Free disk space or fix permissions, then rerun the same command with `resume` set"
        + (" (or without it, into an empty `out`)." if last is None else "."),
    )


class _StopFlag:
    """SIGINT sets a flag that the loop checks between steps (a step is never cut in half)."""

    def __init__(self):
        self.requested = False
        self.aborted = False  # a second Ctrl-C: stop at once, mid-step, without saving
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --- the run ---------------------------------------------------------------------------------------


def _check_resume_steps(
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


def _restore(opt: Optimisation, checkpoint: Path, warnings: list[str]) -> int:
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


def _held_out_episodes(inputs: _Inputs) -> list[int]:
    """Episodes of the dataset that the store has no pairs of (``generation.episodes``; None: all of them)."""
    stored = inputs.store.manifest.get("generation", {}).get("episodes")
    total = int(inputs.dataset.meta.total_episodes)
    return [] if stored is None else sorted(set(range(total)) - {int(e) for e in stored})


@dataclass
class _Run:
    """A checked, planned run: its settings and inputs, before anything is written (``_plan_run``)."""

    cfg: TrainConfig
    out: Path
    resume_from: Path | None  # the checkpoint resumed from; None for a new run
    state: dict[str, Any] | None  # its training state
    settings: dict[str, Any]  # INHERITED settings, resolved
    accelerator: Any  # accelerate.Accelerator: processes, DDP, main-process-only writes
    device: str
    autocast_dtype: torch.dtype | None
    threads: str  # ThreadPlan.describe()
    inputs: _Inputs
    change: ScheduleChange | None  # the schedule change a resume was allowed
    config_json: dict[str, Any]  # the student's config.json
    feature_cache: Any = None  # featurecache.TrainingCache when the store's feature cache applies

    @property
    def policy(self):
        return self.inputs.loaded.policy

    @property
    def preprocessor(self):
        return self.inputs.loaded.preprocessor

    @property
    def batch_size(self) -> int:
        """Pairs per process per step (the global batch is ``batch_size * world``)."""
        return int(self.settings["batch_size"])

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)


@dataclass
class _Start:
    """Where the loop starts: the step and the samples the data order has already served."""

    step: int
    samples_seen: int


def _accelerator(device_setting: str) -> tuple[Any, str]:
    """The ``accelerate.Accelerator`` of this process (joining the process group ``torchrun`` or ``accelerate
    launch`` set up: gloo on CPU, nccl on CUDA) and this process's device (``cuda`` becomes ``cuda:<local rank>``
    when there are several processes). ``mixed_precision="no"``: ``train_step`` keeps its own precision handling
    (float32 master copies of bfloat16 parameters, which accelerate's ``bf16`` does not make, and autocast only where
    ``precision`` says); the scheduler steps once per optimiser step whatever the process count, as in lerobot-train."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from reflowpairs.teacher import resolve_device

    device = resolve_device(device_setting)
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision="no",
        step_scheduler_with_optimizer=False,
        # as lerobot-train: pi0/pi05's loss leaves parts of the VLM unused (its last layer's output, lm_head)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if accelerator.num_processes > 1 and device.startswith("cuda"):
        device = str(accelerator.device)
    return accelerator, device


def _release(accelerator: Any, owns_group: bool) -> None:
    """After every process's last collective: wait for all, end the process group this run created (so no process
    exits with its peers' gloo/nccl connections open), and forget accelerate's process state."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        if owns_group:
            accelerator.end_training()
    _forget_accelerate()


def _forget_accelerate() -> None:
    """Reset accelerate's process-wide state (a singleton), so a later run in the same Python process (tests,
    ``pipeline``) gets an ``Accelerator`` for its own device settings instead of the first run's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _check_world(cfg: TrainConfig, state: dict[str, Any], world: int) -> None:
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


def _plan_run(cfg: TrainConfig) -> _Run:
    """Every check (settings, ``out``, the store's manifest, fingerprints, shapes) and the loaded student; nothing
    is written. Shards are checked as they are read."""
    _check_args(cfg)
    threads = apply_threads(cfg.threads, cfg.num_workers)
    out = Path(cfg.out)
    resume_from = _check_out(out, cfg.resume)
    state = read_state(resume_from) if resume_from is not None else None
    settings = _resolve_settings(cfg, state)
    accelerator, device = _accelerator(cfg.device)
    if state is not None:
        _check_world(cfg, state, accelerator.num_processes)
    autocast_dtype = _precision(cfg.precision, device)
    inputs = _prepare(cfg, resume_from, state, device)
    policy_config = inputs.loaded.policy.config
    change = _check_resume_steps(cfg, state, policy_config, settings) if state is not None else None
    config_json = student_config_json(
        inputs.init_config, inputs.init_source, _saved_num_steps(settings["student_num_steps"])
    )
    from reflowpairs.featurecache import plan_training

    feature_cache = plan_training(cfg.pairs, inputs.loaded.policy, inputs.store.meta, cfg.no_feature_cache)
    return _Run(
        feature_cache=feature_cache,
        cfg=cfg,
        out=out,
        resume_from=resume_from,
        state=state,
        settings=settings,
        accelerator=accelerator,
        device=device,
        autocast_dtype=autocast_dtype,
        threads=threads.describe(),
        inputs=inputs,
        change=change,
        config_json=config_json,
    )


def _restore_or_seed(run: _Run, opt: Optimisation) -> _Start:
    """On resume, the checkpoint's optimiser, schedule, masters and RNG state; for a new run, the seed."""
    from lerobot.utils.random_utils import set_seed

    if run.resume_from is None:
        set_seed(int(run.settings["seed"]))
        return _Start(0, 0)
    step = _restore(opt, run.resume_from, run.inputs.warnings)
    return _Start(step, int(run.state["samples_seen"]))


def _plan_info(run: _Run, opt: Optimisation, start: _Start) -> dict[str, Any]:
    """What ``on_plan`` receives: the run as it will happen."""
    cfg, inputs, change = run.cfg, run.inputs, run.change
    return {
        "init": inputs.init_source,
        "resumed_from": str(run.resume_from) if run.resume_from is not None else None,
        "start_step": start.step,
        "steps": cfg.steps,
        "device": run.device,
        "processes": run.world,  # the global batch is batch_size x processes
        "threads": run.threads,  # ThreadPlan.describe()
        "precision": "bfloat16 autocast" if run.autocast_dtype is not None else "float32",
        "trainable_params": sum(p.numel() for p in opt.masters.model_params),
        "trainable_dtypes": opt.masters.dtype_counts(),  # elements per dtype, e.g. {"bfloat16": N, "float32": M}
        "master_copies": opt.masters.has_copies,  # bfloat16/float16 trainables step as float32 masters
        "total_params": sum(p.numel() for p in run.policy.parameters()),
        "num_pairs": len(inputs.store),
        "samples_seen": start.samples_seen,
        **{
            k: run.settings[k]
            for k in ("batch_size", "seed", "time_sampling", "shuffle_window", "student_num_steps", "loss")
        },
        "saved_num_steps": run.config_json.get(json_step_field(run.config_json)),
        "teacher_num_steps": inputs.init_config.get(json_step_field(inputs.init_config)),
        **opt.plan.describe(),
        "schedule_change": None if change is None else {**asdict(change), "text": change.describe()},
        "warnings": list(inputs.warnings),
        "feature_cache": run.feature_cache.describe() if run.feature_cache is not None else None,
    }


def _open_out(run: _Run, start: _Start) -> Path:
    """Every check has passed: only now is ``out`` touched (leftovers of a killed run cleaned, the log trimmed to
    the resumed step). Returns the log's path."""
    log_path = run.out / LOG_FILE
    if run.is_main:
        check_writable(run.out)
        clean_leftovers(run.out)
        _trim_log(log_path, start.step)
    run.accelerator.wait_for_everyone()
    return log_path


def _loader(run: _Run, start: _Start) -> torch.utils.data.DataLoader:
    """Batches of stored pairs joined with their observations, in the seeded shard-windowed order from
    ``start.samples_seen`` on; each process of a data-parallel run reads its own part of each epoch (``PairSampler``
    with its rank), ``samples_seen / world`` pairs into its stream. Shards are checked as the workers read them; a
    batch with pairs of a damaged shard arrives as ``{"refused": ...}`` (``collate_pairs``). Not prepared by
    accelerate: its batch sharding would have every process read every shard."""
    settings, cfg = run.settings, run.cfg
    pairs = PairDataset(
        run.inputs.store,
        run.feature_cache.frames(run.inputs.dataset) if run.feature_cache else run.inputs.dataset,
        run.inputs.lookup,
        cache_shards=int(settings["shuffle_window"]) + 1,
    )
    order = PairSampler(
        pairs.counts,
        int(settings["seed"]),
        int(settings["shuffle_window"]),
        start=start.samples_seen // run.world,
        rank=run.rank,
        world=run.world,
    )
    return torch.utils.data.DataLoader(
        pairs,
        batch_size=run.batch_size,
        sampler=order,
        collate_fn=collate_pairs,
        num_workers=cfg.num_workers,
        pin_memory=run.device.startswith("cuda"),
        generator=torch.Generator().manual_seed(int(settings["seed"])),
        persistent_workers=cfg.num_workers > 0,
    )


TEST_SAVED_FD = "REFLOWPAIRS_TEST_SAVED_FD"
"""Test hook: an inherited file descriptor (a pipe's write end) to which the main process writes ``"<step>\\n"``
after each checkpoint it saves, so a test can interrupt a run once a checkpoint exists without polling for it
(``tests/test_train.py``'s Ctrl-C and SIGKILL tests). Unset in normal use."""


class _Saver:
    """Writes checkpoints (``save``) and remembers the last complete one."""

    def __init__(self, run: _Run, opt: Optimisation, start: _Start):
        self.run, self.opt, self.start = run, opt, start
        self.checkpoint, self.saved_at = run.resume_from, start.step
        inputs = run.inputs
        manifest = inputs.store.manifest
        self.store_info = {
            "path": str(Path(run.cfg.pairs).resolve()),
            "store_id": manifest.get("store_id"),
            "teacher_fingerprint": manifest.get("teacher", {}).get("fingerprint"),
            "dataset_fingerprint": manifest.get("dataset", {}).get("fingerprint"),
            "num_pairs": len(inputs.store),
        }
        hook = os.environ.get(TEST_SAVED_FD)
        self._hook_fd = int(hook) if hook else None

    def state_for(self, step: int) -> dict[str, Any]:
        """The training state of checkpoint ``step`` (what ``--resume`` continues from)."""
        run = self.run
        done = (step - self.start.step) * run.batch_size * run.world
        return {
            "samples_seen": self.start.samples_seen + done,
            "world": run.world,  # processes: a resume must use as many (``_check_world``)
            "settings": {name: run.settings[name] for name in INHERITED},
            "effective": self.opt.plan.describe(),
            "store": self.store_info,
            "init": {"source": run.inputs.init_source, "fingerprint": run.inputs.init_fingerprint},
            "init_config": run.inputs.init_config,
            "steps": run.cfg.steps,
            "warnings": run.inputs.warnings,
        }

    def save(self, step: int) -> None:
        """Checkpoint ``step`` (the main process only); ``checkpoints/last`` moves to it once it is complete."""
        run = self.run
        try:
            self.checkpoint = save_checkpoint(
                run.out,
                step,
                run.cfg.steps,
                run.policy,  # the unwrapped student (the loop runs its DDP wrapper in several processes)
                run.preprocessor,
                run.inputs.loaded.postprocessor,
                run.config_json,
                self.opt.optimizer,
                self.opt.scheduler,
                self.state_for(step),
                batch_size=run.batch_size,
                master_params=self.opt.masters.state_dict(),
                extra_files=run.inputs.loaded.extra_files,
            )
        except OSError as err:
            raise _write_failed(run.out, f"checkpoint {step}", err, self.checkpoint) from err
        self.saved_at = step
        if self._hook_fd is not None:
            os.write(self._hook_fd, f"{step}\n".encode())


def _model(run: _Run):
    """The module the loop runs: ``accelerator.prepare_model`` of the policy, i.e. the policy itself in one process
    and its DDP wrapper (gradients averaged) in several. The policy is already on this process's device."""
    return run.accelerator.prepare_model(run.policy, device_placement=False)


def _loop(
    run: _Run,
    opt: Optimisation,
    saver: _Saver,
    start: _Start,
    log_path: Path,
    progress: Progress | None,
    on_log: Callable[[dict[str, Any]], None] | None,
) -> tuple[int, float, float]:
    """One ``train_step`` per batch until ``cfg.steps``: a log record every ``log_every`` steps, a checkpoint every
    ``save_every`` steps and at the end. Ctrl-C: the step in flight finishes, a checkpoint is saved, and
    ``TrainingInterrupted`` is raised. Returns the last step, its loss and the seconds the loop took."""
    cfg, settings, is_main = run.cfg, run.settings, run.is_main
    model, loss_fn, loader = (
        _model(run),
        (run.feature_cache.loss_fn if run.feature_cache else reflow_batch_loss)(
            run.preprocessor, run.settings["loss"]
        ),
        _loader(run, start),
    )
    run.policy.train()
    started = time.perf_counter()
    step, loss_value = start.step, float("nan")
    with _StopFlag() as stop, open(log_path if is_main else os.devnull, "a") as log:
        batches = iter(loader)
        try:
            while step < cfg.steps:
                batch = raise_if_refused(next(batches))  # a damaged shard: before any of its pairs is used
                generator = step_generator(settings["seed"], (step + 1) * run.world + run.rank)
                batch["t"] = sample_time(settings["time_sampling"], len(batch["x0"]), generator, run.device)
                try:
                    stats = train_step(model, batch, loss_fn, opt, run.autocast_dtype, run.accelerator)
                except NonFiniteLossError as err:
                    raise ReflowPairsError(
                        f"The loss became non-finite ({err.loss}) at step {step + 1} "
                        f"(obs_index {batch['obs_index'].tolist()[:8]} ...).",
                        "Lower `lr` or check the store with `reflowpairs validate`; the last checkpoint is kept "
                        "(`resume` continues from it).",
                    ) from None
                step, loss_value = step + 1, stats.loss
                if step % cfg.log_every == 0 or step == cfg.steps:
                    record = {
                        "step": step,
                        "loss": stats.loss,
                        "lr": stats.lr,
                        "grad_norm": stats.grad_norm,
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                    _write_log(log, record, run, saver.checkpoint)
                    if on_log is not None and is_main:
                        on_log(record)
                if (step % cfg.save_every == 0 or step == cfg.steps) and is_main:
                    saver.save(step)
                if progress is not None and is_main:
                    progress(step, cfg.steps, loss_value)
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            log.flush()
            if step > saver.saved_at and not stop.aborted and is_main:  # at a step boundary only
                # a second Ctrl-C inside this save stops it at once; the last complete checkpoint is kept
                with contextlib.suppress(KeyboardInterrupt):
                    saver.save(step)
            raise TrainingInterrupted(step, saver.checkpoint, saver.saved_at) from None
        finally:
            del batches
    return step, loss_value, time.perf_counter() - started


def _write_log(log, record: dict[str, Any], run: _Run, last: Path | None) -> None:
    """One ``train_log.jsonl`` record, flushed."""
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as err:
        raise _write_failed(run.out, LOG_FILE, err, last) from err


def _result(run: _Run, saver: _Saver, start: _Start, step: int, loss: float, seconds: float) -> TrainResult:
    """The summary of a finished run."""
    inputs = run.inputs
    return TrainResult(
        run.out,
        saver.checkpoint,
        start.step,
        step,
        loss,
        seconds,
        inputs.warnings,
        saved_num_steps=run.config_json.get(json_step_field(run.config_json)),
        teacher_num_steps=inputs.init_config.get(json_step_field(inputs.init_config)),
        init_source=inputs.init_source,
        dataset_repo_id=inputs.store.manifest.get("dataset", {}).get("repo_id"),
        dataset_root=Path(inputs.dataset.root),
        held_out_episodes=_held_out_episodes(inputs),
        pairs=Path(run.cfg.pairs),
    )


def train(
    cfg: TrainConfig,
    progress: Progress | None = None,
    on_plan: Callable[[dict[str, Any]], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run stage 2. ``on_plan(plan)`` is called
    once before the first step with what the run will do (init, device, CPU threads, precision, effective
    optimiser/schedule, parameter counts and dtypes, start step, a schedule change on resume);
    ``progress(step, total, loss)`` after each step; ``on_log(record)`` in the main process with each record
    written to ``train_log.jsonl`` (``step``, ``loss``, ``lr``, ``grad_norm``, ``seconds``).

    Ctrl-C (SIGINT) finishes the step in flight, saves a checkpoint and raises ``TrainingInterrupted``
    (a second Ctrl-C stops at once, keeping the last checkpoint); rerun with ``resume=True`` to continue."""
    import torch.distributed

    owns_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        run = _plan_run(cfg)  # every check; nothing is written before they pass
    except BaseException:
        _forget_accelerate()
        raise
    try:
        opt = build_optimisation(run.policy, cfg.steps, run.settings, run.inputs.init_source)
        start = _restore_or_seed(run, opt)
        if on_plan is not None:
            on_plan(_plan_info(run, opt, start))
        log_path = _open_out(run, start)
        saver = _Saver(run, opt, start)
        step, loss, seconds = _loop(run, opt, saver, start, log_path, progress, on_log)
        run.accelerator.wait_for_everyone()  # the main process has written the last checkpoint
        _release(run.accelerator, owns_group)
    except BaseException:
        _forget_accelerate()
        raise
    return _result(run, saver, start, step, loss, seconds)


def _saved_num_steps(setting: int | str) -> int | None:
    """The ``num_steps`` to write into the student's config.json (None: keep the teacher's)."""
    return None if setting == TEACHER_NUM_STEPS else int(setting)


def _teacher_env_type(init_source: str) -> str | None:
    """The ``env.type`` a lerobot-train teacher was trained for (its ``train_config.json``), if it is local and says."""
    path = Path(init_source) / "train_config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (
        OSError,
        ValueError,
        RecursionError,
    ):  # unreadable, not UTF-8, not JSON: no environment to suggest
        return None
    env = config.get("env") if isinstance(config, dict) else None
    return env.get("type") if isinstance(env, dict) else None


def next_commands(result: TrainResult) -> dict[str, str]:
    """The commands that use a finished run's student (``OUT/checkpoints/last/pretrained_model``):
    ``lerobot_eval`` (lerobot's own evaluation, at the saved ``num_steps``; ``--env.type`` is the teacher's
    lerobot-train environment when its ``train_config.json`` names one, else ``...`` for the user to fill in) and
    ``reflowpairs_eval`` (teacher vs student at each step count, on the episodes the store holds no pairs of)."""
    student = pretrained_dir(last_link(result.out))
    lerobot = [
        "lerobot-eval",
        f"--policy.path={student}",
        f"--env.type={_teacher_env_type(result.init_source) or '...'}",
    ]
    ours = ["reflowpairs", "eval", "--student", str(student), "--teacher", result.init_source]
    if result.dataset_repo_id:
        ours += ["--dataset", result.dataset_repo_id]
    if result.dataset_root is not None:
        ours += ["--dataset-root", str(result.dataset_root)]
    if result.held_out_episodes:
        ours += ["--episodes", episodes_text(result.held_out_episodes)]
    if result.pairs is not None:
        ours += ["--pairs", str(result.pairs)]
    ours += ["--out", str(Path(result.out) / "eval")]
    return {"lerobot_eval": shlex.join(lerobot), "reflowpairs_eval": shlex.join(ours)}


__all__ = [
    "DEFAULTS",
    "MasterWeights",
    "ScheduleChange",
    "next_commands",
    "parse_student_num_steps",
    "schedule_change",
    "scheduled_lr",
    "LOG_FILE",
    "TIME_SAMPLINGS",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "OptimPlan",
    "plan_optimizer",
    "reflow_loss",
    "reflow_batch_loss",
    "train",
    "train_step",
    "Optimisation",
    "StepStats",
    "NonFiniteLossError",
    "build_optimisation",
    "trainable_parameters",
    "check_store",
]
