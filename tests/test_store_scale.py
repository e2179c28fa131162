"""Issue #15's store side: a shard costs the same to list whatever the store's size (the journal), a torn journal line
is a leftover, format version 1 stores still read, validate and train, and zarr shards are one file per array in
group folders of bounded size. Small arrays through the real writer; the one train step uses the tiny store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from reflowpairs.errors import ReflowPairsError
from reflowpairs.store import PairStore, PairStoreWriter, StoreManifest
from reflowpairs.store.layout import JOURNAL_DIR, MANIFEST, SHARDS_PER_FOLDER, shard_rel_path

from .helpers import D0, D1, K, T, synthetic_pairs


def _manifest(out: Path, backend: str = "zarr", num_frames: int = 10_000) -> StoreManifest:
    provenance = {
        "teacher": {"fingerprint": "t" * 64},
        "dataset": {"fingerprint": "d" * 64},
        "generation": {"seed": 0, "samples_per_frame": K, "num_frames": num_frames, "x0": "explicit"},
        "software": {"reflowpairs": "test"},
    }
    return StoreManifest.new(out, backend, (T, D0), (T, D1), provenance)


def _entry(i: int) -> dict:
    return {
        "path": shard_rel_path(f"w0-{i:06d}.zarr"),
        "num_pairs": 8,
        "num_frames": 4,
        "sha256": {"x1": "0" * 64},
    }


def test_listing_a_shard_costs_the_same_at_any_store_size_and_completing_folds_all(tmp_path):
    manifest = _manifest(tmp_path)
    manifest.write()
    before = (tmp_path / MANIFEST).read_bytes()
    costs = []
    for i in range(300):
        start = manifest.journal_bytes
        manifest.append_shard(_entry(i))
        costs.append(manifest.journal_bytes - start)
    # one journal line per shard, the same bytes for the 1st and the 300th; manifest.json is never rewritten
    assert manifest.rewrites == 1 and (tmp_path / MANIFEST).read_bytes() == before
    assert len(set(costs)) == 1 and costs[0] < 300
    journal = tmp_path / manifest.data["journal"]
    assert journal.stat().st_size == sum(costs) and len(journal.read_bytes().splitlines()) == 300
    manifest.add_skipped([9000, 9001, 9000])
    back = StoreManifest.read(tmp_path)  # a reader finds every shard and skip through manifest.json's journal
    assert [e["path"] for e in back.shards] == [_entry(i)["path"] for i in range(300)]
    assert (back.data["num_pairs"], back.data["num_frames"], back.skipped_frames) == (
        2400,
        1200,
        [9000, 9001],
    )
    back.set_complete(True)  # the end of a run: everything folded into manifest.json, no journal left
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk["version"] == 2 and on_disk["complete"] is True and "journal" not in on_disk
    assert len(on_disk["shards"]) == 300 and on_disk["num_pairs"] == 2400
    assert on_disk["skipped_frames"] == [9000, 9001] and not (tmp_path / JOURNAL_DIR).exists()


def test_a_torn_journal_line_is_ignored_and_its_shard_is_a_leftover(tmp_path):
    manifest = _manifest(tmp_path)
    writer = PairStoreWriter(manifest, shard_size=2 * K, samples_per_frame=K)
    for first in (0, 2, 4):
        writer.add(
            synthetic_pairs([first, first + 1])
        )  # three shards journaled; the run is "killed" before close
    journal = tmp_path / manifest.data["journal"]
    lines = journal.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    journal.write_bytes(b"".join(lines[:2]) + lines[2][:40])  # the kill tore the third line
    back = StoreManifest.read(tmp_path)
    assert [e["path"] for e in back.shards] == [f"shards/w0-000/w0-00000{i}.zarr" for i in range(2)]
    assert back.leftovers() == [tmp_path / "shards/w0-000/w0-000002.zarr"]  # what --resume removes and redoes
    assert back.data["num_pairs"] == 4 * K
    journal.write_bytes(lines[0] + b"{not json\n" + lines[1])  # damage inside the journal is not a crash
    with pytest.raises(ReflowPairsError, match=r"line 2 of its journal journal/.*\.jsonl is not valid JSON"):
        StoreManifest.read(tmp_path)
    journal.write_bytes(b"".join(lines))
    stale = tmp_path / JOURNAL_DIR / "0123456789abcdef.jsonl"
    stale.write_bytes(lines[0].replace(b"w0-000000", b"w0-000077"))  # a journal the manifest does not name
    assert len(StoreManifest.read(tmp_path).shards) == 3
    back = StoreManifest.read(tmp_path)
    back.set_complete(False)  # a resumed run's first write folds the journal and removes every older one
    assert [p.name for p in (tmp_path / JOURNAL_DIR).iterdir()] == []
    assert len(json.loads((tmp_path / MANIFEST).read_text())["shards"]) == 3


def test_zarr_shards_are_one_file_per_array_in_bounded_group_folders(tmp_path):
    manifest = _manifest(tmp_path)
    writer = PairStoreWriter(manifest, shard_size=300 * K, samples_per_frame=K)  # 600 pairs: 3 chunks of 256
    writer.add(synthetic_pairs(list(range(300))))
    writer.close(complete=False)
    shard = tmp_path / manifest.shards[0]["path"]
    files = sorted(p.relative_to(shard).as_posix() for p in shard.rglob("*") if p.is_file())
    assert files == ["obs_index/c.0", "obs_index/zarr.json", "sample/c.0", "sample/zarr.json"] + [
        f"{name}/{f}" for name in ("x0", "x1") for f in ("c.0.0.0", "zarr.json")
    ] + ["zarr.json"]
    x1 = zarr.open_group(str(shard), mode="r")["x1"]
    assert x1.chunks == (256, T, D1) and x1.shards == (768, T, D1)
    assert PairStore(tmp_path).verify_shard(0) == []
    # group folders: sequence numbers k*1000 .. k*1000+999 of one writer share one, so none holds more than 1000
    names = [shard_rel_path(f"w{w}-{i:06d}.parquet") for w in (0, 1) for i in range(2500)] + [
        shard_rel_path(f"s001-w0-{i:06d}.zarr") for i in (999, 1000, 1_234_567)
    ]
    folders: dict[str, int] = {}
    for rel in names:
        folders[str(Path(rel).parent)] = folders.get(str(Path(rel).parent), 0) + 1
    assert max(folders.values()) == SHARDS_PER_FOLDER == 1000 and len(folders) == 3 * 2 + 3
    assert names[-1] == "shards/s001-w0-1234/s001-w0-1234567.zarr"


def _to_version_1(store: Path) -> None:
    """Rewrite ``store`` as the format-version-1 code wrote it: shards directly under shards/, zarr arrays chunked
    (256 rows) without the sharding codec, every shard in manifest.json, no journal."""
    manifest = json.loads((store / MANIFEST).read_text())
    for entry in manifest["shards"]:
        old = store / entry["path"]
        flat = store / "shards" / old.name
        arrays = {
            name: zarr.open_group(str(old), mode="r")[name][...]
            for name in ("x0", "x1", "obs_index", "sample")
        }
        attrs = dict(zarr.open_group(str(old), mode="r").attrs)
        shutil.rmtree(old)
        group = zarr.open_group(str(flat), mode="w", zarr_format=3)
        group.attrs.update(attrs | {"shard": f"shards/{old.name}"})
        for name, data in arrays.items():
            chunks = (min(256, len(data)), *data.shape[1:])
            group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)[...] = data
        entry["path"] = f"shards/{old.name}"
    for folder in (store / "shards").iterdir():
        if folder.is_dir() and not folder.name.endswith(".zarr"):
            folder.rmdir()  # the group folders, empty now
    manifest["version"] = 1
    (store / MANIFEST).write_text(json.dumps(manifest, indent=2))


@pytest.mark.slow
def test_a_version_1_store_reads_validates_and_trains(tiny_store, tmp_path):
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train
    from reflowpairs.validate.checks import validate
    from reflowpairs.validate.config import ValidateConfig

    store = tmp_path / "v1"
    shutil.copytree(tiny_store, store)
    _to_version_1(store)
    assert next((store / "shards").iterdir()).name.endswith(".zarr")  # flat, as version 1 had it
    opened = PairStore(store)
    assert opened.manifest["version"] == 1 and opened.verify_shard(0) == []
    assert np.array_equal(opened.read(1)["x1"], PairStore(tiny_store).read(1)["x1"])
    report = validate(ValidateConfig(store))
    assert report.status == "sound", [(c.name, c.detail) for c in report.checks if c.result != "pass"]
    train(TrainConfig(pairs=store, out=tmp_path / "o", steps=1, batch_size=4, num_workers=0, device="cpu"))
    assert (tmp_path / "o").is_dir()
    assert json.loads((store / MANIFEST).read_text())["version"] == 1  # reading never rewrites it


def test_skipped_frames_added_from_threads_are_listed_once(tmp_path):
    """The writer thread records skips while the main thread may read them: edits hold the manifest's lock, so
    overlapping skips from several threads list each frame once, in the journal as in memory."""
    import threading

    manifest = _manifest(tmp_path)
    manifest.write()

    repeats: list[int] = []

    def skip(offset: int) -> None:
        for i in range(25):
            manifest.add_skipped([offset + i, offset + i + 1, i])
            seen = manifest.skipped_frames  # one copy, taken under the lock
            repeats.append(len(seen) - len(set(seen)))

    threads = [threading.Thread(target=skip, args=(10 * t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = set(range(56))
    assert len(repeats) == 100 and not any(repeats)
    assert sorted(manifest.skipped_frames) == sorted(expected)
    assert sorted(StoreManifest.read(tmp_path).skipped_frames) == sorted(expected)
