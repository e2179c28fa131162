"""Sampling the two models through ``reflowpairs.engine`` and accumulating their errors on the held-out frames.

The prefix (images, language, state) is computed once per frame and shared by every sample and step count; each
model's samples are mapped into the teacher's normalised action space (``ModelUnderEval.in_teacher_space``) and into
dataset units (through the checkpoint's own postprocessor). Shapes: B frames, K samples per frame, T = chunk_size,
D0 = max_action_dim (the noise), A = action dimension (the output, cropped from D0)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reflowpairs.eval.config import MODELS, EvalConfig
from reflowpairs.eval.metrics import ErrorSums, integrate_recording, straightness
from reflowpairs.noise import batch_noise
from reflowpairs.policies import make_engine
from reflowpairs.progress import PhaseProgress


class ModelUnderEval:
    """One checkpoint under evaluation: policy, processors, engine, and the map into the teacher's
    normalised action space (identity when both unnormalise actions identically)."""

    def __init__(self, name: str, loaded, teacher_normalizer=None):
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


def action_normalizer(preprocessor) -> Callable[[Tensor], Tensor]:
    """Dataset-unit action ``(N, T, A)`` -> the checkpoint's normalised space, with its own normaliser step."""
    # lerobot lazily: importing it takes seconds
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
class RowAccumulator:
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


def sample_every_step_count(
    model: ModelUnderEval, raw_batch, x0: Tensor, repeats: int, step_counts: Sequence[int]
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


def measure_held_out(
    teacher: ModelUnderEval,
    student: ModelUnderEval,
    dataset,
    positions: np.ndarray,
    steps: list[int],
    ref_steps: int,
    cfg: EvalConfig,
    progress: PhaseProgress | None,
) -> tuple[dict[tuple[str, int], RowAccumulator], dict[str, Any]]:
    """Errors and straightness on the held-out frames, per (model, step count). Also returns the first
    frame (raw batch of 1, its first noise ``(1, T, D0)``, and each model's engine output for it) for
    the latency and engine-vs-lerobot check."""
    k = cfg.samples_per_frame
    acc = {(m, n): RowAccumulator() for m in MODELS for n in steps}
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
            "teacher": sample_every_step_count(teacher, raw, x0, k, sorted(set(steps) | {ref_steps})),
            "student": sample_every_step_count(student, raw, x0, k, steps),
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
