"""``generate --out`` never mixes a store into the user's files unasked and never deletes what is not the store's:
a non-empty directory that is not a pair store is refused unless --overwrite (which writes beside its files); a
manifest.json of another format is refused even with --overwrite; --overwrite of a store removes only the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.run import generate
from reflowpairs.store import PairStore

from .helpers import runner


def _cfg(world, out: Path, **overrides) -> GenerateConfig:
    settings = {
        "teacher": str(world.teacher_dir),
        "dataset": world.repo_id,
        "dataset_root": world.dataset_root,
        "out": out,
        "episodes": [0],
        "samples_per_frame": 1,
        "num_steps": 2,
        "batch_size": 8,
        "shard_size": 16,
        "device": "cpu",
    }
    return GenerateConfig(**(settings | overrides))


def _user_files(root: Path) -> dict[str, bytes | None]:
    """A user's folder: a file, a nested file and an empty directory."""
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("calibrate the gripper\n")
    (root / "README.md").write_text("my experiment\n")
    (root / "empty").mkdir()
    return _tree(root)


def _tree(root: Path, exclude=("manifest.json", "shards")) -> dict[str, bytes | None]:
    """Every entry under ``root`` (but ``exclude`` at the top) with its bytes (None for a directory)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
        if p.relative_to(root).parts[0] not in exclude
    }


def test_non_empty_folder_that_is_not_a_store_is_refused(tiny_world, tmp_path):
    out = tmp_path / "work"
    before = _user_files(out)
    result = runner.invoke(
        app,
        [
            "generate",
            "--teacher",
            str(tiny_world.teacher_dir),
            "--dataset",
            tiny_world.repo_id,
            "--dataset-root",
            str(tiny_world.dataset_root),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    # the CLI words the settings as its options (--out, --overwrite): only the rest is the library's
    assert f"{out} is not empty and is not a pair store: it holds README.md, empty, notes." in text
    assert "to write the store beside these files" in text and "Traceback" not in result.output
    assert _tree(out, exclude=()) == before  # nothing written, not even a lock file


def test_overwrite_writes_beside_the_users_files(tiny_world, tmp_path):
    out = tmp_path / "work"
    before = _user_files(out)
    generate(_cfg(tiny_world, out, overwrite=True))
    store = PairStore(out)
    assert store.manifest["complete"] is True and len(store) == 24
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "empty", "manifest.json", "notes", "shards"]


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        (b'{"name": "my-robot-project", "version": "2.1.0"}', 'manifest.json has no "format" field.'),
        (
            b'{"format": "webapp.manifest", "icons": []}',
            "manifest.json has format 'webapp.manifest', not 'reflowpairs.pairs'.",
        ),
        (b"\xff\xfe not text", "manifest.json is not UTF-8 text (byte 0 is 0xff)"),
        (b"name: not json", "manifest.json is not valid JSON"),
    ],
    ids=["no-format", "other-format", "not-utf8", "not-json"],
)
@pytest.mark.parametrize("flags", [{}, {"overwrite": True}], ids=["plain", "overwrite"])
def test_foreign_manifest_is_never_replaced(tiny_world, tmp_path, manifest, why, flags):
    out = tmp_path / "project"
    _user_files(out)
    (out / "manifest.json").write_bytes(manifest)
    (out / "shards").mkdir()  # even beside a shards/ directory, it is not ours
    (out / "shards" / "keep.txt").write_text("mine")
    before = _tree(out, exclude=())
    with pytest.raises(ReflowPairsError) as caught:
        generate(_cfg(tiny_world, out, **flags))
    text = f"{caught.value.what} {caught.value.hint}"
    assert f"`out` {out} is not a pair store: {out}/" in text and why in text
    assert "never replaces a manifest.json it did not write, not even with `overwrite`" in text
    assert _tree(out, exclude=()) == before


def test_foreign_manifest_with_resume_is_refused(tiny_world, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"name": "my-robot-project"}))
    with pytest.raises(ReflowPairsError, match="is not a reflowpairs manifest"):
        generate(_cfg(tiny_world, out, resume=True))
    assert (out / "manifest.json").read_text() == json.dumps({"name": "my-robot-project"})


@pytest.mark.parametrize("ours", ["shards", "parts"])
def test_shards_or_parts_without_a_manifest_are_not_taken_for_a_store(tiny_world, tmp_path, ours):
    """A multi-process run deletes OUT/parts/ at its end; a user's parts/ folder must never be taken for it."""
    out = tmp_path / "work"
    (out / ours).mkdir(parents=True)
    (out / ours / "scan.txt").write_text("mine")
    before = _tree(out, exclude=())
    with pytest.raises(ReflowPairsError) as caught:
        generate(_cfg(tiny_world, out, overwrite=True))
    assert f"`out` {out} has a {ours}/ directory but no manifest.json" in caught.value.what
    assert _tree(out, exclude=()) == before


def test_overwrite_of_a_store_removes_only_the_store(tiny_world, tiny_store, tmp_path):
    out = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    before = _user_files(out)
    stale_part = out / "parts" / "rank001-dead0000"
    shutil.copytree(tiny_store, stale_part)  # left by an interrupted multi-process run of the old store
    old = PairStore(out)
    generate(_cfg(tiny_world, out, overwrite=True))
    new = PairStore(out)
    assert (
        new.manifest["store_id"] != old.manifest["store_id"]
        and len(new) == 24
        and new.manifest["complete"] is True
    )
    assert sorted(p.name for p in (out / "shards").glob("*/*")) == sorted(
        Path(s["path"]).name for s in new.shards
    )
    assert not (out / "parts").exists() and not (out / ".lock").exists()
    assert _tree(out) == before  # the user's files beside the store are untouched


def test_empty_folder_and_a_stale_lock_alone_are_fine(tiny_world, tmp_path):
    """An existing empty --out is used; so is one holding only the lock file a killed run left."""
    out = tmp_path / "empty"
    out.mkdir()
    (out / ".lock").write_text(
        json.dumps(
            {"pid": 999999, "host": "gone", "since": "2020-01-01T00:00:00+00:00", "command": "generate"}
        )
    )
    generate(_cfg(tiny_world, out))
    assert PairStore(out).manifest["complete"] is True
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shards"]
