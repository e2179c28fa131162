"""Record the scripted expert's gap-world rollouts into a LeRobotDataset v3 (``LeRobotDataset.create``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reflowpairs.tiny.gapworld.env import EPISODE_LENGTH, IMAGE, GapWorldEnv
from reflowpairs.tiny.gapworld.expert import expert_action, expert_side

GAP_REPO_ID = "reflowpairs/tiny_gap"


@dataclass(frozen=True)
class GapDatasetSpec:
    """``num_episodes`` expert episodes; episode ``i`` resets the env with seed ``seed + i`` and draws its gap from
    ``np.random.default_rng([seed, i])``."""

    num_episodes: int = 100
    seed: int = 0
    fps: int = 10


def gap_features() -> dict:
    """The gap dataset's features in ``LeRobotDataset.create`` form: the keys lerobot's rollout gives the policy
    (``pixels`` -> ``observation.image``, ``agent_pos`` -> ``observation.state``) and the 2-D delta ``action``."""
    return {
        "observation.image": {
            "dtype": "image",
            "shape": (IMAGE, IMAGE, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["dx", "dy"]},
    }


def expert_episode(env: GapWorldEnv, seed: int, rng: np.random.Generator) -> tuple[list[dict], bool]:
    """One expert rollout: its frames (observation, action, task) and whether it succeeded."""
    obs, _ = env.reset(seed=seed)
    side = expert_side(rng)
    frames, info = [], {"is_success": False}
    for _ in range(EPISODE_LENGTH):
        action = expert_action(obs["agent_pos"], side)
        frames.append(
            {
                "observation.image": obs["pixels"],
                "observation.state": obs["agent_pos"].astype(np.float32),
                "action": action,
                "task": env.task,
            }
        )
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return frames, bool(info["is_success"])


def record_gap_dataset(root: str | Path, repo_id: str = GAP_REPO_ID, spec: GapDatasetSpec = GapDatasetSpec()):
    """Write the expert's successful episodes (images as PNG frames, no video) to ``root`` and return the dataset."""
    # lazy: the datasets stack is heavy
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()
    dataset = LeRobotDataset.create(
        repo_id=repo_id, fps=spec.fps, root=root, features=gap_features(), use_videos=False
    )
    env = GapWorldEnv()
    for episode in range(spec.num_episodes):
        frames, success = expert_episode(
            env, spec.seed + episode, np.random.default_rng([spec.seed, episode])
        )
        if not success:
            continue
        for frame in frames:
            dataset.add_frame(frame)
        dataset.save_episode()
    env.close()
    dataset.finalize()
    return LeRobotDataset(repo_id, root=root)
