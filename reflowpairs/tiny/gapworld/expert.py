"""The gap world's scripted expert: a closed-loop controller towards one gap, chosen at random per episode."""

from __future__ import annotations

import numpy as np

from reflowpairs.tiny.gapworld.env import GAP_CENTER, MAX_STEP, WALL_HALF, WALL_Y

SIDESTEP_RISE = 0.05  # upward part of the side-step
CLIMB_SPEED = 0.13  # move per step straight up through the gap


def expert_action(pos: np.ndarray, side: int) -> np.ndarray:
    """The ``(2,)`` float32 position delta at ``pos`` for the gap on ``side`` (-1: left, +1: right).

    Below the wall and not under the gap: one side-step to the gap's column (``x = side * GAP_CENTER``, rising by
    ``SIDESTEP_RISE``). Under the gap or above the wall: straight up by ``CLIMB_SPEED``. From the start (``x = 0``,
    ``y`` in ``START_Y``) the first action alone carries the choice (the chunk's other actions are the same for both
    gaps), and the agent is above the wall after 8 steps: within one chunk."""
    gap_x = side * GAP_CENTER
    if pos[1] < WALL_Y - WALL_HALF and abs(pos[0] - gap_x) > 1e-3:
        dx = float(np.clip(gap_x - pos[0], -MAX_STEP, MAX_STEP))
        return np.array([dx, SIDESTEP_RISE], dtype=np.float32)
    return np.array([0.0, CLIMB_SPEED], dtype=np.float32)


def expert_side(rng: np.random.Generator) -> int:
    """The gap the expert takes in one episode: -1 or +1 with equal probability."""
    return -1 if rng.random() < 0.5 else 1
