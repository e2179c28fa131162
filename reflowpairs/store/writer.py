"""Writing a pair store: ``PairStoreWriter`` cuts frames of pairs into atomic shards and lists them in the manifest.

One writer per process: shard names carry the writer's id, so writers on several processes never collide, and a
single manifest lists them all. A shard holds whole frames only (all K samples of a frame land in the same shard), so
a resumed run can tell done frames from shard contents alone.
"""

from __future__ import annotations

import numpy as np

from reflowpairs.errors import ReflowPairsError
from reflowpairs.store.layout import FORMAT, SHARD_SUFFIX, SHARDS_DIR, shard_rel_path
from reflowpairs.store.manifest import StoreManifest
from reflowpairs.store.pairs import Pairs, checksums
from reflowpairs.store.shards import write_shard


class PairStoreWriter:
    """Appends whole frames of pairs to a store and cuts them into atomic shards.

    ``add`` takes pairs frame by frame (all K samples of a frame together); once ``shard_size``
    pairs are buffered, a shard of ``max(K, shard_size // K * K)`` pairs is written and journaled
    (``StoreManifest.append_shard``). ``close`` writes what is left and folds the journal into the manifest. Not thread-safe: one writer per process. ``add`` always takes X_0;
    a store whose manifest says ``x0.stored: false`` drops it (``StoreManifest.stored_arrays``).
    """

    def __init__(
        self,
        manifest: StoreManifest,
        shard_size: int,
        samples_per_frame: int,
        writer_id: str = "w0",
    ):
        if shard_size < 1:
            raise ReflowPairsError(f"`shard_size` must be at least 1, got {shard_size}.")
        self.out = manifest.out
        self.manifest = manifest
        self.samples_per_frame = samples_per_frame
        self.pairs_per_shard = max(samples_per_frame, shard_size // samples_per_frame * samples_per_frame)
        self.writer_id = writer_id
        self._buffer: list[Pairs] = []
        self._buffered = 0
        (self.out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        self._seq = sum(1 for name in manifest.shard_names() if name.startswith(f"{writer_id}-"))
        manifest.write()

    def add(self, pairs: Pairs) -> None:
        self._buffer.append(pairs)
        self._buffered += len(pairs)
        while self._buffered >= self.pairs_per_shard:
            block = Pairs.concat(self._buffer)
            self._write(block.take(slice(0, self.pairs_per_shard)))
            rest = block.take(slice(self.pairs_per_shard, None))
            self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def skip(self, obs_index: list[int]) -> None:
        """Record frames skipped for non-finite X_1 in the manifest at once (``StoreManifest.add_skipped``), even if
        this run dies before its next shard."""
        self.manifest.add_skipped(obs_index)

    def close(self, complete: bool) -> None:
        """Write buffered pairs as a last shard and mark the manifest complete (or not)."""
        if self._buffered:
            self._write(Pairs.concat(self._buffer))
            self._buffer, self._buffered = [], 0
        self.manifest.set_complete(complete)

    def _write(self, pairs: Pairs) -> None:
        manifest = self.manifest
        rel = shard_rel_path(f"{self.writer_id}-{self._seq:06d}{SHARD_SUFFIX[manifest.backend]}")
        attrs = {"format": FORMAT, "store_id": manifest.store_id, "shard": rel}
        arrays = manifest.stored_arrays
        write_shard(self.out / rel, pairs, manifest.backend, attrs, arrays)
        self._seq += 1
        frames = len(np.unique(pairs.obs_index))
        manifest.append_shard(
            {
                "path": rel,
                "num_pairs": len(pairs),
                "num_frames": frames,
                "obs_index_min": int(pairs.obs_index.min()),
                "obs_index_max": int(pairs.obs_index.max()),
                "store_id": manifest.store_id,
                "sha256": checksums(pairs, arrays),
            }
        )
