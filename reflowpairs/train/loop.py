"""The run: ``train`` plans it (``planning``), builds its optimiser, then steps through batches of stored pairs
(``run_steps``), logging, checkpointing and stopping cleanly on Ctrl-C; W&B logging when the config asks for it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from reflowpairs.atomic import check_writable
from reflowpairs.checkpoint import clean_leftovers
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairdata import PairDataset, PairSampler, collate_pairs, raise_if_refused
from reflowpairs.policies import json_step_field
from reflowpairs.train.checkpointing import CheckpointSaver
from reflowpairs.train.config import TrainConfig, TrainingInterrupted, TrainProgress, TrainResult
from reflowpairs.train.inputs import held_out_episodes
from reflowpairs.train.logfile import LOG_FILE, trim_log, write_log_record
from reflowpairs.train.loss import cached_features_loss, reflow_batch_loss
from reflowpairs.train.optim import Optimisation, build_optimisation
from reflowpairs.train.planning import (
    PlannedRun,
    RunStart,
    TrainPlan,
    describe_plan,
    plan_run,
    restore_or_seed,
)
from reflowpairs.train.processes import release
from reflowpairs.train.signals import StopOnInterrupt
from reflowpairs.train.step import NonFiniteLossError, train_step
from reflowpairs.train.timesampling import sample_time, step_generator
from reflowpairs.wandb_log import WandbRun

LogSink = Callable[[dict[str, Any]], None]
"""``on_log(record)``: a ``train_log.jsonl`` record (``step``, ``loss``, ``lr``, ``grad_norm``, ``seconds``)."""


def open_out(run: PlannedRun, start: RunStart) -> Path:
    """Every check has passed: only now is ``out`` touched (leftovers of a killed run cleaned, the log trimmed to
    the resumed step). Returns the log's path."""
    log_path = run.out / LOG_FILE
    if run.is_main:
        check_writable(run.out)
        clean_leftovers(run.out)
        trim_log(log_path, start.step)
    run.accelerator.wait_for_everyone()
    return log_path


def pair_loader(run: PlannedRun, start: RunStart) -> torch.utils.data.DataLoader:
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


def model_to_run(run: PlannedRun):
    """The module the loop runs: ``accelerator.prepare_model`` of the policy, i.e. the policy itself in one process
    and its DDP wrapper (gradients averaged) in several. The policy is already on this process's device."""
    return run.accelerator.prepare_model(run.policy, device_placement=False)


def run_steps(
    run: PlannedRun,
    opt: Optimisation,
    saver: CheckpointSaver,
    start: RunStart,
    log_path: Path,
    progress: TrainProgress | None,
    on_log: LogSink | None,
) -> tuple[int, float, float]:
    """One ``train_step`` per batch until ``cfg.steps``: a log record every ``log_every`` steps, a checkpoint every
    ``save_every`` steps and at the end. Ctrl-C: the step in flight finishes, a checkpoint is saved, and
    ``TrainingInterrupted`` is raised. Returns the last step, its loss and the seconds the loop took."""
    cfg, settings, is_main = run.cfg, run.settings, run.is_main
    model, loss_fn, loader = model_to_run(run), _loss_fn(run), pair_loader(run, start)
    run.policy.train()
    started = time.perf_counter()
    step, loss_value = start.step, float("nan")
    with StopOnInterrupt() as stop, open(log_path if is_main else os.devnull, "a") as log:
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
                    write_log_record(log, record, run.out, saver.checkpoint)
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


def _result(
    run: PlannedRun, saver: CheckpointSaver, start: RunStart, step: int, loss: float, seconds: float
) -> TrainResult:
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
        held_out_episodes=held_out_episodes(inputs),
        pairs=Path(run.cfg.pairs),
    )


def _loss_fn(run: PlannedRun):
    """The run's ``LossFn``: on decoded observations, or on the store's cached features when they apply."""
    if run.feature_cache is not None:
        return cached_features_loss(run.feature_cache, run.preprocessor, run.settings["loss"])
    return reflow_batch_loss(run.preprocessor, run.settings["loss"])


def _config_options(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg``'s fields as JSON-ready values (paths as text), without its W&B settings."""
    return {
        name: str(value) if isinstance(value, Path) else value
        for name, value in asdict(cfg).items()
        if name != "wandb_config"
    }


def start_wandb(
    run: PlannedRun,
    plan: TrainPlan,
    options: dict[str, Any] | None,
    on_wandb_run: Callable[[str], None] | None,
) -> WandbRun | None:
    """The run's W&B run in the main process when ``cfg.wandb_config`` (lerobot's ``WandBConfig``) is set and enabled (a
    resumed run continues its W&B run), else None; its config records ``options`` (default: the run's
    ``TrainConfig``) and the plan. ``on_wandb_run(where)`` is told where it logs (its URL or offline directory)."""
    settings = run.cfg.wandb_config
    if settings is None or not getattr(settings, "enable", True) or not run.is_main:
        return None
    config = {"options": _config_options(run.cfg) if options is None else options, "plan": plan.as_dict()}
    wandb_run = WandbRun.start(
        settings, run.out, run.out.resolve().name, config, resume=plan.resumed_from is not None
    )
    if on_wandb_run is not None:
        on_wandb_run(wandb_run.where())
    return wandb_run


def _log_sink(on_log: LogSink | None, wandb_run: WandbRun | None) -> LogSink | None:
    """``on_log`` and the W&B run's ``log`` as one sink (None when neither is there)."""
    sinks = [sink for sink in (on_log, wandb_run.log if wandb_run is not None else None) if sink is not None]
    if not sinks:
        return None

    def log(record: dict[str, Any]) -> None:
        for sink in sinks:
            sink(record)

    return log


def train(
    cfg: TrainConfig,
    progress: TrainProgress | None = None,
    on_plan: Callable[[TrainPlan], None] | None = None,
    on_log: LogSink | None = None,
    wandb_options: dict[str, Any] | None = None,
    on_wandb_run: Callable[[str], None] | None = None,
) -> TrainResult:
    """Run stage 2. ``on_plan(plan)`` is called once before the first step with what the run will do
    (``TrainPlan``: init, device, CPU threads, precision, effective optimiser/schedule, parameter counts and dtypes,
    start step, a schedule change on resume); ``progress(step, total, loss)`` after each step; ``on_log(record)`` in
    the main process with each record written to ``train_log.jsonl`` (``step``, ``loss``, ``lr``, ``grad_norm``,
    ``seconds``).

    W&B: with ``cfg.wandb_config`` (lerobot's ``WandBConfig``, enabled), the main process logs each record to a W&B run
    started after ``on_plan`` returns (so ``wandb_options``, the options its config records, may be filled there;
    default: ``cfg``'s fields) and finished when the run ends; ``on_wandb_run(where)`` is told where it logs, and
    ``TrainResult.wandb_run`` holds it.

    Ctrl-C (SIGINT) finishes the step in flight, saves a checkpoint and raises ``TrainingInterrupted``
    (a second Ctrl-C stops at once, keeping the last checkpoint); rerun with ``resume=True`` to continue."""
    run = plan_run(cfg)  # every check; nothing is written before they pass
    opt = build_optimisation(run.policy, cfg.steps, run.settings, run.inputs.init_source)
    start = restore_or_seed(run, opt)
    plan = describe_plan(run, opt, start)
    if on_plan is not None:
        on_plan(plan)
    log_path = open_out(run, start)
    wandb_run = start_wandb(run, plan, wandb_options, on_wandb_run)
    exit_code = 1
    try:
        saver = CheckpointSaver(run, opt, start)
        step, loss, seconds = run_steps(
            run, opt, saver, start, log_path, progress, _log_sink(on_log, wandb_run)
        )
        run.accelerator.wait_for_everyone()  # the main process has written the last checkpoint
        release(run.accelerator, run.owns_group)
        exit_code = 0
    finally:
        if wandb_run is not None:
            wandb_run.finish(exit_code)
    result = _result(run, saver, start, step, loss, seconds)
    result.wandb_run = wandb_run.where() if wandb_run is not None else None
    return result
