"""What a pair store holds: layout, provenance and statistics, as plain JSON-ready dicts.

The summary comes from the manifest (and its journal) alone, without opening a shard, so it costs the same for a
store of any size. Statistics (``summarize(statistics=True)``, ``inspect --stats``) are computed shard by shard with
running sums (Chan et al.'s pairwise merge of means and sums of squared deviations, in float64), so inspecting a
store of millions of pairs holds one shard in memory at a time. Non-finite values are counted and left out of the
statistics. A store that does not keep X_0 (``x0.stored: false``) has it regenerated for the statistics and for
``pair``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.layout import MANIFEST
from reflowpairs.store.reader import PairStore
from reflowpairs.store_features import describe, read_index

ShardProgress = Callable[[int, int], None]
"""``progress(shards_done, shards_total)``, called after each shard."""


@dataclass
class RunningStats:
    """Per-column count / mean / M2 / min / max over rows seen so far, finite values only.

    ``update(x)`` takes ``x`` of shape ``(n, C)``; column ``c`` aggregates ``x[:, c]`` over every
    call. ``M2`` is the sum of squared deviations from the mean, so ``std = sqrt(M2 / count)``
    (population standard deviation)."""

    columns: int
    count: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    min: np.ndarray = field(init=False)
    max: np.ndarray = field(init=False)
    nonfinite: int = 0

    def __post_init__(self):
        self.count = np.zeros(self.columns, np.int64)
        self.mean = np.zeros(self.columns, np.float64)
        self.m2 = np.zeros(self.columns, np.float64)
        self.min = np.full(self.columns, np.inf)
        self.max = np.full(self.columns, -np.inf)

    def update(self, x: np.ndarray, block_rows: int = 1 << 16) -> None:
        """Add the rows of ``x`` ``(n, C)``, ``block_rows`` at a time (bounds float64 temporaries)."""
        x = np.asarray(x).reshape(-1, self.columns)
        for start in range(0, len(x), block_rows):
            self._update(x[start : start + block_rows])

    def _update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        finite = np.isfinite(x)
        self.nonfinite += int(x.size - finite.sum())
        n = finite.sum(axis=0)
        if not n.any():
            return
        clean = np.where(finite, x, 0.0)
        safe_n = np.maximum(n, 1)
        mean = clean.sum(axis=0) / safe_n
        m2 = np.where(finite, (x - mean) ** 2, 0.0).sum(axis=0)
        total = self.count + n
        safe_total = np.maximum(total, 1)
        delta = mean - self.mean
        self.mean = self.mean + delta * n / safe_total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / safe_total
        self.count = total
        self.min = np.minimum(self.min, np.where(finite, x, np.inf).min(axis=0))
        self.max = np.maximum(self.max, np.where(finite, x, -np.inf).max(axis=0))

    def summary(self) -> dict[str, list[float | None]]:
        """``{"count", "min", "max", "mean", "std"}``, one value per column (None where no finite value)."""

        def values(a: np.ndarray) -> list[float | None]:
            return [float(v) if c > 0 else None for v, c in zip(a, self.count, strict=True)]

        return {
            "count": [int(c) for c in self.count],
            "min": values(self.min),
            "max": values(self.max),
            "mean": values(self.mean),
            "std": values(np.sqrt(self.m2 / np.maximum(self.count, 1))),
        }


def bytes_on_disk(path: Path) -> int:
    """Size of a file, or of every file under a directory (symlinks not followed)."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def summarize(
    path: str | Path, statistics: bool = False, progress: ShardProgress | None = None
) -> dict[str, Any]:
    """Everything ``reflowpairs inspect`` shows, as one JSON-ready dict.

    Keys: ``path``, ``backend``, ``store_id``, ``complete``, ``shards``, ``pairs``, ``frames``, ``samples_per_frame``
    (``{"recorded": K, "min": .., "max": ..}`` pairs per frame), ``x0``/``x1`` (``{"shape", "dtype"}``),
    ``bytes_on_disk``, ``bytes_per_pair``, ``x0_storage`` (``{"mode": "explicit"|"implicit", "stored": bool,
    "generator": name of the recipe X_0 is (re)generated with}``), ``teacher``, ``dataset``, ``generation``,
    ``software``, ``skipped_frames``, ``feature_cache``.

    Without ``statistics`` it reads the manifest (and journal) only, never a shard: its cost does not grow with the
    pairs. ``pairs`` and ``frames`` are then the manifest's counts of the listed shards, and ``samples_per_frame``'s
    ``min``/``max`` follow from each shard entry's ``num_pairs / num_frames`` (a shard holds whole frames, every frame
    of a store written by this package its K samples; ``None`` when an entry lacks ``num_frames`` or its pairs are
    not a whole multiple of its frames). ``bytes_on_disk`` stats the shard files (their sizes, not their contents).

    With ``statistics`` it also streams every shard once (``progress`` after each): ``frames`` and
    ``samples_per_frame`` are then counted from the shards' obs_index (distinct values, pairs per value), and
    ``statistics`` is added: ``x0`` (overall ``mean``, ``std``, ``nonfinite``, and ``source``: ``"stored"`` or
    ``"regenerated"``) and ``x1`` (per action dimension ``min``/``max``/``mean``/``std`` lists of length D1, plus
    ``nonfinite``). A missing or unreadable shard raises ``ReflowPairsError`` naming it.
    """
    store = PairStore(path)
    manifest = store.manifest
    shard_bytes = sum(bytes_on_disk(store.shard_path(i)) for i in range(len(store.shards)))
    pairs = store.meta.listed_pairs()
    frames, per_frame = _manifest_frame_counts(store.shards)
    summary: dict[str, Any] = {
        "path": str(store.path),
        "backend": store.backend,
        "store_id": manifest.get("store_id"),
        "complete": bool(manifest.get("complete", False)),
        "shards": len(store.shards),
        "pairs": pairs,
        "frames": frames,
        "samples_per_frame": {
            "recorded": manifest.get("generation", {}).get("samples_per_frame"),
            "min": per_frame[0],
            "max": per_frame[1],
        },
        "x0": {"shape": list(store.x0_shape), "dtype": manifest["x0"].get("dtype")},
        "x1": {"shape": list(store.x1_shape), "dtype": manifest["x1"].get("dtype")},
        "bytes_on_disk": shard_bytes + bytes_on_disk(store.path / MANIFEST),
        "bytes_per_pair": shard_bytes / pairs if pairs else None,
        "x0_storage": {
            "mode": store.meta.x0_mode,
            "stored": store.x0_stored,
            "generator": store.x0_generator,
        },
        "teacher": manifest.get("teacher", {}),
        "dataset": manifest.get("dataset", {}),
        "generation": manifest.get("generation", {}),
        "software": manifest.get("software", {}),
        "skipped_frames": list(manifest.get("skipped_frames", [])),
    }
    features = read_index(store.path)
    summary["feature_cache"] = describe(features) if features is not None else None
    if statistics:
        summary.update(stream_statistics(store, progress))
    return summary


def stream_statistics(store: PairStore, progress: ShardProgress | None = None) -> dict[str, Any]:
    """Read every listed shard once (one in memory at a time): ``{"pairs", "frames", "samples_per_frame"
    (min/max observed; "recorded" from the manifest), "statistics"}`` as ``summarize`` documents them."""
    x0_stats = RunningStats(1)
    x1_stats = RunningStats(store.x1_shape[-1])
    obs_parts: list[tuple[np.ndarray, np.ndarray]] = []
    pairs = 0
    for i in range(len(store.shards)):
        data = store.read(i, ("obs_index", "x0", "x1"))
        obs_parts.append(np.unique(data["obs_index"], return_counts=True))
        pairs += len(data["obs_index"])
        x0_stats.update(data["x0"].reshape(-1, 1))
        x1_stats.update(data["x1"].reshape(-1, store.x1_shape[-1]))
        if progress is not None:
            progress(i + 1, len(store.shards))
    frames, per_frame = _frame_counts(obs_parts)
    x0 = x0_stats.summary()
    x1 = x1_stats.summary()
    return {
        "pairs": pairs,
        "frames": frames,
        "samples_per_frame": {
            "recorded": store.manifest.get("generation", {}).get("samples_per_frame"),
            "min": per_frame[0],
            "max": per_frame[1],
        },
        "statistics": {
            "x0": {
                "mean": x0["mean"][0],
                "std": x0["std"][0],
                "nonfinite": x0_stats.nonfinite,
                "source": "stored" if store.x0_stored else "regenerated",
            },
            "x1": {k: x1[k] for k in ("min", "max", "mean", "std")} | {"nonfinite": x1_stats.nonfinite},
        },
    }


def _manifest_frame_counts(
    shards: list[dict[str, Any]],
) -> tuple[int | None, tuple[int | None, int | None]]:
    """Frames, and (min, max) pairs per frame, from the shard entries alone (no shard read).

    A shard holds whole frames (docs/pair-store.md), so the frames of the store are the sum of the entries'
    ``num_frames``; pairs per frame are each entry's ``num_pairs / num_frames``, known when it is a whole number.
    ``None`` where an entry lacks ``num_frames`` (or, for the pairs per frame, is not a whole multiple)."""
    if not shards:
        return 0, (None, None)
    if any("num_frames" not in entry for entry in shards):
        return None, (None, None)
    frames = sum(int(entry["num_frames"]) for entry in shards)
    ratios = set()
    for entry in shards:
        n, f = int(entry["num_pairs"]), int(entry["num_frames"])
        if f == 0 or n % f:
            return frames, (None, None)
        ratios.add(n // f)
    return frames, (min(ratios), max(ratios))


def _frame_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, tuple[int | None, int | None]]:
    """Distinct frames, and (min, max) pairs per frame, from each shard's ``(values, counts)`` of obs_index.

    Memory is 16 bytes per distinct frame per shard, never per pair."""
    if not parts:
        return 0, (None, None)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    if not len(values):
        return 0, (None, None)
    frames, inverse = np.unique(values, return_inverse=True)
    per = np.bincount(inverse, weights=counts).astype(np.int64)
    return len(frames), (int(per.min()), int(per.max()))


def locate_pair(store: PairStore, index: int) -> tuple[int, int]:
    """``(shard, row)`` of global pair ``index`` (``StoreManifest.locate``); out of range, a ``ReflowPairsError``
    naming the ``pair`` setting."""
    try:
        return store.meta.locate(index)
    except IndexError:
        total = store.meta.listed_pairs()
        raise ReflowPairsError(
            f"`pair` {index} is out of range: store {store.path} holds {total} pairs.",
            f"Give a pair number from 0 to {total - 1}." if total else "The store holds no pairs yet.",
        ) from None


def pair(path: str | Path, index: int, rows: int = 3) -> dict[str, Any]:
    """One pair as a JSON-ready dict: ``index``, ``shard``, ``row``, ``obs_index``, ``sample``, and the
    first ``rows`` rows (chunk steps) of ``x0`` (rows x D0) and ``x1`` (rows x D1) as nested lists."""
    store = PairStore(path)
    shard, row = locate_pair(store, index)
    data = store.read_stored(shard, store.stored_arrays)
    if row >= len(data["obs_index"]):
        raise ReflowPairsError(
            f"Shard {store.shards[shard]['path']} holds {len(data['obs_index'])} pairs, fewer than its manifest entry says.",
            "The store is damaged; run `reflowpairs validate` on it.",
        )
    obs, sample = data["obs_index"][row : row + 1], data["sample"][row : row + 1]
    x0 = data["x0"][row] if store.x0_stored else store.regenerate_x0(obs, sample)[0]
    return {
        "index": index,
        "shard": store.shards[shard]["path"],
        "row": row,
        "obs_index": int(data["obs_index"][row]),
        "sample": int(data["sample"][row]),
        "x0": x0[:rows].tolist(),
        "x1": data["x1"][row, :rows].tolist(),
    }
