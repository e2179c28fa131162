"""Implicit X_0 (`GenerateConfig.x0 = "implicit"`): a store without an X_0 array. Its manifest records the generator,
its shards hold x1/obs_index/sample only, every reader (PairStore, the training reader, validate, inspect, merge)
gets X_0 equal bit for bit to the explicit store of the same run, damage to what it stores is caught, and resume
and merge refuse mixing the two kinds of store."""

from __future__ import annotations

import hashlib
import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from reflowpairs.cli import app
from reflowpairs.dataset import frame_indices, open_dataset
from reflowpairs.errors import ReflowPairsError
from reflowpairs.noise import initial_noise, pair_noise
from reflowpairs.pairdata import PairDataset, PairSampler, position_lookup
from reflowpairs.store import PairStore, read_manifest
from reflowpairs.store.merge import merge_stores
from reflowpairs.validate.checks import validate
from reflowpairs.validate.config import ValidateConfig

from .helpers import runner, small_store

ARRAYS = ("x0", "x1", "obs_index", "sample")


@pytest.fixture(scope="module")
def stores(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """One run's settings written three ways: explicit zarr, implicit zarr, implicit parquet (same shard layout)."""
    root = tmp_path_factory.mktemp("x0")
    return {
        "explicit": small_store(tiny_world, root / "explicit"),
        "zarr": small_store(tiny_world, root / "zarr", x0="implicit"),
        "parquet": small_store(tiny_world, root / "parquet", x0="implicit", backend="parquet"),
    }


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _write_manifest(store: Path, manifest: dict) -> None:
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def outside_noise(seed: int, obs_index: int, sample: int, shape) -> np.ndarray:
    """X_0 regenerated from docs/pair-store.md's recipe alone, without reflowpairs."""
    s0, s1 = np.random.SeedSequence([seed, obs_index, sample]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed((int(s0) << 31) ^ int(s1))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).numpy()


def _read_all(store: Path) -> dict[str, np.ndarray]:
    """Every column of every shard through PairStore.read, in manifest order."""
    reader = PairStore(store)
    parts = [reader.read(i) for i in range(len(reader.shards))]
    return {name: np.concatenate([p[name] for p in parts]) for name in ARRAYS}


# --- the store ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_implicit_store_has_no_x0_and_records_its_generator(stores, backend):
    store = stores[backend]
    manifest = _manifest(store)
    assert manifest["version"] == 2 and manifest["backend"] == backend
    probe = manifest["x0"].pop("probe")
    assert manifest["x0"] == {
        "shape": [8, 6],
        "dtype": "float32",
        "stored": False,
        "generator": "reflowpairs.noise/v1",
    }
    assert probe == {
        "obs_index": 0,
        "sample": 0,
        "sha256": hashlib.sha256(outside_noise(0, 0, 0, (8, 6)).astype("<f4").tobytes()).hexdigest(),
    }
    assert manifest["generation"]["x0"] == "implicit"
    explicit = _manifest(stores["explicit"])
    assert explicit["x0"] == {
        "shape": [8, 6],
        "dtype": "float32",
    }  # an explicit store's entry is version 1's, unchanged
    assert explicit["generation"]["x0"] == "explicit"
    assert [s["num_pairs"] for s in manifest["shards"]] == [s["num_pairs"] for s in explicit["shards"]]
    for entry, twin in zip(manifest["shards"], explicit["shards"], strict=True):
        assert sorted(entry["sha256"]) == ["obs_index", "sample", "x1"]
        assert {k: twin["sha256"][k] for k in entry["sha256"]} == entry[
            "sha256"
        ]  # the same x1, obs_index, sample
        path = store / entry["path"]
        if backend == "zarr":
            assert sorted(name for name, _ in zarr.open_group(str(path), mode="r").arrays()) == [
                "obs_index",
                "sample",
                "x1",
            ]
        else:
            assert pq.read_schema(path).names == ["obs_index", "sample", "x1"]


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_pairstore_regenerates_x0_bit_for_bit(stores, backend):
    implicit, explicit = _read_all(stores[backend]), _read_all(stores["explicit"])
    for name in ARRAYS:
        assert implicit[name].dtype == explicit[name].dtype
        np.testing.assert_array_equal(implicit[name], explicit[name], err_msg=name)
    for row in (
        0,
        len(implicit["obs_index"]) // 2,
        len(implicit["obs_index"]) - 1,
    ):  # the documented recipe, from outside
        want = outside_noise(0, int(implicit["obs_index"][row]), int(implicit["sample"][row]), (8, 6))
        np.testing.assert_array_equal(implicit["x0"][row], want)
    reader = PairStore(stores[backend])
    only = reader.read(
        1, ("x0",)
    )  # x0 alone: obs_index and sample are read to regenerate it, and not returned
    assert list(only) == ["x0"]
    np.testing.assert_array_equal(only["x0"], PairStore(stores["explicit"]).read(1, ("x0",))["x0"])
    pairs = reader.read_pairs(0)
    np.testing.assert_array_equal(pairs.x0, explicit["x0"][: len(pairs)])


def test_pair_noise_is_initial_noise_row_by_row():
    obs, sample = np.array([0, 0, 7, 123456789]), np.array([0, 1, 3, 2], dtype=np.int32)
    for shape in ((8, 6), (50, 32), (3,)):
        got = pair_noise(11, obs, sample, shape)
        assert got.dtype == np.float32 and got.shape == (4, *shape)
        for r in range(4):
            np.testing.assert_array_equal(
                got[r], initial_noise(11, int(obs[r]), int(sample[r]), shape).numpy()
            )
    assert pair_noise(0, np.zeros(0, np.int64), np.zeros(0, np.int32), (8, 6)).shape == (0, 8, 6)
    with pytest.raises(ReflowPairsError, match="reflowpairs.noise/v9"):
        pair_noise(0, obs, sample, (8, 6), generator="reflowpairs.noise/v9")


# --- the training reader --------------------------------------------------------------------------


def test_training_reader_batches_equal_the_explicit_stores(tiny_world, stores):
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    lookup = position_lookup(frame_indices(dataset))

    def batches(store: Path, start: int) -> list[dict]:
        pairs = PairDataset(PairStore(store), dataset, lookup, cache_shards=2)
        loader = torch.utils.data.DataLoader(
            pairs, batch_size=8, sampler=PairSampler(pairs.counts, seed=3, window=1, start=start)
        )
        return list(islice(iter(loader), 4))

    for start in (0, 90):  # the second crosses an epoch boundary (96 pairs)
        want = batches(stores["explicit"], start)
        for backend in ("zarr", "parquet"):
            got = batches(stores[backend], start)
            for a, b in zip(got, want, strict=True):
                for key in ("x0", "x1", "obs_index", "sample"):
                    assert a[key].dtype == b[key].dtype
                    assert torch.equal(a[key], b[key]), (backend, start, key)
                assert torch.equal(
                    a["observation"]["observation.state"], b["observation"]["observation.state"]
                )
    assert "x0" not in PairDataset(PairStore(stores["zarr"]), dataset, lookup).shard(
        0
    )  # X_0 is not cached, only regenerated


def test_unknown_generator_is_refused_by_every_reader(tiny_world, stores, tmp_path):
    store = Path(shutil.copytree(stores["zarr"], tmp_path / "store"))
    manifest = _manifest(store)
    manifest["x0"]["generator"] = "reflowpairs.noise/v9"
    _write_manifest(store, manifest)
    reader = PairStore(store)  # the manifest is readable; X_0 is not
    np.testing.assert_array_equal(
        reader.read(0, ("x1",))["x1"], PairStore(stores["zarr"]).read(0, ("x1",))["x1"]
    )
    with pytest.raises(ReflowPairsError, match=r"reflowpairs\.noise/v9.*does not know"):
        reader.read(0)
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    with pytest.raises(ReflowPairsError, match=str(store)):
        PairDataset(reader, dataset, position_lookup(frame_indices(dataset)))
    report = validate(ValidateConfig(store))
    check = next(c for c in report.checks if c.name == "x0 noise")
    assert (
        report.status == "corrupt"
        and check.result == "fail"
        and "reflowpairs.noise/v9" in check.detail
        and "unknown" in check.detail
    )


def test_a_generator_that_does_not_reproduce_the_writers_x0_is_refused(tiny_world, stores, tmp_path):
    """The manifest's probe is the writer's X_0 of one pair: a reader whose torch draws other numbers stops."""
    store = Path(shutil.copytree(stores["parquet"], tmp_path / "store"))
    manifest = _manifest(store)
    manifest["x0"]["probe"]["sha256"] = "0" * 64  # what another torch's randn would look like to this reader
    _write_manifest(store, manifest)
    with pytest.raises(
        ReflowPairsError, match=r"X_0 regenerated here differs from the writer's.*torch"
    ) as err:
        PairStore(store).read(0)
    assert "Read it with torch" in err.value.hint
    dataset = open_dataset(tiny_world.repo_id, tiny_world.dataset_root)
    with pytest.raises(ReflowPairsError, match="differs from the writer's"):
        PairDataset(PairStore(store), dataset, position_lookup(frame_indices(dataset)))
    report = validate(ValidateConfig(store))
    failed = {c.name: c.detail for c in report.checks if c.result == "fail"}
    assert set(failed) == {"x0 noise"} and "differs from the writer's" in failed["x0 noise"]
    del manifest["x0"]["probe"]  # a probe is optional: without one, only the generator's name is checked
    _write_manifest(store, manifest)
    assert validate(ValidateConfig(store)).status == "sound"
    np.testing.assert_array_equal(PairStore(store).read(0)["x0"], PairStore(stores["explicit"]).read(0)["x0"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["x0"].update(stored="no"), "x0.stored is 'no', not true or false"),
        (lambda m: m["x0"].pop("generator"), "x0.generator is None"),
        (lambda m: m["generation"].pop("seed"), "generation.seed is None"),
    ],
    ids=["stored-not-bool", "no-generator", "no-seed"],
)
def test_a_manifest_that_cannot_regenerate_x0_is_refused(stores, tmp_path, edit, message):
    store = Path(shutil.copytree(stores["zarr"], tmp_path / "store"))
    manifest = _manifest(store)
    edit(manifest)
    _write_manifest(store, manifest)
    with pytest.raises(ReflowPairsError, match="does not follow the pair-store contract") as err:
        read_manifest(store)
    assert message in err.value.what
    report = validate(ValidateConfig(store))
    assert report.status == "corrupt" and message in report.checks[0].detail


# --- validate -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_validate_passes_an_implicit_store(stores, backend):
    report = validate(ValidateConfig(stores[backend]))
    assert report.status == "sound", [(c.name, c.detail) for c in report.checks]
    checks = {c.name: c for c in report.checks}
    assert checks["x0 noise"].result == "pass" and "not stored" in checks["x0 noise"].detail
    assert "reflowpairs.noise/v1" in checks["x0 noise"].detail and "[8, 6]" in checks["x0 noise"].detail
    assert "reproduces the writer's X_0" in checks["x0 noise"].detail
    assert "x1, obs_index, sample" in checks["checksums"].detail


def test_validate_spot_check_of_an_implicit_store(tiny_world, stores):
    report = validate(
        ValidateConfig(stores["zarr"], teacher=str(tiny_world.teacher_dir), spot_check=6, device="cpu")
    )
    spot = next(c for c in report.checks if c.name == "spot check")
    assert report.status == "sound" and spot.result == "pass" and "6 pairs re-sampled" in spot.detail, (
        spot.detail
    )


def _edit_x1(store: Path, shard: dict, backend: str) -> None:
    path = store / shard["path"]
    if backend == "zarr":
        array = zarr.open_group(str(path), mode="r+")["x1"]
        array[0] = array[0] + 0.5
    else:
        table = pq.read_table(path)
        x1 = table.column("x1").combine_chunks()
        values = x1.values.to_numpy(zero_copy_only=False).copy()
        values[0] += 0.5
        import pyarrow as pa

        column = pa.FixedSizeListArray.from_arrays(pa.array(values), x1.type.list_size)
        pq.write_table(
            table.set_column(table.schema.get_field_index("x1"), "x1", column).replace_schema_metadata(
                table.schema.metadata
            ),
            path,
        )


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_a_changed_x1_in_an_implicit_shard_is_caught(stores, tmp_path, backend):
    store = Path(shutil.copytree(stores[backend], tmp_path / backend))
    shard = _manifest(store)["shards"][2]
    _edit_x1(store, shard, backend)
    report = validate(ValidateConfig(store))
    failed = {c.name: c.detail for c in report.checks if c.result == "fail"}
    assert report.status == "corrupt" and set(failed) == {"checksums"}, failed
    assert f"{shard['path']}: x1 does not match the checksum" in failed["checksums"]
    assert PairStore(store).verify_shard(2) == ["x1 does not match the checksum recorded when it was written"]
    assert PairStore(store).verify_shard(1) == []


def test_validate_resume_command_of_an_incomplete_implicit_store(stores, tmp_path):
    store = Path(shutil.copytree(stores["zarr"], tmp_path / "store"))
    manifest = _manifest(store)
    dropped = manifest["shards"].pop()
    manifest.update(
        complete=False,
        num_pairs=manifest["num_pairs"] - dropped["num_pairs"],
        num_frames=manifest["num_frames"] - dropped["num_frames"],
    )
    _write_manifest(store, manifest)
    report = validate(ValidateConfig(store))
    assert report.status == "incomplete" and "--x0 implicit" in report.resume_command


# --- inspect --------------------------------------------------------------------------------------


def _inspect_json(store: Path, *args: str) -> dict:
    result = runner.invoke(app, ["inspect", str(store), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_inspect_shows_the_x0_storage_and_bytes_per_pair(stores, backend):
    got, explicit = _inspect_json(stores[backend], "--stats"), _inspect_json(stores["explicit"], "--stats")
    assert got["x0_storage"] == {"mode": "implicit", "stored": False, "generator": "reflowpairs.noise/v1"}
    assert explicit["x0_storage"] == {"mode": "explicit", "stored": True, "generator": "reflowpairs.noise/v1"}
    assert got["x0"] == {"shape": [8, 6], "dtype": "float32"}
    shard_bytes = sum(f.stat().st_size for f in (stores[backend] / "shards").rglob("*") if f.is_file())
    assert got["bytes_per_pair"] == pytest.approx(shard_bytes / got["pairs"])
    if backend == "zarr":  # same backend, same shards, less the X_0 array
        assert got["bytes_per_pair"] < explicit["bytes_per_pair"]
    assert got["statistics"]["x0"] == explicit["statistics"]["x0"] | {"source": "regenerated"}
    assert got["statistics"]["x1"] == explicit["statistics"]["x1"]
    for index in (0, 41):  # --pair regenerates the one X_0 it shows
        one, twin = (
            _inspect_json(s, "--pair", str(index), "--rows", "8")
            for s in (stores[backend], stores["explicit"])
        )
        assert {k: v for k, v in one.items() if k != "shard"} == {
            k: v for k, v in twin.items() if k != "shard"
        }
        assert len(one["x0"]) == 8 and len(one["x0"][0]) == 6


# --- merge ----------------------------------------------------------------------------------------


def test_merge_of_implicit_partitions(tiny_world, tmp_path):
    settings = {"episodes": [0], "shard_size": 8}
    slices = [
        small_store(tiny_world, tmp_path / f"p{i}", x0="implicit", partition=(i, 2), **settings)
        for i in range(2)
    ]
    merged = tmp_path / "merged"
    manifest = merge_stores(slices, merged)
    assert manifest["x0"]["stored"] is False and manifest["generation"]["x0"] == "implicit"
    assert validate(ValidateConfig(merged)).status == "sound"
    data = _read_all(merged)
    assert len(np.unique(data["obs_index"])) == 24
    for row in range(0, len(data["obs_index"]), 7):
        np.testing.assert_array_equal(
            data["x0"][row],
            initial_noise(0, int(data["obs_index"][row]), int(data["sample"][row]), (8, 6)).numpy(),
        )

    explicit = small_store(tiny_world, tmp_path / "e1", partition=(1, 2), **settings)
    with pytest.raises(ReflowPairsError, match="X_0 storage: implicit vs explicit") as err:
        merge_stores([slices[0], explicit], tmp_path / "mixed")
    assert "generation.x0" not in err.value.what and not (tmp_path / "mixed").exists()


# --- generate: settings and resume -----------------------------------------------------------------


def test_an_unknown_x0_mode_is_refused_before_anything_loads(tiny_world, tmp_path):
    with pytest.raises(ReflowPairsError, match="`x0` must be one of explicit, implicit, got 'none'"):
        small_store(tiny_world, tmp_path / "out", x0="none", teacher=str(tmp_path / "no-such-teacher"))
    assert not (tmp_path / "out").exists()


def _drop_last_shard(store: Path) -> dict:
    manifest = _manifest(store)
    dropped = manifest["shards"].pop()
    (store / dropped["path"]).rename(store / "shards" / ".tmp-left-over")
    manifest.update(
        complete=False,
        num_pairs=manifest["num_pairs"] - dropped["num_pairs"],
        num_frames=manifest["num_frames"] - dropped["num_frames"],
    )
    _write_manifest(store, manifest)
    return manifest


@pytest.mark.parametrize("store_mode, run_mode", [("implicit", "explicit"), ("explicit", "implicit")])
def test_resume_refuses_the_other_x0_mode(tiny_world, stores, tmp_path, store_mode, run_mode):
    store = Path(
        shutil.copytree(stores["zarr" if store_mode == "implicit" else "explicit"], tmp_path / "store")
    )
    before = _drop_last_shard(store)
    with pytest.raises(ReflowPairsError) as err:
        small_store(tiny_world, store, x0=run_mode, resume=True)
    assert f"its X_0 is {store_mode}" in err.value.what and f"asks for `x0` {run_mode}" in err.value.what
    assert f"Resume with `x0` {store_mode}" in err.value.hint
    assert _manifest(store) == before  # nothing changed


def test_resume_finishes_an_implicit_store_and_an_explicit_store_recorded_before_the_setting(
    tiny_world, stores, tmp_path
):
    implicit = Path(shutil.copytree(stores["zarr"], tmp_path / "implicit"))
    _drop_last_shard(implicit)
    small_store(tiny_world, implicit, x0="implicit", resume=True)
    assert validate(ValidateConfig(implicit)).status == "sound"
    np.testing.assert_array_equal(_read_all(implicit)["x0"], _read_all(stores["zarr"])["x0"])
    assert "x0" not in zarr.open_group(str(implicit / _manifest(implicit)["shards"][-1]["path"]), mode="r")

    old = Path(shutil.copytree(stores["explicit"], tmp_path / "old"))
    manifest = _drop_last_shard(old)
    del manifest["generation"]["x0"]  # as every store written before --x0 existed
    _write_manifest(old, manifest)
    small_store(tiny_world, old, resume=True)  # x0 explicit, the default
    assert validate(ValidateConfig(old)).status == "sound"
    assert "x0" not in _manifest(old)["generation"] and _manifest(old)["x0"] == {
        "shape": [8, 6],
        "dtype": "float32",
    }


@pytest.mark.slow
def test_training_on_an_implicit_store_is_training_on_the_explicit_one(stores, tmp_path):
    """`reflowpairs train` end to end (a DataLoader worker regenerates X_0): the same losses, step for step."""
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.logfile import LOG_FILE
    from reflowpairs.train.loop import train

    def losses(store: Path, out: Path) -> list[float]:
        result = train(
            TrainConfig(
                pairs=store,
                out=out,
                steps=3,
                batch_size=4,
                num_workers=1,
                device="cpu",
                save_every=3,
                lr=1e-3,
            )
        )
        assert result.step == 3
        return [json.loads(line)["loss"] for line in (out / LOG_FILE).read_text().splitlines()]

    explicit = losses(stores["explicit"], tmp_path / "explicit")
    assert losses(stores["zarr"], tmp_path / "implicit") == explicit and len(explicit) == 3
