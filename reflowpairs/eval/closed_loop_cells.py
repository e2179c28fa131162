"""The finished cells of a closed-loop evaluation on disk: ``OUT/cells/<label>-<steps>.json``, each with the settings
it was run with; a cell is reused only when those match the current run (``MATCHED_SETTINGS``), and what a cell's
figures are (``summarise_cell``)."""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from reflowpairs.atomic import NotAJSONObjectError, load_json_object
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.closed_loop_metrics import wilson_interval
from reflowpairs.eval.config import ClosedLoopConfig
from reflowpairs.teacher import (
    POSTPROCESSOR_FILE,
    PREPROCESSOR_FILE,
    checkpoint_file,
    fingerprint_checkpoint,
    resolve_device,
)

CELLS_DIR = "cells"


MATCHED_SETTINGS = (
    "env_type",
    "env_options",
    "n_episodes",
    "seed",
    "batch_size",
    "checkpoint_fingerprint",
    "device",
    "tokenizer",
)
"""The settings a finished cell must share with the current run to be reused: what decides its episodes, the model
(``model_fingerprint``: config, weights and processors), the device it ran on (resolved: ``auto`` is the device it
picked; another device draws other noises and rounds otherwise) and the tokenizer. Async envs are recorded but do
not change which episodes run."""


def cell_path(out: Path, label: str, num_steps: int) -> Path:
    """``OUT/cells/<label>-<steps>.json``."""
    return Path(out) / CELLS_DIR / f"{label}-{num_steps}.json"


def processors_digest(checkpoint: str) -> str:
    """sha256 over a checkpoint's ``policy_preprocessor.json`` and ``policy_postprocessor.json`` (as JSON, keys
    sorted) and every ``.safetensors`` state file their steps reference (the normaliser stats), byte for byte."""
    digest = hashlib.sha256()
    for name in (PREPROCESSOR_FILE, POSTPROCESSOR_FILE):
        saved = json.loads(checkpoint_file(checkpoint, name).read_text())
        digest.update(json.dumps(saved, sort_keys=True).encode())
        for step in saved.get("steps", []):
            state_file = step.get("state_file")
            if state_file:
                digest.update(state_file.encode())
                digest.update(checkpoint_file(checkpoint, state_file).read_bytes())
    return digest.hexdigest()


def model_fingerprint(checkpoint: str, checkpoint_hashes: dict[str, str] | None = None) -> str:
    """What a cell's model is: sha256 of the checkpoint's ``fingerprint_checkpoint`` (config and weights) and its
    ``processors_digest``, so a checkpoint whose weights or normaliser stats changed does not reuse stale cells."""
    hashes = checkpoint_hashes or fingerprint_checkpoint(checkpoint)
    return hashlib.sha256(f"{hashes['fingerprint']}:{processors_digest(checkpoint)}".encode()).hexdigest()


def cell_settings(cfg: ClosedLoopConfig, label: str, num_steps: int, fingerprint: str) -> dict[str, Any]:
    """The settings a cell file records (``MATCHED_SETTINGS`` must agree for the cell to be reused); ``device`` is
    the resolved one (``auto``: the device it picks here)."""
    return {
        "env_type": cfg.env_type,
        "env_options": dict(sorted(cfg.env_options.items())),
        "n_episodes": cfg.n_episodes,
        "seed": cfg.seed,
        "batch_size": min(cfg.batch_size, cfg.n_episodes),
        "checkpoint_fingerprint": fingerprint,
        "model": label,
        "num_steps": num_steps,
        "use_async_envs": cfg.use_async_envs,
        "device": resolve_device(cfg.device),
        "tokenizer": cfg.tokenizer,
    }


def read_cell(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished cell at ``path``, or None when there is none; ``ReflowPairsError`` when it was made with other
    settings (naming them) or is unreadable."""
    if not path.exists():
        return None
    try:
        saved = load_json_object(path)
    except (OSError, NotAJSONObjectError) as err:
        raise ReflowPairsError(
            f"The finished cell {path} cannot be read ({err}).", "Delete it; the cell is then run again."
        ) from err
    recorded = saved.get("settings", {})
    differ = [k for k in MATCHED_SETTINGS if recorded.get(k) != settings[k]]
    if differ:
        shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings[k]!r} now" for k in differ)
        raise ReflowPairsError(
            f"{path} was made with other settings ({shown}).",
            f"Use another --out for these settings, or delete {path.parent} to start this one over.",
        )
    return saved["cell"]


def summarise_cell(
    label: str, num_steps: int, episodes: list[dict[str, Any]], chunk_times: list[float], envs_per_call: int
) -> dict[str, Any]:
    """One cell's figures from its episodes (``{task, seed, success, return, length}`` each) and chunk call times."""
    n = len(episodes)
    k = sum(bool(e["success"]) for e in episodes)
    low, high = wilson_interval(k, n)
    return {
        "model": label,
        "num_steps": num_steps,
        "n_episodes": n,
        "successes": k,
        "success_rate": k / n if n else 0.0,
        "success_low": low,
        "success_high": high,
        "mean_return": statistics.fmean(e["return"] for e in episodes) if n else 0.0,
        "mean_length": statistics.fmean(e["length"] for e in episodes) if n else 0.0,
        "latency_ms": 1000 * statistics.median(chunk_times) if chunk_times else None,
        "latency_ms_mean": 1000 * statistics.fmean(chunk_times) if chunk_times else None,
        "chunk_calls": len(chunk_times),
        "envs_per_call": envs_per_call,
        "episodes": episodes,
    }
