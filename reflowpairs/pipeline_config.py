"""The settings of ``reflowpairs pipeline`` (``PipelineConfig``) and the names of what it writes, apart from the
pipeline itself so that the command line reads them without importing the stages (torch, lerobot)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PIPELINE_STATE = "pipeline_state.json"
STATE_VERSION = 1
STUDENT = Path("checkpoints") / "last" / "pretrained_model"  # a training run's latest student, below its out


@dataclass
class PipelineConfig:
    """Settings of ``reflowpairs pipeline`` (the stages' own settings keep their commands' defaults)."""

    teacher: str
    dataset: str
    out: Path
    dataset_root: Path | None = None
    episodes: list[int] | None = (
        None  # pairs are made on these; eval scores the others (None: all / eval's choice)
    )
    rounds: int = 2
    distill: bool = False  # a last stage that fits the 1-step map on round R's pairs
    samples_per_frame: int = 4  # K noises per frame in every round's store
    num_steps: int | None = None  # each round's teacher ODE steps (None: the teacher config's)
    train_steps: int = 2000  # per round
    distill_steps: int | None = None  # None: train_steps
    batch_size: int | None = None  # train's (None: its default)
    lr: float | None = None  # train's (None: the policy preset's)
    loss: str = "pseudo-huber"  # train's loss (mse or pseudo-huber): pseudo-huber measured best (README)
    spot_check: int = 16  # pairs re-sampled by each round's validate
    eval_num_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    eval_episodes: list[int] | None = None  # None: the episodes the store does not cover
    eval_max_frames: int = 64
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0  # train's data loader workers
    # closed loop (None: none): every student at eval_num_steps and the teacher at 1 step and its full count, in
    # this lerobot env type with these --env.FIELD options, env_episodes each (reflowpairs.eval.closed_loop)
    env_type: str | None = None
    env_options: dict[str, str] = field(default_factory=dict)
    env_episodes: int = 50
    env_batch_size: int = 10
    env_use_async_envs: bool = False
    threads: int | str | None = (
        None  # generate's and train's `threads` (None: keep the caller's torch setting)
    )
    # a local tokenizer directory every checkpoint's preprocessor uses (``teacher.load_policy``'s ``tokenizer``):
    # passed to every stage and written into every stage's options file
    tokenizer: str | None = None
