"""The settings of ``reflowpairs generate``, what it reports before sampling (``GeneratePlan``), while sampling
(``GenerationProgress``) and at the end (``GenerateResult``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
"""``GenerateConfig.dtype``'s values: the torch dtype (``getattr(torch, name)``) the teacher samples in, through
torch.autocast (float32: no autocast)."""

GenerationProgress = Callable[[int, int, float], None]
"""``progress(frames_done_this_run, pairs_done_this_run, seconds)``, called after each batch (the last one once the last
shard is written): ``seconds`` is on the clock of ``GenerateResult.seconds``, so the last call's rate is the summary's."""


@dataclass
class GenerateConfig:
    """Settings of ``reflowpairs generate`` (see ``docs/pair-store.md`` for what is stored)."""

    teacher: str
    dataset: str
    out: Path
    dataset_root: Path | None = None
    episodes: list[int] | None = None
    samples_per_frame: int = 4
    num_steps: int | None = None  # None: the teacher config's step count (num_steps / num_inference_steps)
    solver: str = "euler"
    rtol: float = 1e-5
    atol: float = 1e-5
    batch_size: int = 16  # frames per loaded batch (each samples batch_size * K pairs)
    tokens_per_call: int | None = (
        None  # suffix tokens per engine call; 0: whole batch; None: the device's default
    )
    shard_size: int = 4096  # pairs per shard (rounded to whole frames)
    seed: int = 0
    device: str = "auto"
    backend: str = "zarr"
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    on_nonfinite: str = "error"  # "error" | "skip"
    partition: tuple[int, int] | None = None  # (i, P): only frames with obs_index % P == i
    dtype: str = "float32"  # autocast dtype: float32 (none), or bfloat16/float16 through torch.autocast
    exact: bool = False  # lerobot's own sampler per frame (bit for bit), no prefix sharing
    x0: str = "explicit"  # "explicit": shards store X_0; "implicit": no X_0 array, readers regenerate it from the seed
    writer_id: str = "w0"
    cache_features: bool = False  # also store each frame's frozen features (reflowpairs.cached_features)
    feature_dtype: str = "float32"  # storage dtype of the cached features: float32, float16 or bfloat16
    # a store whose feature cache the teacher's prefix fills read instead of running its frozen vision encoder (a
    # later reflow round whose teacher shares those weights); the new store gets the same features (cache_features)
    features_from: str | None = None
    # cache_features when a student of the teacher's checkpoint could train with the cache (its vision encoder and
    # projector frozen by its config: cached_features.student_cache_problems), else not (reflowpairs pipeline's round 1)
    cache_features_if_allowed: bool = False
    # torch intra-op threads of this process: None keeps the caller's torch.set_num_threads, a number sets it,
    # "auto" plans them around the DataLoader workers (what the command line uses; reflowpairs.threads)
    threads: int | str | None = None
    # a local tokenizer directory every checkpoint's preprocessor uses (``teacher.load_policy``'s ``tokenizer``);
    # None: the REFLOWPAIRS_TOKENIZER environment variable, else the one each checkpoint names
    tokenizer: str | None = None


@dataclass
class GenerateResult:
    out: Path
    num_pairs: int  # in the whole store
    num_frames: int  # in the whole store
    new_pairs: int  # written by this run
    seconds: float
    skipped: list[int] = field(default_factory=list)  # obs_index of frames skipped for non-finite X_1

    @property
    def pairs_per_second(self) -> float:
        return self.new_pairs / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class GeneratePlan:
    """What a run will do, reported once before sampling (``generate``'s ``on_plan``)."""

    frames_to_do: int
    frames_done: int
    samples_per_frame: int
    solver: str  # e.g. "euler, 10 steps"
    sampler: str  # "prefix-cached" | "exact"
    frames_per_call: int
    compute_dtype: str  # the least precise dtype the teacher computes in
    device: str
    threads: str  # ThreadPlan.describe()
