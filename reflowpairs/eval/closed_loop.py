"""Closed-loop evaluation: teacher and students at each step count, in an environment, through lerobot's own rollout.

``evaluate_closed_loop(cfg)`` runs every (model, steps) *cell*: the checkpoint's policy with its own pre/post
processors (``reflowpairs.teacher.load_policy``: lerobot's ``make_pre_post_processors``), the env's processors
(lerobot's ``make_env_pre_post_processors``), its step count set on the loaded config through the family registry
(``reflowpairs.policies.configured_num_steps``: SmolVLA ``num_steps``, pi0/pi05 ``num_inference_steps``), and
``lerobot.scripts.lerobot_eval.eval_policy`` unchanged, with the same ``start_seed`` in every cell, so every model
runs the same episodes at every step count. lerobot's ``set_seed(seed)`` before each cell makes the policy's noise
draws repeatable too.

Two things lerobot's ``eval_policy`` does not report are measured around it without changing what it does: the
episode length and the latency per action chunk (``reflowpairs.eval.rollout``, which runs one cell).

Each finished cell is written atomically to ``OUT/cells/<label>-<steps>.json``; a rerun with the same settings reads
it instead of running it again, and refuses, naming the difference, when the settings differ.

The report (a dict, see ``build_report``, in steps: ``plan``, ``describe_models``, ``finished_and_todo``,
``run_cells``, ``paired_with_reference``) holds per cell the success rate with a 95% Wilson interval, the mean return
(sum of rewards), the mean episode length and the chunk latency; per student and step count the paired comparison
with the teacher at its full step count on the shared seeds; and the verdict: the fewest steps at which each student's
success is within (or above) the teacher's full-step interval. ``closed_loop_report.write_closed_loop_report`` writes it as
``closed_loop.json``, ``closed_loop.md`` and ``success_vs_steps.png``. docs/eval.md describes it all.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from reflowpairs.atomic import write_json_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.closed_loop_cells import cell_path, cell_settings, model_fingerprint, read_cell
from reflowpairs.eval.closed_loop_env import check_features, make_env_config, make_envs
from reflowpairs.eval.closed_loop_metrics import (
    episode_successes,
    fewest_matching_steps,
    mcnemar_p,
    paired_counts,
)
from reflowpairs.eval.config import TEACHER, ClosedLoopConfig
from reflowpairs.eval.rollout import run_cell
from reflowpairs.policies import config_num_steps, lerobot_version, step_field
from reflowpairs.progress import PhaseProgress
from reflowpairs.teacher import fingerprint_checkpoint, load_policy, read_policy_config

Plan = list[tuple[str, str, tuple[int, ...]]]
"""``[(label, checkpoint, step counts)]``: the cells to have, the teacher first (``plan``)."""

CellKey = tuple[str, int]
"""``(label, step count)`` of a cell."""


def plan(cfg: ClosedLoopConfig, teacher_full: int) -> Plan:
    """``[(label, checkpoint, step counts)]``: the teacher first (its full step count always included), then the
    students in the given order."""
    teacher_steps = cfg.teacher_num_steps if cfg.teacher_num_steps is not None else cfg.num_steps
    teacher_steps = tuple(sorted({*teacher_steps, teacher_full}))
    cells = [(TEACHER, cfg.teacher, teacher_steps)]
    cells += [(label, ckpt, tuple(sorted(set(cfg.num_steps)))) for label, ckpt in cfg.students.items()]
    return cells


def describe_models(
    checkpoints: dict[str, str], configs: dict[str, Any], hashes: dict[str, dict[str, str]]
) -> dict[str, dict[str, Any]]:
    """The report's ``models``: label -> role, checkpoint, policy type, step field, full step count and
    ``model_fingerprint`` (what its cells are matched on)."""
    return {
        label: {
            "role": TEACHER if label == TEACHER else "student",
            "checkpoint": checkpoint,
            "policy_type": configs[label].type,
            "step_field": step_field(configs[label].type),
            "full_num_steps": config_num_steps(configs[label]),
            "fingerprint": model_fingerprint(checkpoint, hashes[label]),
        }
        for label, checkpoint in checkpoints.items()
    }


def finished_and_todo(
    cfg: ClosedLoopConfig, cell_plan: Plan, models: dict[str, dict[str, Any]]
) -> tuple[dict[CellKey, dict[str, Any]], list[tuple[str, str, int]]]:
    """The cells already in ``OUT/cells/`` with matching settings, and ``[(label, checkpoint, steps)]`` still to run;
    a cell made with other settings is refused (``read_cell``)."""
    cells: dict[CellKey, dict[str, Any]] = {}
    todo: list[tuple[str, str, int]] = []
    for label, checkpoint, steps_list in cell_plan:
        for steps in steps_list:
            settings = cell_settings(cfg, label, steps, models[label]["fingerprint"])
            found = read_cell(cell_path(cfg.out, label, steps), settings)
            if found is None:
                todo.append((label, checkpoint, steps))
            else:
                cells[(label, steps)] = found
    return cells, todo


def run_cells(
    cfg: ClosedLoopConfig,
    env_cfg,
    envs: dict[str, dict[int, Any]],
    todo: list[tuple[str, str, int]],
    models: dict[str, dict[str, Any]],
    hashes: dict[str, dict[str, str]],
    progress: PhaseProgress | None,
) -> dict[CellKey, dict[str, Any]]:
    """Run each cell of ``todo`` (one model loaded at a time, in order) and write it atomically to its cell file;
    ``progress("rollouts", done, total)`` counts episodes over all of them."""
    total = len(todo) * cfg.n_episodes * sum(len(tasks) for tasks in envs.values())
    done = [0]

    def on_episodes(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("rollouts", done[0], total)

    if progress is not None and todo:
        progress("rollouts", 0, total)
    cells: dict[CellKey, dict[str, Any]] = {}
    loaded = None
    for label, checkpoint, steps in todo:
        if loaded is None or loaded.source != str(checkpoint):
            loaded = None  # free the previous model first
            loaded = load_policy(
                checkpoint, device=cfg.device, fingerprint=hashes[label], tokenizer=cfg.tokenizer
            )
        cell = run_cell(envs, env_cfg, loaded, label, steps, cfg, on_episodes, quiet=progress is not None)
        path = cell_path(cfg.out, label, steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = cell_settings(cfg, label, steps, models[label]["fingerprint"])
        write_json_atomically(path, {"settings": settings, "cell": cell})
        cells[(label, steps)] = cell
    return cells


def evaluate_closed_loop(cfg: ClosedLoopConfig, progress: PhaseProgress | None = None) -> dict[str, Any]:
    """Run (or, from ``OUT/cells/``, reuse) every cell and return the report (``build_report``); the report files
    are written by ``closed_loop_report.write_closed_loop_report``. ``progress("rollouts", done, total)`` counts
    episodes over all cells still to run, one display for all. Errors (``ReflowPairsError``): an unknown env type, an
    unknown env field, a missing simulator package, a checkpoint whose inputs do not fit the env, a cell made with
    other settings."""
    env_cfg = make_env_config(cfg.env_type, cfg.env_options)
    checkpoints = {TEACHER: cfg.teacher, **cfg.students}
    configs = {label: read_policy_config(checkpoint) for label, checkpoint in checkpoints.items()}
    cell_plan = plan(cfg, config_num_steps(configs[TEACHER]))
    hashes = {label: fingerprint_checkpoint(ckpt) for label, ckpt in checkpoints.items()}
    models = describe_models(checkpoints, configs, hashes)
    cells, todo = finished_and_todo(cfg, cell_plan, models)
    # the env first (a missing simulator package is named before anything loads), then every model's fit to it
    envs = make_envs(env_cfg, min(cfg.batch_size, cfg.n_episodes), cfg.use_async_envs) if todo else {}
    try:
        for label, checkpoint in checkpoints.items():
            check_features(env_cfg, label, checkpoint)
        cells.update(run_cells(cfg, env_cfg, envs, todo, models, hashes, progress))
    finally:
        if envs:
            from lerobot.envs import close_envs  # lerobot lazily: importing it takes seconds

            close_envs(envs)
    return build_report(cfg, cell_plan, models, cells)


def paired_with_reference(
    cfg: ClosedLoopConfig, cell_plan: Plan, cells: dict[CellKey, dict[str, Any]], full: int
) -> list[dict[str, Any]]:
    """The report's ``paired``: each cell but the reference against the teacher at its ``full`` step count, episode
    by episode on the shared (task, seed), with McNemar's exact p."""
    ref_success = episode_successes(cells[(TEACHER, full)]["episodes"])
    paired = []
    for label, _, steps_list in cell_plan:
        for steps in steps_list:
            if label == TEACHER and steps == full:
                continue
            try:  # paired by (task, seed): every cell ran the same episodes (the cells' settings match)
                counts = paired_counts(episode_successes(cells[(label, steps)]["episodes"]), ref_success)
            except ValueError as err:
                raise ReflowPairsError(
                    f"The {label} cell at {steps} steps cannot be paired with the teacher's at {full}: {err}.",
                    f"Delete {cell_path(cfg.out, label, steps).parent} and run again.",
                ) from err
            paired.append(
                {
                    "model": label,
                    "num_steps": steps,
                    "both": counts["both"],
                    "only_model": counts["only_a"],
                    "only_teacher": counts["only_b"],
                    "neither": counts["neither"],
                    "mcnemar_p": mcnemar_p(counts["only_a"], counts["only_b"]),
                }
            )
    return paired


def build_report(
    cfg: ClosedLoopConfig,
    cell_plan: Plan,
    models: dict[str, dict[str, Any]],
    cells: dict[CellKey, dict[str, Any]],
) -> dict[str, Any]:
    """The report dict: ``settings``, ``env``, ``models``, ``cells`` (one per (model, steps), plan order),
    ``reference`` (the teacher at its full step count), ``paired`` (each student cell vs the reference, on the shared
    seeds) and ``verdict`` (label -> fewest steps within the reference's interval, or None)."""
    full = models[TEACHER]["full_num_steps"]
    ordered = [cells[(label, steps)] for label, _, steps_list in cell_plan for steps in steps_list]
    ref = cells[(TEACHER, full)]
    reference = {
        "model": TEACHER,
        "num_steps": full,
        "success_rate": ref["success_rate"],
        "success_low": ref["success_low"],
        "success_high": ref["success_high"],
    }
    verdict: dict[str, int | None] = {}
    for label, _, steps_list in cell_plan:
        rates = {steps: cells[(label, steps)]["success_rate"] for steps in steps_list}
        if label != TEACHER or len(steps_list) > 1:
            verdict[label] = fewest_matching_steps(rates, ref["success_low"])
    paired = paired_with_reference(cfg, cell_plan, cells, full)
    settings = asdict(cfg)
    settings["out"] = str(cfg.out)
    settings["batch_size"] = min(cfg.batch_size, cfg.n_episodes)
    settings["reference_num_steps"] = full
    return {
        "kind": "closed_loop",
        "env": {"type": cfg.env_type, "options": dict(cfg.env_options)},
        "settings": settings,
        "models": models,
        "cells": ordered,
        "reference": reference,
        "paired": paired,
        "verdict": verdict,
        "lerobot_version": lerobot_version(),
    }
