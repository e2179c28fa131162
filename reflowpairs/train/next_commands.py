"""The commands that use a finished run's student."""

from __future__ import annotations

import json
from pathlib import Path

from reflowpairs.checkpoint import last_link, pretrained_dir
from reflowpairs.dataset import episodes_text
from reflowpairs.next_steps import lerobot_command, reflowpairs_command
from reflowpairs.train.config import TrainResult


def teacher_env_type(init_source: str) -> str | None:
    """The ``env.type`` a lerobot-train teacher was trained for (its ``train_config.json``), if it is local and says."""
    path = Path(init_source) / "train_config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8")) if path.is_file() else None
    except (
        OSError,
        ValueError,
        RecursionError,
    ):  # unreadable, not UTF-8, not JSON: no environment to suggest
        return None
    env = config.get("env") if isinstance(config, dict) else None
    return env.get("type") if isinstance(env, dict) else None


def next_commands(result: TrainResult) -> dict[str, str]:
    """The commands that use a finished run's student (``OUT/checkpoints/last/pretrained_model``):
    ``lerobot_eval`` (lerobot's own evaluation, at the saved ``num_steps``; ``--env.type`` is the teacher's
    lerobot-train environment when its ``train_config.json`` names one, else ``...`` for the user to fill in) and
    ``reflowpairs_eval`` (teacher vs student at each step count, on the episodes the store holds no pairs of)."""
    student = pretrained_dir(last_link(result.out))
    env_type = teacher_env_type(result.init_source) or "..."
    held_out = episodes_text(result.held_out_episodes) if result.held_out_episodes else None
    ours = reflowpairs_command(
        "eval",
        student=student,
        teacher=result.init_source,
        dataset=result.dataset_repo_id or None,
        dataset_root=result.dataset_root,
        episodes=held_out,
        pairs=result.pairs,
        out=Path(result.out) / "eval",
    )
    lerobot = lerobot_command("lerobot-eval", **{"policy.path": student, "env.type": env_type})
    return {"lerobot_eval": lerobot, "reflowpairs_eval": ours}
