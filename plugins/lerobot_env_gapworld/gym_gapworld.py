"""Registers ``gym_gapworld/GapWorld-v0`` with gymnasium (lerobot's ``create_envs`` imports ``gym_<type>``)."""

from reflowpairs.tiny.gapworld.config import register_gym_env

register_gym_env()
