"""Planning a run: every check and the loaded student before anything is written (``plan_run``), where the loop starts
(``restore_or_seed``), and what the run will do, reported once before the first step (``TrainPlan``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from reflowpairs.cached_features import AppliedFeatureCache, cache_for_training
from reflowpairs.checkpoint import read_state, student_config_json
from reflowpairs.errors import ReflowPairsError
from reflowpairs.policies import json_step_field
from reflowpairs.threads import apply_threads
from reflowpairs.train.config import TrainConfig, check_settings, resolve_settings, saved_num_steps
from reflowpairs.train.inputs import TrainInputs, prepare_inputs
from reflowpairs.train.optim import Optimisation
from reflowpairs.train.processes import join_processes
from reflowpairs.train.resume import (
    ScheduleChange,
    check_resume_steps,
    check_world,
    restore_training_state,
    resume_checkpoint,
)


@dataclass
class TrainPlan:
    """What a run will do, reported once before the first step (``train``'s ``on_plan``)."""

    init: str  # the init checkpoint (the store's teacher unless `init`)
    resumed_from: str | None  # the checkpoint resumed from; None for a new run
    start_step: int
    steps: int
    device: str
    processes: int  # the global batch is batch_size x processes
    threads: str  # ThreadPlan.describe()
    precision: str  # "bfloat16 autocast" or "float32"
    trainable_params: int
    trainable_dtypes: dict[str, int]  # elements per dtype, e.g. {"bfloat16": N, "float32": M}
    master_copies: bool  # bfloat16/float16 trainables step as float32 masters
    total_params: int
    num_pairs: int
    samples_seen: int
    batch_size: int
    seed: int
    time_sampling: str
    shuffle_window: int
    student_num_steps: int | str
    loss: str
    saved_num_steps: int | None  # the saved config.json's step count (its family's step field)
    teacher_num_steps: int | None  # the init checkpoint's
    # the effective optimiser and schedule (OptimPlan.describe())
    optimizer: str
    lr: float
    weight_decay: float
    grad_clip: float
    scheduler: str | None
    warmup_steps: int | None
    decay_steps: int | None
    decay_lr: float | None
    preset_warmup_steps: int | None
    preset_decay_steps: int | None
    schedule_change: (
        dict[str, Any] | None
    )  # a resume's allowed schedule change (ScheduleChange, plus its "text")
    warnings: list[str]
    feature_cache: (
        dict[str, Any] | None
    )  # AppliedFeatureCache.describe() when the store's feature cache is used

    def as_dict(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (the W&B run's config records it)."""
        return asdict(self)


@dataclass
class PlannedRun:
    """A checked, planned run: its settings and inputs, before anything is written (``plan_run``)."""

    cfg: TrainConfig
    out: Path
    resume_from: Path | None  # the checkpoint resumed from; None for a new run
    state: dict[str, Any] | None  # its training state
    settings: dict[str, Any]  # INHERITED settings, resolved
    accelerator: Any  # accelerate.Accelerator, or OneProcess: processes, DDP, main-process-only writes
    owns_group: bool  # the run created the process group (and ends it)
    device: str
    autocast_dtype: torch.dtype | None
    threads: str  # ThreadPlan.describe()
    inputs: TrainInputs
    change: ScheduleChange | None  # the schedule change a resume was allowed
    config_json: dict[str, Any]  # the student's config.json
    feature_cache: AppliedFeatureCache | None = None  # when the store's feature cache applies

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
class RunStart:
    """Where the loop starts: the step and the samples the data order has already served."""

    step: int
    samples_seen: int


def autocast_dtype_for(precision: str, device: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (``auto``, ``float32`` or ``bfloat16``) on ``device`` (None: plain float32). bfloat16
    autocast is for CUDA only."""
    if precision == "float32":
        return None
    cuda = device.startswith("cuda")
    if precision == "bfloat16":
        if not cuda:
            raise ReflowPairsError(
                f"`precision` bfloat16 is for CUDA devices; this run is on {device}.",
                "Set `precision` to float32 or auto.",
            )
        return torch.bfloat16
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None


def plan_run(cfg: TrainConfig) -> PlannedRun:
    """Every check (settings, ``out``, the store's manifest, fingerprints, shapes) and the loaded student; nothing
    is written. Shards are checked as they are read."""
    check_settings(cfg)
    threads = apply_threads(cfg.threads, cfg.num_workers)
    out = Path(cfg.out)
    resume_from = resume_checkpoint(out, cfg.resume)
    state = read_state(resume_from) if resume_from is not None else None
    settings = resolve_settings(cfg, state)
    accelerator, device, owns_group = join_processes(cfg.device)
    if state is not None:
        check_world(cfg, state, accelerator.num_processes)
    autocast_dtype = autocast_dtype_for(cfg.precision, device)
    inputs = prepare_inputs(cfg, resume_from, state, device)
    policy_config = inputs.loaded.policy.config
    change = check_resume_steps(cfg, state, policy_config, settings) if state is not None else None
    config_json = student_config_json(
        inputs.init_config, inputs.init_source, saved_num_steps(settings["student_num_steps"])
    )
    feature_cache = cache_for_training(
        cfg.pairs, inputs.loaded.policy, inputs.store.meta, cfg.no_feature_cache
    )
    return PlannedRun(
        cfg=cfg,
        out=out,
        resume_from=resume_from,
        state=state,
        settings=settings,
        accelerator=accelerator,
        owns_group=owns_group,
        device=device,
        autocast_dtype=autocast_dtype,
        threads=threads.describe(),
        inputs=inputs,
        change=change,
        config_json=config_json,
        feature_cache=feature_cache,
    )


def restore_or_seed(run: PlannedRun, opt: Optimisation) -> RunStart:
    """On resume, the checkpoint's optimiser, schedule, masters and RNG state; for a new run, the seed."""
    from lerobot.utils.random_utils import set_seed  # lerobot is heavy: imported when a run starts

    if run.resume_from is None:
        set_seed(int(run.settings["seed"]))
        return RunStart(0, 0)
    step = restore_training_state(opt, run.resume_from, run.inputs.warnings)
    return RunStart(step, int(run.state["samples_seen"]))


def describe_plan(run: PlannedRun, opt: Optimisation, start: RunStart) -> TrainPlan:
    """What ``on_plan`` receives: the run as it will happen."""
    cfg, inputs, change = run.cfg, run.inputs, run.change
    return TrainPlan(
        init=inputs.init_source,
        resumed_from=str(run.resume_from) if run.resume_from is not None else None,
        start_step=start.step,
        steps=cfg.steps,
        device=run.device,
        processes=run.world,
        threads=run.threads,
        precision="bfloat16 autocast" if run.autocast_dtype is not None else "float32",
        trainable_params=sum(p.numel() for p in opt.masters.model_params),
        trainable_dtypes=opt.masters.dtype_counts(),
        master_copies=opt.masters.has_copies,
        total_params=sum(p.numel() for p in run.policy.parameters()),
        num_pairs=len(inputs.store),
        samples_seen=start.samples_seen,
        **{
            k: run.settings[k]
            for k in ("batch_size", "seed", "time_sampling", "shuffle_window", "student_num_steps", "loss")
        },
        saved_num_steps=run.config_json.get(json_step_field(run.config_json)),
        teacher_num_steps=inputs.init_config.get(json_step_field(inputs.init_config)),
        **opt.plan.describe(),
        schedule_change=None if change is None else {**asdict(change), "text": change.describe()},
        warnings=list(inputs.warnings),
        feature_cache=run.feature_cache.describe() if run.feature_cache is not None else None,
    )
