"""The stage-1 sampling engine, the generic part: the ``Engine`` protocol, call sizing and padding, the shared
``PrefixCachedEngine`` the families' samplers build on, and lerobot's own sampler as an engine (``ExactSampler``).
This module knows no policy family: ``reflowpairs.policies.make_engine`` picks a policy's family (``smolvla.py``,
``pi0.py``, ``pi05.py`` in ``reflowpairs/policies/``) and builds its prefix-cached engine or an ``ExactSampler``.

A family's engine fills the prefix's KV cache once per frame (images, language and, per family, the state), then
runs the ODE for all K noise samples of the frame against that one cache; the result equals
``policy.predict_action_chunk(batch, noise=x0)`` for every sample (up to float rounding).

A batch is sampled in calls of exactly ``frames_per_call`` frames (``resolve_frames_per_call``: as many
as fit in ``tokens_per_call`` suffix tokens, frames x K x chunk_size; on a CPU the denoise step runs
fastest while its activations stay in cache, ~1,024 tokens on the benchmark machine; on an accelerator
the loaded batch). A call short of frames is padded with copies of its last frame, and the language
tokens are padded to the tokenizer's ``max_length``, so every call has the same shapes whatever the
batch, the resume point, the partition or the process count. A frame's X_1 then depends on the
teacher, the frame, its noises and ``frames_per_call`` only: matmul and attention rows do not mix,
so batch-mates cannot change it, and in bfloat16, where the rounding of a matmul depends on its
shapes, this is what keeps resumed and multi-process stores equal to an uninterrupted one.

``ExactSampler`` is the reference instead: the family's ``sample_chunk`` (``policy.predict_action_chunk`` with the
given noise) on each frame repeated K times, lerobot's own code bit for bit, at the price of the prefix K times per
frame and no batching across frames (``--exact``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from reflowpairs.errors import ReflowPairsError
from reflowpairs.solvers import SolverConfig, Velocity, integrate

CPU_TOKENS_PER_CALL = 1024


def default_tokens_per_call(device: torch.device) -> int:
    """Suffix tokens per engine call when none are given: ``CPU_TOKENS_PER_CALL`` on a CPU, no limit (0) elsewhere."""
    return CPU_TOKENS_PER_CALL if device.type == "cpu" else 0


def frames_per_call(frames: int, samples: int, chunk: int, tokens_per_call: int) -> int:
    """How many frames (each with ``samples`` suffixes of ``chunk`` tokens) one call samples: as many as fit in
    ``tokens_per_call`` suffix tokens, at least 1; all ``frames`` when ``tokens_per_call`` is 0 (no limit)."""
    if tokens_per_call <= 0:
        return frames
    return max(1, min(frames, tokens_per_call // (samples * chunk)))


def resolve_frames_per_call(
    tokens_per_call: int | None, batch_size: int, samples: int, chunk: int, device: torch.device
) -> int:
    """The fixed number of frames in every engine call of a run: as many of a ``batch_size`` batch as fit in
    ``tokens_per_call`` suffix tokens (None: the device's default, ``default_tokens_per_call``; 0: no limit)."""
    budget = default_tokens_per_call(device) if tokens_per_call is None else tokens_per_call
    return frames_per_call(batch_size, samples, chunk, budget)


def slice_frames(batch: dict, start: int, stop: int, frames: int) -> dict:
    """Frames ``start:stop`` of a (preprocessed) batch of ``frames``: tensors and lists whose first dimension is the
    frame are sliced, everything else (scalars, per-batch metadata) is passed through."""

    def cut(value):
        sliceable = torch.is_tensor(value) and value.ndim > 0 or isinstance(value, (list, tuple))
        return value[start:stop] if sliceable and len(value) == frames else value

    return {key: cut(value) for key, value in batch.items()}


def pad_frames(batch: dict, frames: int, to: int) -> dict:
    """A (preprocessed) batch of ``frames`` padded to ``to`` frames with copies of its last frame (the copies' outputs
    are dropped): per-frame tensors and lists grow, everything else is passed through."""
    if to <= frames:
        return batch

    def grow(value):
        if torch.is_tensor(value) and value.ndim > 0 and len(value) == frames:
            return torch.cat([value, value[-1:].expand(to - frames, *value.shape[1:])])
        if isinstance(value, (list, tuple)) and len(value) == frames:
            return type(value)([*value, *[value[-1]] * (to - frames)])
        return value

    return {key: grow(value) for key, value in batch.items()}


def repeat_frames(batch: dict, frames: int, repeats: int) -> dict:
    """Each frame of a (preprocessed) batch of ``frames`` repeated ``repeats`` times, frame-major."""

    def rep(value):
        if torch.is_tensor(value) and value.ndim > 0 and len(value) == frames:
            return value.repeat_interleave(repeats, dim=0)
        if isinstance(value, (list, tuple)) and len(value) == frames:
            return type(value)(v for v in value for _ in range(repeats))
        return value

    return {key: rep(value) for key, value in batch.items()}


def pad_language(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Language ``tokens`` and attention ``mask`` ``(B, L)`` right-padded to ``length`` (masked-out token 0), so the
    prefix has the same length whatever the longest task in the batch (lerobot pads to the batch's longest)."""
    extra = length - tokens.shape[1]
    if extra <= 0:
        return tokens, mask
    return F.pad(tokens, (0, extra), value=0), F.pad(mask, (0, extra), value=False)


class Engine(Protocol):
    """Samples X_1 for K noises per frame from a preprocessed batch of B frames."""

    noise_shape: tuple[int, int]
    action_dim: int

    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        """The teacher's velocity v(x_t, t) for each frame repeated ``repeats`` times (frame-major)."""

    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """X_1 ``(B, K, T, action_dim)`` in normalised action space from noise ``(B, K, T, D0)``, in calls of at most
        the engine's ``tokens_per_call`` suffix tokens (one frame per call for an adaptive solver)."""

    def finish(self, x: Tensor) -> Tensor:
        """An ODE end point ``(N, T, D0)`` from ``velocity_field`` -> the normalised action ``(N, T, action_dim)``
        ``predict_action_chunk`` returns for it (the family's cropping and action encoding)."""


class PrefixCachedEngine:
    """What every family's prefix-cached engine shares: ``sample`` in calls of exactly ``frames_per_call`` frames
    (a short call padded with copies of its last frame; one frame per call for an adaptive solver), each call one
    ``velocity_field`` (one prefix fill) and one ODE over all its samples, ended by the family's ``finish``.
    Subclasses set ``policy``, ``frames_per_call`` and ``action_dim`` and define ``velocity_field`` and ``finish``."""

    exact = False
    policy: object
    frames_per_call: int | None
    action_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def velocity_field(self, batch: dict[str, Tensor], repeats: int) -> Velocity:
        raise NotImplementedError

    def finish(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """X_1 ``(B, K, T, action_dim)`` in normalised action space from noise ``(B, K, T, D0)``."""
        frames = noise.shape[0]
        # an adaptive solver's steps depend on all it integrates: one frame (its K samples) per call keeps X_1 a
        # function of the frame and its noises, whatever the batching
        group = 1 if solver.adaptive else self.frames_per_call or frames
        calls = []
        for start in range(0, frames, group):
            stop = min(start + group, frames)
            part = pad_frames(slice_frames(batch, start, stop, frames), stop - start, group)
            part_noise = noise[start:stop]
            if stop - start < group:
                part_noise = torch.cat(
                    [part_noise, part_noise[-1:].expand(group - (stop - start), *noise.shape[1:])]
                )
            calls.append(self._sample_call(part, part_noise, solver)[: stop - start])
        return torch.cat(calls)

    @torch.no_grad()
    def _sample_call(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """``sample`` for frames that go in one call: one prefix fill, one ODE over all their samples."""
        frames, samples = noise.shape[:2]
        velocity = self.velocity_field(batch, samples)
        x0 = noise.reshape(frames * samples, *noise.shape[2:]).to(
            self.device, torch.float32, non_blocking=True
        )
        x1 = self.finish(integrate(velocity, x0, solver))
        return x1.reshape(frames, samples, *x1.shape[1:])


@contextmanager
def sampler_steps(policy, step_field: str, num_steps: int) -> Iterator[None]:
    """The one place reflowpairs changes a built policy's config for lerobot's own sampler: within the block,
    ``predict_action_chunk`` -> ``sample_actions`` integrates with ``num_steps`` Euler steps.

    lerobot 0.6's ``sample_actions`` reads the step count from the config field ``step_field`` (the family's: SmolVLA's
    ``num_steps``, pi0/pi05's ``num_inference_steps``), so calling lerobot's sampler at another count means setting
    the config. Only the callers that must run lerobot's own code use this (``ExactSampler``, eval's latency of
    lerobot's call path, through ``reflowpairs.policies.lerobot_sampling_steps``); the engines' own sampling
    (``velocity_field`` + ``solvers.integrate``) takes the count as an argument (``SolverConfig.num_steps``) and never
    touches the config. The config's value is restored and the policy's action queue reset (``policy.reset()``) on
    leaving the block, also on error."""
    saved = getattr(policy.config, step_field)
    setattr(policy.config, step_field, num_steps)
    try:
        yield
    finally:
        setattr(policy.config, step_field, saved)
        policy.reset()


class ChunkSampler(Protocol):
    """What ``ExactSampler`` needs of a policy family (``reflowpairs.policies.interface.PolicyFamily`` has it)."""

    step_field: str

    def pair_shapes(self, config) -> tuple[tuple[int, int], tuple[int, int]]: ...

    def sample_chunk(self, policy, batch: dict[str, Tensor], noise: Tensor) -> Tensor: ...

    def frame_batch(self, batch: dict) -> dict: ...


class ExactSampler:
    """lerobot's own sampler as the engine: for each frame, the family's ``sample_chunk`` (the policy's
    ``predict_action_chunk`` with its noise draw replaced) on the frame repeated K times with its K noises, so X_1 is
    that call's output bit for bit. Euler only (it is lerobot's sampler). Costs the prefix K times per frame and gives
    up batching across frames."""

    exact = True

    def __init__(self, policy, family: ChunkSampler, frames_per_call: int | None = None):
        self.policy = policy
        self.family = family
        self.frames_per_call = 1
        self.noise_shape, (_, self.action_dim) = family.pair_shapes(policy.config)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    @torch.no_grad()
    def sample(self, batch: dict[str, Tensor], noise: Tensor, solver: SolverConfig) -> Tensor:
        """X_1 ``(B, K, T, action_dim)`` from noise ``(B, K, T, D0)``, one ``sample_chunk`` call per frame."""
        if solver.name != "euler":
            raise ReflowPairsError(
                f"The exact sampler is lerobot's own Euler sampler; it cannot run the {solver.name} solver.",
                "Unset `exact`, or set `solver` to euler.",
            )
        frames, samples = noise.shape[:2]
        batch = self.family.frame_batch(batch)
        out = []
        with sampler_steps(self.policy, self.family.step_field, solver.num_steps):
            for f in range(frames):
                frame = repeat_frames(slice_frames(batch, f, f + 1, frames), 1, samples)
                self.policy.reset()
                noise_f = noise[f].to(self.device, torch.float32)
                out.append(self.family.sample_chunk(self.policy, frame, noise_f))
        return torch.stack(out)
