"""The gap world: a point agent must pass a wall through one of two gaps (a gymnasium env in lerobot's conventions).

Coordinates are in ``[-1, 1]^2`` with ``y`` up. The agent starts at ``x = 0`` (exactly between the two gaps: the start
holds no hint of a side) at a seeded height below a horizontal wall at ``y = 0``; the wall has two gaps, centred at
``x = -GAP_CENTER`` and ``x = +GAP_CENTER``. An episode succeeds when the agent is above the wall
(``y >= SUCCESS_Y``) and fails if the agent touches the wall (the episode then ends) or runs out of steps.

Both gaps are equally good: the scripted expert (``reflowpairs.tiny.gapworld.expert``) picks one at random per episode, so
at the start the action chunk given the observation is bimodal, and the average of the two modes (straight up)
hits the solid middle of the wall. A whole chunk of ``CHUNK`` actions reaches past the wall, so the first chunk
commits to a side: a flow-matching policy sampled in 1 step (which gives about the mean of the modes) crashes.

Observation (``obs_type="pixels_agent_pos"``, as gym-pusht names it): ``pixels`` a ``(IMAGE, IMAGE, 3)`` uint8
top-down picture, ``agent_pos`` the ``(2,)`` float32 position. Action: a ``(2,)`` position delta, clipped to
``[-MAX_STEP, MAX_STEP]`` per axis. Reward: 1 on the success step, else 0. ``info["is_success"]`` on every step.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

IMAGE = 32  # camera resolution (H = W)
RENDER_SCALE = 4  # ``render()`` gives the camera picture scaled up by this (128 x 128)
TASK = "pass the wall through a gap"
WALL_Y = 0.0  # wall centre line
WALL_HALF = 0.06  # half thickness of the wall
GAP_CENTER = 0.55  # the gaps are centred at x = -GAP_CENTER and x = +GAP_CENTER
GAP_HALF = 0.22  # half width of each gap: the solid middle is |x| < GAP_CENTER - GAP_HALF = 0.33
START_Y = (-0.6, -0.5)  # the start height is drawn uniformly from this range; the start x is always 0
SUCCESS_Y = 0.3  # above the wall by this much: success
MAX_STEP = 0.6  # largest move per step along each axis (a side-step from the start reaches either gap)
EPISODE_LENGTH = 24  # default step limit (three chunks of 8)
CHUNK = 8  # actions per chunk the world is built for: one chunk from the start reaches past the wall


def in_gap(x: np.ndarray | float) -> np.ndarray:
    """Whether ``x`` lies within one of the two gaps."""
    return np.abs(np.abs(np.asarray(x)) - GAP_CENTER) <= GAP_HALF


def hits_wall(start: np.ndarray, end: np.ndarray, samples: int = 25) -> bool:
    """Whether the straight move from ``start`` to ``end`` (each ``(2,)``) touches the wall outside the gaps."""
    t = np.linspace(0.0, 1.0, samples)[:, None]
    points = start[None, :] + t * (end - start)[None, :]
    in_band = np.abs(points[:, 1] - WALL_Y) <= WALL_HALF
    return bool(np.any(in_band & ~in_gap(points[:, 0])))


def _background() -> np.ndarray:
    """The static part of the picture: dark floor, grey wall with its two gaps, a green goal band at the top."""
    grid = np.linspace(-1.0, 1.0, IMAGE, dtype=np.float32)
    ys = grid[::-1][:, None]  # row 0 is the top (y = +1)
    xs = grid[None, :]
    img = np.full((IMAGE, IMAGE, 3), 20, dtype=np.uint8)
    wall = (np.abs(ys - WALL_Y) <= WALL_HALF + 1.0 / IMAGE) & ~in_gap(xs)
    img[np.broadcast_to(wall, (IMAGE, IMAGE))] = (140, 140, 140)
    goal = np.broadcast_to(ys >= SUCCESS_Y + 0.4, (IMAGE, IMAGE))
    img[goal] = (20, 70, 20)
    return img


_BACKGROUND = _background()


def render_frame(pos: np.ndarray) -> np.ndarray:
    """The ``(IMAGE, IMAGE, 3)`` uint8 picture with the agent (a soft red-yellow blob) at ``pos``."""
    grid = np.linspace(-1.0, 1.0, IMAGE, dtype=np.float32)
    ys = grid[::-1][:, None]
    xs = grid[None, :]
    blob = np.exp(-((xs - pos[0]) ** 2 + (ys - pos[1]) ** 2) / 0.006)[..., None]
    colour = np.array([255.0, 200.0, 40.0], dtype=np.float32)
    img = _BACKGROUND.astype(np.float32) * (1.0 - blob) + colour * blob
    return np.clip(img, 0, 255).astype(np.uint8)


class GapWorldEnv(gym.Env):
    """Pass the wall through one of two gaps. See the module docstring for the geometry and conventions."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        obs_type: str = "pixels_agent_pos",
        render_mode: str | None = "rgb_array",
        max_episode_steps: int = EPISODE_LENGTH,
    ):
        if obs_type != "pixels_agent_pos":
            raise ValueError(f"GapWorld supports obs_type='pixels_agent_pos' only, not {obs_type!r}.")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"GapWorld renders 'rgb_array' only, not {render_mode!r}.")
        self.obs_type = obs_type
        self.render_mode = render_mode
        self._max_episode_steps = max_episode_steps  # lerobot's rollout reads it through env.call
        self.task = TASK
        self.task_description = TASK
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Box(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8),
                "agent_pos": spaces.Box(-1.0, 1.0, (2,), dtype=np.float32),
            }
        )
        self.action_space = spaces.Box(-MAX_STEP, MAX_STEP, (2,), dtype=np.float32)
        self._pos = np.zeros(2, dtype=np.float32)

    def _obs(self) -> dict[str, np.ndarray]:
        return {"pixels": render_frame(self._pos), "agent_pos": self._pos.copy()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        y0 = self.np_random.uniform(*START_Y)
        self._pos = np.array([0.0, y0], dtype=np.float32)
        return self._obs(), {"is_success": False}

    def step(self, action):
        delta = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -MAX_STEP, MAX_STEP)
        end = np.clip(self._pos + delta, -1.0, 1.0).astype(np.float32)
        crashed = hits_wall(self._pos, end)
        if not crashed:
            self._pos = end
        success = bool(not crashed and self._pos[1] >= SUCCESS_Y)
        info: dict[str, Any] = {"is_success": success, "crashed": crashed}
        return self._obs(), float(success), success or crashed, False, info

    def render(self) -> np.ndarray:
        """The camera picture scaled up by ``RENDER_SCALE`` (rgb, uint8)."""
        frame = render_frame(self._pos)
        return np.repeat(np.repeat(frame, RENDER_SCALE, axis=0), RENDER_SCALE, axis=1)
