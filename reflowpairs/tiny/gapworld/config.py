"""lerobot's ``EnvConfig`` for the gap world: ``--env.type=gapworld``.

Importing this module registers the config with lerobot. The ``lerobot_env_gapworld`` plugin distribution
(``plugins/lerobot_env_gapworld``) imports it, so that lerobot's ``register_third_party_plugins`` makes
``lerobot-eval --env.type=gapworld`` work; its ``gym_gapworld`` module registers the gym id
``gym_gapworld/GapWorld-v0`` that lerobot's default ``create_envs`` makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium as gym
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGE, OBS_STATE

from reflowpairs.tiny.gapworld.env import EPISODE_LENGTH, IMAGE

ENV_TYPE = "gapworld"
GYM_TASK = "GapWorld-v0"
GYM_ID = f"gym_{ENV_TYPE}/{GYM_TASK}"


@EnvConfig.register_subclass(ENV_TYPE)
@dataclass
class GapWorldEnvConfig(EnvConfig):
    """The gap world for ``lerobot-eval``: camera ``pixels`` -> ``observation.image``, ``agent_pos`` ->
    ``observation.state``, a 2-D position-delta action, ``episode_length`` steps at most."""

    task: str | None = GYM_TASK
    fps: int = 10
    episode_length: int = EPISODE_LENGTH
    obs_type: str = "pixels_agent_pos"
    render_mode: str = "rgb_array"
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(2,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(2,)),
            "pixels": PolicyFeature(type=FeatureType.VISUAL, shape=(IMAGE, IMAGE, 3)),
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {ACTION: ACTION, "agent_pos": OBS_STATE, "pixels": OBS_IMAGE}
    )

    @property
    def gym_kwargs(self) -> dict:
        return {
            "obs_type": self.obs_type,
            "render_mode": self.render_mode,
            "max_episode_steps": self.episode_length,
        }


def register_gym_env() -> None:
    """Register ``gym_gapworld/GapWorld-v0`` with gymnasium (once)."""
    if GYM_ID not in gym.registry:
        gym.register(
            id=GYM_ID,
            entry_point="reflowpairs.tiny.gapworld.env:GapWorldEnv",
            max_episode_steps=EPISODE_LENGTH,
        )


# Registered on import too: lerobot's AsyncVectorEnv workers (forkserver) unpickle ``GapWorldEnvConfig`` (so import
# this module) and then ``gym.make`` the id, without importing ``gym_gapworld``.
register_gym_env()
