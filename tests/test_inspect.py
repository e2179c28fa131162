"""`reflowpairs inspect`: its JSON agrees with what plain zarr / pyarrow reads of the store show (both
backends), the tables name what they show, `--pair` shows the pair it names, statistics are streamed
and skip non-finite values, and bad input gets a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from reflowpairs.store.inspect import RunningStats

from .helpers import cli, generate_store, inspect_json


@pytest.fixture(scope="module")
def parquet_store(tiny_world, tmp_path_factory) -> Path:
    return generate_store(
        tiny_world,
        tmp_path_factory.mktemp("inspect") / "parquet",
        episodes=[2, 3],
        samples_per_frame=3,
        batch_size=8,
        shard_size=30,
        backend="parquet",
    )


def plain_read(store: Path) -> dict:
    """Every pair of the store in manifest shard order, read with zarr / pyarrow only (docs/pair-store.md)."""
    manifest = json.loads((store / "manifest.json").read_text())
    parts, dtypes = [], set()
    for shard in manifest["shards"]:
        path = store / shard["path"]
        if manifest["backend"] == "zarr":
            group = zarr.open_group(str(path), mode="r")
            part = {name: np.asarray(group[name][...]) for name in ("x0", "x1", "obs_index", "sample")}
            dtypes.add((str(group["x0"].dtype), str(group["x1"].dtype)))
        else:
            table = pq.read_table(path)
            n = table.num_rows
            part = {
                "x0": np.stack(table.column("x0").to_numpy(zero_copy_only=False)).reshape(
                    n, *manifest["x0"]["shape"]
                ),
                "x1": np.stack(table.column("x1").to_numpy(zero_copy_only=False)).reshape(
                    n, *manifest["x1"]["shape"]
                ),
                "obs_index": table.column("obs_index").to_numpy(),
                "sample": table.column("sample").to_numpy(),
            }
            dtypes.add(
                tuple(
                    str(np.dtype(table.schema.field(k).type.value_type.to_pandas_dtype()))
                    for k in ("x0", "x1")
                )
            )
        parts.append(part)
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    size = (
        sum(f.stat().st_size for f in (store / "shards").rglob("*") if f.is_file())
        + (store / "manifest.json").stat().st_size
    )
    return {"manifest": manifest, "data": data, "dtypes": dtypes, "bytes": size}


@pytest.mark.parametrize("which", ["zarr", "parquet"])
def test_inspect_json_agrees_with_plain_reads(tiny_store, parquet_store, which):
    store = tiny_store if which == "zarr" else parquet_store
    got = inspect_json(store, "--stats")
    plain = plain_read(store)
    manifest, data = plain["manifest"], plain["data"]
    x0, x1 = data["x0"].astype(np.float64), data["x1"].astype(np.float64)
    frames, per_frame = np.unique(data["obs_index"], return_counts=True)
    assert got["backend"] == which == manifest["backend"]
    assert (
        got["shards"] == len(manifest["shards"])
        and got["pairs"] == len(data["obs_index"]) == manifest["num_pairs"]
    )
    assert got["frames"] == len(frames)
    assert got["samples_per_frame"] == {
        "recorded": manifest["generation"]["samples_per_frame"],
        "min": int(per_frame.min()),
        "max": int(per_frame.max()),
    }
    ((x0_dtype, x1_dtype),) = plain["dtypes"]
    assert got["x0"] == {"shape": list(data["x0"].shape[1:]), "dtype": x0_dtype}
    assert got["x1"] == {"shape": list(data["x1"].shape[1:]), "dtype": x1_dtype}
    assert got["bytes_on_disk"] == plain["bytes"]
    assert got["bytes_per_pair"] == pytest.approx(
        (plain["bytes"] - (store / "manifest.json").stat().st_size) / len(x0)
    )
    assert (
        got["complete"] is True
        and got["teacher"] == manifest["teacher"]
        and got["dataset"] == manifest["dataset"]
    )
    assert got["generation"] == manifest["generation"] and got["software"] == manifest["software"]
    stats = got["statistics"]
    assert stats["x0"]["mean"] == pytest.approx(x0.mean(), abs=1e-9)
    assert stats["x0"]["std"] == pytest.approx(x0.std(), rel=1e-9)
    flat = x1.reshape(-1, x1.shape[-1])
    for key, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std)):
        assert stats["x1"][key] == pytest.approx(fn(flat, axis=0).tolist(), rel=1e-9, abs=1e-9), key
    assert stats["x0"]["nonfinite"] == stats["x1"]["nonfinite"] == 0


def test_inspect_tables_name_what_they_show(tiny_world, tiny_store):
    result = cli("inspect", str(tiny_store), "--stats")
    for words in (
        "backend",
        "zarr",
        "frames covered",
        "samples per frame",
        "bytes on disk",
        "bytes per pair",
        "provenance",
        "teacher",
        "fingerprint",
        "generation",
        "num_steps",
        "X_0 (noise",
        "X_1 per action dimension",
    ):
        assert words in result.output, words
    assert "144" in result.output  # frames of episodes 0-5


@pytest.mark.parametrize("which", ["zarr", "parquet"])
def test_pair_shows_the_pair_it_names(tiny_store, parquet_store, which):
    store = tiny_store if which == "zarr" else parquet_store
    plain = plain_read(store)
    data, first_shard = plain["data"], plain["manifest"]["shards"][0]["num_pairs"]
    index = first_shard + 5  # a pair in the second shard
    got = inspect_json(store, "--pair", str(index), "--rows", "2")
    assert (
        got["index"] == index
        and got["shard"].endswith(("w0-000001.zarr", "w0-000001.parquet"))
        and got["row"] == 5
    )
    assert (got["obs_index"], got["sample"]) == (int(data["obs_index"][index]), int(data["sample"][index]))
    np.testing.assert_array_equal(np.array(got["x0"], np.float32), data["x0"][index, :2])
    np.testing.assert_array_equal(np.array(got["x1"], np.float32), data["x1"][index, :2])
    table = cli("inspect", str(store), "--pair", str(index))
    assert f"obs_index {got['obs_index']}" in table.output and "X_1" in table.output


def test_pair_out_of_range(tiny_store):
    result = cli("inspect", str(tiny_store), "--pair", "288", exit_code=1)
    assert (
        "--pair 288 is out of range" in result.output
        and "0 to 287" in result.output
        and "Traceback" not in result.output
    )


def test_not_a_store(tmp_path):
    result = cli("inspect", str(tmp_path), exit_code=1)
    assert "is not a pair store" in result.output and "Traceback" not in result.output


def test_missing_shard_is_named(tiny_store, tmp_path):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    shutil.rmtree(store / "shards/w0-000/w0-000002.zarr")
    result = cli("inspect", str(store), "--stats", exit_code=1)
    assert "shards/w0-000/w0-000002.zarr" in result.output and "missing" in result.output
    assert "Traceback" not in result.output


def test_nonfinite_values_are_counted_and_left_out_of_the_statistics(tiny_store, tmp_path):
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    group = zarr.open_group(str(store / "shards/w0-000/w0-000001.zarr"), mode="r+")
    group["x1"][4, 0, 1] = np.nan
    group["x1"][9, 3, 0] = np.inf
    got = inspect_json(store, "--stats")
    x1 = plain_read(store)["data"]["x1"].astype(np.float64).reshape(-1, 2)
    assert got["statistics"]["x1"]["nonfinite"] == 2 and got["statistics"]["x0"]["nonfinite"] == 0
    finite = np.where(np.isfinite(x1), x1, np.nan)
    assert got["statistics"]["x1"]["mean"] == pytest.approx(np.nanmean(finite, axis=0).tolist(), rel=1e-9)
    assert got["statistics"]["x1"]["std"] == pytest.approx(np.nanstd(finite, axis=0).tolist(), rel=1e-9)
    assert got["statistics"]["x1"]["max"] == pytest.approx(np.nanmax(finite, axis=0).tolist())


def test_no_stats_reads_only_the_index(tiny_store):
    got = inspect_json(tiny_store, "--no-stats")
    assert "statistics" not in got and got["pairs"] == 288 and got["frames"] == 144


def _no_shard_reads(monkeypatch) -> list[str]:
    """Make every way of opening a shard's data fail (and record the attempt)."""
    import reflowpairs.store.reader as reader  # PairStore's shard readers, as its module names them

    opened: list[str] = []

    def refuse(path, *args, **kwargs):
        opened.append(str(path))
        raise AssertionError(f"inspect opened shard {path} without --stats")

    monkeypatch.setattr(reader, "read_shard", refuse)
    monkeypatch.setattr(reader, "shard_attrs", refuse)
    monkeypatch.setattr(zarr, "open_group", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    return opened


@pytest.mark.parametrize("which", ["zarr", "parquet"])
def test_inspect_without_stats_opens_no_shard_and_agrees_with_stats(
    tiny_store, parquet_store, which, monkeypatch
):
    """The default `inspect` answers from the manifest alone: every field it keeps equals what `--stats` (which
    reads every shard) reports, and no shard is opened, in JSON and in the tables."""
    store = tiny_store if which == "zarr" else parquet_store
    full = inspect_json(store, "--stats")
    opened = _no_shard_reads(monkeypatch)
    quick = inspect_json(store)
    tables = cli("inspect", str(store))
    assert opened == []
    assert "statistics" not in quick and "X_1 per action dimension" not in tables.output
    assert quick == {k: v for k, v in full.items() if k != "statistics"}
    assert "frames covered" in tables.output and "bytes per pair" in tables.output
    with pytest.raises(AssertionError, match="without --stats"):  # the patch does bite: --stats reads shards
        inspect_json(store, "--stats")


def test_inspect_an_old_store_without_frame_counts(tiny_store, tmp_path, monkeypatch):
    """A store whose shard entries lack `num_frames` (optional in the format) still inspects at once: frames and
    pairs per frame are unknown (`?` in the tables) until `--stats` counts them."""
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    manifest = json.loads((store / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["num_frames"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    full = inspect_json(store, "--stats")
    assert full["frames"] == 144 and full["samples_per_frame"]["min"] == 2
    _no_shard_reads(monkeypatch)
    quick = inspect_json(store)
    assert quick["pairs"] == 288 and quick["frames"] is None
    assert quick["samples_per_frame"] == {"recorded": 2, "min": None, "max": None}
    assert "? (see --stats)" in cli("inspect", str(store)).output


def test_running_stats_merge_blocks_like_numpy():
    rng = np.random.default_rng(0)
    blocks = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (1, 7, 300, 0, 42)]
    stats = RunningStats(4)
    for block in blocks:
        stats.update(block)
    full = np.concatenate(blocks)
    summary = stats.summary()
    assert summary["count"] == [len(full)] * 4
    np.testing.assert_allclose(summary["mean"], full.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(summary["std"], full.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(summary["min"], full.min(axis=0))
    np.testing.assert_allclose(summary["max"], full.max(axis=0))


def test_running_stats_with_no_finite_value():
    stats = RunningStats(2)
    stats.update(np.full((3, 2), np.nan))
    assert stats.nonfinite == 6 and stats.summary()["mean"] == [None, None]
