"""Whether two stores come from the same generation job (``generate --resume``, ``merge`` and the multi-process
absorb combine only such stores)."""

from __future__ import annotations

from typing import Any, NamedTuple

from reflowpairs.store.layout import DEFAULT_TIME_DIRECTION
from reflowpairs.store.x0 import generation_record, x0_mode


class JobDifference(NamedTuple):
    """One way two stores' jobs differ (``StoreManifest.job_differences``): ``field`` is ``"x0 storage"`` (how X_0 is
    kept, ``X0_MODES``), ``"backend"``, ``"x0"``, ``"x1"`` (the manifest entries), ``"time_direction"``,
    ``"teacher.fingerprint"``, ``"dataset.fingerprint"`` or ``"generation.<key>"``; ``ours`` and ``theirs`` are its
    two values."""

    field: str
    ours: Any
    theirs: Any


def time_direction(manifest: dict[str, Any]) -> str:
    """The teacher family's time direction the manifest dict records (``TIME_DIRECTIONS``), ``noise_at_1`` when it
    has no ``time_direction`` (every store written before the key)."""
    return manifest.get("time_direction", DEFAULT_TIME_DIRECTION)


def _seed(manifest: dict[str, Any]) -> Any:
    return (manifest.get("generation") or {}).get("seed")


def job_differences(a: dict[str, Any], b: dict[str, Any]) -> list[JobDifference]:
    """How manifest dict ``b``'s generation job differs from ``a``'s; [] when they are the same job. A generation
    record without ``x0`` (written before that setting) counts as ``explicit``; when the two keep X_0 differently,
    that is one difference (``"x0 storage"``) and their ``x0`` entries are compared on shape and dtype only. An
    implicit store's ``x0.probe`` follows from ``generation.seed``: with different seeds (a difference of their own)
    the probes are not compared. A manifest without ``time_direction`` counts as ``noise_at_1``."""
    diffs = []
    mixed = x0_mode(a) != x0_mode(b)
    if mixed:
        diffs.append(JobDifference("x0 storage", x0_mode(a), x0_mode(b)))
    for key in ("backend", "x0", "x1"):
        va, vb = a.get(key), b.get(key)
        if key == "x0" and mixed:  # storage named above: compare what X_0 is, not how it is kept
            va, vb = ({k: v.get(k) for k in ("shape", "dtype")} for v in (va, vb))
        elif key == "x0" and _seed(a) != _seed(b):
            va, vb = ({k: v for k, v in spec.items() if k != "probe"} for spec in (va, vb))
        if va != vb:
            diffs.append(JobDifference(key, va, vb))
    if time_direction(a) != time_direction(b):
        diffs.append(JobDifference("time_direction", time_direction(a), time_direction(b)))
    for key in ("teacher", "dataset"):
        fa, fb = ((m.get(key) or {}).get("fingerprint") for m in (a, b))
        if fa != fb:
            diffs.append(JobDifference(f"{key}.fingerprint", fa, fb))
    ga, gb = generation_record(a), generation_record(b)
    for key in sorted(set(ga) | set(gb)):
        if key != "x0" and ga.get(key) != gb.get(key):  # x0: "x0 storage" above
            diffs.append(JobDifference(f"generation.{key}", ga.get(key), gb.get(key)))
    return diffs
