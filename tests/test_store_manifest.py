"""A damaged manifest.json never gives a traceback: every reader (``PairStore``, which ``train`` and ``inspect`` use,
``inspect`` on the command line, ``generate --resume``) raises ``ReflowPairsError`` naming the file and what to do,
and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reflowpairs.cli import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.config import GenerateConfig
from reflowpairs.generate.run import generate
from reflowpairs.store import PairStore

from .helpers import runner


def _edit(**fields):
    def apply(text: str) -> bytes:
        return json.dumps(json.loads(text) | fields).encode()

    return apply


def _edit_shard(**fields):
    def apply(text: str) -> bytes:
        manifest = json.loads(text)
        manifest["shards"][1].update(fields)
        return json.dumps(manifest).encode()

    return apply


# (damage applied to the manifest text, words the error must contain)
DAMAGE = {
    "not-utf8": (lambda text: b"\xff\xfe" + text.encode("utf-16-le"), "is not UTF-8 text (byte 0 is 0xff)"),
    "latin1": (lambda text: text.replace('"zarr"', '"z\u00e4rr"').encode("latin-1"), "is not UTF-8 text"),
    "not-json": (lambda text: text[:-40].encode(), "is not valid JSON"),
    "not-an-object": (lambda text: b"[1, 2, 3]", "holds a JSON list, not an object"),
    "deeply-nested": (lambda text: b"[" * 200_000 + b"]" * 200_000, "is not valid JSON"),
    "huge-integer": (
        lambda text: text.replace('"num_pairs": ', '"num_pairs": 1' + "0" * 5000 + ', "x": ', 1).encode(),
        "is not valid JSON",
    ),
    "x0-not-an-object": (_edit(x0=5), "x0: its shape is None"),
    "shards-not-a-list": (_edit(shards="shards/w0-000000.zarr"), "shards is a JSON str, not a list"),
    "num-pairs-text": (_edit(num_pairs="288"), "num_pairs is '288', not a count"),
    "generation-a-list": (_edit(generation=[1, 2]), "generation is a JSON list, not an object"),
    "skipped-frames-a-number": (_edit(skipped_frames=3), "skipped_frames is 3, not a list"),
    "shard-outside-the-store": (
        _edit_shard(path="../../elsewhere.zarr"),
        "shards[1] has path '../../elsewhere.zarr'",
    ),
    "shard-num-pairs-missing": (
        _edit_shard(num_pairs=None),
        "shards[1] (shards/w0-000/w0-000001.zarr) has num_pairs None",
    ),
    "shard-sha256-a-string": (_edit_shard(sha256="abc"), "has sha256 'abc', not an object of checksums"),
}


def _damaged(tiny_store: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    store = Path(shutil.copytree(tiny_store, tmp_path / "store"))
    damage, words = DAMAGE[kind]
    (store / "manifest.json").write_bytes(damage((store / "manifest.json").read_text()))
    return store, words


def _snapshot(store: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(store)): (p.stat().st_size, p.stat().st_mtime_ns) for p in store.rglob("*")}


@pytest.mark.parametrize("kind", DAMAGE)
def test_pair_store_reader(tiny_store, tmp_path, kind):
    """What ``train`` and ``inspect`` open a store with."""
    store, words = _damaged(tiny_store, tmp_path, kind)
    with pytest.raises(ReflowPairsError) as caught:
        PairStore(store)
    assert str(store / "manifest.json") in caught.value.what and words in caught.value.what
    assert caught.value.hint  # says what to do


@pytest.mark.parametrize("kind", DAMAGE)
def test_inspect_command(tiny_store, tmp_path, kind):
    store, words = _damaged(tiny_store, tmp_path, kind)
    result = runner.invoke(app, ["inspect", str(store)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "error:" in text and "manifest.json" in text and words in text
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_inspect_process_on_a_manifest_that_is_not_utf8(tiny_store, tmp_path):
    """As a user runs it: ``python -m reflowpairs inspect DIR`` exits 1 with one paragraph, no traceback."""
    store, words = _damaged(tiny_store, tmp_path, "not-utf8")
    proc = subprocess.run(
        [sys.executable, "-m", "reflowpairs", "inspect", str(store)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    text = " ".join(proc.stderr.split())
    assert f"{store / 'manifest.json'} is not UTF-8 text" in text and "restore manifest.json" in text
    assert "Traceback" not in proc.stderr and "UnicodeDecodeError" not in proc.stderr


@pytest.mark.parametrize(
    "kind", ["not-utf8", "not-an-object", "x0-not-an-object", "generation-a-list", "deeply-nested"]
)
def test_generate_resume(tiny_world, tiny_store, tmp_path, kind):
    """Refused before the teacher is loaded, and the damaged store is left exactly as it was (no lock file either)."""
    store, words = _damaged(tiny_store, tmp_path, kind)
    before = _snapshot(store)
    cfg = GenerateConfig(
        teacher=str(tiny_world.teacher_dir),
        dataset=tiny_world.repo_id,
        dataset_root=tiny_world.dataset_root,
        out=store,
        episodes=[0, 1, 2, 3, 4, 5],
        samples_per_frame=2,
        batch_size=8,
        shard_size=64,
        device="cpu",
        resume=True,
    )
    with pytest.raises(ReflowPairsError) as caught:
        generate(cfg)
    assert str(store / "manifest.json") in caught.value.what and words in caught.value.what
    assert _snapshot(store) == before


def test_a_sound_manifest_still_reads(tiny_store):
    """The checks accept what generate writes (the fixture store, untouched)."""
    store = PairStore(tiny_store)
    assert len(store) == sum(s["num_pairs"] for s in store.shards) > 0
