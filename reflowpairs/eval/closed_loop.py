"""Closed-loop evaluation: teacher and students at each step count, in an environment, through lerobot's own rollout.

``evaluate_closed_loop(cfg)`` runs every (model, steps) *cell*: the checkpoint's policy with its own pre/post
processors (``reflowpairs.teacher.load_policy``: lerobot's ``make_pre_post_processors``), the env's processors
(lerobot's ``make_env_pre_post_processors``), its step count set on the loaded config through the family registry
(``reflowpairs.policies.configured_num_steps``: SmolVLA ``num_steps``, pi0/pi05 ``num_inference_steps``), and
``lerobot.scripts.lerobot_eval.eval_policy`` unchanged, with the same ``start_seed`` in every cell, so every model
runs the same episodes at every step count. lerobot's ``set_seed(seed)`` before each cell makes the policy's noise
draws repeatable too.

Two things lerobot's ``eval_policy`` does not report are measured around it without changing what it does:

- the episode length: the vector env's ``step``/``reset`` are wrapped on the instance (``_EpisodeLengths``) to note
  the step at which each sub-env first ends (terminated or truncated), as ``eval_policy``'s own ``done`` mask does;
- the latency per action chunk: the policy's ``predict_action_chunk`` (and SmolVLA's ``_get_action_chunk``, which
  its ``select_action`` calls directly) are wrapped on the instance (``_ChunkTimer``) to time each call that makes a
  chunk (for the whole batch of envs), synchronising the device first.

Each finished cell is written atomically to ``OUT/cells/<label>-<steps>.json``; a rerun with the same settings reads
it instead of running it again, and refuses, naming the difference, when the settings differ.

The report (a dict, see ``build_report``) holds per cell the success rate with a 95% Wilson interval, the mean return
(sum of rewards), the mean episode length and the chunk latency; per student and step count the paired comparison
with the teacher at its full step count on the shared seeds; and the verdict: the fewest steps at which each student's
success is within (or above) the teacher's full-step interval. ``write_closed_loop_report`` writes it as
``closed_loop.json``, ``closed_loop.md`` and ``success_vs_steps.png``. docs/eval.md describes it all.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reflowpairs.atomic import NotAJSONObjectError, load_json_object, write_json_atomically
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.closed_loop_env import (  # noqa: F401 - part of this module's API
    ENV_EXTRAS,
    PLUGIN_PREFIX,
    check_features,
    feature_problems,
    known_env_types,
    make_env_config,
    make_envs,
)
from reflowpairs.eval.closed_loop_metrics import (
    episode_successes,
    fewest_matching_steps,
    mcnemar_p,
    paired_counts,
    wilson_interval,
)
from reflowpairs.eval.closed_loop_report import (  # noqa: F401 - the report's writer is part of this module's API
    PLOT_PNG,
    REPORT_JSON,
    REPORT_MD,
    write_closed_loop_report,
)

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: episodes done out of all the episodes still to run (one phase, ``"rollouts"``)."""

TEACHER = "teacher"
CELLS_DIR = "cells"

MATCHED_SETTINGS = (
    "env_type",
    "env_options",
    "n_episodes",
    "seed",
    "batch_size",
    "checkpoint_fingerprint",
    "device",
    "tokenizer",
)
"""The settings a finished cell must share with the current run to be reused: what decides its episodes, the model
(``model_fingerprint``: config, weights and processors), the device it ran on (resolved: ``auto`` is the device it
picked; another device draws other noises and rounds otherwise) and the tokenizer. Async envs are recorded but do
not change which episodes run."""


@dataclass
class ClosedLoopConfig:
    """What ``evaluate_closed_loop`` runs.

    ``env_type``: any type in lerobot's ``EnvConfig`` registry (``pusht``, ``aloha``, ``libero``, ``metaworld``,
    the bundled ``gapworld``, installed ``lerobot_env_*`` plugins); ``env_options``: its fields as lerobot-eval's
    ``--env.<field>=VALUE`` would set them, ``{"episode_length": "20"}`` (text, parsed by draccus into the field's
    type). ``teacher``: its checkpoint; ``students``: label -> checkpoint (labels are file names: letters, digits,
    ``-_.``). ``num_steps``: the step counts every student runs at; ``teacher_num_steps``: the teacher's (None:
    ``num_steps`` and its own full step count, from its config; the full step count is always added, it is the
    reference). ``n_episodes``: episodes per cell (per task of a multi-task env), seeds ``seed``, ``seed + 1``, ...
    ``batch_size``/``use_async_envs``: lerobot-eval's ``--eval.batch_size``/``--eval.use_async_envs`` (parallel envs;
    the batch is capped at ``n_episodes``).
    """

    env_type: str
    teacher: str
    out: Path
    students: dict[str, str] = field(default_factory=dict)
    num_steps: tuple[int, ...] = (1, 2, 10)
    teacher_num_steps: tuple[int, ...] | None = None
    env_options: dict[str, str] = field(default_factory=dict)
    n_episodes: int = 50
    seed: int = 1000
    batch_size: int = 10
    use_async_envs: bool = False
    device: str = "auto"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.num_steps = tuple(int(n) for n in self.num_steps)
        if self.teacher_num_steps is not None:
            self.teacher_num_steps = tuple(int(n) for n in self.teacher_num_steps)
        self.env_options = {str(k): str(v) for k, v in self.env_options.items()}
        if self.n_episodes < 1:
            raise ReflowPairsError(f"`n_episodes` is {self.n_episodes}.", "Give at least 1 episode per cell.")
        if self.batch_size < 1:
            raise ReflowPairsError(
                f"The env batch size (--eval.batch_size) is {self.batch_size}.",
                "Give at least 1 env per batch.",
            )
        for steps in (*self.num_steps, *(self.teacher_num_steps or ())):
            if steps < 1:
                raise ReflowPairsError(f"`num_steps` holds {steps}.", "Step counts are positive integers.")
        for label in self.students:
            if label == TEACHER or not label or not all(c.isalnum() or c in "-_." for c in label):
                raise ReflowPairsError(
                    f"{label!r} cannot label a student.",
                    "Use letters, digits, - _ . only, and not 'teacher'.",
                )


# --- measuring around lerobot's rollout ------------------------------------------------------------------------


class _EpisodeLengths:
    """Notes each episode's length (the step at which its sub-env first ends) by wrapping ``env.step`` and
    ``env.reset`` on the instance; behaviour unchanged. ``on_batch_done(n)`` is called with the batch size when a
    batch of episodes ends (at the next reset, or at ``finish``)."""

    def __init__(self, env, on_batch_done: Callable[[int], None]):
        self.env = env
        self.on_batch_done = on_batch_done
        self.lengths: list[int] = []
        self._batch: list[int | None] | None = None
        self._steps = 0

    def _close_batch(self) -> None:
        if self._batch is not None:
            self.lengths += [self._steps if n is None else n for n in self._batch]
            self.on_batch_done(len(self._batch))
        self._batch = None

    def reset(self, *args, **kwargs):
        self._close_batch()
        self._batch = [None] * self.env.num_envs
        self._steps = 0
        return self._reset(*args, **kwargs)

    def step(self, actions):
        result = self._step(actions)
        self._steps += 1
        terminated, truncated = result[2], result[3]
        for i, ended in enumerate((terminated | truncated).tolist()):
            if ended and self._batch is not None and self._batch[i] is None:
                self._batch[i] = self._steps
        return result

    @contextmanager
    def installed(self) -> Iterator[_EpisodeLengths]:
        self._reset, self._step = self.env.reset, self.env.step
        self.env.reset, self.env.step = self.reset, self.step
        try:
            yield self
            self._close_batch()
        finally:
            del self.env.reset, self.env.step  # the class's methods again


class _ChunkTimer:
    """Times each call that makes an action chunk, by wrapping ``predict_action_chunk`` and ``_get_action_chunk``
    (SmolVLA's ``select_action`` calls the latter directly) on the policy instance; a call nested in another is not
    counted twice; behaviour unchanged. Seconds per call in ``times``."""

    METHODS = ("predict_action_chunk", "_get_action_chunk")

    def __init__(self, policy, device: str):
        self.policy = policy
        self.cuda = str(device).startswith("cuda")
        self.times: list[float] = []
        self._depth = 0

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _wrap(self, method):
        def timed(*args, **kwargs):
            if self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            self._sync()
            start = time.perf_counter()
            try:
                out = method(*args, **kwargs)
                self._sync()
                self.times.append(time.perf_counter() - start)
                return out
            finally:
                self._depth -= 1

        return timed

    @contextmanager
    def installed(self) -> Iterator[_ChunkTimer]:
        # only the methods this policy has (``_get_action_chunk`` is SmolVLA's private one: a policy or a lerobot
        # without it is timed through ``predict_action_chunk`` alone, or not at all: latency None, no crash)
        names = [n for n in self.METHODS if callable(getattr(self.policy, n, None))]
        for name in names:
            setattr(self.policy, name, self._wrap(getattr(self.policy, name)))
        try:
            yield self
        finally:
            for name in names:
                delattr(self.policy, name)


@contextmanager
def quiet_lerobot_bars(quiet: bool = True) -> Iterator[None]:
    """Within the block, lerobot_eval's own tqdm bars (per batch and per rollout step) are off, so that the caller's
    one progress display is the only one; what the rollout does is unchanged. It swaps lerobot_eval's module-global
    ``trange`` (lerobot 0.6.1's), restored after; a no-op when ``quiet`` is False or lerobot_eval has no ``trange``."""
    import lerobot.scripts.lerobot_eval as lerobot_eval

    saved = getattr(lerobot_eval, "trange", None)
    if not quiet or not callable(
        saved
    ):  # a lerobot without the module-level trange: its bars stay, nothing breaks
        yield
        return

    def silent(*args, **kwargs):
        return saved(*args, **{**kwargs, "disable": True})

    lerobot_eval.trange = silent
    try:
        yield
    finally:
        lerobot_eval.trange = saved


# --- cells -----------------------------------------------------------------------------------------------------


def cell_path(out: Path, label: str, num_steps: int) -> Path:
    """``OUT/cells/<label>-<steps>.json``."""
    return Path(out) / CELLS_DIR / f"{label}-{num_steps}.json"


def processors_digest(checkpoint: str) -> str:
    """sha256 over a checkpoint's ``policy_preprocessor.json`` and ``policy_postprocessor.json`` (as JSON, keys
    sorted) and every ``.safetensors`` state file their steps reference (the normaliser stats), byte for byte."""
    import hashlib
    import json

    from reflowpairs.teacher import POSTPROCESSOR_FILE, PREPROCESSOR_FILE, checkpoint_file

    digest = hashlib.sha256()
    for name in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        saved = json.loads(checkpoint_file(checkpoint, name).read_text())
        digest.update(json.dumps(saved, sort_keys=True).encode())
        for step in saved.get("steps", []):
            state_file = step.get("state_file")
            if state_file:
                digest.update(state_file.encode())
                digest.update(checkpoint_file(checkpoint, state_file).read_bytes())
    return digest.hexdigest()


def model_fingerprint(checkpoint: str, checkpoint_hashes: dict[str, str] | None = None) -> str:
    """What a cell's model is: sha256 of the checkpoint's ``fingerprint_checkpoint`` (config and weights) and its
    ``processors_digest``, so a checkpoint whose weights or normaliser stats changed does not reuse stale cells."""
    import hashlib

    from reflowpairs.teacher import fingerprint_checkpoint

    hashes = checkpoint_hashes or fingerprint_checkpoint(checkpoint)
    return hashlib.sha256(f"{hashes['fingerprint']}:{processors_digest(checkpoint)}".encode()).hexdigest()


def cell_settings(cfg: ClosedLoopConfig, label: str, num_steps: int, fingerprint: str) -> dict[str, Any]:
    """The settings a cell file records (``MATCHED_SETTINGS`` must agree for the cell to be reused); ``device`` is
    the resolved one (``auto``: the device it picks here)."""
    from reflowpairs.teacher import resolve_device

    return {
        "env_type": cfg.env_type,
        "env_options": dict(sorted(cfg.env_options.items())),
        "n_episodes": cfg.n_episodes,
        "seed": cfg.seed,
        "batch_size": min(cfg.batch_size, cfg.n_episodes),
        "checkpoint_fingerprint": fingerprint,
        "model": label,
        "num_steps": num_steps,
        "use_async_envs": cfg.use_async_envs,
        "device": resolve_device(cfg.device),
        "tokenizer": cfg.tokenizer,
    }


def read_cell(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished cell at ``path``, or None when there is none; ``ReflowPairsError`` when it was made with other
    settings (naming them) or is unreadable."""
    if not path.exists():
        return None
    try:
        saved = load_json_object(path)
    except (OSError, NotAJSONObjectError) as err:
        raise ReflowPairsError(
            f"The finished cell {path} cannot be read ({err}).", "Delete it; the cell is then run again."
        ) from err
    recorded = saved.get("settings", {})
    differ = [k for k in MATCHED_SETTINGS if recorded.get(k) != settings[k]]
    if differ:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings[k]!r} now" for k in differ)
        raise ReflowPairsError(
            f"{path} was made with other settings ({shown}).",
            f"Use another --out for these settings, or delete {path.parent} to start this one over.",
        )
    return saved["cell"]


def summarise_cell(
    label: str, num_steps: int, episodes: list[dict[str, Any]], chunk_times: list[float], envs_per_call: int
) -> dict[str, Any]:
    """One cell's figures from its episodes (``{task, seed, success, return, length}`` each) and chunk call times."""
    n = len(episodes)
    k = sum(bool(e["success"]) for e in episodes)
    low, high = wilson_interval(k, n)
    return {
        "model": label,
        "num_steps": num_steps,
        "n_episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "success_low": low,
        "success_high": high,
        "mean_return": statistics.fmean(e["return"] for e in episodes) if n else 0.0,
        "mean_length": statistics.fmean(e["length"] for e in episodes) if n else 0.0,
        "latency_ms": 1000 * statistics.median(chunk_times) if chunk_times else None,
        "latency_ms_mean": 1000 * statistics.fmean(chunk_times) if chunk_times else None,
        "chunk_calls": len(chunk_times),
        "envs_per_call": envs_per_call,
        "episodes": episodes,
    }


def run_cell(
    envs: dict[str, dict[int, Any]],
    env_cfg,
    loaded,
    label: str,
    num_steps: int,
    cfg: ClosedLoopConfig,
    on_episodes: Callable[[int], None],
    quiet: bool = False,
) -> dict[str, Any]:
    """Run one (model, steps) cell: ``eval_policy`` on every task's vector env, ``n_episodes`` each from
    ``cfg.seed``, with the policy's step count set to ``num_steps``; returns ``summarise_cell``'s dict. ``quiet``:
    lerobot's own tqdm bars off (``quiet_lerobot_bars``)."""
    import torch
    from lerobot.envs import make_env_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy
    from lerobot.utils.random_utils import set_seed

    from reflowpairs.policies import configured_num_steps

    policy = loaded.policy
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    episodes: list[dict[str, Any]] = []
    timer = _ChunkTimer(policy, str(policy.config.device))
    set_seed(cfg.seed)
    with (
        configured_num_steps(policy, num_steps),
        timer.installed(),
        torch.no_grad(),
        quiet_lerobot_bars(quiet),
    ):
        for group, tasks in envs.items():
            for task_id, env in tasks.items():
                remaining = [cfg.n_episodes]

                def done(batch: int, remaining=remaining) -> None:
                    counted = min(batch, remaining[0])
                    remaining[0] -= counted
                    on_episodes(counted)

                with _EpisodeLengths(env, done).installed() as lengths:
                    info = eval_policy(
                        env=env,
                        policy=policy,
                        env_preprocessor=env_pre,
                        env_postprocessor=env_post,
                        preprocessor=loaded.preprocessor,
                        postprocessor=loaded.postprocessor,
                        n_episodes=cfg.n_episodes,
                        start_seed=cfg.seed,
                    )
                for episode, length in zip(info["per_episode"], lengths.lengths, strict=False):
                    episodes.append(
                        {
                            "task": f"{group}/{task_id}",
                            "seed": episode["seed"],
                            "success": bool(episode["success"]),
                            "return": float(episode["sum_reward"]),
                            "length": int(length),
                        }
                    )
    return summarise_cell(label, num_steps, episodes, timer.times, min(cfg.batch_size, cfg.n_episodes))


# --- the whole evaluation --------------------------------------------------------------------------------------


def _plan(cfg: ClosedLoopConfig, teacher_full: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """``[(label, checkpoint, step counts)]``: the teacher first (its full step count always included), then the
    students in the given order."""
    teacher_steps = cfg.teacher_num_steps if cfg.teacher_num_steps is not None else cfg.num_steps
    teacher_steps = tuple(sorted({*teacher_steps, teacher_full}))
    plan = [(TEACHER, cfg.teacher, teacher_steps)]
    plan += [(label, ckpt, tuple(sorted(set(cfg.num_steps)))) for label, ckpt in cfg.students.items()]
    return plan


def evaluate_closed_loop(cfg: ClosedLoopConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run (or, from ``OUT/cells/``, reuse) every cell and return the report (``build_report``); the report files
    are written by ``write_closed_loop_report``. ``progress("rollouts", done, total)`` counts episodes over all cells
    still to run, one display for all. Errors (``ReflowPairsError``): an unknown env type, an unknown env field, a
    missing simulator package, a checkpoint whose inputs do not fit the env, a cell made with other settings."""
    from reflowpairs.policies import config_num_steps, step_field
    from reflowpairs.teacher import fingerprint_checkpoint, load_policy, read_policy_config

    env_cfg = make_env_config(cfg.env_type, cfg.env_options)
    checkpoints = {TEACHER: cfg.teacher, **cfg.students}
    configs = {label: read_policy_config(checkpoint) for label, checkpoint in checkpoints.items()}
    plan = _plan(cfg, config_num_steps(configs[TEACHER]))
    hashes = {label: fingerprint_checkpoint(ckpt) for label, ckpt in checkpoints.items()}
    models = {
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
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    todo: list[tuple[str, str, int]] = []
    for label, checkpoint, steps_list in plan:
        for steps in steps_list:
            settings = cell_settings(cfg, label, steps, models[label]["fingerprint"])
            found = read_cell(cell_path(cfg.out, label, steps), settings)
            if found is None:
                todo.append((label, checkpoint, steps))
            else:
                cells[(label, steps)] = found
    # the env first (a missing simulator package is named before anything loads), then every model's fit to it
    envs = make_envs(env_cfg, min(cfg.batch_size, cfg.n_episodes), cfg.use_async_envs) if todo else {}
    try:
        for label, checkpoint in checkpoints.items():
            check_features(env_cfg, label, checkpoint)
        total = len(todo) * cfg.n_episodes * sum(len(tasks) for tasks in envs.values())
        done = [0]

        def on_episodes(n: int) -> None:
            done[0] += n
            if progress is not None:
                progress("rollouts", done[0], total)

        if progress is not None and todo:
            progress("rollouts", 0, total)
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
    finally:
        if envs:
            from lerobot.envs import close_envs

            close_envs(envs)
    return build_report(cfg, plan, models, cells)


def build_report(
    cfg: ClosedLoopConfig,
    plan: list[tuple[str, str, tuple[int, ...]]],
    models: dict[str, dict[str, Any]],
    cells: dict[tuple[str, int], dict[str, Any]],
) -> dict[str, Any]:
    """The report dict: ``settings``, ``env``, ``models``, ``cells`` (one per (model, steps), plan order),
    ``reference`` (the teacher at its full step count), ``paired`` (each student cell vs the reference, on the shared
    seeds) and ``verdict`` (label -> fewest steps within the reference's interval, or None)."""
    from reflowpairs.policies import lerobot_version

    full = models[TEACHER]["full_num_steps"]
    ordered = [cells[(label, steps)] for label, _, steps_list in plan for steps in steps_list]
    ref = cells[(TEACHER, full)]
    reference = {
        "model": TEACHER,
        "num_steps": full,
        "success_rate": ref["success_rate"],
        "success_low": ref["success_low"],
        "success_high": ref["success_high"],
    }
    ref_success = episode_successes(ref["episodes"])
    paired = []
    verdict: dict[str, int | None] = {}
    for label, _, steps_list in plan:
        rates = {steps: cells[(label, steps)]["success_rate"] for steps in steps_list}
        if label != TEACHER or len(steps_list) > 1:
            verdict[label] = fewest_matching_steps(rates, ref["success_low"])
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
