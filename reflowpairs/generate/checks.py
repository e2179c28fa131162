"""generate's checks before anything is loaded or written: its settings, and whether ``--out`` may be written."""

from __future__ import annotations

from pathlib import Path

from reflowpairs.atomic import TMP_PREFIX
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import COMPUTE_DTYPES, GenerateConfig
from reflowpairs.solvers import SolverConfig
from reflowpairs.store.contract import manifest_format
from reflowpairs.store.layout import FORMAT, MANIFEST, PARTS_DIR, SHARDS_DIR, STORE_ENTRIES, X0_MODES
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store_features import check_feature_dtype


def check_settings(cfg: GenerateConfig) -> None:
    """Refuse settings that contradict each other or are out of range, then an ``out`` this run must not write to."""
    check_feature_dtype(cfg.feature_dtype)
    if cfg.features_from is not None and cfg.exact:
        raise ReflowPairsError(
            "`features_from` feeds the prefix-cached engine's prefix fills; `exact` runs lerobot's own sampler.",
            "Unset `exact` or `features_from`.",
        )
    if cfg.samples_per_frame < 1:
        raise ReflowPairsError(f"`samples_per_frame` must be at least 1, got {cfg.samples_per_frame}.")
    if cfg.batch_size < 1:
        raise ReflowPairsError(f"`batch_size` must be at least 1, got {cfg.batch_size}.")
    if cfg.num_steps is not None and cfg.num_steps < 1:
        raise ReflowPairsError(
            f"`num_steps` must be at least 1, got {cfg.num_steps}.",
            "Leave `num_steps` unset to use the teacher's num_steps.",
        )
    if cfg.num_workers < 0:
        raise ReflowPairsError(
            f"`num_workers` must be 0 (load in the main process) or more, got {cfg.num_workers}."
        )
    if cfg.shard_size < 1:
        raise ReflowPairsError(f"`shard_size` must be at least 1, got {cfg.shard_size}.")
    SolverConfig(
        cfg.solver, 1 if cfg.num_steps is None else cfg.num_steps, cfg.rtol, cfg.atol
    )  # solver, rtol, atol
    if cfg.tokens_per_call is not None and cfg.tokens_per_call < 0:
        raise ReflowPairsError(f"`tokens_per_call` must be 0 (no limit) or more, got {cfg.tokens_per_call}.")
    if cfg.exact and cfg.solver != "euler":
        raise ReflowPairsError(
            f"`exact` runs lerobot's own Euler sampler; it cannot run `solver` {cfg.solver}.",
            "Unset `exact`, or set `solver` to euler.",
        )
    _check_storage_settings(cfg)
    check_out(cfg)


def _check_storage_settings(cfg: GenerateConfig) -> None:
    """``on_nonfinite``, ``x0``, ``dtype``, ``resume``/``overwrite`` and ``partition``."""
    if cfg.on_nonfinite not in ("error", "skip"):
        raise ReflowPairsError(f"`on_nonfinite` must be 'error' or 'skip', got {cfg.on_nonfinite!r}.")
    if cfg.x0 not in X0_MODES:
        raise ReflowPairsError(
            f"`x0` must be one of {', '.join(X0_MODES)}, got {cfg.x0!r}.",
            "explicit stores X_0 in every shard; implicit leaves it out (readers regenerate it from the seed).",
        )
    if cfg.dtype not in COMPUTE_DTYPES:
        raise ReflowPairsError(f"`dtype` must be one of {', '.join(COMPUTE_DTYPES)}, got {cfg.dtype!r}.")
    if cfg.resume and cfg.overwrite:
        raise ReflowPairsError("`resume` and `overwrite` contradict each other.", "Set one of them.")
    if cfg.partition is not None and not (cfg.partition[1] >= 1 and 0 <= cfg.partition[0] < cfg.partition[1]):
        raise ReflowPairsError(
            f"`partition` {cfg.partition[0]}/{cfg.partition[1]} is not a slice i/P with 0 <= i < P."
        )


def _user_entries(out: Path) -> list[str]:
    """Names in ``out`` that a pair store does not put there (the user's own files), sorted."""
    if not out.is_dir():
        return []
    return sorted(
        p.name for p in out.iterdir() if p.name not in STORE_ENTRIES and not p.name.startswith(TMP_PREFIX)
    )


def _listed(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_out(cfg: GenerateConfig) -> None:
    """Refuse an --out this run must not write to; reads only. Called before anything is loaded, and again under the
    store lock (``open_store``) in case another run changed --out in between.

    - ``--resume``: --out must hold a readable pair store (any damage to its manifest is named here);
    - a ``manifest.json`` that is not a pair store's (unreadable, or another ``format``) is never replaced;
    - a pair store is refused without ``--resume`` / ``--overwrite``;
    - a directory with ``shards/`` or ``parts/`` but no manifest is refused (they are not known to be ours);
    - any other non-empty directory is refused without ``--overwrite``, which writes the store beside its files.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ReflowPairsError(
            f"`out` {out} exists and is not a directory.", "Give a directory for the pair store."
        )
    has_manifest = (out / MANIFEST).exists()
    if cfg.resume:
        if not has_manifest:
            raise ReflowPairsError(
                f"`resume` is set but {out} holds no pair store ({MANIFEST} missing).",
                "Unset `resume` to start a new store there.",
            )
        StoreManifest.read(out)
        return
    if has_manifest:
        _check_existing_store(out, cfg.overwrite)
        return
    ours = [name for name in (SHARDS_DIR, PARTS_DIR) if (out / name).exists()]
    if ours:
        raise ReflowPairsError(
            f"`out` {out} has a {ours[0]}/ directory but no {MANIFEST}, so it is not a pair store that generate can "
            "resume or replace.",
            "Choose an empty `out` (or delete that directory yourself if it is what is left of a store).",
        )
    others = _user_entries(out)
    if others and not cfg.overwrite:
        raise ReflowPairsError(
            f"`out` {out} is not empty and is not a pair store: it holds {_listed(others)}.",
            "Choose a new or empty `out` (for example a new subdirectory), or set `overwrite` to write the store "
            f"beside these files ({MANIFEST}, {SHARDS_DIR}/; your files are left alone).",
        )


def _check_existing_store(out: Path, overwrite: bool) -> None:
    """``out`` has a manifest: it must be a pair store's, and replacing it needs ``overwrite``."""
    fmt, why = manifest_format(out)
    if fmt != FORMAT:
        reason = why or f"{out / MANIFEST} has format {fmt!r}, not {FORMAT!r}"
        raise ReflowPairsError(
            f"`out` {out} is not a pair store: {reason.rstrip('.')}.",
            f"generate never replaces a {MANIFEST} it did not write, not even with `overwrite`: choose another "
            "`out` (for example a new subdirectory).",
        )
    if not overwrite:
        raise ReflowPairsError(
            f"`out` {out} already holds a pair store.",
            "Set `resume` to finish it (same teacher, dataset and settings), `overwrite` to replace it, "
            "or choose another `out`.",
        )
