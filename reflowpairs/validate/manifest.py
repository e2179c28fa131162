"""What validate reads from the manifest alone: its contract (``manifest`` check), the files under ``shards/`` it
does not list (``leftovers``) and the ``generate --resume`` command that finishes the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflowpairs.atomic import TMP_PREFIX
from reflowpairs.next_steps import reflowpairs_command
from reflowpairs.store.layout import ARRAYS, MANIFEST, SHARD_SUFFIX, SHARDS_DIR, unlisted_entries
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.validate.report import PASS, WARN, CheckResult, listed


def manifest_problems(meta: StoreManifest) -> list[str]:
    """Contract problems of a manifest that ``StoreManifest.read`` accepted (types, sums, shard entries)."""
    manifest = meta.data
    problems = _field_problems(manifest)
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    problems += _shard_entry_problems(meta, shards)
    try:
        pairs = sum(int(e["num_pairs"]) for e in shards)
        if manifest.get("num_pairs") != pairs:
            problems.append(f"num_pairs is {manifest.get('num_pairs')!r} but its shards hold {pairs} pairs")
        frames = sum(int(e["num_frames"]) for e in shards)
        if manifest.get("num_frames") != frames:
            problems.append(
                f"num_frames is {manifest.get('num_frames')!r} but its shards hold {frames} frames"
            )
    except (KeyError, TypeError, ValueError):
        problems.append("shard entries lack num_pairs / num_frames")
    return problems


def _field_problems(manifest: dict[str, Any]) -> list[str]:
    """Problems of the manifest's top-level fields, array specs, generation settings and fingerprints."""
    problems: list[str] = []
    for key, kind in (
        ("store_id", str),
        ("complete", bool),
        ("teacher", dict),
        ("dataset", dict),
        ("generation", dict),
        ("shards", list),
    ):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key} is missing or not a {kind.__name__}")
    for key in ("x0", "x1"):
        spec = manifest.get(key)
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not (
            isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)
        ):
            problems.append(f"{key}.shape is {shape!r}, not [T, D] with positive integers")
        elif spec.get("dtype") != "float32":
            problems.append(f"{key}.dtype is {spec.get('dtype')!r}, not 'float32'")
    generation = manifest.get("generation") if isinstance(manifest.get("generation"), dict) else {}
    for key in ("seed", "samples_per_frame", "num_frames", "num_steps"):
        if not isinstance(generation.get(key), int) or isinstance(generation.get(key), bool):
            problems.append(f"generation.{key} is {generation.get(key)!r}, not an integer")
    if not isinstance(generation.get("solver"), str):
        problems.append("generation.solver is missing")
    for key in ("teacher", "dataset"):
        if isinstance(manifest.get(key), dict) and not manifest[key].get("fingerprint"):
            problems.append(f"{key}.fingerprint is missing")
    return problems


def _shard_entry_problems(meta: StoreManifest, shards: list) -> list[str]:
    """Problems of the ``shards`` entries: paths, pair counts, checksums and entries listed twice."""
    backend = meta.data.get("backend")
    problems: list[str] = []
    paths: dict[str, int] = {}
    for j, entry in enumerate(shards):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            problems.append(f"shards[{j}] has no path")
            continue
        path = entry["path"]
        paths[path] = paths.get(path, 0) + 1
        parts = Path(path).parts
        if (
            len(parts) not in (2, 3)  # shards/<name> (format version 1) or shards/<group>/<name>
            or parts[0] != SHARDS_DIR
            or not path.endswith(SHARD_SUFFIX.get(backend, "?"))
        ):
            problems.append(f"{path}: not a {backend} shard path under {SHARDS_DIR}/")
        if not isinstance(entry.get("num_pairs"), int) or entry["num_pairs"] < 0:
            problems.append(f"{path}: num_pairs is {entry.get('num_pairs')!r}")
        sha = entry.get("sha256")
        arrays = meta.stored_arrays
        if not isinstance(sha, dict) or sorted(sha) != sorted(arrays):
            kept = "" if arrays == ARRAYS else " (X_0 is not stored)"
            problems.append(f"{path}: sha256 must hold checksums of {', '.join(arrays)}{kept}")
    problems += [f"{path} is listed {n} times" for path, n in paths.items() if n > 1]
    return problems


def resume_command(store: Path, meta: StoreManifest) -> str:
    """The ``reflowpairs generate ... --resume`` command that finishes ``store`` with its recorded settings (every
    argument shell-quoted, so a path with a space pastes as one argument)."""
    manifest = meta.data
    g, teacher, dataset = (
        manifest.get("generation", {}),
        manifest.get("teacher", {}),
        manifest.get("dataset", {}),
    )
    exact = g.get("sampler") == "exact"
    # the call size X_1 was computed in: --batch-size G with no token limit gives G
    frames_per_call = None if exact else g.get("frames_per_call") or None
    partition = manifest.get("partition")
    return reflowpairs_command(
        "generate",
        teacher=str(teacher.get("source")),
        dataset=str(dataset.get("repo_id")),
        dataset_root=dataset.get("root") or None,
        out=store,
        episodes=g.get("episodes") or None,
        samples_per_frame=str(g.get("samples_per_frame")),
        num_steps=str(g.get("num_steps")),
        solver=str(g.get("solver")),
        rtol=str(g.get("rtol")) if g.get("solver") == "dopri5" else None,
        atol=str(g.get("atol")) if g.get("solver") == "dopri5" else None,
        seed=str(g.get("seed")),
        format=str(manifest.get("backend")),
        x0=None if meta.x0_stored else "implicit",
        dtype=g["dtype"] if g.get("dtype", "float32") != "float32" else None,
        exact=exact,
        batch_size=frames_per_call,
        tokens_per_call=0 if frames_per_call else None,
        partition=f"{partition['index']}/{partition['count']}" if partition else None,
        resume=True,
    )


def check_leftovers(store_path: Path, listed_paths: set[str]) -> CheckResult:
    """Entries under ``shards/`` the manifest does not list, and a half-written manifest: warned, never counted."""
    leftovers = []
    for path in unlisted_entries(store_path, listed_paths):
        rel = path.relative_to(store_path).as_posix()
        leftovers.append(
            f"{rel} (half-written)" if path.name.startswith(TMP_PREFIX) else f"{rel} (not listed)"
        )
    if (store_path / (TMP_PREFIX + MANIFEST)).exists():
        leftovers.append(f"{TMP_PREFIX}{MANIFEST} (half-written manifest)")
    if leftovers:
        return CheckResult(
            "leftovers",
            WARN,
            f"not counted: {listed(leftovers)}; leftovers of an interrupted run (`generate --resume` removes them) "
            "or files copied in: delete them",
        )
    return CheckResult("leftovers", PASS, "nothing under shards/ but the listed shards")
