"""The open-loop measures, as pure functions: error sums (MSE, L1, masked), the straightness of a sampled Euler path,
the recording integrator it needs, even frame picks and ratios.

Conventions are lerobot's: t=1 is noise, t=0 the action, the velocity ``v = dx/dt`` points from action to noise and
Euler steps ``x <- x - v / n``. Shapes: N samples, T = chunk_size, D0 = max_action_dim, A = action dimension."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from reflowpairs.solvers import SolverConfig, integrate


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
