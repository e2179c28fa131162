"""The lerobot version gate: the policy families call lerobot's model internals (private methods such as
``_prepare_batch``, ``_preprocess_images``, ``_fix_pytorch_state_dict_keys``, and model-level ``embed_prefix`` /
``embed_suffix`` / ``forward``), which are not a stable API, so they run only on the lerobot series they were written
and tested against. Each family module calls ``require_lerobot_version()`` where it uses them."""

from __future__ import annotations

from functools import cache
from importlib import metadata

from reflowpairs.errors import ReflowPairsError

TESTED_LEROBOT = "0.6"
"""The lerobot minor series the families were written and tested against."""


@cache
def lerobot_version() -> str:
    """The installed lerobot's version (from its distribution metadata, read once; "unknown" when it has none)."""
    try:
        return metadata.version("lerobot")
    except metadata.PackageNotFoundError:
        return "unknown"


def lerobot_version_ok(version: str | None = None) -> bool:
    """True when ``version`` (default: the installed lerobot's) is in the tested series, 0.6.x."""
    version = lerobot_version() if version is None else version
    return version == TESTED_LEROBOT or version.startswith(f"{TESTED_LEROBOT}.")


def require_lerobot_version(version: str | None = None) -> None:
    """Raise ``ReflowPairsError`` unless the installed lerobot (or ``version``) is 0.6.x."""
    version = lerobot_version() if version is None else version
    if not lerobot_version_ok(version):
        raise ReflowPairsError(
            f"lerobot {version} is installed; reflowpairs' policy families (SmolVLA, pi0, pi05) call lerobot "
            f"{TESTED_LEROBOT}.x internals and are not tested with other versions.",
            f"Install lerobot {TESTED_LEROBOT}.x (pip install 'lerobot=={TESTED_LEROBOT}.*').",
        )
