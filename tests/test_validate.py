"""`reflowpairs validate`: sound stores pass in both backends; each kind of damage, done to a real store
generated here, fails with a message naming the shard and the problem (never a traceback); an
interrupted store is reported as incomplete with the command that finishes it."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.validate.checks import CHECK_TABLE, validate
from reflowpairs.validate.config import ValidateConfig
from reflowpairs.validate.report import CHECKS

from .helpers import runner, small_store


def test_the_check_table_runs_every_reported_check_once_and_the_features_check():
    """validate's table names each check of CHECKS exactly once, plus the feature-cache check, so no check is run
    outside it; the dataset check runs before the two that use the dataset it opens."""
    names = [name for name, _ in CHECK_TABLE]
    assert sorted(names) == sorted([*CHECKS, "features"])
    assert names.index("dataset") < min(names.index("obs_index"), names.index("frames"))


@pytest.fixture(scope="module")
def stores(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """Sound stores made once for this module: zarr and parquet (episodes 0-1, K=2, 8 frames a shard), and a
    second zarr store ("other", episode 0) whose first shard holds the same pairs under another store id."""
    root = tmp_path_factory.mktemp("validate")
    return {
        "zarr": small_store(tiny_world, root / "zarr"),
        "parquet": small_store(tiny_world, root / "parquet", backend="parquet"),
        "other": small_store(tiny_world, root / "other", episodes=[0]),
    }


def _copy(stores, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(stores[name], tmp_path / name))


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _write_manifest(store: Path, manifest: dict) -> None:
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _sha256(array: np.ndarray) -> str:
    """The contract's checksum (docs/pair-store.md), computed here without reflowpairs."""
    return hashlib.sha256(
        np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    ).hexdigest()


def _check(report, name: str):
    return next(c for c in report.checks if c.name == name)


def _failed(report) -> dict[str, str]:
    return {c.name: c.detail for c in report.checks if c.result == "fail"}


def _run(store: Path, *args: str):
    return runner.invoke(app, ["validate", str(store), *args])


def _run_json(store: Path, *args: str) -> tuple[int, dict]:
    """``reflowpairs validate STORE ARGS --json``: its exit code and its report."""
    result = _run(store, *args, "--json")
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def _json_failed(data: dict) -> set[str]:
    return {c["name"] for c in data["checks"] if c["result"] == "fail"}


# --- sound stores ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_sound_store_passes_in_both_backends(stores, backend):
    report = validate(ValidateConfig(stores[backend]))
    assert report.status == "sound", report.checks
    assert [c.name for c in report.checks] == list(CHECKS)
    assert all(c.result in ("pass", "skip") for c in report.checks), report.checks
    assert "48 frames x K=2" in _check(report, "frames").detail
    code, data = _run_json(stores[backend])
    assert code == 0 and data["status"] == "sound" and not _json_failed(data)


def test_sound_store_matches_its_dataset_and_teacher(tiny_world, tiny_store):
    report = validate(
        ValidateConfig(tiny_store, dataset_root=tiny_world.dataset_root, teacher=str(tiny_world.teacher_dir))
    )
    assert report.status == "sound", report.checks
    for name in ("dataset", "teacher", "obs_index"):
        assert _check(report, name).result == "pass", _check(report, name)
    assert "is the recorded dataset" in _check(report, "dataset").detail
    assert "is the recorded teacher" in _check(report, "teacher").detail


def test_json_output_is_one_object(stores, tmp_path):
    result = _run(stores["parquet"], "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["status"] == "sound" and [c["name"] for c in data["checks"]] == list(CHECKS)
    assert all(c["ok"] for c in data["checks"])


# --- damaged stores -------------------------------------------------------------------------------


def test_deleted_zarr_chunk_file(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    chunk = store / "shards/w0-000/w0-000001.zarr/x1/c.0.0.0"
    assert chunk.is_file()
    chunk.unlink()
    report = validate(ValidateConfig(store))
    assert report.status == "corrupt"
    detail = _failed(report)["checksums"]
    assert "shards/w0-000/w0-000001.zarr" in detail and "x1" in detail and "missing" in detail
    code, data = _run_json(store)
    assert code == 1 and data["status"] == "corrupt" and "checksums" in _json_failed(data)


def test_truncated_chunk_file_is_unreadable(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    chunk = store / "shards/w0-000/w0-000002.zarr/x0/c.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:20])
    detail = _failed(validate(ValidateConfig(store)))["shards"]
    assert "shards/w0-000/w0-000002.zarr" in detail and "cannot be read" in detail


def test_truncated_parquet_file(stores, tmp_path):
    store = _copy(stores, "parquet", tmp_path)
    shard = store / "shards/w0-000/w0-000001.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = validate(ValidateConfig(store))
    assert report.status == "corrupt"
    detail = _failed(report)["shards"]
    assert "shards/w0-000/w0-000001.parquet" in detail and "cannot be read" in detail
    code, data = _run_json(store)
    assert code == 1 and data["status"] == "corrupt"
    # its frames are missing, but --resume cannot replace a listed shard: no advice to run it
    frames = _failed(report)["frames"]
    assert "damaged shards" in frames and "--overwrite" in frames and "Finish it with" not in frames
    assert report.resume_command is None and data["resume_command"] is None


def test_deleted_parquet_shard(stores, tmp_path):
    store = _copy(stores, "parquet", tmp_path)
    (store / "shards/w0-000/w0-000003.parquet").unlink()
    detail = _failed(validate(ValidateConfig(store)))["shards"]
    assert "shards/w0-000/w0-000003.parquet is missing" in detail


def test_manifest_that_is_not_json(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    (store / "manifest.json").write_text((store / "manifest.json").read_text()[:-40])
    report = validate(ValidateConfig(store))
    assert report.status == "corrupt"
    assert "not valid JSON" in _failed(report)["manifest"]
    assert all(c.result == "skip" for c in report.checks[1:])
    code, data = _run_json(store)
    assert code == 1 and _json_failed(data) == {"manifest"}
    assert "not valid JSON" in data["checks"][0]["detail"]


def _edit_num_pairs(m):
    m["num_pairs"] += 2


def _edit_shard_rows(m):
    m["shards"][1]["num_pairs"] -= 2


def _edit_checksum(m):
    m["shards"][2]["sha256"]["x1"] = "0" * 64


def _edit_version(m):
    m["version"] = 99


def _edit_shape(m):
    m["x1"]["shape"] = [8, 3]


def _edit_fingerprint(m):
    del m["teacher"]["fingerprint"]


@pytest.mark.parametrize(
    ("edit", "check", "words"),
    [
        (_edit_num_pairs, "manifest", ["num_pairs is 98", "96 pairs"]),
        (_edit_shard_rows, "shards", ["shards/w0-000/w0-000001.zarr", "the manifest says", "[14"]),
        (_edit_checksum, "checksums", ["shards/w0-000/w0-000002.zarr", "x1 does not match the checksum"]),
        (_edit_version, "manifest", ["version 99", "this build reads versions 1, 2"]),
        (_edit_shape, "shards", ["shards/w0-000/w0-000000.zarr", "x1 is float32[16, 8, 2]"]),
        (_edit_fingerprint, "manifest", ["teacher.fingerprint is missing"]),
    ],
    ids=["num_pairs", "shard-rows", "checksum", "version", "x1-shape", "no-fingerprint"],
)
def test_edited_manifest(stores, tmp_path, edit, check, words):
    store = _copy(stores, "zarr", tmp_path)
    manifest = _manifest(store)
    edit(manifest)
    _write_manifest(store, manifest)
    report = validate(ValidateConfig(store))
    assert report.status == "corrupt"
    detail = _failed(report)[check]
    for word in words:
        assert word in detail, detail
    result = _run(store, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["status"] == "corrupt"


def test_nan_written_into_x1(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    group = zarr.open_group(str(store / "shards/w0-000/w0-000003.zarr"), mode="r+")
    obs, sample = int(group["obs_index"][5]), int(group["sample"][5])
    group["x1"][5, 2, 1] = np.nan
    report = validate(ValidateConfig(store))
    failed = _failed(report)
    assert "shards/w0-000/w0-000003.zarr: x1 has 1 non-finite value" in failed["finite"]
    assert f"obs_index {obs} sample {sample}" in failed["finite"]
    assert "shards/w0-000/w0-000003.zarr: x1 does not match" in failed["checksums"]
    code, data = _run_json(store)
    assert code == 1 and _json_failed(data) == {"finite", "checksums"}


def test_x0_that_does_not_regenerate(stores, tmp_path):
    """X_0 replaced and its checksum updated to match: only regenerating X_0 from the seed catches it."""
    store = _copy(stores, "zarr", tmp_path)
    group = zarr.open_group(str(store / "shards/w0-000/w0-000004.zarr"), mode="r+")
    x0 = np.asarray(group["x0"][...])
    x0[3] = np.random.default_rng(5).standard_normal(x0[3].shape).astype(np.float32)
    group["x0"][...] = x0
    manifest = _manifest(store)
    manifest["shards"][4]["sha256"]["x0"] = _sha256(x0)
    _write_manifest(store, manifest)
    report = validate(ValidateConfig(store))
    assert set(_failed(report)) == {"x0 noise"}
    detail = _failed(report)["x0 noise"]
    assert "shards/w0-000/w0-000004.zarr: x0 of 1 of 16 pairs does not regenerate" in detail


def test_duplicated_shard_entry(stores, tmp_path):
    store = _copy(stores, "parquet", tmp_path)
    manifest = _manifest(store)
    manifest["shards"].append(dict(manifest["shards"][1]))
    manifest["num_pairs"] += manifest["shards"][1]["num_pairs"]
    manifest["num_frames"] += manifest["shards"][1]["num_frames"]
    _write_manifest(store, manifest)
    report = validate(ValidateConfig(store))
    failed = _failed(report)
    assert "shards/w0-000/w0-000001.parquet is listed 2 times" in failed["manifest"]
    assert (
        "16 duplicate pair(s) over 8 frame(s)" in failed["frames"]
        and "shards/w0-000/w0-000001.parquet" in failed["frames"]
    )


def test_copy_of_a_shard_listed_twice(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    shutil.copytree(store / "shards/w0-000/w0-000001.zarr", store / "shards/w0-000/w0-000099.zarr")
    manifest = _manifest(store)
    manifest["shards"].append(dict(manifest["shards"][1], path="shards/w0-000/w0-000099.zarr"))
    manifest["num_pairs"] += manifest["shards"][1]["num_pairs"]
    manifest["num_frames"] += manifest["shards"][1]["num_frames"]
    _write_manifest(store, manifest)
    failed = _failed(validate(ValidateConfig(store)))
    assert "duplicate pair(s)" in failed["frames"]
    assert "shards/w0-000/w0-000001.zarr, shards/w0-000/w0-000099.zarr" in failed["frames"]
    assert "shards/w0-000/w0-000099.zarr was written as shards/w0-000/w0-000001.zarr" in failed["origin"]


def test_shard_from_another_store_copied_in(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    shutil.rmtree(store / "shards/w0-000/w0-000000.zarr")
    shutil.copytree(stores["other"] / "shards/w0-000/w0-000000.zarr", store / "shards/w0-000/w0-000000.zarr")
    report = validate(ValidateConfig(store))
    failed = _failed(report)
    assert set(failed) == {"origin"}, failed  # the same pairs, so the checksums alone would not notice
    other_id = _manifest(stores["other"])["store_id"]
    assert (
        "shards/w0-000/w0-000000.zarr belongs to store" in failed["origin"] and other_id in failed["origin"]
    )
    assert "another store" in failed["origin"]
    code, data = _run_json(store)
    assert code == 1 and _json_failed(data) == {"origin"}


def test_obs_index_outside_the_recorded_dataset(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    manifest = _manifest(store)
    manifest["dataset"]["total_frames"] = 40
    _write_manifest(store, manifest)
    detail = _failed(validate(ValidateConfig(store)))["obs_index"]
    assert "shards/w0-000/w0-000005.zarr: obs_index 40, 41" in detail and "frames 0..39" in detail


# --- incomplete stores ----------------------------------------------------------------------------


def _drop_last_shard(store: Path) -> dict:
    manifest = _manifest(store)
    dropped = manifest["shards"].pop()
    manifest["num_pairs"] -= dropped["num_pairs"]
    manifest["num_frames"] -= dropped["num_frames"]
    _write_manifest(store, manifest)
    return dropped


def test_missing_frames_are_incomplete_not_corrupt(tiny_world, stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    dropped = _drop_last_shard(store)
    report = validate(ValidateConfig(store, dataset_root=tiny_world.dataset_root))
    assert report.status == "incomplete", report.checks
    assert (report.frames_done, report.frames_expected) == (40, 48)
    frames = _check(report, "frames")
    assert frames.result == "incomplete" and "40 of 48 frames done, 8 remaining" in frames.detail
    assert "missing obs_index 40, 41" in frames.detail and "--resume" in frames.detail
    leftovers = _check(report, "leftovers")
    assert leftovers.result == "warn" and f"{dropped['path']} (not listed)" in leftovers.detail
    code, data = _run_json(store)
    assert code == 1 and data["status"] == "incomplete" and data["resume_command"] == report.resume_command
    # The command the report gives finishes the store, which is then sound.
    args = shlex.split(report.resume_command)
    assert args[:2] == ["reflowpairs", "generate"]
    finished = runner.invoke(app, [*args[1:], "--device", "cpu"])
    assert finished.exit_code == 0, finished.output
    assert validate(ValidateConfig(store)).status == "sound"


def test_resume_command_quotes_a_path_with_a_space(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path / "my runs")
    _drop_last_shard(store)
    report = validate(ValidateConfig(store))
    args = shlex.split(report.resume_command)
    assert report.status == "incomplete" and args[args.index("--out") + 1] == str(store)
    assert " " in str(store)


def test_interrupted_store_says_complete_false(stores, tmp_path):
    store = _copy(stores, "parquet", tmp_path)
    _drop_last_shard(store)
    manifest = _manifest(store)
    manifest["complete"] = False
    _write_manifest(store, manifest)
    (store / "shards/.tmp-w0-000006.parquet").write_bytes(b"PAR1 half")
    report = validate(ValidateConfig(store))
    assert report.status == "incomplete"
    detail = _check(report, "frames").detail
    assert "40 of 48 frames done, 8 remaining" in detail and "complete: false" in detail
    assert "shards/.tmp-w0-000006.parquet (half-written)" in _check(report, "leftovers").detail
    assert "INCOMPLETE: 40 of 48 frames done" in report.summary()


def test_leftovers_are_reported_but_not_counted(stores, tmp_path):
    store = _copy(stores, "zarr", tmp_path)
    shutil.copytree(store / "shards/w0-000/w0-000001.zarr", store / "shards/.tmp-w0-000006.zarr")
    report = validate(ValidateConfig(store))
    assert report.status == "sound"
    assert _check(report, "leftovers").result == "warn"
    assert "shards/.tmp-w0-000006.zarr (half-written)" in _check(report, "leftovers").detail
    assert _check(report, "frames").result == "pass"


# --- other dataset, other teacher, spot check -----------------------------------------------------


def test_other_dataset_and_teacher_are_named(stores, other_world):
    report = validate(
        ValidateConfig(
            stores["zarr"],
            dataset=other_world.repo_id,
            dataset_root=other_world.dataset_root,
            teacher=str(other_world.teacher_dir),
        )
    )
    failed = _failed(report)
    assert "another dataset" in failed["dataset"] and str(other_world.dataset_root) in failed["dataset"]
    assert "are not frames of" in failed["obs_index"]
    assert "another checkpoint" in failed["teacher"] and str(other_world.teacher_dir) in failed["teacher"]


def test_missing_dataset_root_is_a_failed_check(stores, tmp_path):
    report = validate(ValidateConfig(stores["zarr"], dataset_root=tmp_path / "nowhere"))
    assert "is not a LeRobotDataset" in _failed(report)["dataset"]


def test_spot_check_passes_on_every_pair_of_a_sound_store(stores):
    report = validate(ValidateConfig(stores["parquet"], spot_check=1000, device="cpu"))
    spot = _check(report, "spot check")
    assert spot.result == "pass", spot.detail
    assert "96 pairs re-sampled" in spot.detail


def test_spot_check_json_stays_one_object_when_the_teacher_is_loaded(stores):
    """lerobot prints notes to stdout while loading a policy; they must not land in --json output."""
    result = _run(stores["zarr"], "--json", "--spot-check", "4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert next(c for c in data["checks"] if c["name"] == "spot check")["result"] == "pass"


def test_spot_check_names_the_features_a_dataset_lacks(stores, other_world):
    """Against a dataset without the teacher's inputs, the spot check says so instead of blaming the store."""
    report = validate(
        ValidateConfig(
            stores["zarr"],
            dataset=other_world.repo_id,
            dataset_root=other_world.dataset_root,
            spot_check=2,
            device="cpu",
        )
    )
    detail = _failed(report)["spot check"]
    assert "does not match the policy's features" in detail and "observation.state" in detail
    assert "re-sampled pairs differ" not in detail


def test_spot_check_tolerance_follows_the_stores_compute_dtype(tiny_world, tmp_path):
    """A sound bfloat16-autocast store, re-sampled in other batches, passes at the bfloat16 default; on the device that
    made it the re-sampled X_1 is even bit for bit the stored one (every call has the recorded shapes)."""
    store = small_store(tiny_world, tmp_path / "bf16", episodes=[0], dtype="bfloat16", batch_size=24)
    report = validate(ValidateConfig(store, spot_check=6, seed=1, device="cpu", batch_size=1))
    spot = _check(report, "spot check")
    assert spot.result == "pass", spot.detail
    assert "computed in bfloat16" in spot.detail and "atol 0.05" in spot.detail
    tight = _check(
        validate(ValidateConfig(store, spot_check=6, seed=1, device="cpu", batch_size=1, atol=1e-12)),
        "spot check",
    )
    assert tight.result == "pass" and "max |X_1 difference| 0 <=" in tight.detail


@pytest.mark.slow
def test_spot_check_of_a_dopri5_store_resamples_whole_frames(tiny_world, tmp_path):
    """dopri5 solves each frame's K samples together: the spot check re-samples a chosen pair with its frame's other
    samples, in batches unlike generate's, and gets the stored X_1 within the float32 default."""
    store = small_store(
        tiny_world, tmp_path / "dopri5", episodes=[0], solver="dopri5", batch_size=24, rtol=1e-3, atol=1e-3
    )
    report = validate(ValidateConfig(store, spot_check=5, seed=2, device="cpu", batch_size=1))
    spot = _check(report, "spot check")
    assert (
        spot.result == "pass" and "5 pairs re-sampled (dopri5" in spot.detail and "atol 0.0001" in spot.detail
    ), spot.detail


def test_spot_check_catches_a_store_made_with_other_settings(stores, tmp_path):
    """The pairs were sampled with 10 Euler steps; a manifest that says 2 passes every other check."""
    store = _copy(stores, "zarr", tmp_path)
    manifest = _manifest(store)
    manifest["generation"]["num_steps"] = 2
    _write_manifest(store, manifest)
    report = validate(ValidateConfig(store, spot_check=6, seed=3, device="cpu"))
    assert set(_failed(report)) == {"spot check"}
    detail = _failed(report)["spot check"]
    assert "6 of 6 re-sampled pairs differ from the stored X_1 by more than --atol 0.0001" in detail
    assert "euler, 2 steps" in detail and "shards/w0-" in detail
    code, data = _run_json(store, "--spot-check", "2", "--device", "cpu")
    assert code == 1 and _json_failed(data) == {"spot check"}


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--spot-check", "-1"], "`spot_check` must be 0 or more"),
        (["--atol", "0"], "`atol` must be positive"),
    ],
)
def test_bad_options(stores, option, words):
    result = _run(stores["zarr"], *option)
    # the CLI words the setting as its option (--spot-check, --atol): only the rest is the library's
    assert (
        result.exit_code == 1 and words.split("` ")[1] in result.output and "Traceback" not in result.output
    )
    with pytest.raises(ReflowPairsError) as caught:
        validate(
            ValidateConfig(
                stores["zarr"], spot_check=-1 if "spot" in words else 0, atol=0.0 if "atol" in words else 1e-4
            )
        )
    assert caught.value.what.startswith(words)


def test_not_a_store(tmp_path):
    code, data = _run_json(tmp_path)
    assert code == 1 and data["status"] == "corrupt" and _json_failed(data) == {"manifest"}
    assert "has no manifest.json" in data["checks"][0]["detail"]
