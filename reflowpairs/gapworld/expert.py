"""The gap world's scripted expert: a closed-loop controller towards one gap, chosen at random per episode."""

from __future__ import annotations

import numpy as np

from reflowpairs.gapworld.env import GAP_CENTER, GAP_HALF, MAX_STEP, WALL_HALF, WALL_Y

APPROACH_Y = (
    WALL_Y - WALL_HALF - 0.07
)  # the expert lines up under its gap at this height, then goes straight up
APPROACH_SPEED = 0.14  # largest move per step along an axis while lining up
CLIMB_SPEED = 0.12  # move per step straight up through the gap


def expert_action(pos: np.ndarray, side: int) -> np.ndarray:
    """The ``(2,)`` float32 position delta at ``pos`` for the gap on ``side`` (-1: left, +1: right).

    Below the wall and not yet under the gap: straight towards the point ``(side * GAP_CENTER, APPROACH_Y)``, the
    delta scaled so that neither axis moves more than ``APPROACH_SPEED``. Under the gap (or above the wall):
    straight up by ``CLIMB_SPEED``. From the start (``x = 0``, ``y`` in ``START_Y``) it lines up in 4 steps and is
    above the wall after 8, within one chunk."""
    target = np.array([side * GAP_CENTER, APPROACH_Y], dtype=np.float32)
    lined_up = abs(pos[0] - target[0]) < 1e-3 and pos[1] >= APPROACH_Y - 1e-3
    through = pos[1] > WALL_Y + WALL_HALF and abs(abs(pos[0]) - GAP_CENTER) <= GAP_HALF
    if lined_up or through:
        return np.array([0.0, CLIMB_SPEED], dtype=np.float32)
    diff = target - pos
    scale = min(1.0, APPROACH_SPEED / max(float(np.max(np.abs(diff))), 1e-9))
    return np.clip(diff * scale, -MAX_STEP, MAX_STEP).astype(np.float32)


def expert_side(rng: np.random.Generator) -> int:
    """The gap the expert takes in one episode: -1 or +1 with equal probability."""
    return -1 if rng.random() < 0.5 else 1
