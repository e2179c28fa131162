"""Training a bfloat16 teacher (as real SmolVLA checkpoints are): the optimiser steps float32 master copies of
the bfloat16 trainable parameters, so updates below bfloat16's resolution are kept; the student is still saved
in the teacher's dtypes, the masters go into the training state, and a resumed run continues bit for bit."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from reflowpairs.checkpoint import MASTER_FILE
from reflowpairs.train.config import TrainConfig, TrainingInterrupted
from reflowpairs.train.loop import train
from reflowpairs.train.masters import MasterWeights
from reflowpairs.train.next_commands import next_commands

BATCH = 4


@pytest.fixture(scope="module")
def bf16_store(bf16_world, tmp_path_factory) -> Path:
    """A small zarr pair store from the bfloat16 teacher (episodes 0-3, K=2)."""
    from reflowpairs.generate.config import GenerateConfig
    from reflowpairs.generate.run import generate

    out = tmp_path_factory.mktemp("bf16store") / "pairs"
    generate(
        GenerateConfig(
            teacher=str(bf16_world.teacher_dir),
            dataset=bf16_world.repo_id,
            dataset_root=bf16_world.dataset_root,
            out=out,
            episodes=[0, 1, 2, 3],
            samples_per_frame=2,
            num_steps=2,
            batch_size=8,
            shard_size=64,
            device="cpu",
        )
    )
    return out


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = {
        "pairs": store,
        "out": out,
        "steps": 3,
        "batch_size": BATCH,
        "num_workers": 0,
        "device": "cpu",
        "save_every": 100,
        "lr": 2e-5,
    }
    base.update(kw)
    return TrainConfig(**base)


def _dtypes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path), "pt") as f:
        names = f.keys()  # safe_open is not iterable
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in names}


@pytest.fixture(scope="module")
def small_lr_run(bf16_store, tmp_path_factory):
    """3 steps at --lr 2e-5, recording around every optimiser step which master elements had a nonzero gradient
    and which changed."""
    records = []
    original = MasterWeights.step

    def recording_step(self, optimizer, grad_clip):
        copies = self._copies()
        nonzero = {name: param.grad.float() != 0 for name, param, _ in copies if param.grad is not None}
        before = {name: master.detach().clone() for name, _, master in copies}
        norm = original(self, optimizer, grad_clip)
        records.append(
            {
                name: (nonzero[name], master.detach() != before[name])
                for name, _, master in copies
                if name in nonzero
            }
        )
        return norm

    out = tmp_path_factory.mktemp("bf16run") / "run"
    plans = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MasterWeights, "step", recording_step)
        result = train(_cfg(bf16_store, out), on_plan=plans.append)
    return {"out": out, "result": result, "records": records, "plan": plans[0]}


@pytest.mark.slow
def test_masters_take_every_update_at_a_small_lr(small_lr_run, bf16_world):
    """At --lr 2e-5 the float32 masters keep every update: at the first step (fresh AdamW state, an update of
    lr * g / (|g| + eps) for every gradient g) every element with a nonzero gradient changes, and after the run
    every element that ever had one differs from the teacher's. Most of those moves are below bfloat16's resolution:
    the saved (rounded) weights differ in fewer elements, which is all that bfloat16 weights alone would have kept."""
    records = small_lr_run["records"]
    assert len(records) == 3 and records[0]
    for name, (grad_nonzero, moved) in records[0].items():
        assert bool(moved[grad_nonzero].all()), (
            f"{name}: a master element with a nonzero gradient did not change"
        )
    last = small_lr_run["out"] / "checkpoints" / "last"
    masters = load_file(str(last / "training_state" / MASTER_FILE))
    teacher = load_file(str(bf16_world.teacher_dir / "model.safetensors"))
    student = load_file(str(last / "pretrained_model" / "model.safetensors"))
    master_moved = rounded_moved = ever_nonzero = 0
    for name, master in masters.items():
        touched = torch.stack([step[name][0] for step in records if name in step]).any(dim=0)
        moved = master != teacher[name].float()
        assert bool(moved[touched].all()), (
            f"{name}: an element with a nonzero gradient ends where the teacher had it"
        )
        ever_nonzero += int(touched.sum())
        master_moved += int(moved.sum())
        rounded_moved += int((student[name] != teacher[name]).sum())
    assert master_moved >= ever_nonzero > 0
    assert rounded_moved < master_moved


@pytest.mark.slow
def test_saved_weights_are_the_masters_rounded_in_the_teachers_dtypes(small_lr_run, bf16_world):
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    last = small_lr_run["out"] / "checkpoints" / "last"
    teacher_file = bf16_world.teacher_dir / "model.safetensors"
    student_file = last / "pretrained_model" / "model.safetensors"
    assert _dtypes(student_file) == _dtypes(teacher_file)  # names, shapes, dtypes
    teacher, student = load_file(str(teacher_file)), load_file(str(student_file))
    masters = load_file(str(last / "training_state" / MASTER_FILE))
    policy = SmolVLAPolicy.from_pretrained(bf16_world.teacher_dir)
    trainable = {name: p.dtype for name, p in policy.named_parameters() if p.requires_grad}
    assert set(masters) == {name for name, dtype in trainable.items() if dtype == torch.bfloat16}
    assert all(m.dtype == torch.float32 for m in masters.values())
    assert all(torch.equal(student[name], master.to(student[name].dtype)) for name, master in masters.items())
    assert sum(not torch.equal(student[name], teacher[name]) for name in masters) > 0
    frozen = [k for k in teacher if k not in trainable]
    assert frozen and all(torch.equal(teacher[k], student[k]) for k in frozen)  # bit-identical


@pytest.mark.slow
def test_plan_states_trainable_dtypes_and_master_copies(small_lr_run):
    plan = small_lr_run["plan"]
    assert plan.master_copies is True
    assert set(plan.trainable_dtypes) == {
        "bfloat16",
        "float32",
    }  # the expert is bf16, the projections fp32
    assert sum(plan.trainable_dtypes.values()) == plan.trainable_params


@pytest.mark.slow
def test_resume_with_masters_is_bit_identical(bf16_store, tmp_path):
    straight = tmp_path / "straight"
    train(_cfg(bf16_store, straight, steps=4, lr=1e-4))

    def stop_at_2(step, total, loss):
        if step == 2:
            raise KeyboardInterrupt

    parted = tmp_path / "parted"
    with pytest.raises(TrainingInterrupted):
        train(_cfg(bf16_store, parted, steps=4, lr=1e-4), progress=stop_at_2)
    result = train(
        TrainConfig(
            pairs=bf16_store, out=parted, steps=4, resume=True, num_workers=0, device="cpu", save_every=100
        )
    )
    assert (result.start_step, result.step) == (2, 4)
    logs = [
        [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        for run in (straight, parted)
    ]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    assert [r["grad_norm"] for r in logs[0]] == [r["grad_norm"] for r in logs[1]]
    for name in (
        "pretrained_model/model.safetensors",
        f"training_state/{MASTER_FILE}",
        "training_state/optimizer_state.safetensors",
    ):
        a, b = (load_file(str(run / "checkpoints" / "last" / name)) for run in (straight, parted))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_plan_and_summary(bf16_world, bf16_store, tmp_path):
    """What the CLI's plan table and summary show, from the structured results: ``on_plan``'s plan (trainable
    dtypes, master copies, saved num_steps) and ``next_commands`` of the result."""
    plans = []
    result = train(_cfg(bf16_store, tmp_path / "run", steps=1, lr=None), on_plan=plans.append)
    (plan,) = plans
    assert plan.master_copies is True
    assert set(plan.trainable_dtypes) == {"bfloat16", "float32"} and all(plan.trainable_dtypes.values())
    teacher_steps = json.loads((bf16_world.teacher_dir / "config.json").read_text())["num_steps"]
    assert (plan.saved_num_steps, plan.teacher_num_steps) == (1, teacher_steps)
    assert (result.saved_num_steps, result.teacher_num_steps) == (1, teacher_steps)
    assert result.held_out_episodes == [4, 5, 6, 7, 8, 9]  # the episodes the store holds no pairs of
    student = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"
    commands = {name: shlex.split(command) for name, command in next_commands(result).items()}
    assert commands["lerobot_eval"] == ["lerobot-eval", f"--policy.path={student}", "--env.type=..."]
    ours = commands["reflowpairs_eval"]
    assert ours[:6] == [
        "reflowpairs",
        "eval",
        "--student",
        str(student),
        "--teacher",
        str(bf16_world.teacher_dir),
    ]
    assert ours[ours.index("--episodes") + 1] == "4-9" and ours[ours.index("--pairs") + 1] == str(bf16_store)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_keep_updates_below_the_dtypes_resolution(dtype):
    """A plain low-precision parameter loses an update smaller than half its spacing; its master keeps it, and the
    parameter moves once the masters' updates add up to a representable step. Gradients are cleared after step()."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8).to(dtype)
    layer.bias.data = layer.bias.data.float()  # mixed: a float32 parameter steps as itself
    named = list(layer.named_parameters())
    masters = MasterWeights(named)
    assert [m is p for m, (_, p) in zip(masters.params, named, strict=True)] == [False, True]
    optimizer = torch.optim.SGD(masters.params, lr=1.0)
    tiny = float(torch.finfo(dtype).eps) / 64  # well below half the spacing of weights near 1
    layer.weight.data.fill_(1.0)
    masters.load_state_dict({"weight": torch.ones(8, 8)})
    for i in range(1, 65):
        layer.weight.grad = torch.full_like(layer.weight, -tiny)  # SGD: w += tiny
        layer.bias.grad = torch.zeros_like(layer.bias)
        masters.step(optimizer, grad_clip=1e9)
        assert (
            layer.weight.grad is None
            and layer.bias.grad is None
            and all(m.grad is None for m in masters.params)
        )
        master = masters.state_dict()["weight"]
        assert torch.equal(master, torch.full_like(master, 1 + i * tiny))  # exact: powers of two
        assert torch.equal(layer.weight, master.to(dtype))
    assert torch.equal(
        layer.weight, torch.full_like(layer.weight, 1 + 64 * tiny)
    )  # 64 updates of eps/64: one eps
    plain = torch.ones(8, dtype=dtype) + torch.tensor(tiny, dtype=dtype)
    assert torch.equal(
        plain, torch.ones(8, dtype=dtype)
    )  # what the weight alone would have kept of one update


@pytest.mark.slow
def test_resume_without_or_with_damaged_masters(bf16_store, small_lr_run, tmp_path):
    """A checkpoint written before master copies existed resumes from its bfloat16 weights, with a warning; a master
    file that does not fit the trainable parameters, or cannot be read, is refused naming it, and nothing is written."""
    import shutil

    from safetensors.torch import save_file

    from reflowpairs.errors import ReflowPairsError

    out = tmp_path / "run"
    shutil.copytree(small_lr_run["out"], out, symlinks=True)
    masters_file = out / "checkpoints" / "last" / "training_state" / MASTER_FILE
    saved = load_file(str(masters_file))
    resume = {
        "pairs": bf16_store,
        "out": out,
        "steps": 4,
        "resume": True,
        "num_workers": 0,
        "device": "cpu",
        "allow_schedule_change": True,
    }
    dropped = dict(saved)
    dropped.pop(sorted(dropped)[0])
    save_file(dropped, str(masters_file))
    with pytest.raises(ReflowPairsError, match=rf"Cannot restore {MASTER_FILE} of .*missing"):
        train(TrainConfig(**resume))
    masters_file.write_bytes(b"not safetensors")
    with pytest.raises(ReflowPairsError, match=rf"Cannot read .*{MASTER_FILE}"):
        train(TrainConfig(**resume))
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    masters_file.unlink()
    result = train(TrainConfig(**resume))
    assert result.step == 4 and any(
        f"holds no float32 master copies ({MASTER_FILE})" in w for w in result.warnings
    )
    assert (result.checkpoint / "training_state" / MASTER_FILE).is_file()


def test_train_step_with_any_loss_steps_the_masters_and_refuses_a_non_finite_loss():
    """``train_step`` takes the loss as a parameter (the tiny teacher's is lerobot's plain forward): one call is
    forward, backward, clip on the float32 masters, step, rounding into the bf16 model, schedule step; a non-finite
    loss is refused before anything changes."""
    from reflowpairs.train.optim import Optimisation
    from reflowpairs.train.step import NonFiniteLossError, train_step

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1).to(torch.bfloat16)
    masters = MasterWeights(list(layer.named_parameters()))
    optimizer = torch.optim.SGD(masters.params, lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    opt = Optimisation(masters, optimizer, schedule, grad_clip=1e9)

    def loss_fn(model, batch):
        return ((model(batch["x"]).float() - batch["y"]) ** 2).mean()

    batch = {"x": torch.ones(2, 4, dtype=torch.bfloat16), "y": torch.zeros(2, 1)}
    before = {name: master.clone() for name, master in masters.state_dict().items()}
    with torch.no_grad():
        expected = float(loss_fn(layer, batch))
    stats = train_step(layer, batch, loss_fn, opt)
    assert stats.loss == expected and stats.lr == 0.5
    assert stats.grad_norm > 0 and optimizer.param_groups[0]["lr"] == 0.25  # the schedule stepped
    after = masters.state_dict()
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, after[n].to(torch.bfloat16)) for n, p in layer.named_parameters())
    assert all(p.grad is None for p in layer.parameters()) and all(m.grad is None for m in masters.params)
    with pytest.raises(NonFiniteLossError):
        train_step(layer, batch, lambda model, batch: loss_fn(model, batch) * float("nan"), opt)
    assert all(torch.equal(after[n], m) for n, m in masters.state_dict().items())
    assert optimizer.param_groups[0]["lr"] == 0.25 and all(p.grad is None for p in layer.parameters())
