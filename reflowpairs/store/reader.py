"""Reading a pair store: ``PairStore`` opens the manifest and reads shards on demand, regenerating X_0 when the
store does not keep it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import check_generator, pair_noise
from reflowpairs.store.layout import ARRAYS
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.pairs import Pairs, array_sha256
from reflowpairs.store.shards import read_shard, shard_attrs


class PairStore:
    """Read access to a pair store: its manifest (``meta``, a ``StoreManifest``; ``manifest`` is its dict), and shards
    on demand (nothing loaded up front). ``time_direction`` is the teacher family's time convention the manifest
    records (``"noise_at_1"`` for a store written without it).

    ``read`` returns ``x0`` whether or not the shards store it: a store with ``x0.stored: false`` has it regenerated
    from ``(generation.seed, obs_index, sample)`` by its recorded generator (``regenerate_x0``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = StoreManifest.read(self.path)
        self.manifest: dict[str, Any] = self.meta.data
        self.backend: str = self.meta.backend
        self.x0_shape = self.meta.x0_shape
        self.x1_shape = self.meta.x1_shape
        self.shards: list[dict[str, Any]] = self.meta.shards
        self.x0_stored: bool = self.meta.x0_stored
        self.stored_arrays: tuple[str, ...] = self.meta.stored_arrays
        self.x0_generator: str = self.meta.x0_generator
        self.seed: int | None = self.meta.seed
        self.time_direction: str = self.meta.time_direction  # TIME_DIRECTIONS; "noise_at_1" when not recorded
        self._x0_checked = False

    def check_x0_generator(self) -> str:
        """For a store that does not keep X_0: raise ``ReflowPairsError`` unless this build knows its generator and,
        when the manifest records a ``probe``, regenerating that pair here gives the writer's X_0 (same checksum).
        Returns what was checked, in words. One draw; ``regenerate_x0`` calls it once per ``PairStore``."""
        check_generator(self.x0_generator, f"store {self.path}")
        probe = self.manifest["x0"].get("probe")
        if probe is None:
            self._x0_checked = True
            return f"generator {self.x0_generator} is known (the manifest records no probe to compare with)"
        try:
            obs, sample, recorded = int(probe["obs_index"]), int(probe["sample"]), str(probe["sha256"])
        except (TypeError, KeyError, ValueError) as err:
            raise ReflowPairsError(
                f"Store {self.path}: its manifest's x0.probe {probe!r} is not {{obs_index, sample, sha256}}.",
                "The manifest is damaged or was edited by hand; restore it from a copy or regenerate the store.",
            ) from err
        got = array_sha256(
            pair_noise(int(self.seed), np.array([obs]), np.array([sample]), self.x0_shape, self.x0_generator)[
                0
            ]
        )
        if got != recorded:
            written = (self.manifest.get("software") or {}).get("torch", "?")
            import torch  # heavy: only to name its version in this error

            raise ReflowPairsError(
                f"Store {self.path} does not keep X_0, and X_0 regenerated here differs from the writer's: pair "
                f"(obs_index {obs}, sample {sample}) has sha256 {got[:12]}..., the manifest records {recorded[:12]}... "
                f"(generator {self.x0_generator}; torch {torch.__version__} here, {written} when it was written).",
                f"Read it with torch {written}, or regenerate the store (with `x0` explicit to keep X_0 in it).",
            )
        self._x0_checked = True
        return f"generator {self.x0_generator} is known and reproduces the writer's X_0 of pair ({obs}, {sample})"

    def regenerate_x0(self, obs_index: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """X_0 ``(n, T, D0)`` float32 of pairs ``(obs_index[r], sample[r])`` from the store's seed and generator;
        a generator this build does not know, or one that does not reproduce the recorded probe, raises
        ``ReflowPairsError`` (``check_x0_generator``)."""
        if not self._x0_checked:
            self.check_x0_generator()
        return pair_noise(int(self.seed), obs_index, sample, self.x0_shape, self.x0_generator)

    def __len__(self) -> int:
        return int(self.manifest["num_pairs"])

    def shard_path(self, i: int) -> Path:
        return self.path / self.shards[i]["path"]

    def read(self, i: int, columns=ARRAYS) -> dict[str, np.ndarray]:
        """Columns of shard ``i``, ``x0`` regenerated when the store does not keep it; a missing or unreadable shard
        raises an error naming it."""
        columns = tuple(columns)
        if "x0" in columns and not self.x0_stored:
            stored = tuple(dict.fromkeys(c for c in (*columns, "obs_index", "sample") if c != "x0"))
            data = self.read_stored(i, stored)
            x0 = self.regenerate_x0(data["obs_index"], data["sample"])
            return {name: x0 if name == "x0" else data[name] for name in columns}
        return self.read_stored(i, columns)

    def read_stored(self, i: int, columns=ARRAYS) -> dict[str, np.ndarray]:
        """Columns of shard ``i`` as its files hold them (no regeneration); errors name the shard."""
        path = self.shard_path(i)
        if not path.exists():
            raise ReflowPairsError(
                f"Shard {self.shards[i]['path']} of store {self.path} is missing.",
                "The store is damaged; regenerate it or restore the file.",
            )
        try:
            return read_shard(path, self.backend, self.x0_shape, self.x1_shape, columns)
        except Exception as err:  # noqa: BLE001 - zarr/pyarrow/numcodecs raise many kinds
            raise ReflowPairsError(
                f"Shard {self.shards[i]['path']} of store {self.path} cannot be read ({type(err).__name__}: {err}).",
                "The store is damaged; regenerate it or restore the file.",
            ) from err

    def read_pairs(self, i: int) -> Pairs:
        return Pairs(**self.read(i))

    def iter_shards(self) -> Iterator[Pairs]:
        for i in range(len(self.shards)):
            yield self.read_pairs(i)

    def index(self) -> tuple[np.ndarray, np.ndarray]:
        """``(obs_index, sample)`` of every pair, in shard order (reads only those two columns)."""
        cols = [self.read(i, ("obs_index", "sample")) for i in range(len(self.shards))]
        if not cols:
            return np.zeros(0, np.int64), np.zeros(0, np.int32)
        return np.concatenate([c["obs_index"] for c in cols]), np.concatenate([c["sample"] for c in cols])

    def verify_shard(self, i: int) -> list[str]:
        """Problems with shard ``i``: unreadable, or ``StoreManifest.shard_problems`` (row count, shape, dtype, checksum
        of the arrays it stores; X_0 is not read, nor regenerated, when the store does not keep it)."""
        try:
            data = self.read_stored(i, self.stored_arrays)
        except ReflowPairsError as err:
            return [err.what]
        return [problem.text for problem in self.meta.shard_problems(i, data)]

    def origin_problem(self, i: int) -> str | None:
        """``StoreManifest.origin_problem`` of shard ``i``, from the attributes its file carries."""
        return self.meta.origin_problem(i, shard_attrs(self.shard_path(i), self.backend))
