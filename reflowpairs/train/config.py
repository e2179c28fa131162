"""The settings of a training run (``TrainConfig``), their defaults and checks, and what a run returns.

``None`` in ``TrainConfig`` means "the default" for a new run and "the checkpoint's value" for ``resume``
(``resolve_settings``); a value given on resume that differs from the checkpoint's is refused (the run would not
continue as if uninterrupted).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reflowpairs.errors import ReflowPairsError
from reflowpairs.wandb_log import check_mode, require_wandb

PRECISIONS = ("auto", "float32", "bfloat16")

# Settings that decide which data, times and updates a run sees (``INHERITED`` by a resumed run).
DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "seed": 0,
    "time_sampling": "beta",
    "shuffle_window": 4,
    "student_num_steps": 1,
    "loss": "mse",
}
INHERITED = (
    "batch_size",
    "seed",
    "time_sampling",
    "shuffle_window",
    "lr",
    "warmup_steps",
    "grad_clip",
    "student_num_steps",
    "loss",
)
TEACHER_NUM_STEPS = "teacher"  # --student-num-steps teacher: the saved config keeps the teacher's num_steps

TrainProgress = Callable[[int, int, float], None]
"""``progress(step, total_steps, loss)``: called in the main process after every optimiser step of ``train``."""

TIME_SAMPLINGS = ("beta", "uniform", "u-shaped", "logit-normal", "noise-end")
"""The training-time distributions of ``t`` (``reflowpairs.train.timesampling``)."""
LOSSES = ("mse", "pseudo-huber")
"""The reflow losses (``reflowpairs.train.loss``)."""


def check_time_sampling(name: str) -> str:
    """``name`` if it is a known time sampling, else a ``ReflowPairsError`` listing the choices."""
    if name not in TIME_SAMPLINGS:
        raise ReflowPairsError(
            f"Unknown `time_sampling` {name!r}.",
            f"Set `time_sampling` to one of: {', '.join(TIME_SAMPLINGS)}.",
        )
    return name


@dataclass
class TrainConfig:
    """Settings of ``reflowpairs train`` (``docs/train.md``). ``None`` means: the default (shown in
    ``DEFAULTS`` or the policy's lerobot preset) for a new run, the checkpoint's value on ``resume``."""

    pairs: Path
    out: Path
    steps: int = 10_000
    batch_size: int | None = None  # 32
    init: str | None = None  # None: the manifest's teacher.source
    dataset_root: Path | None = None  # None: the manifest's dataset.root
    lr: float | None = None  # None: the policy preset's optimizer_lr
    warmup_steps: int | None = None  # None: the preset's, rescaled as lerobot does for short runs
    grad_clip: float | None = None  # None: the preset's grad_clip_norm
    seed: int | None = None  # 0
    num_workers: int = 2
    device: str = "auto"
    save_every: int = 1000
    log_every: int = 1
    time_sampling: str | None = None  # "beta" (lerobot's own); "noise-end" (t = 1): one-step distillation
    loss: str | None = None  # "mse" (lerobot's own); "pseudo-huber" (rectified flow++)
    student_num_steps: int | str | None = (
        None  # 1: the saved config's num_steps; "teacher" keeps the teacher's
    )
    precision: str = "auto"  # auto: bfloat16 autocast on CUDA (when supported), float32 elsewhere
    shuffle_window: int | None = None  # 4 shards
    resume: bool = False
    allow_mismatch: bool = False
    allow_schedule_change: bool = False  # resume with a --steps that changes the lr schedule
    no_feature_cache: bool = (
        False  # decode images even when the store has a feature cache (reflowpairs.cached_features)
    )
    # torch intra-op threads of this process: None keeps the caller's torch.set_num_threads, a number sets it,
    # "auto" plans them around the DataLoader workers (what the command line uses; reflowpairs.threads)
    threads: int | str | None = None
    # a local tokenizer directory every checkpoint's preprocessor uses (``teacher.load_policy``'s ``tokenizer``);
    # None: the REFLOWPAIRS_TOKENIZER environment variable, else the one each checkpoint names
    tokenizer: str | None = None
    # lerobot's WandBConfig (lerobot.configs.default): log to Weights & Biases when set and enabled (reflowpairs.wandb_log)
    wandb_config: Any = None


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path  # the last checkpoint written (OUT/checkpoints/<step>)
    start_step: int
    step: int
    final_loss: float
    seconds: float
    warnings: list[str] = field(default_factory=list)
    saved_num_steps: int | None = (
        None  # the saved config.json's step count (its family's step field: num_steps, num_inference_steps)
    )
    teacher_num_steps: int | None = None  # the init checkpoint config.json's step count (its step field)
    init_source: str = ""
    dataset_repo_id: str | None = None
    dataset_root: Path | None = None
    held_out_episodes: list[int] = field(default_factory=list)  # dataset episodes the store has no pairs of
    pairs: Path | None = None
    wandb_run: str | None = None  # where the W&B run logged (its URL or offline directory); None without W&B

    @property
    def steps_per_second(self) -> float:
        done = self.step - self.start_step
        return done / self.seconds if self.seconds > 0 else 0.0


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training at ``step``; ``checkpoint`` is the last complete checkpoint (None if there is
    none), holding ``saved_step``. After one Ctrl-C it holds every completed step."""

    def __init__(self, step: int, checkpoint: Path | None, saved_step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.checkpoint = checkpoint
        self.saved_step = saved_step


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings out of range (``ReflowPairsError`` naming the setting and the fix), before anything is read."""
    for name, value, least in (
        ("steps", cfg.steps, 1),
        ("batch_size", cfg.batch_size, 1),
        ("save_every", cfg.save_every, 1),
        ("log_every", cfg.log_every, 1),
        ("num_workers", cfg.num_workers, 0),
        ("shuffle_window", cfg.shuffle_window, 1),
        ("warmup_steps", cfg.warmup_steps, 0),
        ("seed", cfg.seed, 0),
    ):
        if value is not None and value < least:
            raise ReflowPairsError(
                f"`{name}` must be at least {least}, got {value}.", f"Set `{name}` to {least} or more."
            )
    if isinstance(cfg.student_num_steps, str):
        parse_student_num_steps(cfg.student_num_steps)  # refuses anything but a number or "teacher"
    elif cfg.student_num_steps is not None and cfg.student_num_steps < 1:
        raise ReflowPairsError(
            f"`student_num_steps` must be at least 1, got {cfg.student_num_steps}.",
            "Set `student_num_steps` to a step count such as 1 or 2, or 'teacher' to keep the teacher's num_steps.",
        )
    for name, value in (("lr", cfg.lr), ("grad_clip", cfg.grad_clip)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ReflowPairsError(
                f"`{name}` must be a positive number, got {value}.", f"Set `{name}` above 0."
            )
    if cfg.time_sampling is not None:
        check_time_sampling(cfg.time_sampling)
    if cfg.loss is not None and cfg.loss not in LOSSES:
        raise ReflowPairsError(f"Unknown `loss` {cfg.loss!r}.", f"Set `loss` to one of: {', '.join(LOSSES)}.")
    if cfg.wandb_config is not None and getattr(cfg.wandb_config, "enable", True):
        check_mode(cfg.wandb_config.mode)  # before any work, as the command line does
        require_wandb()
    if cfg.precision not in PRECISIONS:
        raise ReflowPairsError(
            f"`precision` must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}.",
            "Set `precision` to one of those.",
        )


def parse_student_num_steps(text: str | None) -> int | str | None:
    """``--student-num-steps``: ``"2"`` -> 2, ``"teacher"`` -> ``"teacher"``, None -> None (the default)."""
    if text is None or text.strip().lower() == TEACHER_NUM_STEPS:
        return None if text is None else TEACHER_NUM_STEPS
    try:
        return int(text)
    except ValueError:
        raise ReflowPairsError(
            f"`student_num_steps` must be a whole number of steps or 'teacher', got {text!r}.",
            "Set `student_num_steps` to e.g. 1 (the default), or to 'teacher' to keep the teacher's num_steps.",
        ) from None


def resolve_settings(cfg: TrainConfig, state: dict[str, Any] | None) -> dict[str, Any]:
    """The run's data/optimiser settings: given values, else the checkpoint's (resume), else defaults."""
    given = {name: getattr(cfg, name) for name in INHERITED}
    if isinstance(given["student_num_steps"], str):
        given["student_num_steps"] = parse_student_num_steps(given["student_num_steps"])
    if state is None:
        return {name: given[name] if given[name] is not None else DEFAULTS.get(name) for name in INHERITED}
    recorded = dict(state["settings"])
    if (
        recorded.get("student_num_steps") is None
    ):  # runs before --student-num-steps defaulted to 1: the teacher's
        recorded["student_num_steps"] = TEACHER_NUM_STEPS
    recorded.setdefault("loss", "mse")  # runs from before the loss setting trained on MSE
    differences = [
        f"{name}: the checkpoint has {recorded.get(name)!r}, this run asks for {given[name]!r}"
        for name in INHERITED
        if name != "student_num_steps" and given[name] is not None and given[name] != recorded.get(name)
    ]
    if differences:
        raise ReflowPairsError(
            "Cannot resume with other training settings: " + "; ".join(differences) + ".",
            "Leave those settings unset (a resumed run keeps its own), or start a new run in another `out`.",
        )
    return {name: given[name] if given[name] is not None else recorded.get(name) for name in INHERITED}


def saved_num_steps(setting: int | str) -> int | None:
    """The ``num_steps`` to write into the student's config.json (None: keep the teacher's)."""
    return None if setting == TEACHER_NUM_STEPS else int(setting)
