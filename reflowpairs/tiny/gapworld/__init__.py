"""The bundled closed-loop world (issue #24): pass a wall through one of two gaps.

- ``env``: the gymnasium environment and its rendering (``GapWorldEnv``);
- ``config``: lerobot's ``EnvConfig`` for it (``--env.type=gapworld``, gym id ``gym_gapworld/GapWorld-v0``);
- ``expert``: the scripted expert, which picks a gap at random per episode;
- ``record``: expert rollouts into a LeRobotDataset v3 (``reflowpairs/tiny_gap``);
- ``teacher``: ``build_gap_world``, the dataset plus a SmolVLA teacher trained on it with lerobot's loss.

Submodules are imported on demand (``config`` imports lerobot's env configs).
"""
