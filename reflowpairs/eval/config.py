"""The settings of ``reflowpairs eval``: open loop (``EvalConfig``) and closed loop (``ClosedLoopConfig``), and the
checks on them that need nothing loaded. Imports neither torch nor lerobot: the CLI builds these at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reflowpairs.errors import ReflowPairsError

MODELS = ("teacher", "student")
"""The two models of an open-loop evaluation, in report-row order."""

TEACHER = "teacher"
"""The closed-loop label of the teacher (no student may take it)."""


@dataclass
class EvalConfig:
    """Settings of ``reflowpairs eval`` (see ``docs/eval.md``)."""

    student: str
    teacher: str
    dataset: str
    out: Path
    num_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 10])
    dataset_root: Path | None = None
    episodes: list[int] | None = None  # None: the episodes the student did not train on (all when unknown)
    pairs: Path | None = None  # a pair store the student trained on: also report its error there
    max_frames: int = 64  # frames evaluated (evenly spaced over the episodes), and store frames with --pairs
    samples_per_frame: int = 4  # K noises per frame
    seed: int = 1  # X_0 seed; generate's default is 0, so eval noises are fresh even on training frames
    device: str = "auto"
    latency_repeats: int = 5  # timed calls per latency figure (median reported)
    batch_size: int = 8  # frames per engine call
    allow_mismatch: bool = False  # evaluate against a teacher the student was not trained from (labelled)
    include_training_frames: bool = False  # evaluate on episodes the student trained on (labelled)
    # a local tokenizer directory every checkpoint's preprocessor uses (``teacher.load_policy``'s ``tokenizer``);
    # None: the REFLOWPAIRS_TOKENIZER environment variable, else the one each checkpoint names
    tokenizer: str | None = None


def parse_num_steps(text: str, setting: str = "num_steps") -> list[int]:
    """``"1,2,4,10"`` -> ``[1, 2, 4, 10]`` (sorted, unique); anything but positive integers is refused, naming
    ``setting`` (the config field the text came from)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ReflowPairsError(
            f"`{setting}` is empty.",
            f"Set `{setting}` to a comma-separated list of step counts, e.g. 1,2,4,10.",
        )
    bad = [p for p in parts if not p.isdigit() or int(p) < 1]
    if bad:
        raise ReflowPairsError(
            f"`{setting}` {text!r} has entries that are not positive whole numbers: "
            f"{', '.join(repr(b) for b in bad)}.",
            f"Set `{setting}` to step counts of at least 1, e.g. 1,2,4,10.",
        )
    return sorted({int(p) for p in parts})


def check_config(cfg: EvalConfig) -> list[int]:
    """Refuse bad settings before anything is loaded; returns the sorted, unique step counts."""
    steps = sorted(set(cfg.num_steps))
    if not steps or any(not isinstance(n, int) or n < 1 for n in steps):
        raise ReflowPairsError(
            f"`num_steps` must be positive whole numbers, got {cfg.num_steps}.",
            "Set `num_steps` to e.g. 1,2,4,10.",
        )
    for name, value in (
        ("`samples_per_frame`", cfg.samples_per_frame),
        ("`max_frames`", cfg.max_frames),
        ("`latency_repeats`", cfg.latency_repeats),
        ("`batch_size`", cfg.batch_size),
    ):
        if value < 1:
            raise ReflowPairsError(f"{name} must be at least 1, got {value}.", f"Set {name} to 1 or more.")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(
            f"`out` {out} exists and is not a directory.", "Set `out` to a directory for the report files."
        )
    return steps


@dataclass
class ClosedLoopConfig:
    """What ``evaluate_closed_loop`` runs.

    ``env_type``: any type in lerobot's ``EnvConfig`` registry (``pusht``, ``aloha``, ``libero``, ``metaworld``,
    the bundled ``gapworld``, installed ``lerobot_env_*`` plugins); ``env_options``: its fields as lerobot-eval's
    ``--env.<field>=VALUE`` would set them, ``{"episode_length": "20"}`` (text, parsed by draccus into the field's
    type). ``teacher``: its checkpoint; ``students``: label -> checkpoint (labels are file names: letters, digits,
    ``-_.``). ``num_steps``: the step counts every student runs at; ``teacher_num_steps``: the teacher's (None:
    ``num_steps`` and its own full step count, from its config; the full step count is always added, it is the
    reference). ``n_episodes``: episodes per cell (per task of a multi-task env), seeds ``seed``, ``seed + 1``, ...
    ``batch_size``/``use_async_envs``: lerobot-eval's ``--eval.batch_size``/``--eval.use_async_envs`` (parallel envs;
    the batch is capped at ``n_episodes``).
    """

    env_type: str
    teacher: str
    out: Path
    students: dict[str, str] = field(default_factory=dict)
    num_steps: tuple[int, ...] = (1, 2, 10)
    teacher_num_steps: tuple[int, ...] | None = None
    env_options: dict[str, str] = field(default_factory=dict)
    n_episodes: int = 50
    seed: int = 1000
    batch_size: int = 10
    use_async_envs: bool = False
    device: str = "auto"
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.num_steps = tuple(int(n) for n in self.num_steps)
        if self.teacher_num_steps is not None:
            self.teacher_num_steps = tuple(int(n) for n in self.teacher_num_steps)
        self.env_options = {str(k): str(v) for k, v in self.env_options.items()}
        if self.n_episodes < 1:
            raise ReflowPairsError(f"`n_episodes` is {self.n_episodes}.", "Give at least 1 episode per cell.")
        if self.batch_size < 1:
            raise ReflowPairsError(
                f"The env batch size (--eval.batch_size) is {self.batch_size}.",
                "Give at least 1 env per batch.",
            )
        for steps in (*self.num_steps, *(self.teacher_num_steps or ())):
            if steps < 1:
                raise ReflowPairsError(f"`num_steps` holds {steps}.", "Step counts are positive integers.")
        for label in self.students:
            if label == TEACHER or not label or not all(c.isalnum() or c in "-_." for c in label):
                raise ReflowPairsError(
                    f"{label!r} cannot label a student.",
                    "Use letters, digits, - _ . only, and not 'teacher'.",
                )
