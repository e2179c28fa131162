"""The bundled closed-loop world (``reflowpairs.tiny.gapworld``, ``--env.type=gapworld``): a gymnasium env in lerobot's
conventions, registered as a lerobot env plugin, whose scripted expert is bimodal where the observation cannot
settle the choice, and whose average of the two modes crashes."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from reflowpairs.tiny.gapworld.config import GYM_ID, GapWorldEnvConfig, register_gym_env
from reflowpairs.tiny.gapworld.env import CHUNK, EPISODE_LENGTH, GapWorldEnv, hits_wall
from reflowpairs.tiny.gapworld.expert import expert_action
from reflowpairs.tiny.gapworld.record import expert_episode

from .helpers import cli, run_child


def _expert_rollout(seed: int, side: int) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    env = GapWorldEnv()
    obs, _ = env.reset(seed=seed)
    images, positions, info = [obs["pixels"]], [obs["agent_pos"]], {}
    for _ in range(EPISODE_LENGTH):
        obs, _, terminated, _, info = env.step(expert_action(obs["agent_pos"], side))
        images.append(obs["pixels"])
        positions.append(obs["agent_pos"])
        if terminated:
            break
    return images, positions, bool(info["is_success"])


def test_env_passes_gymnasiums_checker_directly_and_through_its_gym_id():
    check_env(GapWorldEnv(), skip_render_check=False)
    register_gym_env()
    env = gym.make(GYM_ID, disable_env_checker=True)
    check_env(env.unwrapped)
    assert env.spec.max_episode_steps == EPISODE_LENGTH
    frame = env.unwrapped.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3


def test_same_seed_gives_the_same_episode_and_another_seed_another():
    first = _expert_rollout(seed=7, side=1)
    again = _expert_rollout(seed=7, side=1)
    other = _expert_rollout(seed=8, side=1)
    assert len(first[0]) == len(again[0])
    assert all(np.array_equal(a, b) for a, b in zip(first[0], again[0], strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first[1], again[1], strict=True))
    assert not np.array_equal(first[1][0], other[1][0])


def test_scripted_expert_succeeds_in_at_least_99_percent_of_200_episodes_within_one_chunk():
    env = GapWorldEnv()
    results = [expert_episode(env, seed, np.random.default_rng([0, seed])) for seed in range(200)]
    assert sum(success for _, success in results) >= 198
    assert (
        max(len(frames) for frames, _ in results) <= CHUNK
    )  # the first chunk commits to a gap and passes it
    sides = {int(np.sign(frames[-1]["observation.state"][0])) for frames, _ in results}
    assert sides == {-1, 1}  # both gaps are used


def test_start_does_not_settle_the_gap_and_the_average_of_the_two_modes_crashes():
    env = GapWorldEnv()
    obs, _ = env.reset(seed=3)
    assert obs["agent_pos"][0] == 0.0
    image = obs["pixels"].astype(int)
    assert np.abs(image - image[:, ::-1]).max() <= 1  # the picture is mirror-symmetric: no side is hinted
    left, right = _expert_rollout(3, -1), _expert_rollout(3, 1)
    assert left[2] and right[2]
    # the mean of the two experts' action chunks from the same start, run whole, hits the wall
    pos = obs["agent_pos"].astype(np.float32)
    crashed = False
    for t in range(CHUNK):
        mean = 0.5 * (np.diff(left[1], axis=0)[t] + np.diff(right[1], axis=0)[t])
        crashed = hits_wall(pos, pos + mean)
        if crashed:
            break
        pos = pos + mean
    assert crashed


@pytest.mark.slow
def test_lerobot_knows_the_env_type_through_the_plugin_distribution():
    from lerobot.envs.configs import EnvConfig
    from lerobot.utils.import_utils import register_third_party_plugins

    assert importlib.metadata.distribution("lerobot_env_gapworld").metadata["Name"] == "lerobot_env_gapworld"
    register_third_party_plugins()
    cfg = EnvConfig.get_choice_class("gapworld")()
    assert isinstance(cfg, GapWorldEnvConfig) and cfg.gym_id == GYM_ID
    envs = cfg.create_envs(n_envs=2, use_async_envs=True)  # lerobot-eval's default: forkserver workers
    vec = envs["gapworld"][0]
    assert isinstance(vec, gym.vector.AsyncVectorEnv)
    obs, _ = vec.reset(seed=[0, 1])
    assert obs["pixels"].shape == (2, *cfg.features["pixels"].shape)
    assert obs["agent_pos"].shape == (2, 2)
    assert vec.call("_max_episode_steps")[0] == cfg.episode_length
    vec.close()


def test_tiny_world_rejects_an_unknown_world(tmp_path):
    result = cli("tiny-world", str(tmp_path / "w"), "--world", "maze", exit_code=1)
    assert "--world 'maze'" in result.output and "--world gap" in result.output


@pytest.mark.slow
def test_tiny_world_gap_builds_a_teacher_that_lerobot_eval_runs_in_a_subprocess(tmp_path):
    cli("tiny-world", str(tmp_path / "gap"), "--world", "gap", "--train-steps", "4")
    teacher = tmp_path / "gap" / "teacher"
    config = json.loads((teacher / "config.json").read_text())
    assert config["chunk_size"] == config["n_action_steps"] == CHUNK
    assert set(config["input_features"]) == {"observation.image", "observation.state"}
    lerobot_eval = shutil.which("lerobot-eval", path=str(Path(sys.executable).parent))
    assert lerobot_eval is not None
    out = tmp_path / "eval"
    done = run_child(
        [
            lerobot_eval,
            f"--policy.path={teacher}",
            "--env.type=gapworld",
            "--eval.n_episodes=2",
            "--eval.batch_size=2",
            "--policy.device=cpu",
            f"--output_dir={out}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    info = json.loads((out / "eval_info.json").read_text())
    assert "pc_success" in json.dumps(info)
