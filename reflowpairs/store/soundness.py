"""Whether a shard is the one its manifest entry recorded: its arrays' layout and checksums, and its origin."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from reflowpairs.store.layout import DTYPES
from reflowpairs.store.pairs import array_sha256

LAYOUT, CHECKSUM = "layout", "checksum"


class ShardProblem(NamedTuple):
    """What is wrong with one array of a shard (``StoreManifest.shard_problems``): ``kind`` is ``"layout"`` (row
    count, shape or dtype other than the manifest says) or ``"checksum"`` (content other than what was written);
    ``text`` says it in words, starting with the array's name."""

    array: str
    kind: str
    text: str


def shard_problems(
    entry: dict[str, Any],
    x0_shape: tuple[int, ...],
    x1_shape: tuple[int, ...],
    arrays: tuple[str, ...],
    data: dict[str, np.ndarray],
) -> list[ShardProblem]:
    """What is wrong with the stored arrays ``data`` of the shard listed as ``entry`` (as ``read_shard`` returns
    them): each of ``arrays`` must have the entry's row count, shape ``(n, *x0_shape)``/``(n, *x1_shape)``/``(n,)``,
    its dtype (``DTYPES``), and the checksum recorded when it was written; [] when the shard is sound."""
    n = entry.get("num_pairs")
    expected = {"x0": (n, *x0_shape), "x1": (n, *x1_shape), "obs_index": (n,), "sample": (n,)}
    recorded = entry.get("sha256") or {}
    problems = []
    for name in arrays:
        array = data[name]
        if array.shape != expected[name] or array.dtype != DTYPES[name]:
            problems.append(
                ShardProblem(
                    name,
                    LAYOUT,
                    f"{name} is {array.dtype}{list(array.shape)}, the manifest says {DTYPES[name]}{list(expected[name])}",
                )
            )
        elif array_sha256(array) != recorded.get(name):
            problems.append(
                ShardProblem(
                    name, CHECKSUM, f"{name} does not match the checksum recorded when it was written"
                )
            )
    return problems


def origin_problem(entry: dict[str, Any], store_id: str | None, attrs: dict[str, Any]) -> str | None:
    """What is wrong with where the shard listed as ``entry`` in store ``store_id`` comes from, given the attributes
    it carries (``shard_attrs``), or None: it must carry the store id and name it was written with (the entry's
    ``store_id`` and ``written_as``, which a merged store keeps for each shard, else ``store_id`` and the entry's
    path)."""
    name = entry["path"]
    origin_id = entry.get("store_id", store_id)
    if attrs.get("store_id") != origin_id:
        return (
            f"{name} belongs to store {attrs.get('store_id')!r}, not this store ({origin_id}): copied in from "
            "another store"
        )
    if attrs.get("shard") != entry.get("written_as", name):
        return f"{name} was written as {attrs.get('shard')} (a copy or a renamed shard)"
    return None
