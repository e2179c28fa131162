"""Shard files: writing and reading one shard with zarr or Parquet.

A shard holds n pairs: ``x0`` (n, T, D0) float32, ``x1`` (n, T, D1) float32, ``obs_index`` (n,) int64, ``sample``
(n,) int32 (``arrays`` of them: a store that does not keep X_0 leaves ``x0`` out). zarr: a v3 group, one array per
name, each array one data file through zarr's sharding codec, the attributes in the group's metadata. Parquet: one
column per name, x0/x1 as fixed-size lists of float32 (each tensor flattened row-major), the attributes as JSON in
the schema metadata under ``reflowpairs``. A shard is written under ``.tmp-<name>`` beside its final path, fsynced
and renamed into place only when complete (``reflowpairs.atomic.replace_atomically``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from reflowpairs.atomic import fsync_dir, replace_atomically
from reflowpairs.store.layout import ARRAYS, ZARR_CHUNK, remove_path
from reflowpairs.store.pairs import Pairs

# zarr and pyarrow are imported where a shard is written or read: `reflowpairs inspect` and the CLI's start-up read
# manifests only and need neither.


def write_shard(
    path: Path, pairs: Pairs, backend: str, attrs: dict[str, Any], arrays: tuple[str, ...] = ARRAYS
) -> None:
    """Write ``arrays`` of ``pairs`` to ``path`` atomically: into ``.tmp-<name>`` beside it, fsync, rename."""
    if not path.parent.is_dir():  # a new group folder: its entry in shards/ must survive a crash too
        path.parent.mkdir(parents=True)
        fsync_dir(path.parent.parent)

    def write(tmp: Path) -> None:
        remove_path(tmp)  # a leftover of an interrupted run
        if backend == "zarr":
            _write_zarr(tmp, pairs, attrs, arrays)
        else:
            _write_parquet(tmp, pairs, attrs, arrays)

    replace_atomically(path, write)


def _write_zarr(path: Path, pairs: Pairs, attrs: dict[str, Any], arrays: tuple[str, ...]) -> None:
    import zarr  # lazy: only the storage backend in use is imported

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update(attrs)
    for name in arrays:
        data = getattr(pairs, name)
        rows = min(ZARR_CHUNK, max(len(data), 1))
        chunks = (rows, *data.shape[1:])
        # one zarr shard (one file, ``c.0[.0.0]``) holds the whole array, its chunks inside it
        whole = (-(-max(len(data), 1) // rows) * rows, *data.shape[1:])
        array = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=whole,
            chunk_key_encoding={"name": "default", "separator": "."},
        )
        array[...] = data


def _write_parquet(path: Path, pairs: Pairs, attrs: dict[str, Any], arrays: tuple[str, ...]) -> None:
    import pyarrow as pa  # lazy: only the storage backend in use is imported
    import pyarrow.parquet as pq  # lazy: only the storage backend in use is imported

    def fixed(x: np.ndarray) -> pa.FixedSizeListArray:
        width = int(np.prod(x.shape[1:]))
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), width)

    columns = {
        "obs_index": pa.array(pairs.obs_index),
        "sample": pa.array(pairs.sample),
        "x0": fixed(pairs.x0) if "x0" in arrays else None,
        "x1": fixed(pairs.x1),
    }
    table = pa.table(
        {name: column for name, column in columns.items() if name in arrays}
    ).replace_schema_metadata({b"reflowpairs": json.dumps(attrs).encode()})
    pq.write_table(table, path, row_group_size=1024)


def read_shard(
    path: Path, backend: str, x0_shape: tuple[int, ...], x1_shape: tuple[int, ...], columns=ARRAYS
) -> dict[str, np.ndarray]:
    """Read ``columns`` of a shard as numpy arrays (x0/x1 reshaped to ``(n, *shape)``)."""
    if backend == "zarr":
        import zarr  # lazy: only the storage backend in use is imported

        group = zarr.open_group(str(path), mode="r")
        return {name: np.asarray(group[name][...]) for name in columns}
    import pyarrow.parquet as pq  # lazy: only the storage backend in use is imported

    table = pq.read_table(path, columns=list(columns))
    out = {}
    for name in columns:
        column = table.column(name).combine_chunks()
        if name in ("x0", "x1"):
            shape = x0_shape if name == "x0" else x1_shape
            out[name] = column.values.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
        else:
            out[name] = column.to_numpy()
    return out


def shard_attrs(path: Path, backend: str) -> dict[str, Any]:
    """The metadata a shard carries about itself (store id, name)."""
    if backend == "zarr":
        import zarr  # lazy: only the storage backend in use is imported

        return dict(zarr.open_group(str(path), mode="r").attrs)
    import pyarrow.parquet as pq  # lazy: only the storage backend in use is imported

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(b"reflowpairs", b"{}"))
