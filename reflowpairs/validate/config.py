"""The settings of ``reflowpairs validate`` and the spot check's default tolerance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reflowpairs.errors import ReflowPairsError


@dataclass
class ValidateConfig:
    """Settings of ``reflowpairs validate``.

    ``dataset``/``dataset_root``: check the store against this dataset (by default the spot check
    uses the manifest's recorded repo id and root). ``teacher``: check it is the recorded teacher
    (and use it for the spot check). ``spot_check``: re-sample this many random pairs (all of them
    when at least the store's size) and compare X_1 within ``atol`` (None: ``SPOT_CHECK_ATOL`` of the store's
    recorded compute dtype); ``seed`` picks the pairs."""

    store: Path
    dataset: str | None = None
    dataset_root: Path | None = None
    teacher: str | None = None
    spot_check: int = 0
    atol: float | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16  # frames per teacher call in the spot check
    # a local tokenizer directory every checkpoint's preprocessor uses (``teacher.load_policy``'s ``tokenizer``);
    # None: the REFLOWPAIRS_TOKENIZER environment variable, else the one each checkpoint names
    tokenizer: str | None = None


SPOT_CHECK_ATOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 5e-2}
"""Default spot-check tolerance by the least precise dtype the teacher computes in (its parameters' dtypes and the
autocast dtype, as the manifest records them: ``teacher.compute_dtype``). Re-sampled on the machine and device that
made the store, X_1 comes back bit for bit (fixed call shapes); on another device or kernel library half-precision
X_1 moves by its rounding, ~1e-3-1e-2 in bfloat16 on SmolVLA's real shapes."""


def check_settings(cfg: ValidateConfig) -> None:
    """Refuse settings no store can be checked with (the store itself is never refused, only reported)."""
    if cfg.spot_check < 0:
        raise ReflowPairsError(f"`spot_check` must be 0 or more pairs, got {cfg.spot_check}.")
    if cfg.atol is not None and not cfg.atol > 0:
        raise ReflowPairsError(f"`atol` must be positive, got {cfg.atol}.")
    if cfg.batch_size < 1:
        raise ReflowPairsError(f"`batch_size` must be at least 1, got {cfg.batch_size}.")
