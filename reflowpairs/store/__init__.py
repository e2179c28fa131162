"""The sharded pair store: ``OUT/manifest.json`` plus ``OUT/shards/<group>/<name>.zarr|.parquet``.

The format is a contract other tools can read without this package; ``docs/pair-store.md`` states it and this
package keeps to it. In short:

- a shard holds n pairs: ``x0`` (n, T, D0) float32, ``x1`` (n, T, D1) float32, ``obs_index`` (n,) int64, ``sample``
  (n,) int32 (zarr v3 arrays, one data file each through zarr's sharding codec, or Parquet columns with x0/x1 as
  fixed-size lists of float32, each tensor flattened row-major; ``shards``);
- shards sit in group folders of at most ``SHARDS_PER_FOLDER`` shards (``layout.shard_rel_path``);
- a shard is written under ``.tmp-<name>`` beside its final path, flushed, and renamed into place only when complete;
  one fsynced line recording it is then appended to the store's journal (``journal``), and the journal is folded into
  ``manifest.json`` (atomically: temp file + rename) when the run ends. Writing a shard therefore costs the same
  whatever the store's size, the manifest plus its journal only ever list complete shards, and anything else under
  ``shards/`` is a leftover from an interrupted run;
- each shard entry records sha256 checksums of its arrays' logical content (C order, little-endian bytes), so a reader
  can prove a shard is the one that was written (``soundness``);
- X_0 is a pure function of ``(generation.seed, obs_index, sample)`` (``reflowpairs/noise.py``), so a store may leave
  it out (``x0``: ``generate --x0 implicit``); ``PairStore.read`` regenerates it;
- the manifest may record the teacher family's time convention, ``time_direction`` (``noise_at_1`` or ``noise_at_0``;
  a store without the key is ``noise_at_1``);
- a shard holds whole frames only (all K samples of a frame land in the same shard), so a resumed run can tell done
  frames from shard contents alone.

Modules: ``layout`` (names, constants, paths), ``pairs`` (a block of pairs, checksums), ``x0`` (how X_0 is kept),
``shards`` (shard file I/O, zarr and Parquet), ``contract`` (loading and checking a manifest), ``journal``,
``soundness``, ``jobs`` (same-job comparison), ``manifest`` (``StoreManifest``), ``writer`` (``PairStoreWriter``),
``reader`` (``PairStore``), ``lock`` (one writer per store), ``merge`` (slices and a multi-process run's parts),
``inspect`` (what ``reflowpairs inspect`` shows). This package re-exports the small public API below; ``merge`` and
``inspect`` are imported from their modules.
"""

from reflowpairs.store.manifest import StoreManifest, read_manifest
from reflowpairs.store.pairs import Pairs
from reflowpairs.store.reader import PairStore
from reflowpairs.store.writer import PairStoreWriter

__all__ = ["PairStore", "PairStoreWriter", "Pairs", "StoreManifest", "read_manifest"]
