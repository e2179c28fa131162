"""What a reader needs of a manifest: loading ``manifest.json`` and checking the fields a reader relies on.

``structure_problems`` lists, in words, every field a reader relies on that is missing or of the wrong kind; a
manifest without problems is safe to index as ``PairStore`` does. ``reflowpairs validate`` checks the rest of the
contract (``docs/pair-store.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflowpairs.atomic import NotAJSONObjectError, load_json_object
from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.layout import BACKENDS, MANIFEST, TIME_DIRECTIONS


def _damaged(path: Path, what: str) -> ReflowPairsError:
    return ReflowPairsError(
        f"{path} {what}, so it is not a readable pair-store manifest.",
        "If this directory is a pair store, its manifest is damaged: restore manifest.json from a copy, or delete the "
        "directory and run `reflowpairs generate` again.",
    )


def load_manifest_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; a file that cannot be read, is not UTF-8, not JSON or not an object raises
    ``ReflowPairsError`` naming it (never a raw ``OSError``/``UnicodeDecodeError``/``RecursionError``)."""
    path = Path(path)
    try:
        return load_json_object(path)
    except OSError as err:
        raise ReflowPairsError(
            f"Cannot read {path} ({err.strerror or err}).", "Check that it is a readable file."
        ) from err
    except NotAJSONObjectError as err:
        raise _damaged(path, err.problem) from err.__cause__


def is_count(value: Any) -> bool:
    """Whether ``value`` is a non-negative JSON integer (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape_problem(spec: Any) -> str | None:
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if isinstance(shape, list) and shape and all(is_count(v) and v > 0 for v in shape):
        return None
    return f"its shape is {shape!r}, not a list of positive integers"


def shard_entry_problem(entry: Any) -> str | None:
    """What makes a ``shards`` entry unusable by a reader, or None; ``reflowpairs validate`` checks the rest."""
    if not isinstance(entry, dict):
        return f"is a JSON {type(entry).__name__}, not an object"
    path = entry.get("path")
    if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
        return f"has path {path!r}, not a relative path inside the store"
    if not is_count(entry.get("num_pairs")):
        return f"({path}) has num_pairs {entry.get('num_pairs')!r}, not a count"
    if "num_frames" in entry and not is_count(entry["num_frames"]):
        return f"({path}) has num_frames {entry['num_frames']!r}, not a count"
    if "sha256" in entry and not isinstance(entry["sha256"], dict):
        return f"({path}) has sha256 {entry['sha256']!r}, not an object of checksums"
    return None


def structure_problems(manifest: dict[str, Any]) -> list[str]:
    """Fields a reader relies on that are missing or of the wrong kind (each named); [] when it can be read."""
    missing = [k for k in ("backend", "num_pairs", "x0", "x1", "shards") if k not in manifest]
    if missing:
        return [f"it has no {', '.join(missing)}"]
    problems = []
    if manifest["backend"] not in BACKENDS:
        problems.append(f"its backend is {manifest['backend']!r}, not one of {', '.join(BACKENDS)}")
    if not is_count(manifest["num_pairs"]):
        problems.append(f"num_pairs is {manifest['num_pairs']!r}, not a count")
    if "num_frames" in manifest and not is_count(manifest["num_frames"]):
        problems.append(f"num_frames is {manifest['num_frames']!r}, not a count")
    for key in ("x0", "x1"):
        if (problem := _shape_problem(manifest[key])) is not None:
            problems.append(f"{key}: {problem}")
    problems += _x0_storage_problems(manifest)
    if "time_direction" in manifest and manifest["time_direction"] not in TIME_DIRECTIONS:
        problems.append(
            f"time_direction is {manifest['time_direction']!r}, not one of {', '.join(TIME_DIRECTIONS)}"
        )
    for key in ("teacher", "dataset", "generation", "software", "partition"):
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            problems.append(f"{key} is a JSON {type(manifest[key]).__name__}, not an object")
    if "skipped_frames" in manifest and not isinstance(manifest["skipped_frames"], list):
        problems.append(f"skipped_frames is {manifest['skipped_frames']!r}, not a list")
    if not isinstance(manifest["shards"], list):
        problems.append(f"shards is a JSON {type(manifest['shards']).__name__}, not a list")
    else:
        for j, entry in enumerate(manifest["shards"]):
            if (problem := shard_entry_problem(entry)) is not None:
                problems.append(f"shards[{j}] {problem}")
                break
    return problems


def _x0_storage_problems(manifest: dict[str, Any]) -> list[str]:
    """What stops a reader from getting X_0: a ``stored`` that is not a boolean, or, when X_0 is not stored, no
    generator name or no integer ``generation.seed`` to regenerate it from. Whether this build knows the
    generator is checked when X_0 is regenerated (``reflowpairs validate``: its ``x0 noise`` check)."""
    spec = manifest["x0"]
    if not isinstance(spec, dict) or "stored" not in spec:
        return []
    if not isinstance(spec["stored"], bool):
        return [f"x0.stored is {spec['stored']!r}, not true or false"]
    if spec["stored"]:
        return []
    problems = []
    if not isinstance(spec.get("generator"), str) or not spec["generator"]:
        problems.append(
            f"x0 is not stored but x0.generator is {spec.get('generator')!r}, not the name of the generator that regenerates it"
        )
    generation = manifest.get("generation")
    seed = generation.get("seed") if isinstance(generation, dict) else None
    if not is_count(seed):
        problems.append(
            f"x0 is not stored but generation.seed is {seed!r}, not the non-negative integer it is regenerated from"
        )
    return problems


def manifest_format(out: str | Path) -> tuple[str | None, str]:
    """``(format, why_not)`` of ``out/manifest.json``: its ``format`` field when it is a JSON object that has one,
    else ``(None, what is wrong with it)``. Recognises a store without requiring it to be sound."""
    try:
        fmt = load_manifest_json(Path(out) / MANIFEST).get("format")
    except ReflowPairsError as err:
        return None, err.what
    return (fmt, "") if isinstance(fmt, str) else (None, f'{Path(out) / MANIFEST} has no "format" field')
