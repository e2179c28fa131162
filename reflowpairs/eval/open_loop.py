"""``reflowpairs eval``: how close a student gets to its teacher at few ODE steps, and how fast.

For frames of the chosen episodes and fixed noises X_0 = f(seed, obs_index, sample)
(``reflowpairs.noise``), the *reference* is the teacher's own Euler sampler at its config's full
``num_steps``. For the teacher and the student at each requested step count this measures:

- the error of the action chunk to the reference: MSE and L1 in the teacher's normalised action
  space and in dataset units (through the checkpoints' own postprocessors);
- the error to the dataset's recorded action chunk (``delta_timestamps`` chunks, padded positions
  past the episode end masked out with ``action_is_pad``);
- straightness of the sampled Euler path (``straightness``, documented in ``docs/eval.md``);
- latency of one action chunk through lerobot's plain ``policy.predict_action_chunk(batch, noise=)``
  with ``config.num_steps`` set to the step count (median over interleaved repeats after one warm-up).

A student written by ``reflowpairs train`` records its teacher and pair store in
``training_state/reflow_state.json``: another ``--teacher`` is refused (``--allow-mismatch``), and by
default only the episodes its store does not cover are evaluated (``--include-training-frames``).

Sampling for the error and straightness columns goes through ``reflowpairs.engine``: the prefix
(images, language, state) is computed once per frame and shared by every sample and step count.

Conventions are lerobot's: t=1 is noise, t=0 the action, ``x_t = t*noise + (1-t)*action``, and the
velocity ``v = dx/dt`` points from action to noise (``u = noise - action``); Euler steps
``x <- x - v / n``. Shapes: B frames, K samples per frame, T = chunk_size, D0 = max_action_dim
(the noise), A = action dimension (the output, cropped from D0).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reflowpairs.dataset import check_episodes, open_metadata
from reflowpairs.engine import lerobot_sampling_steps, pair_shapes
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.report import episode_span
from reflowpairs.noise import batch_noise
from reflowpairs.policies import config_num_steps, step_field

REPORT_FORMAT = "reflowpairs.eval"
REPORT_VERSION = 1
MODELS = ("teacher", "student")
NEXT_TOLERANCE = 1.1  # "next:" recommends the fewest steps within this factor of the student's lowest error

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)``: phase is "held-out frames", "training pairs" or "latency"."""


@dataclass
class EvalConfig:
    """Settings of ``reflowpairs eval`` (see ``docs/eval.md``)."""

    student: str
    teacher: str
    dataset: str
    out: Path
    num_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    dataset_root: Path | None = None
    episodes: list[int] | None = None  # None: the episodes the student did not train on (all when unknown)
    pairs: Path | None = None  # a pair store the student trained on: also report its error there
    max_frames: int = 64  # frames evaluated (evenly spaced over the episodes), and store frames with --pairs
    samples_per_frame: int = 4  # K noises per frame
    seed: int = 1  # X_0 seed; generate's default is 0, so eval noises are fresh even on training frames
    device: str = "auto"
    latency_repeats: int = 5  # timed calls per latency figure (median reported)
    batch_size: int = 8  # frames per engine call
    allow_mismatch: bool = False  # evaluate against a teacher the student was not trained from (labelled)
    include_training_frames: bool = False  # evaluate on episodes the student trained on (labelled)


# --- input checks ----------------------------------------------------------------------------------


def parse_num_steps(text: str, setting: str = "num_steps") -> list[int]:
    """``"1,2,4,10"`` -> ``[1, 2, 4, 10]`` (sorted, unique); anything but positive integers is refused, naming
    ``setting`` (the config field the text came from)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ReflowPairsError(
            f"`{setting}` is empty.",
            f"Set `{setting}` to a comma-separated list of step counts, e.g. 1,2,4,10.",
        )
    bad = [p for p in parts if not p.isdigit() or int(p) < 1]
    if bad:
        raise ReflowPairsError(
            f"`{setting}` {text!r} has entries that are not positive whole numbers: "
            f"{', '.join(repr(b) for b in bad)}.",
            f"Set `{setting}` to step counts of at least 1, e.g. 1,2,4,10.",
        )
    return sorted({int(p) for p in parts})


def check_config(cfg: EvalConfig) -> list[int]:
    """Refuse bad settings before anything is loaded; returns the sorted, unique step counts."""
    steps = sorted(set(cfg.num_steps))
    if not steps or any(not isinstance(n, int) or n < 1 for n in steps):
        raise ReflowPairsError(
            f"`num_steps` must be positive whole numbers, got {cfg.num_steps}.",
            "Set `num_steps` to e.g. 1,2,4,10.",
        )
    for name, value in (
        ("`samples_per_frame`", cfg.samples_per_frame),
        ("`max_frames`", cfg.max_frames),
        ("`latency_repeats`", cfg.latency_repeats),
        ("`batch_size`", cfg.batch_size),
    ):
        if value < 1:
            raise ReflowPairsError(f"{name} must be at least 1, got {value}.", f"Set {name} to 1 or more.")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(
            f"`out` {out} exists and is not a directory.", "Set `out` to a directory for the report files."
        )
    return steps


def _feature_text(feature) -> str:
    return f"{feature.type.name.lower()} {tuple(feature.shape)}"


def compatibility_problems(teacher_config, student_config) -> list[str]:
    """What stops the student from being compared with the teacher on the same frames and noises.

    Both must read the same input features (names, kinds and, for non-image inputs, shapes), write the
    same action, and take noise of the same ``(chunk_size, max_action_dim)``."""
    from lerobot.configs.types import FeatureType

    problems: list[str] = []
    for kind, t_features, s_features in (
        ("input", teacher_config.input_features, student_config.input_features),
        ("output", teacher_config.output_features, student_config.output_features),
    ):
        for key in sorted(set(t_features) | set(s_features)):
            t, s = t_features.get(key), s_features.get(key)
            if t is None:
                problems.append(f"the student has {kind} {key} ({_feature_text(s)}), the teacher has none")
            elif s is None:
                problems.append(f"the teacher has {kind} {key} ({_feature_text(t)}), the student has none")
            elif t.type != s.type or (t.type is not FeatureType.VISUAL and tuple(t.shape) != tuple(s.shape)):
                problems.append(
                    f"{key} is {_feature_text(s)} in the student and {_feature_text(t)} in the teacher"
                )
    for name in ("chunk_size", "max_action_dim"):
        t, s = getattr(teacher_config, name), getattr(student_config, name)
        if t != s:
            problems.append(f"{name} is {s} in the student and {t} in the teacher")
    return problems


def check_compatible(teacher_config, student_config, teacher: str, student: str) -> None:
    problems = compatibility_problems(teacher_config, student_config)
    if problems:
        raise ReflowPairsError(
            f"The student {student} and the teacher {teacher} do not have the same features: "
            + "; ".join(problems)
            + ".",
            "Evaluate a student trained from this teacher (same robot, cameras, action space and chunk size).",
        )


def _read_config(flag: str, source: str):
    """The checkpoint's config, with errors that say whether the student or the teacher is at fault."""
    import lerobot.policies.factory  # noqa: F401 - registers the policy config types read_policy_config parses

    from reflowpairs.teacher import read_policy_config

    try:
        return read_policy_config(source)
    except ReflowPairsError as err:
        raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


def _check_files(flag: str, source: str) -> None:
    """Every file ``load_policy`` needs is there (weights and both processors), before anything loads."""
    from reflowpairs.teacher import POSTPROCESSOR_FILE, PREPROCESSOR_FILE, checkpoint_file

    for name in ("model.safetensors", PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        try:
            checkpoint_file(source, name)
        except ReflowPairsError as err:
            raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


def _load(flag: str, source: str, device: str, fingerprint: dict[str, str] | None = None):
    from reflowpairs.teacher import load_policy

    try:
        return load_policy(source, device, fingerprint=fingerprint)
    except ReflowPairsError as err:
        raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


def _fingerprint(flag: str, source: str) -> dict[str, str]:
    from reflowpairs.teacher import fingerprint_checkpoint

    try:
        return fingerprint_checkpoint(source)
    except ReflowPairsError as err:
        raise ReflowPairsError(f"{flag}: {err.what}", err.hint) from err


# --- what the student's training recorded ----------------------------------------------------------


def student_state_file(student: str) -> Path | None:
    """``<checkpoint>/training_state/reflow_state.json`` beside a local ``<checkpoint>/pretrained_model``
    student, or None when there is none (a hub id, or a checkpoint not written by ``reflowpairs train``)."""
    from reflowpairs.checkpoint import STATE_FILE, training_state_dir
    from reflowpairs.teacher import is_local

    if not is_local(student):
        return None
    path = training_state_dir(Path(student).expanduser().resolve().parent) / STATE_FILE
    return path if path.is_file() else None


def read_student_state(student: str) -> dict[str, Any] | None:
    """The student's ``reflow_state.json`` (see ``reflowpairs.checkpoint``), or None when it has none."""
    from reflowpairs.checkpoint import read_state

    path = student_state_file(student)
    if path is None:
        return None
    try:
        return read_state(path.parent.parent)
    except ReflowPairsError as err:
        raise ReflowPairsError(
            f"`student`: {err.what}",
            "Restore the checkpoint's training_state/, or evaluate a copy of pretrained_model/ on its own "
            "(then its teacher and training frames are not checked).",
        ) from err


def trained_teacher_fingerprint(state: dict[str, Any]) -> str | None:
    """Fingerprint of the teacher whose samples the student learnt: the one its pair store was generated
    with (else, for an older state, its init checkpoint's)."""
    recorded = (state.get("store") or {}).get("teacher_fingerprint")
    return recorded or ((state.get("init") or {}).get("fingerprint") or {}).get("fingerprint")


def check_teacher(state: dict[str, Any] | None, teacher_fp: str, cfg: EvalConfig) -> dict[str, Any]:
    """Compare ``--teacher`` (fingerprint ``teacher_fp``) with the teacher the student's state records.

    Refuses a different teacher unless ``cfg.allow_mismatch``. Returns the report's ``checks.teacher``:
    ``{"recorded", "given", "matches"}`` (``matches`` None when the student records no teacher)."""
    recorded = trained_teacher_fingerprint(state) if state is not None else None
    matches = None if recorded is None else recorded == teacher_fp
    if matches is False and not cfg.allow_mismatch:
        init = state.get("init") or {}
        init_fp = (init.get("fingerprint") or {}).get("fingerprint")
        store = (state.get("store") or {}).get("path")
        fix = (
            f"Set `teacher` to {init['source']} (the checkpoint it was trained from)"
            if init.get("source") and init_fp == recorded
            else f"Set `teacher` to the teacher it was trained from (fingerprint {recorded[:12]})"
        )
        raise ReflowPairsError(
            f"`student` {cfg.student} was trained from teacher {recorded[:12]} (its training_state/reflow_state.json "
            f"records pair store {store}, generated by that teacher, and init checkpoint {init.get('source')}), but "
            f"`teacher` {cfg.teacher} is teacher {teacher_fp[:12]}: the error ratio would compare the student with a "
            "teacher it did not learn from.",
            f"{fix}, or set `allow_mismatch` to compare them anyway (the report is then labelled as a teacher mismatch).",
        )
    return {"recorded": recorded, "given": teacher_fp, "matches": matches}


def episodes_of_frames(obs_index: np.ndarray, meta) -> list[int]:
    """The episodes (of dataset metadata ``meta``) that hold the global frame indices ``obs_index``."""
    episodes = meta.episodes
    starts = np.asarray(episodes["dataset_from_index"], dtype=np.int64)
    ends = np.asarray(episodes["dataset_to_index"], dtype=np.int64)
    ids = np.asarray(episodes["episode_index"], dtype=np.int64)
    order = np.argsort(starts)
    starts, ends, ids = starts[order], ends[order], ids[order]
    frames = np.unique(np.asarray(obs_index, dtype=np.int64))
    slot = np.searchsorted(starts, frames, side="right") - 1
    inside = (slot >= 0) & (frames < ends[np.clip(slot, 0, None)])
    return sorted({int(e) for e in ids[slot[inside]]})


def _training_store(state: dict[str, Any], pairs: Path | None):
    """The student's training store: ``--pairs`` when it is that store (moved), else the recorded path.
    Returns ``(store or None, why it is unavailable)``."""
    from reflowpairs.pairstore import PairStore

    recorded = state.get("store") or {}
    if pairs is not None and PairStore(pairs).manifest.get("store_id") == recorded.get("store_id"):
        return PairStore(pairs), ""
    path = recorded.get("path")
    if not path:
        return None, "the student's training state records no pair store"
    try:
        store = PairStore(path)
    except ReflowPairsError:
        return None, f"the student's training store {path} (recorded in its reflow_state.json) is gone"
    if store.manifest.get("store_id") != recorded.get("store_id"):
        return None, (
            f"{path} now holds another pair store ({store.manifest.get('store_id')}) than the one the student "
            f"trained on ({recorded.get('store_id')})"
        )
    return store, ""


def training_frames(
    state: dict[str, Any] | None, pairs: Path | None, meta, dataset_fp: str
) -> dict[str, Any]:
    """Which episodes of this dataset the student trained on, from the pair store its state records.

    ``status`` is ``known`` (``episodes`` listed), ``other_dataset`` (the store was generated from
    another dataset: none of these episodes), ``unrecorded`` (the student has no training state) or
    ``store_gone`` (``reason`` says why). A student trains on every frame of its store, and neighbouring
    frames of an episode look alike, so whole episodes are excluded, not just the stored frames."""
    if state is None:
        return {
            "status": "unrecorded",
            "episodes": None,
            "store": None,
            "store_id": None,
            "num_frames": None,
            "reason": "the student has no recorded training state (it was not written by `reflowpairs train`, "
            "e.g. a plain lerobot checkpoint)",
        }
    recorded = state.get("store") or {}
    info = {
        "store": recorded.get("path"),
        "store_id": recorded.get("store_id"),
        "num_frames": None,
        "reason": "",
    }
    if recorded.get("dataset_fingerprint") and recorded["dataset_fingerprint"] != dataset_fp:
        return {
            **info,
            "status": "other_dataset",
            "episodes": [],
            "reason": "the student's training store was generated from another dataset (dataset fingerprint "
            f"{recorded['dataset_fingerprint'][:12]}, this one is {dataset_fp[:12]})",
        }
    store, why = _training_store(state, pairs)
    if store is None:
        return {**info, "status": "store_gone", "episodes": None, "reason": why}
    obs_index = np.unique(store.index()[0])
    return {
        **info,
        "store": str(Path(store.path).resolve()),
        "status": "known",
        "episodes": episodes_of_frames(obs_index, meta),
        "num_frames": int(len(obs_index)),
    }


def choose_episodes(cfg: EvalConfig, total_episodes: int, training: dict[str, Any]) -> list[int]:
    """The episodes to evaluate on: ``--episodes`` if given, else every episode the student did not train on.

    Refuses (unless ``--include-training-frames``) ``--episodes`` the student trained on, a dataset with
    no held-out episode left, and a student whose training store is gone when no ``--episodes`` says
    which frames are held out."""
    every = list(range(total_episodes))
    trained = training["episodes"]
    if training["status"] == "store_gone" and cfg.episodes is None and not cfg.include_training_frames:
        raise ReflowPairsError(
            f"Cannot tell which frames the student {cfg.student} trained on: {training['reason']}, so eval cannot "
            "leave its training episodes out.",
            "Set `pairs` to the store's new location, or `episodes` to episodes you know it did not train on "
            "(they are then used as given), or set `include_training_frames` to evaluate on every episode (labelled).",
        )
    if trained is None or cfg.include_training_frames:
        return list(cfg.episodes) if cfg.episodes is not None else every
    if cfg.episodes is None:
        held_out = [e for e in every if e not in set(trained)]
        if not held_out:
            raise ReflowPairsError(
                f"The student {cfg.student} trained on every episode of {cfg.dataset} ({episode_span(trained)}, store "
                f"{training['store']}): there is no held-out episode to evaluate on.",
                "Evaluate on a dataset it did not train on, or set `include_training_frames` to evaluate on its "
                "training episodes (the report is then labelled).",
            )
        return held_out
    overlap = sorted(set(cfg.episodes) & set(trained))
    if overlap:
        held_out = [e for e in every if e not in set(trained)]
        raise ReflowPairsError(
            f"`episodes` includes {episode_span(overlap)}, which the student {cfg.student} trained on (its store "
            f"{training['store']} holds frames of episodes {episode_span(trained)}): its error there is not a held-out error.",
            (
                f"Choose held-out episodes ({episode_span(held_out)}) or leave `episodes` unset to use all of them, "
                if held_out
                else "Evaluate on a dataset it did not train on, "
            )
            + "or set `include_training_frames` to evaluate there anyway (the report is then labelled).",
        )
    return list(cfg.episodes)


# --- metrics (pure functions) ----------------------------------------------------------------------


@dataclass
class ErrorSums:
    """Running sums for MSE and L1 over many batches: ``sq``, ``abs`` and ``count`` of elements."""

    sq: float = 0.0
    abs: float = 0.0
    count: int = 0

    def add(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add ``pred - target`` (same shape); ``mask`` (broadcastable, bool) keeps the True elements."""
        diff = pred.detach().double().cpu() - target.detach().double().cpu()
        if mask is None:
            self.sq += float(diff.square().sum())
            self.abs += float(diff.abs().sum())
            self.count += diff.numel()
            return
        keep = mask.cpu().expand_as(diff)
        self.sq += float(diff.square()[keep].sum())
        self.abs += float(diff.abs()[keep].sum())
        self.count += int(keep.sum())

    @property
    def mse(self) -> float | None:
        return self.sq / self.count if self.count else None

    @property
    def l1(self) -> float | None:
        return self.abs / self.count if self.count else None


def straightness(velocities: Sequence[Tensor], x_start: Tensor, x_end: Tensor) -> Tensor:
    """Per-sample straightness ``S = mean_i ||v_i - (x_start - x_end)||^2 / D`` of an ODE path.

    ``velocities``: the n velocities ``v_i`` (each ``(N, T, A)``) the solver evaluated along the path;
    ``x_start`` the noise (t=1) and ``x_end`` the action (t=0), ``(N, T, A)``; D = T * A. In lerobot's
    convention ``dx/dt = v`` with t running from 1 to 0, so on a straight path every ``v_i`` equals
    ``x_start - x_end`` and S = 0. For Euler ``x_start - x_end`` is the mean of the ``v_i``, so S is the
    variance of the velocity along the path (S = 0 at one step by construction). Returns ``(N,)``."""
    direction = (x_start - x_end).double()
    dims = direction[0].numel()
    deviations = torch.stack([(v.double() - direction).square().flatten(1).sum(dim=1) for v in velocities])
    return deviations.mean(dim=0) / dims


def integrate_recording(velocity, noise: Tensor, num_steps: int) -> tuple[Tensor, list[Tensor]]:
    """Euler-integrate ``velocity`` from ``noise`` (t=1, ``(N, T, D0)``) to t=0 with lerobot's own loop
    (``reflowpairs.solvers.integrate``) and return ``(x_end (N, T, D0), [v_i (N, T, D0)] * num_steps)``."""
    from reflowpairs.solvers import SolverConfig, integrate

    recorded: list[Tensor] = []

    def recording(x_t: Tensor, t: Tensor) -> Tensor:
        v_t = velocity(x_t, t)
        recorded.append(v_t)
        return v_t

    x_end = integrate(recording, noise, SolverConfig("euler", num_steps))
    return x_end, recorded


def pick_positions(num_positions: int, max_frames: int) -> np.ndarray:
    """At most ``max_frames`` positions evenly spread over ``0 .. num_positions-1`` (first and last kept)."""
    if num_positions <= max_frames:
        return np.arange(num_positions, dtype=np.int64)
    return np.unique(np.linspace(0, num_positions - 1, max_frames).round().astype(np.int64))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


# --- sampling --------------------------------------------------------------------------------------


class _Model:
    """One checkpoint under evaluation: policy, processors, engine, and the map into the teacher's
    normalised action space (identity when both unnormalise actions identically)."""

    def __init__(self, name: str, loaded, teacher_normalizer=None):
        from reflowpairs.engine import make_engine

        self.name = name
        self.loaded = loaded
        self.policy = loaded.policy
        self.engine = make_engine(loaded.policy)
        self.teacher_normalizer = teacher_normalizer  # None: outputs already in the teacher's space

    def velocity(self, raw_batch: dict[str, Any], repeats: int):
        return self.engine.velocity_field(self.loaded.preprocessor(dict(raw_batch)), repeats)

    def finish(self, x: Tensor) -> Tensor:
        """Model-space ``(N, T, D0)`` -> its normalised action ``(N, T, A)``, as ``predict_action_chunk``."""
        return self.engine.finish(x)

    def units(self, action: Tensor) -> Tensor:
        """Normalised ``(N, T, A)`` -> dataset units on CPU, through the checkpoint's postprocessor."""
        return self.loaded.postprocessor(action).float().cpu()

    def in_teacher_space(self, action: Tensor) -> Tensor:
        if self.teacher_normalizer is None:
            return action
        return self.teacher_normalizer(self.units(action))


def _action_normalizer(preprocessor) -> Callable[[Tensor], Tensor]:
    """Dataset-unit action ``(N, T, A)`` -> the checkpoint's normalised space, with its own normaliser step."""
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    steps = [s for s in getattr(preprocessor, "steps", []) if isinstance(s, NormalizerProcessorStep)]
    if not steps:
        return lambda action: action
    step = steps[0]
    return lambda action: (
        transition_to_policy_action(step(policy_action_to_transition(action.clone()))).float().cpu()
    )


def same_action_units(teacher, student, shape: tuple[int, int, int]) -> bool:
    """True when both postprocessors map normalised actions to dataset units identically (probed)."""
    probe = torch.linspace(-2.0, 2.0, int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    return torch.equal(teacher.postprocessor(probe.clone()).cpu(), student.postprocessor(probe.clone()).cpu())


@dataclass
class _Accumulator:
    """Everything measured for one (model, step count) over the held-out frames."""

    ref_norm: ErrorSums = field(default_factory=ErrorSums)
    ref_units: ErrorSums = field(default_factory=ErrorSums)
    data_norm: ErrorSums = field(default_factory=ErrorSums)
    data_units: ErrorSums = field(default_factory=ErrorSums)
    straightness: list[float] = field(default_factory=list)

    def row(self, model: str, num_steps: int, latency_runs: Sequence[float]) -> dict[str, Any]:
        """The report row; ``latency_runs`` are the timed calls in ms (``latency_ms`` is their median)."""
        return {
            "model": model,
            "num_steps": num_steps,
            "mse_ref_norm": self.ref_norm.mse,
            "l1_ref_norm": self.ref_norm.l1,
            "mse_ref_units": self.ref_units.mse,
            "l1_ref_units": self.ref_units.l1,
            "mse_data_norm": self.data_norm.mse,
            "l1_data_norm": self.data_norm.l1,
            "mse_data_units": self.data_units.mse,
            "l1_data_units": self.data_units.l1,
            "straightness": float(np.mean(self.straightness)) if self.straightness else None,
            "latency_ms": statistics.median(latency_runs) if latency_runs else None,
            "latency_ms_runs": [float(t) for t in latency_runs],
        }


def _sample_all(
    model: _Model, raw_batch, x0: Tensor, repeats: int, step_counts: Sequence[int]
) -> dict[int, tuple[Tensor, Tensor]]:
    """``{n: (action (N, T, A) normalised, straightness (N,))}`` for each step count, one prefix for all."""
    velocity = model.velocity(raw_batch, repeats)
    results = {}
    for n in step_counts:
        x_end, velocities = integrate_recording(velocity, x0, n)
        a = model.engine.action_dim
        s = straightness([v[:, :, :a] for v in velocities], x0[:, :, :a], x_end[:, :, :a])
        results[n] = (model.finish(x_end), s)
    return results


def _loader(dataset, positions: Sequence[int], batch_size: int):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, [int(p) for p in positions]), batch_size=batch_size, shuffle=False
    )


def _held_out(
    teacher: _Model,
    student: _Model,
    dataset,
    positions: np.ndarray,
    steps: list[int],
    ref_steps: int,
    cfg: EvalConfig,
    progress: Progress | None,
) -> tuple[dict[tuple[str, int], _Accumulator], dict[str, Any]]:
    """Errors and straightness on the held-out frames, per (model, step count). Also returns the first
    frame (raw batch of 1, its first noise ``(1, T, D0)``, and each model's engine output for it) for
    the latency and engine-vs-lerobot check."""
    k = cfg.samples_per_frame
    acc = {(m, n): _Accumulator() for m in MODELS for n in steps}
    first: dict[str, Any] = {}
    done = 0
    for raw in _loader(dataset, positions, cfg.batch_size):
        obs_index = raw["index"].to(torch.int64).tolist()
        frames = len(obs_index)
        noise = batch_noise(cfg.seed, obs_index, k, teacher.engine.noise_shape)  # (B, K, T, D0)
        x0 = noise.reshape(frames * k, *noise.shape[2:]).to(teacher.engine.device)

        def per_frame(x: Tensor, frames: int = frames) -> Tensor:  # (B*K, T, A) -> (B, K, T, A) on CPU
            return x.reshape(frames, k, *x.shape[1:]).cpu()

        data_units = raw["action"].float()[:, None]  # (B, 1, T, A) recorded chunk, dataset units
        data_norm = (
            teacher.loaded.preprocessor(dict(raw))["action"].float().cpu()[:, None]
        )  # teacher-normalised
        inside = ~raw["action_is_pad"].bool()[:, None, :, None]  # (B, 1, T, 1): False past the episode end
        outputs = {
            "teacher": _sample_all(teacher, raw, x0, k, sorted(set(steps) | {ref_steps})),
            "student": _sample_all(student, raw, x0, k, steps),
        }
        reference = outputs["teacher"][ref_steps][0]
        ref_norm, ref_units = per_frame(reference), per_frame(teacher.units(reference))
        for name, model in (("teacher", teacher), ("student", student)):
            for n in steps:
                action, s = outputs[name][n]
                norm, units = per_frame(model.in_teacher_space(action)), per_frame(model.units(action))
                a = acc[(name, n)]
                a.ref_norm.add(norm, ref_norm)
                a.ref_units.add(units, ref_units)
                a.data_norm.add(norm, data_norm, inside)
                a.data_units.add(units, data_units, inside)
                a.straightness.extend(s.tolist())
        if not first:
            first = {
                "raw": {key: value[:1] for key, value in raw.items()},
                "noise": noise[:1, 0],
                "engine": {(m, n): outputs[m][n][0][:1].cpu() for m in MODELS for n in steps},
            }
        done += frames
        if progress is not None:
            progress("held-out frames", done, len(positions))
    return acc, first


# --- latency ---------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _plain_call(model: _Model, batch: dict[str, Any], noise: Tensor, num_steps: int) -> tuple[float, Tensor]:
    """Seconds for one ``policy.predict_action_chunk(batch, noise=noise)`` at ``num_steps``, and its action."""
    device = model.engine.device
    with lerobot_sampling_steps(model.policy, num_steps):  # lerobot's sampler reads the step field only
        model.policy.reset()
        _synchronize(device)
        start = time.perf_counter()
        action = model.policy.predict_action_chunk(dict(batch), noise=noise.clone())
        _synchronize(device)
        return time.perf_counter() - start, action


def measure_latencies(
    models: dict[str, _Model],
    raw_frame: dict[str, Any],
    noise: Tensor,
    steps: Sequence[int],
    repeats: int,
    progress: Progress | None = None,
) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], Tensor]]:
    """Milliseconds of ``policy.predict_action_chunk(batch, noise=noise)`` for one frame, per (model, step
    count): one warm-up call each, then ``repeats`` rounds that each time every (model, step count) once,
    so a slow spell of a shared machine spreads over all rows instead of biasing one. Report the median.

    ``raw_frame`` is a dataset batch of one frame; ``noise`` is ``(1, T, D0)``. Also returns each warm-up's
    action ``(1, T, A)`` (on CPU), to check the engine against lerobot's own call path."""
    todo = [(name, n) for name in models for n in steps]
    batches = {}
    for name, model in models.items():
        batch = model.loaded.preprocessor(dict(raw_frame))
        batches[name] = {k: v for k, v in batch.items() if k.startswith("observation.")}
    noise = {name: noise.to(model.engine.device) for name, model in models.items()}
    total, done = len(todo) * (repeats + 1), 0
    warm: dict[tuple[str, int], Tensor] = {}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in todo}
    for round_ in range(repeats + 1):
        for name, n in todo:
            seconds, action = _plain_call(models[name], batches[name], noise[name], n)
            if round_ == 0:
                warm[(name, n)] = action.float().cpu()
            else:
                times[(name, n)].append(1000.0 * seconds)
            done += 1
            if progress is not None:
                progress("latency", done, total)
    return times, warm


# --- training pairs --------------------------------------------------------------------------------


def _store_frames(store, max_frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(obs_index (F,), x0 (F, K, T, D0), x1 (F, K, T, A))`` for up to ``max_frames`` frames of the store,
    evenly spread, all their stored samples in sample order; only shards that can hold them are read."""
    obs, _ = store.index()
    frames = np.unique(obs)
    if len(frames) == 0:
        raise ReflowPairsError(
            f"`pairs` {store.path} holds no pairs.", "Give the store the student was trained on."
        )
    chosen = frames[pick_positions(len(frames), max_frames)]
    blocks = []
    for i, shard in enumerate(store.shards):
        lo, hi = shard.get("obs_index_min", -math.inf), shard.get("obs_index_max", math.inf)
        if np.any((chosen >= lo) & (chosen <= hi)):
            data = store.read(i)
            rows = np.isin(data["obs_index"], chosen)
            if rows.any():
                blocks.append({name: data[name][rows] for name in ("x0", "x1", "obs_index", "sample")})
    cat = {name: np.concatenate([b[name] for b in blocks]) for name in ("x0", "x1", "obs_index", "sample")}
    order = np.lexsort((cat["sample"], cat["obs_index"]))
    counts = np.unique(cat["obs_index"], return_counts=True)[1]
    k = int(counts.min())
    if counts.max() != k:
        raise ReflowPairsError(
            f"`pairs` {store.path}: frames hold different numbers of samples.",
            "Run `reflowpairs validate` on it.",
        )
    x0 = cat["x0"][order].reshape(len(chosen), k, *store.x0_shape)
    x1 = cat["x1"][order].reshape(len(chosen), k, *store.x1_shape)
    return chosen, x0, x1


def check_store(store, student_config, dataset_fp: str, repo_id: str) -> None:
    """Refuse a ``--pairs`` store the student cannot be scored on: other noise/action shapes, or
    generated from another dataset (its obs_index would point at other frames)."""
    noise_shape, action_shape = pair_shapes(student_config)
    if tuple(store.x0_shape) != noise_shape or tuple(store.x1_shape) != action_shape:
        raise ReflowPairsError(
            f"`pairs` {store.path} holds X_0 {tuple(store.x0_shape)} and X_1 {tuple(store.x1_shape)}, but the student "
            f"samples noise {noise_shape} into actions {action_shape}.",
            "Give the pair store this student was trained on.",
        )
    recorded = store.manifest.get("dataset", {}).get("fingerprint")
    if recorded != dataset_fp:
        raise ReflowPairsError(
            f"`pairs` {store.path} was generated from another dataset than {repo_id} (the dataset fingerprint in its "
            "manifest differs), so its obs_index cannot be looked up there.",
            "Set `dataset` (and `dataset_root`) to the dataset the store was generated from.",
        )


def _training_pairs(
    student: _Model, store, cfg: EvalConfig, steps: list[int], teacher_fp: str, progress: Progress | None
) -> dict[str, Any]:
    """The student's error at each step count to stored X_1 from stored X_0, on frames it trained on."""
    from reflowpairs.dataset import frame_indices, open_dataset

    obs_index, x0, x1 = _store_frames(store, cfg.max_frames)
    dataset = open_dataset(cfg.dataset, cfg.dataset_root, None)
    position_of = {int(i): p for p, i in enumerate(frame_indices(dataset))}
    missing = [int(i) for i in obs_index if int(i) not in position_of]
    if missing:
        raise ReflowPairsError(
            f"`pairs` {store.path} refers to obs_index {missing[:5]} that dataset {cfg.dataset} does not have.",
            "Give the dataset the store was generated from.",
        )
    sums = {n: ErrorSums() for n in steps}
    k = x0.shape[1]
    done = 0
    for start in range(0, len(obs_index), cfg.batch_size):
        chunk = slice(start, start + cfg.batch_size)
        frames = len(obs_index[chunk])
        raw = torch.utils.data.default_collate([dataset[position_of[int(i)]] for i in obs_index[chunk]])
        noise = torch.from_numpy(x0[chunk]).reshape(frames * k, *x0.shape[2:]).to(student.engine.device)
        target = torch.from_numpy(x1[chunk]).reshape(frames * k, *x1.shape[2:])
        for n, (action, _) in _sample_all(student, raw, noise, k, steps).items():
            sums[n].add(action.cpu(), target)
        done += frames
        if progress is not None:
            progress("training pairs", done, len(obs_index))
    manifest = store.manifest
    store_teacher = manifest.get("teacher", {}).get("fingerprint")
    return {
        "path": str(Path(store.path).resolve()),
        "store_id": manifest.get("store_id"),
        "teacher_fingerprint": store_teacher,
        "same_teacher": store_teacher == teacher_fp,
        "episodes": manifest.get("dataset", {}).get("episodes"),
        "num_frames": int(len(obs_index)),
        "num_pairs": int(len(obs_index) * k),
        "rows": [
            {"model": "student", "num_steps": n, "mse_norm": sums[n].mse, "l1_norm": sums[n].l1}
            for n in steps
        ],
    }


# --- the whole evaluation --------------------------------------------------------------------------


def headline(rows: list[dict[str, Any]], key: str = "mse_ref_norm") -> dict[str, Any]:
    """Student error / teacher error at the fewest steps evaluated (1 when asked for)."""
    fewest = min(r["num_steps"] for r in rows)
    pick = {r["model"]: r[key] for r in rows if r["num_steps"] == fewest}
    return {
        "num_steps": fewest,
        "metric": key,
        "student": pick.get("student"),
        "teacher": pick.get("teacher"),
        "ratio": ratio(pick.get("student"), pick.get("teacher")),
    }


def recommend_steps(
    rows: list[dict[str, Any]], tolerance: float = NEXT_TOLERANCE, key: str = "mse_ref_norm"
) -> int | None:
    """The fewest step counts at which the student's error is within ``tolerance`` times its lowest error
    over the evaluated counts: more steps than that buy little accuracy for their latency. None when the
    student has no error figures."""
    errors = {r["num_steps"]: r[key] for r in rows if r["model"] == "student" and r[key] is not None}
    if not errors:
        return None
    best = min(errors.values())
    return min(n for n, e in errors.items() if e <= best * tolerance)


def next_step(report: dict[str, Any]) -> dict[str, Any]:
    """What to run after this evaluation: the lerobot-eval command for the student at the recommended step
    count (``recommend_steps``), or, when the student is no better than the teacher at the fewest steps,
    more training. ``{"num_steps", "rule", "command", "why"}``."""
    n = recommend_steps(report["rows"])
    student = report["student"]["source"]
    rule = (
        f"the fewest steps with the student's MSE to the reference within {NEXT_TOLERANCE:g}x of its lowest"
    )
    head = report["headline"]
    training = report["student"].get("training") or {}
    if head["ratio"] is not None and head["ratio"] >= 1 and training.get("run") and training.get("store"):
        return {
            "num_steps": n,
            "rule": rule,
            "why": f"the student is no better than the teacher at {head['num_steps']} step(s) (ratio "
            f"{head['ratio']:.3g}): train it longer",
            "command": f"reflowpairs train --pairs {training['store']} --out {training['run']} --resume "
            f"--steps {2 * int(training['steps'] or training['step'] or 1)}",
        }
    saved = report["student"].get("num_steps")
    field = report["student"].get("step_field", "num_steps")  # the policy family's step-count field
    if n == saved:  # the checkpoint already samples in n steps: lerobot-eval needs no step-count flag
        why, override = f"the student is saved to sample in {n} step{'s' if n != 1 else ''}, {rule}", ""
    else:
        why, override = (
            f"--policy.{field}={n}: {rule} (the checkpoint is saved with {field} {saved})",
            f" --policy.{field}={n}",
        )
    return {
        "num_steps": n,
        "saved_num_steps": saved,
        "rule": rule,
        "why": f"{why}; set ENV to your lerobot env type",
        "command": f"lerobot-eval --policy.path={student}{override} --policy.device="
        f"{report['settings']['device']} --env.type=ENV --eval.n_episodes=50",
    }


def _training_info(
    state: dict[str, Any] | None, state_file: Path | None, teacher_check: dict[str, Any]
) -> dict[str, Any] | None:
    """The report's ``student.training``: what the student's reflow_state.json records (None: no state)."""
    if state is None:
        return None
    init = state.get("init") or {}
    checkpoint = state_file.parent.parent
    return {
        "state_file": str(state_file),
        "run": str(checkpoint.parent.parent),
        "step": state.get("step"),
        "steps": state.get("steps"),
        "init_source": init.get("source"),
        "init_fingerprint": (init.get("fingerprint") or {}).get("fingerprint"),
        "store": (state.get("store") or {}).get("path"),
        "store_id": (state.get("store") or {}).get("store_id"),
        "teacher_fingerprint": teacher_check["recorded"],
        "teacher_matches": teacher_check["matches"],
    }


def evaluate(cfg: EvalConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the evaluation and return the report (a JSON-able dict; ``reflowpairs.report`` writes it).

    Every input is checked (settings, both checkpoints' configs and their compatibility, the teacher the
    student was trained from, the dataset, and which episodes it trained on) before any weights are
    loaded. Without ``--episodes`` the student is scored on the episodes its training store does not cover."""
    from reflowpairs.dataset import (
        check_features,
        dataset_fingerprint,
        dataset_provenance,
        frame_indices,
        open_dataset,
    )
    from reflowpairs.generate import software_versions
    from reflowpairs.pairstore import PairStore
    from reflowpairs.teacher import rename_map

    steps = check_config(cfg)
    store = PairStore(cfg.pairs) if cfg.pairs is not None else None
    teacher_config = _read_config("`teacher`", cfg.teacher)
    student_config = _read_config("`student`", cfg.student)
    _check_files("`teacher`", cfg.teacher)
    _check_files("`student`", cfg.student)
    check_compatible(teacher_config, student_config, cfg.teacher, cfg.student)
    meta = open_metadata(cfg.dataset, cfg.dataset_root)
    check_episodes(cfg.episodes, meta.total_episodes, cfg.dataset)
    dataset_fp = dataset_fingerprint(meta)
    if store is not None:
        check_store(store, student_config, dataset_fp, cfg.dataset)
    state_file = student_state_file(cfg.student)
    state = read_student_state(cfg.student)
    teacher_fp = _fingerprint("`teacher`", cfg.teacher)
    teacher_check = check_teacher(state, teacher_fp["fingerprint"], cfg)
    training = training_frames(state, cfg.pairs, meta, dataset_fp)
    episodes = choose_episodes(cfg, meta.total_episodes, training)

    started = time.perf_counter()
    teacher_loaded = _load("`teacher`", cfg.teacher, cfg.device, teacher_fp)
    student_loaded = _load("`student`", cfg.student, cfg.device)
    check_features(teacher_loaded.config, meta, rename_map(teacher_loaded.preprocessor))
    check_features(student_loaded.config, meta, rename_map(student_loaded.preprocessor))
    chunk_size = teacher_loaded.config.chunk_size
    ref_steps = config_num_steps(teacher_loaded.config)
    dataset = open_dataset(
        cfg.dataset,
        cfg.dataset_root,
        episodes,
        delta_timestamps={"action": [i / meta.fps for i in range(chunk_size)]},
    )
    teacher = _Model("teacher", teacher_loaded)
    action_shape = (1, chunk_size, teacher.engine.action_dim)
    same_units = same_action_units(teacher_loaded, student_loaded, action_shape)
    student = _Model(
        "student", student_loaded, None if same_units else _action_normalizer(teacher_loaded.preprocessor)
    )

    positions = pick_positions(len(dataset), cfg.max_frames)
    obs_index = frame_indices(dataset)[positions]
    with torch.no_grad():
        acc, first = _held_out(teacher, student, dataset, positions, steps, ref_steps, cfg, progress)
        latency, plain = measure_latencies(
            {"teacher": teacher, "student": student},
            first["raw"],
            first["noise"],
            steps,
            cfg.latency_repeats,
            progress,
        )
        engine_gap = max(float((plain[key] - first["engine"][key]).abs().max()) for key in plain)
        pairs = None
        if store is not None:
            pairs = _training_pairs(
                student, store, cfg, steps, teacher_loaded.fingerprint["fingerprint"], progress
            )

    rows = [acc[(m, n)].row(m, n, latency[(m, n)]) for m in MODELS for n in steps]
    settings = asdict(cfg)
    settings.update(
        out=str(Path(cfg.out).resolve()),
        dataset_root=str(cfg.dataset_root) if cfg.dataset_root is not None else None,
        pairs=str(cfg.pairs) if cfg.pairs is not None else None,
        num_steps=steps,
        reference_num_steps=ref_steps,
        solver="euler",
        device=str(teacher.engine.device),
    )
    evaluated = sorted(int(e) for e in episodes)
    trained = training["episodes"]
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings,
        "teacher": {**teacher_loaded.provenance(), "num_steps": ref_steps},
        "student": {
            **student_loaded.provenance(),
            "num_steps": config_num_steps(student_loaded.config),
            "step_field": step_field(student_loaded.config.type),
            "same_action_normalisation": same_units,
            "training": _training_info(state, state_file, teacher_check),
        },
        "dataset": dataset_provenance(dataset, evaluated),
        "frames": {
            "count": int(len(positions)),
            "samples_per_frame": cfg.samples_per_frame,
            "episodes": evaluated,
            "selection": "given"
            if cfg.episodes is not None
            else ("held_out" if trained is not None and not cfg.include_training_frames else "all"),
            "training": {
                **training,
                "included": sorted(set(evaluated) & set(trained)) if trained is not None else None,
            },
            "obs_index": [int(i) for i in obs_index],
        },
        "checks": {
            "teacher": teacher_check,
            "allow_mismatch": cfg.allow_mismatch,
            "include_training_frames": cfg.include_training_frames,
        },
        "labels": labels(teacher_check, training, evaluated),
        "rows": rows,
        "headline": headline(rows),
        "pairs": pairs,
        "engine_check": {
            "max_abs_diff": engine_gap,
            "note": "largest |engine sample - policy.predict_action_chunk(batch, noise=)| over the latency frame, "
            "every model and step count (normalised units)",
        },
        "software": software_versions(),
        "seconds": time.perf_counter() - started,
    }
    if pairs is not None:
        stored = set(pairs["episodes"] if pairs["episodes"] is not None else range(meta.total_episodes))
        report["frames"]["episodes_in_store"] = sorted(set(evaluated) & stored)  # [] when truly held out
    report["next"] = next_step(report)
    return report


def labels(teacher_check: dict[str, Any], training: dict[str, Any], evaluated: Sequence[int]) -> list[str]:
    """Short labels for a report that is not a plain held-out comparison with the student's own teacher
    (shown on the console, in report.md and on the plot)."""
    out = []
    if teacher_check["matches"] is False:
        out.append("TEACHER MISMATCH (--allow-mismatch)")
    if training["episodes"] and set(evaluated) & set(training["episodes"]):
        out.append("TRAINING FRAMES INCLUDED (--include-training-frames)")
    return out
