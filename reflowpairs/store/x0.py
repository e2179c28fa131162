"""How a store keeps X_0: its manifest ``x0`` entry, written (``x0_spec``) and read (``x0_stored``, ``x0_mode``).

X_0 is a pure function of ``(generation.seed, obs_index, sample)`` (``reflowpairs/noise.py``), so a store may leave it
out: with ``x0.stored: false`` (``generate --x0 implicit``) shards hold only ``x1``, ``obs_index`` and ``sample``, and
readers regenerate ``x0`` with the generator the manifest names (``x0.generator``). A store without ``x0.stored``
stores X_0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import GENERATOR, pair_noise
from reflowpairs.store.layout import ARRAYS, IMPLICIT_ARRAYS, X0_MODES
from reflowpairs.store.pairs import array_sha256


def x0_probe(seed: int, shape, generator: str = GENERATOR) -> dict[str, Any]:
    """``{"obs_index": 0, "sample": 0, "sha256": ...}``: the checksum of X_0 of pair (0, 0) as ``generator`` draws it
    here. Recorded in an implicit store's manifest, it lets any reader prove its regeneration reproduces the writer's
    (torch does not promise the same ``randn`` numbers across releases) at the cost of one draw."""
    x0 = pair_noise(int(seed), np.zeros(1, np.int64), np.zeros(1, np.int64), shape, generator)
    return {"obs_index": 0, "sample": 0, "sha256": array_sha256(x0[0])}


def x0_spec(shape, mode: str = "explicit", seed: int | None = None) -> dict[str, Any]:
    """The manifest's ``x0`` entry. ``explicit``: ``{"shape", "dtype"}``, exactly as format version 1 always wrote it;
    ``implicit``: also ``"stored": false``, ``"generator"`` (the versioned name of the recipe that regenerates it) and
    ``"probe"`` (``x0_probe`` of ``seed``, the store's ``generation.seed``)."""
    if mode not in X0_MODES:
        raise ReflowPairsError(f"`x0` must be one of {', '.join(X0_MODES)}, got {mode!r}.")
    spec: dict[str, Any] = {"shape": list(shape), "dtype": "float32"}
    if mode == "implicit":
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ReflowPairsError(
                f"`seed` must be a non-negative integer to regenerate X_0 from, got {seed!r}."
            )
        spec.update(stored=False, generator=GENERATOR, probe=x0_probe(seed, shape))
    return spec


def x0_stored(manifest: dict[str, Any]) -> bool:
    """Whether the shards of the store with manifest dict ``manifest`` hold an ``x0`` array (true unless its ``x0``
    entry says ``stored: false``)."""
    spec = manifest.get("x0")
    return not (isinstance(spec, dict) and spec.get("stored") is False)


def x0_mode(manifest: dict[str, Any]) -> str:
    """``"explicit"`` or ``"implicit"``: how the store with manifest dict ``manifest`` keeps X_0 (``X0_MODES``)."""
    return "explicit" if x0_stored(manifest) else "implicit"


def stored_arrays(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The arrays each shard of the store with manifest dict ``manifest`` holds (and has checksums for)."""
    return ARRAYS if x0_stored(manifest) else IMPLICIT_ARRAYS


def generation_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``manifest``'s generation record with ``x0`` (``X0_MODES``) filled in from its ``x0`` entry when the
    record predates that setting (such a store keeps X_0: ``explicit``)."""
    generation = dict(manifest.get("generation") or {})
    generation.setdefault("x0", x0_mode(manifest))
    return generation
