"""Stage 1 across processes: torchrun with 2 CPU processes (gloo), --partition slices + merge, and a resumed run
with another process count all store exactly the pairs of one process."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from reflowpairs.cli import app

from .helpers import assert_same_pairs, read_plain, runner

EPISODES = [0, 1, 2]


def _args(world, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--teacher",
        str(world.teacher_dir),
        "--dataset",
        world.repo_id,
        "--dataset-root",
        str(world.dataset_root),
        "--out",
        str(out),
        "--episodes",
        ",".join(map(str, EPISODES)),
        "--samples-per-frame",
        "2",
        "--num-steps",
        "3",
        "--shard-size",
        "10",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", "-m", "reflowpairs", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600
    )


@pytest.fixture(scope="module")
def single(tiny_world, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("single") / "pairs"
    assert runner.invoke(app, _args(tiny_world, out)).exit_code == 0
    return read_plain(out)


@pytest.mark.slow
def test_two_processes_store_the_same_pairs_each_on_its_own_frames(tiny_world, tmp_path, single):
    out = tmp_path / "pairs"
    proc = _torchrun(_args(tiny_world, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and not (out / "parts").exists()
    assert_same_pairs(single, read_plain(out))
    frames_by_rank: dict[str, set[int]] = {}
    for shard in manifest["shards"]:
        rank = Path(shard["path"]).name.split("-")[1]  # <token>-r<rank>-<seq>
        obs = zarr.open_group(str(out / shard["path"]), mode="r")["obs_index"][...]
        frames_by_rank.setdefault(rank, set()).update(obs.tolist())
    assert sorted(frames_by_rank) == ["r000", "r001"]
    assert frames_by_rank["r000"].isdisjoint(frames_by_rank["r001"])


def test_partitions_merged_equal_one_process(tiny_world, tmp_path, single):
    slices = []
    for i in range(3):
        out = tmp_path / f"slice{i}"
        result = runner.invoke(app, _args(tiny_world, out, "--partition", f"{i}/3"))
        assert result.exit_code == 0, result.output
        obs = read_plain(out)["obs_index"]
        assert set((obs % 3).tolist()) == {i}
        slices.append(str(out))
    result = runner.invoke(app, ["merge", *slices, "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "merged" / "manifest.json").read_text())["complete"] is True
    assert_same_pairs(single, read_plain(tmp_path / "merged"))

    partial = runner.invoke(app, ["merge", slices[0], slices[2], "--out", str(tmp_path / "partial")])
    assert partial.exit_code == 0, partial.output
    assert json.loads((tmp_path / "partial" / "manifest.json").read_text())["complete"] is False


def test_merge_refuses_slices_of_another_job_and_overlaps(tiny_world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert runner.invoke(app, _args(tiny_world, a, "--partition", "0/2")).exit_code == 0
    assert runner.invoke(app, _args(tiny_world, b, "--partition", "1/2", "--seed", "5")).exit_code == 0
    result = runner.invoke(app, ["merge", str(a), str(b), "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "generation.seed: 0 vs 5" in " ".join(result.output.split())
    result = runner.invoke(app, ["merge", str(a), str(a), "--out", str(tmp_path / "m2")])
    assert result.exit_code == 1 and "both hold frame obs_index" in " ".join(result.output.split())


@pytest.mark.slow
def test_single_process_run_resumed_by_two_processes(tiny_world, tmp_path, single):
    out = tmp_path / "pairs"
    assert runner.invoke(app, _args(tiny_world, out)).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:2]  # as if the run had stopped after two shards
    manifest["num_pairs"] = sum(s["num_pairs"] for s in manifest["shards"])
    manifest["num_frames"] = sum(s["num_frames"] for s in manifest["shards"])
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = _torchrun(_args(tiny_world, out, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert_same_pairs(single, read_plain(out))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_world, tmp_path, single):
    out = tmp_path / "pairs"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "reflowpairs",
        *_args(tiny_world, out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = {p.name.split("-")[1] for p in (out / "shards").iterdir()}
    assert ranks == {"r000", "r001"}  # two processes really each wrote their own shards
    assert_same_pairs(single, read_plain(out))


def test_partition_slices_and_merged_stores_validate(tiny_world, tmp_path):
    from reflowpairs.validate.checks import validate
    from reflowpairs.validate.config import ValidateConfig

    slices = []
    for i in range(2):
        out = tmp_path / f"slice{i}"
        assert runner.invoke(app, _args(tiny_world, out, "--partition", f"{i}/2")).exit_code == 0
        report = validate(
            ValidateConfig(store=out, dataset=tiny_world.repo_id, dataset_root=tiny_world.dataset_root)
        )
        assert report.status == "sound", report
        slices.append(out)
    runner.invoke(app, ["merge", *map(str, slices), "--out", str(tmp_path / "merged")])
    report = validate(ValidateConfig(store=tmp_path / "merged"))
    assert report.status == "sound", report
    # train's own checks accept it too (the start-up one, then each shard's as a loader reads it): each merged shard
    # carries the id of the slice that wrote it
    from reflowpairs.pairdata import read_checked
    from reflowpairs.store import PairStore
    from reflowpairs.train.inputs import open_training_store

    merged = open_training_store(tmp_path / "merged")
    assert (
        sum(len(read_checked(merged, i)["obs_index"]) for i in range(len(merged.shards)))
        == sum(len(PairStore(s)) for s in slices)
        > 0
    )


def test_each_process_reads_its_own_shards_and_every_epoch_covers_the_store():
    from reflowpairs.pairdata import PairSampler, epoch_order, piece_size

    counts = np.array([5, 7, 3, 6, 4, 8, 2, 5, 6])  # 46 pairs in 9 shards
    ends = np.cumsum(counts)
    assert epoch_order(counts, 3, 0, 2).tolist() == epoch_order(counts, 3, 0, 2, rank=0, world=1).tolist()
    for world in (1, 2, 3):
        streams = [
            list(
                itertools.islice(
                    iter(PairSampler(counts, 3, 2, rank=r, world=world)), 4 * piece_size(46, r, world)
                )
            )
            for r in range(world)
        ]
        for epoch in range(4):
            orders = [epoch_order(counts, 3, epoch, 2, rank=r, world=world) for r in range(world)]
            assert sorted(np.concatenate(orders).tolist()) == list(range(46))  # every pair once per epoch
            touched = [set(np.searchsorted(ends, order, side="right").tolist()) for order in orders]
            for rank, order in enumerate(orders):
                size = piece_size(46, rank, world)
                assert (
                    len(order) == size and streams[rank][epoch * size : (epoch + 1) * size] == order.tolist()
                )
                others = set().union(*(t for r, t in enumerate(touched) if r != rank))
                assert len(touched[rank] & others) <= 2  # only a piece's two end shards can be shared
            # the distinct shards the processes read add up to the store's, plus at most one cut shard per boundary
            assert len(counts) <= sum(map(len, touched)) <= len(counts) + world - 1
        if world > 1:
            # resuming at position p of a process's stream continues it
            assert (
                list(itertools.islice(iter(PairSampler(counts, 3, 2, 17, 1, world)), 20)) == streams[1][17:37]
            )
    assert not np.array_equal(epoch_order(counts, 3, 0, 2, 0, 2), epoch_order(counts, 3, 1, 2, 0, 2))


@pytest.mark.slow
def test_two_process_training_saves_a_loadable_student(tiny_world, tiny_store, tmp_path):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from safetensors.torch import load_file

    out = tmp_path / "student"
    proc = _torchrun(
        [
            "train",
            "--pairs",
            str(tiny_store),
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
            "--save-every",
            "2",
            "--lr",
            "1e-3",
            "--device",
            "cpu",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = out / "checkpoints" / "last"
    state = json.loads((last / "training_state" / "reflow_state.json").read_text())
    assert state["samples_seen"] == 4 * 2 * 2  # two processes, each a batch of 2 per step
    assert state["world"] == 2
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4  # written once, by the main process
    student = SmolVLAPolicy.from_pretrained(last / "pretrained_model")
    trained = load_file(last / "pretrained_model" / "model.safetensors")
    teacher = load_file(tiny_world.teacher_dir / "model.safetensors")
    assert trained.keys() == teacher.keys()
    assert any(not torch.equal(trained[k], teacher[k]) for k in trained)
    assert student.config.chunk_size == 8
    # one process cannot continue it: the global batch and each process's part of the store would change
    from reflowpairs.errors import ReflowPairsError
    from reflowpairs.train.config import TrainConfig
    from reflowpairs.train.loop import train

    with pytest.raises(ReflowPairsError) as err:
        train(TrainConfig(pairs=tiny_store, out=out, steps=6, resume=True, device="cpu", num_workers=0))
    assert "on 1 process: it was trained on 2 (global batch 2 x 2 = 4 pairs per step" in err.value.what
    assert "Resume it with 2 processes" in err.value.hint
