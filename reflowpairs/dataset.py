"""Opening a LeRobotDataset for reflow, checking it against a policy, and fingerprinting it.

Observations are addressed by the dataset's global frame ``index`` (the ``index`` column), which
is what the pair store records as ``obs_index``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.errors import ReflowPairsError

DATASET_LOGGER = "lerobot.utils.import_utils"
"""The lerobot logger that warns, when lerobot's dataset code is first imported, about every video decoder it
could not load (a page-long "Could not load libtorchcodec" traceback where FFmpeg's shared libraries are missing;
lerobot falls back to pyav, and image datasets never decode video)."""


def quiet_dataset_logs() -> None:
    """Silence ``DATASET_LOGGER`` below CRITICAL. Nothing in reflowpairs calls it on import: logging is the
    application's to configure; the ``reflowpairs`` CLI, the test suite and the benchmarks call it."""
    logging.getLogger(DATASET_LOGGER).setLevel(logging.CRITICAL)


def check_dataset_root(root: str | Path | None) -> Path | None:
    """``root`` as a Path, after checking it holds a LeRobotDataset (None stays None: lerobot's cache/hub)."""
    if root is None:
        return None
    root = Path(root).expanduser()
    if not (root / "meta" / "info.json").is_file():
        raise ReflowPairsError(
            f"`dataset_root` {root} is not a LeRobotDataset (no meta/info.json there).",
            "Set `dataset_root` to the dataset's local root, the directory holding meta/ and data/.",
        )
    return root


def open_metadata(repo_id: str, root: str | Path | None):
    """``LeRobotDatasetMetadata`` of the dataset, with errors that name the input."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata  # lazy: the datasets stack is heavy

    root = check_dataset_root(root)
    try:
        return LeRobotDatasetMetadata(repo_id, root)
    except Exception as err:  # noqa: BLE001 - hub and file errors come in many kinds
        raise unopenable(repo_id, root, err) from err


def check_episodes(episodes: Sequence[int] | None, total_episodes: int, repo_id: str) -> None:
    """Refuse episode numbers outside ``0 .. total_episodes-1`` and an empty selection (lerobot would look for the
    missing episodes on the hub, or fail with its own wording)."""
    if episodes is None:
        return
    if not episodes:
        raise ReflowPairsError(
            "`episodes` selects no episode.", "Set `episodes` to episode numbers, e.g. 0,2,5 or 0-9."
        )
    bad = [e for e in episodes if e < 0 or e >= total_episodes]
    if bad:
        raise ReflowPairsError(
            f"`episodes` {', '.join(map(str, bad))} out of range: dataset {repo_id} has {total_episodes} episodes "
            f"(0 to {total_episodes - 1}).",
            "Choose episodes that exist.",
        )


def episodes_text(episodes: list[int] | None) -> str | None:
    """``[0, 1, 2, 5, 8, 9]`` -> ``"0-2,5,8-9"``, the ``--episodes`` syntax (None stays None: all episodes)."""
    if episodes is None:
        return None
    parts: list[str] = []
    for episode in episodes:
        if parts and episode == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = parts[-1].split("-")[0] + f"-{episode}"
        else:
            parts.append(str(episode))
    return ",".join(parts)


def open_dataset(repo_id: str, root: str | Path | None = None, episodes: list[int] | None = None, **kwargs):
    """``LeRobotDataset(repo_id, root=root, episodes=episodes)`` with errors that name the input; ``episodes`` are
    checked against the dataset's metadata first."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lazy: the datasets stack is heavy

    root = check_dataset_root(root)
    if episodes is not None:
        check_episodes(episodes, open_metadata(repo_id, root).total_episodes, repo_id)
    try:
        return LeRobotDataset(repo_id, root=root, episodes=episodes, **kwargs)
    except ValueError as err:
        raise ReflowPairsError(f"Dataset {repo_id}: {err}", "Check `episodes` against the dataset.") from err
    except Exception as err:  # noqa: BLE001 - hub and file errors come in many kinds
        raise unopenable(repo_id, root, err) from err


def unopenable(repo_id: str, root: Path | None, err: Exception) -> ReflowPairsError:
    """The error for a dataset (or its metadata) lerobot could not open, naming where it looked."""
    where = f"at {root}" if root is not None else "in the local cache or on the Hugging Face hub"
    return ReflowPairsError(
        f"Could not open dataset {repo_id!r} {where} ({type(err).__name__}: {err}).",
        "Set `dataset_root` to a local copy, or check the repo id and your network.",
    )


def frame_indices(dataset) -> np.ndarray:
    """Global frame ``index`` of each position of ``dataset`` (its selected episodes), int64."""
    return np.asarray(dataset.hf_dataset.select_columns(["index"])["index"], dtype=np.int64).reshape(-1)


def dataset_fingerprint(dataset) -> str:
    """sha256 over every file under the dataset's ``meta/`` (info, tasks, episodes, stats), by path.

    Two copies of the same dataset share it; a dataset with other episodes, frames, tasks or
    statistics does not. Data files are not hashed (they can be hundreds of GB)."""
    meta_dir = Path(dataset.root) / "meta"
    digest = hashlib.sha256()
    for path in sorted(p for p in meta_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(meta_dir)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def dataset_provenance(dataset, episodes: list[int] | None) -> dict[str, Any]:
    """The manifest's ``dataset`` object."""
    return {
        "repo_id": dataset.repo_id,
        "root": str(Path(dataset.root).resolve()),
        "total_frames": int(dataset.meta.total_frames),
        "total_episodes": int(dataset.meta.total_episodes),
        "fps": int(dataset.meta.fps),
        "episodes": episodes,
        "fingerprint": dataset_fingerprint(dataset),
    }


def check_features(policy_config, dataset_meta, renames: dict[str, str] | None = None) -> None:
    """Refuse a dataset that does not carry the policy's inputs and action with the right shapes.

    The policy's feature names are after the preprocessor's renames; extra dataset keys are fine
    (the policy ignores them) but are listed when something is wrong, to help spot a renamed key.
    """
    # lazy: lerobot's configs import its policy stack
    from lerobot.configs.types import FeatureType
    from lerobot.utils.feature_utils import dataset_to_policy_features

    renames = renames or {}
    available = {renames.get(k, k): f for k, f in dataset_to_policy_features(dataset_meta.features).items()}
    wanted = dict(policy_config.input_features)
    wanted.update(policy_config.output_features)
    problems: list[str] = []
    for key, feature in wanted.items():
        if key.startswith("observation.images.empty_camera_"):
            continue
        if key not in available:
            problems.append(f"missing {key} {tuple(feature.shape)}")
        elif feature.type is not FeatureType.VISUAL and tuple(available[key].shape) != tuple(feature.shape):
            problems.append(
                f"{key} has shape {tuple(available[key].shape)}, the policy expects {tuple(feature.shape)}"
            )
    if problems:
        extra = sorted(set(available) - set(wanted))
        raise ReflowPairsError(
            "The dataset does not match the policy's features: "
            + "; ".join(problems)
            + "."
            + (f" Dataset keys the policy does not use: {', '.join(extra)}." if extra else ""),
            "Use the dataset the policy was trained on (or one recorded with the same robot and cameras).",
        )
