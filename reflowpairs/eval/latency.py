"""Latency of one action chunk through each policy's own call path (its family's ``sample_chunk``: lerobot's
``predict_action_chunk(batch, noise=)`` for SmolVLA and pi), with the step count set on its config; timed calls of
every (model, step count) interleaved, so a slow spell of a shared machine spreads over all rows."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from reflowpairs.eval.sampling import ModelUnderEval
from reflowpairs.policies import family, lerobot_sampling_steps
from reflowpairs.progress import PhaseProgress


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_the_action(key: str) -> bool:
    """The dataset's action and its padding mask (``action``, ``action.*``, ``action_is_pad``), not a model input that
    merely starts with the word (EO-1's ``action_token_id``)."""
    return key == "action" or key.startswith("action.") or key == "action_is_pad"


def plain_chunk_call(
    model: ModelUnderEval, batch: dict[str, Any], noise: Tensor, num_steps: int
) -> tuple[float, Tensor]:
    """Seconds for one ``policy.predict_action_chunk(batch, noise=noise)`` at ``num_steps`` (through the family's
    ``sample_chunk``), and its action."""
    device = model.engine.device
    sample_chunk = family(model.policy.config.type).sample_chunk
    with lerobot_sampling_steps(model.policy, num_steps):  # lerobot's sampler reads the step field only
        model.policy.reset()
        _synchronize(device)
        start = time.perf_counter()
        action = sample_chunk(model.policy, dict(batch), noise.clone())
        _synchronize(device)
        return time.perf_counter() - start, action


def measure_latencies(
    models: dict[str, ModelUnderEval],
    raw_frame: dict[str, Any],
    noise: Tensor,
    steps: Sequence[int],
    repeats: int,
    progress: PhaseProgress | None = None,
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
        # the whole model batch but the action: a family's inputs need not be named observation.* (EO-1's
        # input_ids, pixel_values, ...)
        batches[name] = {k: v for k, v in batch.items() if not _is_the_action(k)}
    noise = {name: noise.to(model.engine.device) for name, model in models.items()}
    total, done = len(todo) * (repeats + 1), 0
    warm: dict[tuple[str, int], Tensor] = {}
    times: dict[tuple[str, int], list[float]] = {key: [] for key in todo}
    for round_ in range(repeats + 1):
        for name, n in todo:
            seconds, action = plain_chunk_call(models[name], batches[name], noise[name], n)
            if round_ == 0:
                warm[(name, n)] = action.float().cpu()
            else:
                times[(name, n)].append(1000.0 * seconds)
            done += 1
            if progress is not None:
                progress("latency", done, total)
    return times, warm
