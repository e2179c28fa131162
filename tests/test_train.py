"""Stage 2 (`reflowpairs train`): the student is an ordinary lerobot checkpoint, the loss is the policy's
own forward with the stored pair substituted, exactly one policy is built, resume continues as if
uninterrupted, and every bad input is refused before anything is written."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reflowpairs.checkpoint import MASTER_FILE, STATE_FILE
from reflowpairs.cli.app import app
from reflowpairs.errors import ReflowPairsError
from reflowpairs.pairdata import PairSampler, drop_action_keys, epoch_order
from reflowpairs.train.checkpointing import TEST_SAVED_FD
from reflowpairs.train.config import TIME_SAMPLINGS, TrainConfig, TrainingInterrupted
from reflowpairs.train.loop import train
from reflowpairs.train.optim import plan_optimizer
from reflowpairs.train.timesampling import sample_time, step_generator

from .helpers import runner

BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine run faster (and steadier) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "pairs": store,
        "out": out,
        "steps": 4,
        "batch_size": BATCH,
        "num_workers": 0,
        "device": "cpu",
        "save_every": 2,
        "lr": 1e-3,
    }
    base.update(kw)
    return TrainConfig(**base)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    """One 4-step run (checkpoints at 2 and 4), counting every SmolVLAPolicy built while it trains."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    built = []
    original = SmolVLAPolicy.__init__

    def counting_init(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    out = tmp_path_factory.mktemp("train") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SmolVLAPolicy, "__init__", counting_init)
        result = train(_cfg(tiny_store, out))
    return {"out": out, "result": result, "built": built}


# --- the student is an ordinary lerobot checkpoint ------------------------------------------------------


@pytest.mark.slow
def test_exactly_one_policy_is_built(run):
    assert run["built"] == ["SmolVLAPolicy"]


@pytest.mark.slow
def test_layout_like_lerobot_train(run):
    ckpts = run["out"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["000002", "000004", "last"]
    assert (ckpts / "last").is_symlink() and os.readlink(ckpts / "last") == "000004"
    assert run["result"].checkpoint == ckpts / "000004" and run["result"].step == 4
    model = ckpts / "last" / "pretrained_model"
    assert {p.name for p in model.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
    }
    state = ckpts / "last" / "training_state"
    assert {p.name for p in state.iterdir()} >= {
        "optimizer_state.safetensors",
        "optimizer_param_groups.json",
        "scheduler_state.json",
        "rng_state.safetensors",
        "training_step.json",
        STATE_FILE,
    }
    assert json.loads((state / "training_step.json").read_text())["step"] == 4
    assert not (state / MASTER_FILE).exists()  # a float32 policy steps its own parameters: no master copies
    assert json.loads((state / STATE_FILE).read_text())["samples_seen"] == 4 * BATCH
    log = _log(run["out"])
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)


@pytest.mark.slow
def test_config_json_is_the_teachers_with_a_one_step_default(run, tiny_world):
    """Only pretrained_path and num_steps differ: the student samples in 1 step by default (lerobot-eval uses it)."""
    teacher = json.loads((tiny_world.teacher_dir / "config.json").read_text())
    student = json.loads(
        (run["out"] / "checkpoints" / "last" / "pretrained_model" / "config.json").read_text()
    )
    assert set(student) == set(teacher)
    assert {k for k in teacher if teacher[k] != student[k]} == {"pretrained_path", "num_steps"}
    assert student["pretrained_path"] == str(tiny_world.teacher_dir)
    assert student["num_steps"] == 1 != teacher["num_steps"]
    assert (run["result"].saved_num_steps, run["result"].teacher_num_steps) == (1, teacher["num_steps"])
    state = json.loads((run["out"] / "checkpoints" / "last" / "training_state" / STATE_FILE).read_text())
    assert state["settings"]["student_num_steps"] == 1


@pytest.mark.slow
def test_student_num_steps_teacher_keeps_the_teachers_and_resume_keeps_the_setting(
    tiny_world, tiny_store, tmp_path
):
    teacher = json.loads((tiny_world.teacher_dir / "config.json").read_text())
    out = tmp_path / "o"
    first = train(_cfg(tiny_store, out, steps=1, student_num_steps="teacher"))
    saved = json.loads((first.checkpoint / "pretrained_model" / "config.json").read_text())
    assert {k for k in teacher if teacher[k] != saved[k]} == {"pretrained_path"}
    assert first.saved_num_steps == teacher["num_steps"]
    # Resumed without the option: the run's recorded setting ("teacher"), not the new-run default of 1.
    again = train(
        TrainConfig(
            pairs=tiny_store,
            out=out,
            steps=2,
            resume=True,
            device="cpu",
            num_workers=0,
            allow_schedule_change=True,
        )
    )
    resumed = json.loads((again.checkpoint / "pretrained_model" / "config.json").read_text())
    assert resumed["num_steps"] == teacher["num_steps"] and again.saved_num_steps == teacher["num_steps"]
    # Given on resume, it only changes what is saved (training is unaffected), and is recorded for later resumes.
    third = train(
        TrainConfig(
            pairs=tiny_store,
            out=out,
            steps=3,
            resume=True,
            device="cpu",
            num_workers=0,
            allow_schedule_change=True,
            student_num_steps=2,
        )
    )
    assert json.loads((third.checkpoint / "pretrained_model" / "config.json").read_text())["num_steps"] == 2
    assert (
        json.loads((third.checkpoint / "training_state" / STATE_FILE).read_text())["settings"][
            "student_num_steps"
        ]
        == 2
    )


@pytest.mark.slow
def test_weights_have_the_teachers_names_shapes_dtypes_and_frozen_values(run, tiny_world):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    def header(path):
        with safe_open(str(path), "pt") as f:
            names = f.keys()  # safe_open is not iterable (ruff's SIM118 "fix" to `in f` broke this)
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in names}

    teacher_file = tiny_world.teacher_dir / "model.safetensors"
    student_file = run["out"] / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"
    assert header(student_file) == header(teacher_file)
    teacher, student = load_file(str(teacher_file)), load_file(str(student_file))
    policy = SmolVLAPolicy.from_pretrained(tiny_world.teacher_dir)
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    frozen = [k for k in teacher if k not in trainable]
    assert frozen and trainable
    assert all(torch.equal(teacher[k], student[k]) for k in frozen)  # bit-identical
    assert any(not torch.equal(teacher[k], student[k]) for k in trainable if k in teacher)


@pytest.mark.slow
def test_student_loads_back_with_lerobot(run, tiny_world):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    model_dir = run["out"] / "checkpoints" / "last" / "pretrained_model"
    policy = SmolVLAPolicy.from_pretrained(model_dir)
    saved = load_file(str(model_dir / "model.safetensors"))
    state = policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    pre, post = make_pre_post_processors(policy.config, pretrained_path=model_dir)
    item = LeRobotDataset(tiny_world.repo_id, root=tiny_world.dataset_root)[0]
    batch = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()}
    chunk = post(policy.predict_action_chunk(pre(batch)))
    assert chunk.shape == (1, policy.config.chunk_size, 2) and torch.isfinite(chunk).all()


@pytest.mark.slow
def test_a_step_loss_is_the_policys_own_forward(run, tiny_world, tiny_store):
    """Step 1's logged loss, recomputed independently: plain zarr reads, a plain LeRobotDataset, the teacher
    loaded by lerobot, and SmolVLAPolicy.forward with noise=X_0, action=X_1, time=t."""
    import zarr
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    manifest = json.loads((tiny_store / "manifest.json").read_text())
    counts = np.array([s["num_pairs"] for s in manifest["shards"]])
    ids = epoch_order(counts, seed=0, epoch=0, window=4)[:BATCH]  # the data order of a seed-0 run
    ends = np.cumsum(counts)
    x0, x1, obs = [], [], []
    dataset = LeRobotDataset(tiny_world.repo_id, root=tiny_world.dataset_root)
    index = np.asarray(dataset.hf_dataset["index"])
    for pair in ids:
        shard = int(np.searchsorted(ends, pair, side="right"))
        row = int(pair - (ends[shard] - counts[shard]))
        group = zarr.open_group(str(tiny_store / manifest["shards"][shard]["path"]), mode="r")
        x0.append(torch.from_numpy(np.asarray(group["x0"][row])))
        x1.append(torch.from_numpy(np.asarray(group["x1"][row])))
        item = dataset[int(np.flatnonzero(index == int(group["obs_index"][row]))[0])]
        obs.append({k: v for k, v in item.items() if k != "action"})
    batch = {
        k: (torch.stack([o[k] for o in obs]) if isinstance(obs[0][k], torch.Tensor) else [o[k] for o in obs])
        for k in obs[0]
    }
    policy = SmolVLAPolicy.from_pretrained(tiny_world.teacher_dir)
    policy.train()
    pre, _ = make_pre_post_processors(policy.config, pretrained_path=tiny_world.teacher_dir)
    processed = pre(batch)
    processed["action"] = torch.stack(x1)
    t = sample_time("beta", BATCH, step_generator(0, 1))
    with torch.no_grad():
        loss, _ = policy.forward(processed, noise=torch.stack(x0), time=t)
    assert abs(_log(run["out"])[0]["loss"] - loss.item()) < 1e-5


@pytest.mark.slow
def test_no_gradient_lives_through_a_forward(tiny_store, tmp_path, monkeypatch):
    """lerobot's order (update_policy): backward, clip, step, zero_grad; so each forward starts with no gradients
    held (the previous step's would add their size to the forward's peak memory)."""
    import reflowpairs.train.loss as train_module

    held = []
    original = train_module.reflow_loss

    def recording_loss(model, *args):
        held.append(sum(p.grad is not None for p in model.parameters()))
        return original(model, *args)

    monkeypatch.setattr(train_module, "reflow_loss", recording_loss)
    result = train(_cfg(tiny_store, tmp_path / "o", steps=3, save_every=100))
    assert result.step == 3 and held == [0, 0, 0]


# --- resume and interruption -----------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_as_if_uninterrupted(tiny_store, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(tiny_store, straight, steps=6, save_every=100))

    def stop_at_3(step, total, loss):
        if step == 3:
            raise KeyboardInterrupt

    parted = tmp_path / "parted"
    with pytest.raises(TrainingInterrupted) as stop:
        train(_cfg(tiny_store, parted, steps=6, save_every=100, num_workers=1), progress=stop_at_3)
    assert (stop.value.step, stop.value.saved_step) == (
        3,
        3,
    ) and stop.value.checkpoint == parted / "checkpoints" / "000003"
    assert os.readlink(parted / "checkpoints" / "last") == "000003"
    # A resumed run keeps its settings: batch size, lr, seed... come from the checkpoint.
    result = train(
        TrainConfig(
            pairs=tiny_store, out=parted, steps=6, resume=True, num_workers=1, device="cpu", save_every=100
        )
    )
    assert (result.start_step, result.step) == (3, 6)
    a, b = _log(straight), _log(parted)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-5, rtol=0)
    assert np.allclose([r["lr"] for r in a], [r["lr"] for r in b], rtol=1e-9)
    wa = load_file(str(straight / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"))
    wb = load_file(str(parted / "checkpoints" / "last" / "pretrained_model" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


@pytest.mark.slow
def test_resume_with_more_steps_follows_the_new_schedule(tiny_store, tmp_path):
    """--steps 3, then --steps 6 --resume: refused (the lr schedule would change mid-run) unless
    --allow-schedule-change; then the plan states the change and steps 4-6 use the 6-step schedule's lr, the first
    of them included (the restored optimiser state still held the 3-step schedule's last lr)."""
    straight = tmp_path / "straight"
    train(_cfg(tiny_store, straight, steps=6, save_every=100))
    longer = tmp_path / "longer"
    train(_cfg(tiny_store, longer, steps=3, save_every=100))
    a, first_leg = _log(straight), _log(longer)
    resume = {
        "pairs": tiny_store,
        "out": longer,
        "steps": 6,
        "resume": True,
        "device": "cpu",
        "num_workers": 0,
        "save_every": 100,
    }
    before = _tree(longer)
    with pytest.raises(ReflowPairsError) as err:
        train(TrainConfig(**resume))
    old_lr = plan_optimizer_lr(longer, steps=3, step=4)
    assert "with `steps` 6 would change its lr schedule mid-run" in err.value.what
    stated = re.search(r"the lr at step 4 goes from (\S+) to (\S+)\.$", err.value.what)
    assert (
        stated
        and float(stated[1]) == pytest.approx(old_lr, rel=0.06)
        and float(stated[2]) == pytest.approx(a[3]["lr"], rel=0.06)
    )
    assert "`allow_schedule_change`" in err.value.hint and _tree(longer) == before
    plans = []
    result = train(TrainConfig(**resume, allow_schedule_change=True), on_plan=plans.append)
    assert (result.start_step, result.step) == (3, 6)
    change = plans[0].schedule_change
    assert (change["old_steps"], change["new_steps"], change["step"]) == (3, 6, 4)
    assert change["lr_before"] == pytest.approx(old_lr, rel=1e-12) and change["lr_after"] == pytest.approx(
        a[3]["lr"], rel=1e-12
    )
    assert (change["old"]["decay_steps"], change["new"]["decay_steps"]) == (3, 6)
    b = _log(longer)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert b[2]["lr"] != a[2]["lr"] and b[:3] == first_leg  # the first leg was planned for 3 steps
    np.testing.assert_allclose([r["lr"] for r in b[3:]], [r["lr"] for r in a[3:]], rtol=1e-12)


def plan_optimizer_lr(run: Path, steps: int, step: int) -> float:
    """The lr step ``step`` gets under the schedule lerobot's own scheduler builds for a ``steps``-step run of ``run``'s
    settings (its checkpoint's config and lr), stepped one scheduler step at a time."""
    from lerobot.configs.policies import PreTrainedConfig

    config = PreTrainedConfig.from_pretrained(run / "checkpoints" / "last" / "pretrained_model")
    config.optimizer_lr = json.loads(
        (run / "checkpoints" / "last" / "training_state" / STATE_FILE).read_text()
    )["settings"]["lr"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optimizer_lr)
    preset = config.get_scheduler_preset()
    preset.peak_lr = config.optimizer_lr
    sched = preset.build(opt, steps)
    for _ in range(step - 1):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_a_schedule_is_changed_only_below_lerobots_decay_horizon(tiny_world):
    """lerobot rescales its schedule to the run's length only below the preset's decay horizon (30,000 steps for
    SmolVLA): a longer --steps there changes nothing, and is not refused."""
    from lerobot.configs.policies import PreTrainedConfig

    from reflowpairs.train.optim import scheduled_lr
    from reflowpairs.train.resume import schedule_change

    config = PreTrainedConfig.from_pretrained(tiny_world.teacher_dir)
    settings = {"lr": 1e-3, "warmup_steps": None, "grad_clip": None}
    horizon = config.get_scheduler_preset().num_decay_steps
    assert schedule_change(config, settings, horizon, 2 * horizon, horizon // 2) is None
    change = schedule_change(config, settings, horizon // 2, horizon, horizon // 4)
    assert change is not None and change.step == horizon // 4 + 1
    plan = plan_optimizer(config, horizon, lr=1e-3, warmup_steps=None, grad_clip=None)
    assert change.lr_after == pytest.approx(scheduled_lr(plan, horizon, horizon // 4 + 1), rel=1e-12)
    assert change.lr_after > change.lr_before  # halfway down a schedule twice as long: a higher lr


@pytest.mark.slow
def test_a_run_recorded_before_the_one_step_default_keeps_the_teachers_num_steps(
    run, tiny_world, tiny_store, tmp_path
):
    """Before --student-num-steps defaulted to 1, a run without it recorded None, meaning the teacher's num_steps: a
    resume of such a run keeps saving the teacher's."""
    out = tmp_path / "old"
    shutil.copytree(run["out"], out, symlinks=True)
    state_file = out / "checkpoints" / "last" / "training_state" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["settings"]["student_num_steps"] = None
    state_file.write_text(json.dumps(state))
    result = train(
        TrainConfig(
            pairs=tiny_store,
            out=out,
            steps=5,
            resume=True,
            device="cpu",
            num_workers=0,
            allow_schedule_change=True,
        )
    )
    teacher = json.loads((tiny_world.teacher_dir / "config.json").read_text())
    assert (
        json.loads((result.checkpoint / "pretrained_model" / "config.json").read_text())["num_steps"]
        == teacher["num_steps"]
    )


@pytest.mark.slow
def test_relative_init_is_recorded_as_an_absolute_pretrained_path(
    tiny_world, tiny_store, tmp_path, monkeypatch
):
    monkeypatch.chdir(tiny_world.teacher_dir.parent)
    result = train(_cfg(tiny_store, tmp_path / "o", init=tiny_world.teacher_dir.name, steps=1))
    student = json.loads((result.checkpoint / "pretrained_model" / "config.json").read_text())
    assert student["pretrained_path"] == str(tiny_world.teacher_dir.resolve())


@pytest.mark.slow
def test_resume_refuses_other_settings(run, tiny_store):
    before = _tree(run["out"])
    with pytest.raises(ReflowPairsError, match=r"batch_size: the checkpoint has 4, this run asks for 8"):
        train(TrainConfig(pairs=tiny_store, out=run["out"], steps=8, batch_size=8, resume=True, device="cpu"))
    assert _tree(run["out"]) == before


@pytest.mark.slow
def test_resume_past_the_end_and_without_a_run(run, tiny_store, tmp_path):
    before = _tree(run["out"])
    with pytest.raises(ReflowPairsError, match=r"already at step 4, and `steps` is 4.*larger `steps`"):
        train(TrainConfig(pairs=tiny_store, out=run["out"], steps=4, resume=True, device="cpu"))
    assert _tree(run["out"]) == before
    with pytest.raises(ReflowPairsError, match=r"`resume` was set but .* has no checkpoints/last"):
        train(_cfg(tiny_store, tmp_path / "none", resume=True))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_existing_run_is_refused_without_resume(run, tiny_store):
    before = _tree(run["out"])
    with pytest.raises(ReflowPairsError, match=r"already holds a training run.*`resume`"):
        train(_cfg(tiny_store, run["out"]))
    assert _tree(run["out"]) == before


@pytest.mark.slow
def test_failed_save_leaves_last_on_a_complete_checkpoint(tiny_store, tmp_path, monkeypatch):
    """A crash while writing checkpoint 4 leaves `last` on checkpoint 2, complete and loadable; the failed save
    removes its half-written copy, and the next run resumes from 2."""
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.processor.pipeline import DataProcessorPipeline

    out = tmp_path / "crash"
    original = DataProcessorPipeline.save_pretrained
    calls = {"n": 0}

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # checkpoint 2 saves pre+post (calls 1, 2); checkpoint 4 fails on its first
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DataProcessorPipeline, "save_pretrained", failing_save)
    with pytest.raises(ReflowPairsError) as err:
        train(_cfg(tiny_store, out))
    assert "Writing checkpoint 4" in err.value.what and "No space left on device" in err.value.what
    assert "checkpoints/last still points at the last complete checkpoint (000002)" in err.value.what
    assert "`resume`" in err.value.hint
    monkeypatch.setattr(DataProcessorPipeline, "save_pretrained", original)
    ckpts = out / "checkpoints"
    assert os.readlink(ckpts / "last") == "000002"
    assert not (ckpts / "000004").exists() and not (ckpts / ".tmp-000004").exists()
    SmolVLAPolicy.from_pretrained(ckpts / "last" / "pretrained_model")
    result = train(TrainConfig(pairs=tiny_store, out=out, steps=4, resume=True, device="cpu", num_workers=0))
    assert (result.start_step, result.step) == (2, 4)
    assert sorted(p.name for p in ckpts.iterdir()) == ["000002", "000004", "last"]
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


# --- refusals: each names the input and leaves nothing behind --------------------------------------------


def _copy_store(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest)
    return dest


def test_incomplete_store_is_refused(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["complete"] = False
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReflowPairsError, match=r"is incomplete \(144 of 144 frames\).*--resume"):
        train(_cfg(store, tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_shard_stops_training_before_its_pairs_are_used(tiny_store, tmp_path, monkeypatch, damage):
    """Start-up reads no shard; the damaged one is refused (naming it) when the loader first reads it, before the
    step whose batch holds its first pair, and no step or checkpoint used it. ``flip``: the library, loading in this
    process; ``truncate``: the CLI, loading in a DataLoader worker (the error crosses back without a traceback)."""
    from reflowpairs.store.reader import PairStore

    store = _copy_store(tiny_store, tmp_path / "s")
    manifest = json.loads((store / "manifest.json").read_text())
    counts = np.array([s["num_pairs"] for s in manifest["shards"]])
    order = epoch_order(counts, seed=0, epoch=0, window=1)  # one shard at a time
    ends = np.cumsum(counts)
    damaged = int(
        np.searchsorted(ends, order[counts.max()], side="right")
    )  # in use from the 2nd or 3rd window
    first_use = int(np.flatnonzero(np.searchsorted(ends, order, side="right") == damaged)[0])
    assert first_use >= 8
    shard = manifest["shards"][damaged]["path"]
    chunk = next(
        p for p in sorted((store / shard / "x1").rglob("*")) if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[len(data) // 2 :]
    chunk.write_bytes(bytes(data))
    before = _tree(store)
    out = tmp_path / "o"
    settings = {"steps": 40, "batch_size": 8, "save_every": 1, "shuffle_window": 1, "seed": 0}
    if damage == "flip":
        reads = []
        original = PairStore.read_stored
        monkeypatch.setattr(
            PairStore, "read_stored", lambda self, *a, **k: reads.append(1) or original(self, *a, **k)
        )
        at_plan = []
        with pytest.raises(ReflowPairsError) as err:
            train(_cfg(store, out, **settings), on_plan=lambda plan: at_plan.append(len(reads)))
        assert at_plan == [0]  # no shard was read before training started
        what, hint = err.value.what, err.value.hint
    else:
        args = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
        result = runner.invoke(
            app,
            [
                "train",
                "--pairs",
                str(store),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--num-workers",
                "1",
                *args,
            ],
        )
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        what = hint = " ".join(result.output.split())
    assert f"is corrupt: shard {shard}" in what and not what.endswith("..")
    # a flipped byte usually still decodes (then the checksum catches it); a truncated chunk does not decode
    assert "x1 does not match the checksum" in what or "cannot be read" in what
    assert "regenerate" in hint
    last_clean_step = first_use // 8  # the next step's batch holds the shard's first pair
    assert [r["step"] for r in _log(out)] == list(range(1, last_clean_step + 1))
    state = json.loads((out / "checkpoints" / "last" / "training_state" / STATE_FILE).read_text())
    assert state["samples_seen"] == 8 * last_clean_step <= first_use
    assert _tree(store) == before


@pytest.mark.slow
def test_parquet_store_trains(tiny_world, tmp_path):
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate

    store = tmp_path / "pq"
    generate(
        GenerateConfig(
            teacher=str(tiny_world.teacher_dir),
            dataset=tiny_world.repo_id,
            dataset_root=tiny_world.dataset_root,
            out=store,
            episodes=[0, 1],
            samples_per_frame=2,
            num_steps=2,
            batch_size=8,
            shard_size=32,
            backend="parquet",
            device="cpu",
        )
    )
    result = train(_cfg(store, tmp_path / "o", steps=2, num_workers=1))
    assert result.step == 2 and math.isfinite(result.final_loss)
    state = json.loads((result.checkpoint / "training_state" / STATE_FILE).read_text())
    assert state["store"]["store_id"] == json.loads((store / "manifest.json").read_text())["store_id"]


def test_unwritable_out_is_refused_before_training(tiny_store, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ReflowPairsError, match=r"Cannot write to `out` .*file/run"):
        train(_cfg(tiny_store, blocker / "run"))
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow
def test_other_init_checkpoint_is_refused_unless_allowed(tiny_world, tiny_store, tmp_path):
    other = tmp_path / "other_teacher"
    shutil.copytree(tiny_world.teacher_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k in sorted(weights) if "action_out_proj" in k)
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ReflowPairsError) as err:
        train(_cfg(tiny_store, tmp_path / "o", init=str(other)))
    assert "is not the teacher the store" in err.value.what and "teacher fingerprint" in err.value.what
    assert "`allow_mismatch`" in err.value.hint
    assert not (tmp_path / "o").exists()
    # Allowed: it trains, records the warning, and --student-num-steps is the only other config change.
    result = train(
        _cfg(tiny_store, tmp_path / "o", init=str(other), allow_mismatch=True, steps=1, student_num_steps=1)
    )
    assert any("allowed by --allow-mismatch" in w for w in result.warnings)
    teacher = json.loads((other / "config.json").read_text())
    student = json.loads((result.checkpoint / "pretrained_model" / "config.json").read_text())
    assert set(student) == set(teacher) and student["num_steps"] == 1 and teacher["num_steps"] == 10
    assert {k for k in teacher if teacher[k] != student[k]} == {"pretrained_path", "num_steps"}


def test_other_dataset_is_refused(tiny_world, tiny_store, tmp_path):
    root = tmp_path / "dataset"
    shutil.copytree(tiny_world.dataset_root, root)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["robot_type"] = "another_robot"
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    with pytest.raises(ReflowPairsError) as err:
        train(_cfg(tiny_store, tmp_path / "o", dataset_root=root))
    assert "is not the one the store" in err.value.what and "dataset fingerprint" in err.value.what
    assert not (tmp_path / "o").exists()


def test_moved_teacher_asks_for_init(tiny_store, tmp_path):
    store = _copy_store(tiny_store, tmp_path / "s")
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["teacher"]["source"] = str(tmp_path / "gone" / "pretrained_model")
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ReflowPairsError) as err:
        train(_cfg(store, tmp_path / "o"))
    assert (
        "store's teacher" in err.value.what
        and "does not exist" in err.value.what
        and "`init`" in err.value.hint
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "`steps` must be at least 1, got 0"),
        ({"batch_size": 0}, "`batch_size` must be at least 1, got 0"),
        ({"lr": -1.0}, "`lr` must be a positive number, got -1.0"),
        ({"time_sampling": "cosine"}, "Unknown `time_sampling` 'cosine'"),
        ({"precision": "bfloat16"}, "`precision` bfloat16 is for CUDA devices"),
        ({"student_num_steps": 0}, "`student_num_steps` must be at least 1, got 0"),
        (
            {"student_num_steps": "ten"},
            "`student_num_steps` must be a whole number of steps or 'teacher', got 'ten'",
        ),
    ],
)
def test_bad_settings(tiny_store, tmp_path, change, message):
    with pytest.raises(ReflowPairsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(_cfg(tiny_store, tmp_path / "o", **change))
    assert not (tmp_path / "o").exists()


def test_cli_student_num_steps_takes_a_number_or_teacher(tmp_path):
    from reflowpairs.train.config import parse_student_num_steps

    assert (
        parse_student_num_steps("2"),
        parse_student_num_steps("teacher"),
        parse_student_num_steps(None),
    ) == (2, "teacher", None)
    result = runner.invoke(
        app,
        ["train", "--pairs", str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--student-num-steps", "ten"],
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    # the library names the setting (`student_num_steps`), the CLI prints its flag
    text = " ".join(result.output.split())
    assert "--student-num-steps must be a whole number of steps or 'teacher'" in text and "`" not in text
    assert not (tmp_path / "o").exists()


def test_cli_error_is_one_paragraph(tmp_path):
    result = runner.invoke(app, ["train", "--pairs", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "is not a pair store" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


# --- the CLI under a real Ctrl-C and a real SIGKILL -----------------------------------------------------


def _cli(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reflowpairs",
        "train",
        "--pairs",
        str(store),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--lr",
        "1e-3",
        *extra,
    ]


def _run_until_checkpoint(cmd: list[str], sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``cmd``, wait until it reports its first saved checkpoint on the ``TEST_SAVED_FD`` pipe (no polling),
    send ``sig``; returns the finished process and the step of that first checkpoint."""
    read_end, write_end = os.pipe()
    env = {**os.environ, "OMP_NUM_THREADS": "1", TEST_SAVED_FD: str(write_end)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, pass_fds=(write_end,)
    )
    os.close(write_end)  # the child holds the only write end: EOF once it exits
    with os.fdopen(
        read_end
    ) as saved:  # open until the child is gone: its later reports must not hit a closed pipe
        ready, _, _ = select.select([saved], [], [], 120)
        line = saved.readline() if ready else ""
        if not line:  # it exited, or hung, before its first checkpoint
            proc.kill()
            pytest.fail(f"no checkpoint was reported: {proc.communicate()}")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), int(line)


@pytest.mark.slow
def test_cli_ctrl_c_saves_and_resumes(tiny_store, tmp_path):
    out = tmp_path / "run"
    done, first = _run_until_checkpoint(
        _cli(tiny_store, out, "--steps", "100000", "--save-every", "2"), signal.SIGINT
    )
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    step = json.loads((out / "checkpoints" / "last" / "training_state" / "training_step.json").read_text())[
        "step"
    ]
    assert step >= first >= 2 and [r["step"] for r in _log(out)] == list(range(1, step + 1))
    # steps=step+2 replans the 100,000-step schedule (lerobot rescales it below its 30,000-step decay horizon):
    # refused, naming the lr change, unless allow_schedule_change, and then the plan states it.
    resume = TrainConfig(pairs=tiny_store, out=out, steps=step + 2, resume=True, device="cpu", num_workers=0)
    with pytest.raises(ReflowPairsError) as refused:
        train(resume)
    assert "would change its lr schedule" in refused.value.what
    assert f"the lr at step {step + 1} goes from" in refused.value.what
    assert "`allow_schedule_change`" in refused.value.hint
    plans = []
    result = train(dataclasses.replace(resume, allow_schedule_change=True), on_plan=plans.append)
    (plan,) = plans
    assert plan.resumed_from is not None and plan.start_step == step
    assert (plan.warmup_steps, plan.preset_warmup_steps, plan.preset_decay_steps) == (0, 1000, 30000)
    change = plan.schedule_change
    assert (change["old_steps"], change["new_steps"]) == (100_000, step + 2)
    assert (change["old"]["warmup_steps"], change["old"]["decay_steps"]) == (1000, 30000)
    assert (result.start_step, result.step) == (step, step + 2)
    assert [r["step"] for r in _log(out)] == list(range(1, step + 3))
    assert os.readlink(out / "checkpoints" / "last") == f"{step + 2:06d}"


@pytest.mark.slow
def test_cli_sigkill_leaves_a_sound_checkpoint(tiny_store, tmp_path):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    out = tmp_path / "run"
    done, _ = _run_until_checkpoint(
        _cli(tiny_store, out, "--steps", "100000", "--save-every", "1"), signal.SIGKILL
    )
    assert done.returncode == -signal.SIGKILL
    last = (out / "checkpoints" / "last").resolve()
    assert last.is_dir() and not last.name.startswith(".")
    SmolVLAPolicy.from_pretrained(last / "pretrained_model")
    step = json.loads((last / "training_state" / "training_step.json").read_text())["step"]
    result = train(
        TrainConfig(
            pairs=tiny_store,
            out=out,
            steps=step + 1,
            resume=True,
            device="cpu",
            num_workers=0,
            allow_schedule_change=True,
        )
    )
    assert (result.start_step, result.step) == (step, step + 1)
    assert [r["step"] for r in _log(out)] == list(range(1, step + 2))
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bfloat16_autocast_on_cuda_keeps_float32_weights(tiny_world, tiny_store, tmp_path):
    out = tmp_path / "cuda"
    result = train(_cfg(tiny_store, out, device="cuda", precision="auto", steps=2))
    assert math.isfinite(result.final_loss)
    with (
        safe_open(str(tiny_world.teacher_dir / "model.safetensors"), "pt") as t,
        safe_open(str(result.checkpoint / "pretrained_model" / "model.safetensors"), "pt") as s,
    ):
        teacher_names, student_names = t.keys(), s.keys()  # safe_open is not iterable
        assert {k: t.get_slice(k).get_dtype() for k in teacher_names} == {
            k: s.get_slice(k).get_dtype() for k in student_names
        }


# --- pieces: time sampling, data order, schedule --------------------------------------------------------


def test_time_samplings_stay_in_lerobots_range_and_are_reproducible():
    from lerobot.policies.common.flow_matching import sample_time_beta

    before = torch.get_rng_state()
    for name in TIME_SAMPLINGS:
        t = sample_time(name, 4096, step_generator(3, 7))
        assert t.dtype == torch.float32 and t.shape == (4096,)
        assert float(t.min()) >= 0.001 - 1e-7 and float(t.max()) <= 1.0 + 1e-7
        assert torch.equal(t, sample_time(name, 4096, step_generator(3, 7)))
        if name != "noise-end":  # t = 1 always: nothing random (test_train_objectives)
            assert not torch.equal(t, sample_time(name, 4096, step_generator(3, 8)))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never touched
    # beta is lerobot's own sampler (mean of 1.5/(1.5+1) * 0.999 + 0.001 = 0.6004)
    reference = sample_time_beta(100_000, "cpu", alpha=1.5, beta=1.0, scale=0.999, offset=0.001)
    assert (
        abs(float(sample_time("beta", 100_000, step_generator(0, 1)).mean()) - float(reference.mean())) < 0.01
    )
    ends = {
        n: float(((sample_time(n, 100_000, step_generator(0, 1)) - 0.5).abs() > 0.4).float().mean())
        for n in TIME_SAMPLINGS
    }
    assert ends["u-shaped"] > ends["uniform"] > ends["logit-normal"]


def test_data_order_is_shard_windowed_and_resumable():
    counts = np.array([5, 3, 7, 4, 6])
    order = epoch_order(counts, seed=1, epoch=0, window=2)
    assert sorted(order.tolist()) == list(range(counts.sum()))
    assert _most_live_shards(counts, order) == 2  # never more than `window` shards in use at a time
    assert _most_live_shards(counts, epoch_order(counts, seed=1, epoch=0, window=1)) == 1
    stream = list(islice(iter(PairSampler(counts, seed=1, window=2)), 60))
    assert stream[:25] == order.tolist() and sorted(stream[25:50]) == list(
        range(25)
    )  # epoch 2 is another shuffle
    assert list(islice(iter(PairSampler(counts, seed=1, window=2, start=37)), 23)) == stream[37:60]
    assert not np.array_equal(order, epoch_order(counts, seed=2, epoch=0, window=2))


def _most_live_shards(counts: np.ndarray, order: np.ndarray) -> int:
    """The largest number of shards whose [first use, last use] spans overlap at one position of ``order``."""
    shard_of = np.searchsorted(np.cumsum(counts), order, side="right")
    first = {s: int(np.flatnonzero(shard_of == s)[0]) for s in set(shard_of.tolist())}
    last = {s: int(np.flatnonzero(shard_of == s)[-1]) for s in first}
    return max(sum(first[s] <= i <= last[s] for s in first) for i in range(len(order)))


def test_action_keys_are_dropped():
    item = {
        "action": 1,
        "action_is_pad": 2,
        "action.extra": 3,
        "observation.state": 4,
        "task": "x",
        "actions_taken": 5,
    }
    assert drop_action_keys(item) == {"observation.state": 4, "task": "x", "actions_taken": 5}


def test_effective_schedule_matches_lerobots_rescaling(tiny_world):
    """The explicit warmup/decay equal what lerobot's own build would do for a short run (same lr at every step),
    and --warmup-steps is taken as the effective warmup."""
    from lerobot.configs.policies import PreTrainedConfig

    config = PreTrainedConfig.from_pretrained(tiny_world.teacher_dir)
    steps = 300
    plan = plan_optimizer(config, steps, lr=None, warmup_steps=None, grad_clip=None)
    assert (plan.scheduler.num_warmup_steps, plan.scheduler.num_decay_steps) == (int(1000 * 300 / 30000), 300)
    assert (
        plan.optimizer.lr == config.optimizer_lr
        and plan.optimizer.grad_clip_norm == config.optimizer_grad_clip_norm
    )

    def lrs(scheduler_cfg):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optimizer_lr)
        sched = scheduler_cfg.build(opt, steps)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(plan.scheduler) == pytest.approx(lrs(config.get_scheduler_preset()), rel=1e-12)
    custom = plan_optimizer(config, steps, lr=1e-3, warmup_steps=25, grad_clip=2.0)
    assert (custom.scheduler.num_warmup_steps, custom.scheduler.peak_lr, custom.optimizer.grad_clip_norm) == (
        25,
        1e-3,
        2.0,
    )


# --- processes, W&B and the launch rank --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_of_one_process_leaves_no_accelerate_state(tiny_store, tmp_path):
    """One process runs without an ``accelerate.Accelerator`` (``train.processes.OneProcess``): nothing of
    accelerate's process-wide state is left for a later run, or lerobot-train, in the same Python process."""
    from accelerate.state import is_initialized

    before = is_initialized()  # False unless another test in this session ran lerobot-train in process
    result = train(_cfg(tiny_store, tmp_path / "o", steps=2))
    assert result.step == 2 and is_initialized() == before


@pytest.mark.slow
def test_library_train_logs_to_wandb(tiny_store, tmp_path, monkeypatch):
    """``TrainConfig.wandb_config`` (lerobot's WandBConfig) makes library ``train()`` log each ``train_log.jsonl`` record to
    a W&B run (offline here), say where (``on_wandb_run``, ``TrainResult.wandb_run``) and finish it."""
    import wandb
    from lerobot.configs.default import WandBConfig

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    settings = WandBConfig(enable=True, project="reflowpairs-tests", mode="offline")
    told: list[str] = []
    try:
        result = train(
            _cfg(tiny_store, tmp_path / "o", steps=2, log_every=1, wandb_config=settings),
            on_wandb_run=told.append,
        )
    finally:
        wandb.teardown()  # wandb keeps process-wide settings read from the environment: a later test reads its own
    assert told == [result.wandb_run] and str(tmp_path / "wandb") in result.wandb_run
    (run_file,) = (tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0 and settings.run_id is not None
    plain = train(_cfg(tiny_store, tmp_path / "plain", steps=1))
    assert plain.wandb_run is None


def test_a_bad_wandb_mode_is_refused_before_any_work(tmp_path):
    from lerobot.configs.default import WandBConfig

    with pytest.raises(ReflowPairsError, match="wandb-mode must be one of"):
        train(
            TrainConfig(
                pairs=tmp_path / "none",
                out=tmp_path / "o",
                wandb_config=WandBConfig(enable=True, mode="sometimes"),
            )
        )
    assert not (tmp_path / "o").exists()


def test_process_rank_is_the_launchers(monkeypatch):
    from reflowpairs.launcher import is_main_process, process_rank

    monkeypatch.delenv("RANK", raising=False)
    assert process_rank() == 0 and is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert process_rank() == 3 and not is_main_process()


def test_the_train_plan_is_typed_and_json_ready():
    from reflowpairs.train.planning import TrainPlan

    names = [f.name for f in dataclasses.fields(TrainPlan)]
    assert names[:3] == ["init", "resumed_from", "start_step"] and "feature_cache" in names
    plan = TrainPlan(**dict.fromkeys(names))
    assert json.loads(json.dumps(plan.as_dict())) == dict.fromkeys(names)
