"""``StoreManifest``, the one owner of the pair-store format: manifest round trip, appending shards, pair lookup,
shard soundness, origin and same-job identity. Small arrays written through the real writer; no teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reflowpairs.errors import ReflowPairsError
from reflowpairs.store import PairStore, PairStoreWriter, StoreManifest
from reflowpairs.store.jobs import JobDifference
from reflowpairs.store.layout import ARRAYS, IMPLICIT_ARRAYS, MANIFEST
from reflowpairs.store.shards import shard_attrs
from reflowpairs.store.soundness import CHECKSUM, LAYOUT

from .helpers import D0, D1, K, T, synthetic_pairs


def _provenance(seed: int = 7, num_frames: int = 5, **generation) -> dict:
    return {
        "teacher": {"fingerprint": "t" * 64},
        "dataset": {"fingerprint": "d" * 64},
        "generation": {"seed": seed, "samples_per_frame": K, "num_frames": num_frames, "x0": "explicit"}
        | generation,
        "software": {"reflowpairs": "test"},
    }


def _new(out: Path, backend: str = "zarr", x0: str = "explicit", **provenance) -> StoreManifest:
    generation = {"x0": x0} | provenance.pop("generation", {})
    return StoreManifest.new(out, backend, (T, D0), (T, D1), _provenance(**generation, **provenance), x0=x0)


def _store(out: Path, frames: list[list[int]], backend: str = "zarr", x0: str = "explicit") -> StoreManifest:
    """A store whose shards hold ``frames`` (one shard per inner list; only the last may be shorter than the first),
    written by ``PairStoreWriter``."""
    manifest = _new(out, backend, x0)
    writer = PairStoreWriter(manifest, shard_size=len(frames[0]) * K, samples_per_frame=K)
    for i, obs in enumerate(frames):
        writer.add(synthetic_pairs(obs, seed=i))
    writer.close(complete=True)
    return manifest


def _on_disk(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


# --- manifest: new, write, read ----------------------------------------------------------------------


def test_new_manifest_holds_exactly_the_documented_keys_in_order(tmp_path):
    manifest = _new(tmp_path)
    assert list(manifest.data) == [
        "format",
        "version",
        "backend",
        "store_id",
        "complete",
        "num_pairs",
        "num_frames",
        "x0",
        "x1",
        "teacher",
        "dataset",
        "generation",
        "software",
        "shards",
    ]
    assert manifest.data["x0"] == {"shape": [T, D0], "dtype": "float32"}
    assert manifest.data["x1"] == {"shape": [T, D1], "dtype": "float32"}
    assert not (tmp_path / MANIFEST).exists()  # new writes nothing


def test_write_then_read_round_trips(tmp_path):
    manifest = _new(tmp_path, "parquet", "implicit")
    manifest.write()
    assert _on_disk(tmp_path) == manifest.data
    assert list(_on_disk(tmp_path)) == list(manifest.data)
    back = StoreManifest.read(tmp_path)
    assert back.data == manifest.data and back.out == tmp_path
    assert (back.backend, back.x0_shape, back.x1_shape) == ("parquet", (T, D0), (T, D1))
    assert (back.x0_stored, back.x0_mode, back.stored_arrays) == (False, "implicit", IMPLICIT_ARRAYS)
    assert back.data["x0"]["stored"] is False and back.data["x0"]["probe"]["sha256"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_unknown_backend_and_x0_mode_name_the_setting(tmp_path):
    with pytest.raises(ReflowPairsError, match="Unknown `backend` 'hdf5'") as err:
        _new(tmp_path, "hdf5")
    assert "`backend`" in err.value.hint
    with pytest.raises(ReflowPairsError, match="`x0` must be one of explicit, implicit, got 'none'"):
        _new(tmp_path, x0="none")


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (None, "has no manifest.json"),
        ({"version": 3}, "has format version 3; this build reads versions 1, 2"),
        ({"format": "other"}, "is not a reflowpairs manifest"),
        ({"num_pairs": -1}, "num_pairs is -1, not a count"),
    ],
)
def test_read_refuses_what_is_not_a_sound_manifest(tmp_path, edit, words):
    if edit is not None:
        (tmp_path / MANIFEST).write_text(json.dumps(_new(tmp_path).data | edit))
    with pytest.raises(ReflowPairsError, match=words):
        StoreManifest.read(tmp_path)


def test_a_record_without_x0_mode_counts_as_explicit(tmp_path):
    manifest = _new(tmp_path)
    del manifest.data["generation"]["x0"]
    assert manifest.generation["x0"] == "explicit" and "x0" not in manifest.data["generation"]


# --- time direction -----------------------------------------------------------------------------------


def test_time_direction_is_written_after_x1_only_when_given(tmp_path):
    without = _new(tmp_path / "a")
    assert "time_direction" not in without.data and without.time_direction == "noise_at_1"
    given = StoreManifest.new(
        tmp_path / "b", "zarr", (T, D0), (T, D1), _provenance(), time_direction="noise_at_0"
    )
    keys = list(given.data)
    assert keys[keys.index("x1") + 1] == "time_direction"
    assert [k for k in keys if k != "time_direction"] == list(without.data)
    (tmp_path / "b").mkdir()
    given.write()
    assert _on_disk(tmp_path / "b")["time_direction"] == "noise_at_0"
    assert StoreManifest.read(tmp_path / "b").time_direction == "noise_at_0"
    assert PairStore(tmp_path / "b").time_direction == "noise_at_0"
    (tmp_path / "a").mkdir()
    without.write()
    assert PairStore(tmp_path / "a").time_direction == "noise_at_1"  # a store written without the key


def test_an_unknown_time_direction_is_refused_by_name(tmp_path):
    with pytest.raises(ReflowPairsError, match="Unknown `time_direction` 'backwards'") as err:
        StoreManifest.new(tmp_path, "zarr", (T, D0), (T, D1), _provenance(), time_direction="backwards")
    assert "noise_at_1, noise_at_0" in err.value.hint
    (tmp_path / MANIFEST).write_text(json.dumps(_new(tmp_path).data | {"time_direction": "backwards"}))
    with pytest.raises(
        ReflowPairsError, match="time_direction is 'backwards', not one of noise_at_1, noise_at_0"
    ):
        StoreManifest.read(tmp_path)


def test_time_direction_is_part_of_the_job(tmp_path):
    old = _new(tmp_path / "a")  # no key: noise_at_1
    same = StoreManifest.new(
        tmp_path / "b", "zarr", (T, D0), (T, D1), _provenance(), time_direction="noise_at_1"
    )
    other = StoreManifest.new(
        tmp_path / "c", "zarr", (T, D0), (T, D1), _provenance(), time_direction="noise_at_0"
    )
    assert old.job_differences(same) == [] and same.job_differences(old) == []
    assert old.job_differences(other) == [JobDifference("time_direction", "noise_at_1", "noise_at_0")]
    assert other.emptied(tmp_path / "d").time_direction == "noise_at_0"  # a rank's sub-store keeps it


# --- edits --------------------------------------------------------------------------------------------


def test_the_writer_lists_each_shard_once_it_is_in_place(tmp_path):
    manifest = _store(tmp_path, [[0, 1], [2, 3], [4]])
    on_disk = _on_disk(tmp_path)
    assert on_disk == manifest.data and on_disk["complete"] is True
    assert [s["path"] for s in on_disk["shards"]] == [f"shards/w0-000/w0-00000{i}.zarr" for i in range(3)]
    assert [s["num_pairs"] for s in on_disk["shards"]] == [4, 4, 2]
    assert (on_disk["num_pairs"], on_disk["num_frames"]) == (10, 5)
    first = on_disk["shards"][0]
    assert list(first) == [
        "path",
        "num_pairs",
        "num_frames",
        "obs_index_min",
        "obs_index_max",
        "store_id",
        "sha256",
    ]
    assert (first["obs_index_min"], first["obs_index_max"], first["store_id"]) == (0, 1, on_disk["store_id"])
    assert sorted(first["sha256"]) == sorted(ARRAYS)
    assert manifest.shard_names() == {f"w0-00000{i}.zarr" for i in range(3)}


def test_an_implicit_store_has_no_x0_array_nor_checksum(tmp_path):
    manifest = _store(tmp_path, [[0, 1]], backend="parquet", x0="implicit")
    assert sorted(manifest.shards[0]["sha256"]) == sorted(IMPLICIT_ARRAYS)
    store = PairStore(tmp_path)
    assert store.verify_shard(0) == []
    assert store.read(0)["x0"].shape == (2 * K, T, D0)  # regenerated


def test_append_shard_adds_to_the_totals_and_writes_at_once(tmp_path):
    manifest = _new(tmp_path)
    manifest.write()
    manifest.append_shard({"path": "shards/a.zarr", "num_pairs": 6, "num_frames": 3})
    manifest.append_shard({"path": "shards/b.zarr", "num_pairs": 0, "num_frames": 0})
    on_disk = StoreManifest.read(tmp_path).data  # manifest.json and the journal it names
    assert (on_disk["num_pairs"], on_disk["num_frames"]) == (6, 3)
    assert [s["path"] for s in on_disk["shards"]] == ["shards/a.zarr", "shards/b.zarr"]


def test_skipped_frames_are_recorded_once_and_complete_follows_coverage(tmp_path):
    manifest = _new(tmp_path)  # generation.num_frames 5
    manifest.write()
    manifest.append_shard({"path": "shards/a.zarr", "num_pairs": 6, "num_frames": 3})
    manifest.set_complete()
    assert _on_disk(tmp_path)["complete"] is False
    manifest.add_skipped([4, 3, 4])
    manifest.add_skipped([3])
    assert StoreManifest.read(tmp_path).skipped_frames == [4, 3] == manifest.skipped_frames
    manifest.set_complete()
    assert _on_disk(tmp_path)["complete"] is True
    manifest.set_complete(False)
    assert _on_disk(tmp_path)["complete"] is False


def test_emptied_keeps_the_job_and_drops_the_shards(tmp_path):
    manifest = _store(tmp_path / "a", [[0, 1]])
    manifest.data["partition"] = {"index": 0, "count": 2, "num_frames": 3}
    part = manifest.emptied(tmp_path / "part")
    assert part.out == tmp_path / "part" and part.store_id == manifest.store_id
    assert (part.shards, part.data["num_pairs"], part.data["num_frames"], part.skipped_frames) == (
        [],
        0,
        0,
        [],
    )
    assert list(part.data) == list(manifest.data) + ["skipped_frames"]
    assert manifest.shards  # the original is untouched
    merged = manifest.emptied(tmp_path / "m", drop=("shards", "partition"), store_id="new", merged_from=["a"])
    assert "partition" not in merged.data and merged.store_id == "new"
    assert list(merged.data)[-3:] == ["shards", "skipped_frames", "merged_from"]
    assert part.job_differences(manifest) == [] and merged.job_differences(manifest) == []


# --- pair lookup --------------------------------------------------------------------------------------


def _counts(counts: list[int]) -> StoreManifest:
    return StoreManifest(Path("."), {"shards": [{"num_pairs": n} for n in counts]})


def test_locate_numbers_pairs_in_shard_order_and_skips_empty_shards():
    manifest = _counts([3, 0, 2, 0])
    assert manifest.listed_pairs() == 5
    assert [manifest.locate(i) for i in range(5)] == [(0, 0), (0, 1), (0, 2), (2, 0), (2, 1)]
    shards, rows = manifest.locate_many(np.array([4, 0, 3]))
    assert shards.tolist() == [2, 0, 2] and rows.tolist() == [1, 0, 0]


@pytest.mark.parametrize("pair_id", [-1, 5, 10**12])
def test_locate_outside_the_store_is_an_index_error(pair_id):
    with pytest.raises(IndexError, match=f"pair id {pair_id} out of range"):
        _counts([3, 0, 2]).locate(pair_id)


def test_locate_in_an_empty_store():
    manifest = _counts([])
    assert manifest.listed_pairs() == 0 and len(manifest.pair_ends()) == 0
    with pytest.raises(IndexError, match=r"\[0, 0\)"):
        manifest.locate(0)


def test_locate_follows_appended_shards(tmp_path):
    manifest = _new(tmp_path)
    manifest.write()
    manifest.append_shard({"path": "shards/a.zarr", "num_pairs": 2, "num_frames": 1})
    assert manifest.locate(1) == (0, 1)
    manifest.append_shard({"path": "shards/b.zarr", "num_pairs": 2, "num_frames": 1})
    assert manifest.locate(2) == (1, 0) and manifest.listed_pairs() == 4


def test_locate_matches_the_rows_the_store_reads(tmp_path):
    _store(tmp_path, [[0, 1], [2, 3], [4]])
    store = PairStore(tmp_path)
    obs = np.concatenate([store.read(i, ("obs_index",))["obs_index"] for i in range(len(store.shards))])
    for pair_id in range(len(obs)):
        shard, row = store.meta.locate(pair_id)
        assert store.read(shard, ("obs_index",))["obs_index"][row] == obs[pair_id]


# --- soundness and origin -----------------------------------------------------------------------------


def test_a_sound_shard_has_no_problems(tmp_path):
    _store(tmp_path, [[0, 1], [2]])
    store = PairStore(tmp_path)
    for i in range(2):
        assert store.meta.shard_problems(i, store.read_stored(i)) == [] and store.verify_shard(i) == []


def test_changed_content_is_a_checksum_problem(tmp_path):
    _store(tmp_path, [[0, 1]])
    store = PairStore(tmp_path)
    data = store.read_stored(0)
    data["x1"][0, 0, 0] += 1
    assert store.meta.shard_problems(0, data) == [
        ("x1", CHECKSUM, "x1 does not match the checksum recorded when it was written")
    ]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d.update(x1=d["x1"][1:]), "x1 is float32[3, 3, 2], the manifest says float32[4, 3, 2]"),
        (
            lambda d: d.update(x0=d["x0"].astype(np.float64)),
            "x0 is float64[4, 3, 4], the manifest says float32",
        ),
        (
            lambda d: d.update(sample=d["sample"][:, None]),
            "sample is int32[4, 1], the manifest says int32[4]",
        ),
    ],
    ids=["rows", "dtype", "shape"],
)
def test_wrong_rows_dtype_or_shape_is_a_layout_problem(tmp_path, change, words):
    _store(tmp_path, [[0, 1]])
    store = PairStore(tmp_path)
    data = store.read_stored(0)
    change(data)
    problems = store.meta.shard_problems(0, data)
    assert [(p.kind, p.array) for p in problems] == [(LAYOUT, words.split()[0])]
    assert problems[0].text.startswith(words)


def test_a_missing_shard_file_is_named(tmp_path):
    manifest = _store(tmp_path, [[0, 1]], backend="parquet")
    (tmp_path / manifest.shards[0]["path"]).unlink()
    assert PairStore(tmp_path).verify_shard(0) == [
        f"Shard {manifest.shards[0]['path']} of store {tmp_path} is missing."
    ]


def test_origin_follows_the_store_id_and_name_a_shard_was_written_with(tmp_path):
    manifest = _store(tmp_path, [[0, 1]])
    store = PairStore(tmp_path)
    attrs = shard_attrs(store.shard_path(0), "zarr")
    assert store.origin_problem(0) is None and manifest.origin_problem(0, attrs) is None
    name = manifest.shards[0]["path"]
    assert manifest.origin_problem(0, attrs | {"store_id": "other"}) == (
        f"{name} belongs to store 'other', not this store ({manifest.store_id}): copied in from another store"
    )
    assert manifest.origin_problem(0, attrs | {"shard": "shards/x.zarr"}) == (
        f"{name} was written as shards/x.zarr (a copy or a renamed shard)"
    )
    # a merged store keeps each shard's original store id and name in its entry
    manifest.shards[0].update(path="shards/s000-w0-000000.zarr", written_as=name)
    manifest.data["store_id"] = "merged"
    assert manifest.origin_problem(0, attrs) is None


# --- same job -----------------------------------------------------------------------------------------


def test_the_same_job_has_no_differences(tmp_path):
    a, b = _new(tmp_path / "a"), _new(tmp_path / "b")
    assert a.store_id != b.store_id and a.job_differences(b) == []
    a, b = _new(tmp_path / "a", x0="implicit"), _new(tmp_path / "b", x0="implicit")
    assert a.job_differences(b) == []


def test_each_difference_is_named_with_both_values(tmp_path):
    a = _new(tmp_path / "a")
    b = _new(tmp_path / "b", "parquet", generation={"seed": 8, "num_frames": 5})
    b.data["teacher"]["fingerprint"] = "u" * 64
    del b.data["dataset"]
    assert a.job_differences(b) == [
        JobDifference("backend", "zarr", "parquet"),
        JobDifference("teacher.fingerprint", "t" * 64, "u" * 64),
        JobDifference("dataset.fingerprint", "d" * 64, None),
        JobDifference("generation.seed", 7, 8),
    ]


def test_x0_storage_is_one_difference(tmp_path):
    a, b = _new(tmp_path / "a"), _new(tmp_path / "b", x0="implicit")
    assert a.job_differences(b) == [JobDifference("x0 storage", "explicit", "implicit")]
    del a.data["generation"]["x0"]  # recorded before the setting: explicit
    assert a.job_differences(b) == [JobDifference("x0 storage", "explicit", "implicit")]
    b.data["x1"]["shape"] = [T, 9]
    assert [d.field for d in a.job_differences(b)] == ["x0 storage", "x1"]


def test_an_implicit_stores_probe_follows_its_seed(tmp_path):
    a = _new(tmp_path / "a", x0="implicit")
    b = _new(tmp_path / "b", x0="implicit", generation={"seed": 8, "num_frames": 5})
    assert a.job_differences(b) == [JobDifference("generation.seed", 7, 8)]
    c = _new(tmp_path / "c", x0="implicit")
    c.data["x0"]["probe"] = dict(
        c.data["x0"]["probe"], sha256="0" * 64
    )  # same seed, other X_0: another torch
    assert [d.field for d in a.job_differences(c)] == ["x0"]
