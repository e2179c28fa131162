"""lerobot env plugin for reflowpairs' gap world.

lerobot's ``register_third_party_plugins`` imports every installed distribution named ``lerobot_env_*`` by that
name; importing this module registers the ``gapworld`` ``EnvConfig`` (``--env.type=gapworld``) and the gym id.
"""

import gym_gapworld  # noqa: F401 - registers gym_gapworld/GapWorld-v0

from reflowpairs.tiny.gapworld.config import GapWorldEnvConfig

__all__ = ["GapWorldEnvConfig"]
