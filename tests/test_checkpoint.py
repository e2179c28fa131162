"""reflowpairs.checkpoint: student checkpoints in lerobot-train's layout, written atomically.

A real (random-weight, untrained) tiny SmolVLA and its real processors are built once for the module from a local
tiny VLM config: no dataset, no teacher training, so the module runs in seconds without the session tiny world.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from reflowpairs.checkpoint import (
    MASTER_FILE,
    STATE_FILE,
    STATE_FORMAT,
    STATE_VERSION,
    checkpoints_dir,
    clean_leftovers,
    last_checkpoint,
    last_link,
    load_master_params,
    load_training_state,
    point_last,
    read_state,
    save_checkpoint,
    student_config_json,
)
from reflowpairs.errors import ReflowPairsError

TOTAL = 100  # total steps: lerobot names checkpoints with 6 digits below a million


class _Student:
    """What save_checkpoint takes, all real lerobot/torch objects."""

    def __init__(self, root: Path):
        from lerobot.configs.types import FeatureType, PolicyFeature
        from lerobot.policies.factory import make_pre_post_processors
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
        from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
        from transformers import AutoConfig

        from reflowpairs.tiny.world import build_tiny_vlm

        vlm = build_tiny_vlm(root / "vlm")
        vlm_config = AutoConfig.from_pretrained(vlm)
        image = vlm_config.vision_config.image_size
        torch.manual_seed(0)
        self.config = SmolVLAConfig(
            vlm_model_name=str(vlm),
            load_vlm_weights=False,
            chunk_size=4,
            n_action_steps=4,
            max_action_dim=4,
            max_state_dim=4,
            num_steps=10,
            resize_imgs_with_padding=(image, image),
            tokenizer_max_length=16,
            num_vlm_layers=vlm_config.text_config.num_hidden_layers,
            device="cpu",
            push_to_hub=False,
            input_features={
                "observation.state": PolicyFeature(FeatureType.STATE, (2,)),
                "observation.images.cam": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
            },
            output_features={"action": PolicyFeature(FeatureType.ACTION, (2,))},
        )
        self.policy = SmolVLAPolicy(self.config)
        self.preprocessor, self.postprocessor = make_pre_post_processors(self.config, dataset_stats=None)
        # The init checkpoint: what `reflowpairs train --init` reads config.json from.
        self.init_dir = root / "init"
        self.policy.save_pretrained(self.init_dir)
        self.init_config = json.loads((self.init_dir / "config.json").read_text())

    def optimisation(self, lr: float = 1e-3):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return optimizer, scheduler

    def save(self, out: Path, step: int, state: dict | None = None, num_steps: int = 1, **kwargs) -> Path:
        optimizer, scheduler = kwargs.pop("optimisation", None) or self.optimisation()
        return save_checkpoint(
            out,
            step,
            TOTAL,
            self.policy,
            self.preprocessor,
            self.postprocessor,
            student_config_json(self.init_config, str(self.init_dir), num_steps),
            optimizer,
            scheduler,
            {"position": step * 10} if state is None else state,
            **kwargs,
        )


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> _Student:
    return _Student(tmp_path_factory.mktemp("student"))


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ----------------------------------------------------------------------------------------- student_config_json


def test_student_config_changes_only_pretrained_path_and_num_steps(student):
    init = student.init_config
    original = json.loads(json.dumps(init))
    config = student_config_json(init, student.init_dir, 1)
    assert config["pretrained_path"] == str(student.init_dir)
    assert config["num_steps"] == 1 and init["num_steps"] == 10
    assert init == original, "the init's config must not be modified"
    changed = {k for k in config.keys() | init.keys() if config.get(k, object()) != init.get(k, object())}
    assert changed == {"pretrained_path", "num_steps"}
    # Key for key, in the init's order (pretrained_path appended only if the init had none).
    assert [k for k in config if k != "pretrained_path"] == [k for k in init if k != "pretrained_path"]
    # Fields the predecessor lost or changed are kept as they were.
    assert config["load_vlm_weights"] is False and config["type"] == "smolvla"
    assert config["input_features"] == init["input_features"]


def test_student_config_keeps_the_teachers_num_steps_when_not_given(student):
    config = student_config_json(student.init_config, "some/hub-id")
    assert config["num_steps"] == student.init_config["num_steps"]
    assert config["pretrained_path"] == "some/hub-id"
    assert {k for k in config if config[k] != student.init_config.get(k)} <= {"pretrained_path"}


def test_student_config_num_steps_is_a_json_int():
    import numpy as np

    config = student_config_json({"type": "x", "num_steps": 10}, "init", np.int64(2))
    assert type(config["num_steps"]) is int and config["num_steps"] == 2
    assert json.loads(json.dumps(config)) == {"type": "x", "num_steps": 2, "pretrained_path": "init"}


def test_student_config_without_num_steps_field_is_a_clear_error():
    init = {"type": "otherpolicy", "chunk_size": 8}
    with pytest.raises(ReflowPairsError) as info:
        student_config_json(init, "init", 1)
    assert "num_steps would be 1 (`student_num_steps`)" in info.value.what
    assert "has no num_steps field" in info.value.what
    assert info.value.hint == "Set `student_num_steps` to 'teacher' for this policy."
    # Without a requested num_steps the same config is fine and gains nothing but pretrained_path.
    assert student_config_json(init, "init") == {**init, "pretrained_path": "init"}


# ----------------------------------------------------------------------------------------------- last_checkpoint


def test_last_checkpoint_is_none_before_any_checkpoint(tmp_path):
    assert last_checkpoint(tmp_path / "never-created") is None
    checkpoints_dir(tmp_path).mkdir(parents=True)
    assert last_checkpoint(tmp_path) is None


def test_last_checkpoint_resolves_a_relative_link(tmp_path):
    target = checkpoints_dir(tmp_path) / "000020"
    target.mkdir(parents=True)
    point_last(tmp_path, target)
    link = last_link(tmp_path)
    assert link.is_symlink() and os.readlink(link) == "000020", (
        "lerobot-train makes `last` a relative symlink"
    )
    assert last_checkpoint(tmp_path) == target.resolve()
    # Relative, so the run directory can be moved.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    try:
        assert last_checkpoint(moved) == (checkpoints_dir(moved) / "000020").resolve()
    finally:
        moved.rename(tmp_path)


def test_point_last_replaces_an_existing_link_and_a_stale_tmp_link(tmp_path):
    root = checkpoints_dir(tmp_path)
    for name in ("000010", "000020"):
        (root / name).mkdir(parents=True)
    point_last(tmp_path, root / "000010")
    (root / ".tmp-last").symlink_to("nowhere")  # a crash between making the new link and renaming it
    point_last(tmp_path, root / "000020")
    assert os.readlink(last_link(tmp_path)) == "000020"
    assert _entries(root) == ["000010", "000020", "last"]


def test_dangling_last_is_a_clear_error(tmp_path):
    root = checkpoints_dir(tmp_path)
    root.mkdir(parents=True)
    last_link(tmp_path).symlink_to("000030")
    with pytest.raises(ReflowPairsError) as info:
        last_checkpoint(tmp_path)
    assert (
        info.value.what
        == f"{last_link(tmp_path)} points at {(root / '000030').resolve()}, which does not exist."
    )
    assert "`out`" in info.value.hint


def test_last_pointing_at_a_file_is_a_clear_error(tmp_path):
    root = checkpoints_dir(tmp_path)
    root.mkdir(parents=True)
    (root / "000030").write_text("not a checkpoint")
    last_link(tmp_path).symlink_to("000030")
    with pytest.raises(ReflowPairsError, match="which does not exist"):
        last_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------- clean_leftovers


def test_clean_leftovers_removes_tmp_and_old_entries_only(tmp_path):
    root = checkpoints_dir(tmp_path)
    (root / "000010" / "pretrained_model").mkdir(parents=True)
    (root / "000010" / "pretrained_model" / "config.json").write_text("{}")
    point_last(tmp_path, root / "000010")
    (root / ".tmp-000020" / "training_state").mkdir(parents=True)
    (root / ".tmp-000020" / "training_state" / "x").write_text("partial")
    (root / ".old-000010").mkdir()
    (root / ".tmp-last").symlink_to(
        "000010"
    )  # a symlink to a real checkpoint: the link goes, the target stays
    (root / ".tmp-stray-file").write_text("x")
    (root / "notes.tmp-1").write_text("the user's")  # only names *starting* with the prefixes are leftovers
    (root / "000015.old").mkdir()

    removed = clean_leftovers(tmp_path)

    assert sorted(p.name for p in removed) == [".old-000010", ".tmp-000020", ".tmp-last", ".tmp-stray-file"]
    assert all(p.parent == root for p in removed)
    assert _entries(root) == ["000010", "000015.old", "last", "notes.tmp-1"]
    assert (root / "000010" / "pretrained_model" / "config.json").read_text() == "{}"
    assert last_checkpoint(tmp_path) == (root / "000010").resolve()
    assert clean_leftovers(tmp_path) == [], "a second call has nothing left to remove"


def test_clean_leftovers_without_checkpoints_dir(tmp_path):
    assert clean_leftovers(tmp_path) == []
    assert clean_leftovers(tmp_path / "missing") == []
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------------------------------------------- read_state


def _state_file(tmp_path: Path, content: bytes | str | None) -> Path:
    checkpoint = tmp_path / "000010"
    (checkpoint / "training_state").mkdir(parents=True)
    if content is not None:
        path = checkpoint / "training_state" / STATE_FILE
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return checkpoint


def test_read_state_of_a_valid_file(tmp_path):
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": 10, "position": [1, 2]}
    checkpoint = _state_file(tmp_path, json.dumps(state))
    assert read_state(checkpoint) == state


def test_read_state_missing_file_says_it_is_not_a_reflowpairs_run(tmp_path):
    checkpoint = _state_file(tmp_path, None)
    with pytest.raises(ReflowPairsError) as info:
        read_state(checkpoint)
    assert info.value.what == (
        f"{checkpoint} has no training_state/{STATE_FILE}: it was not written by `reflowpairs train`."
    )
    assert "start a new run in another `out`" in info.value.hint


def test_read_state_bad_json_names_the_file(tmp_path):
    checkpoint = _state_file(tmp_path, '{"format": "reflowpairs.train", "version": 1, "step": ')
    with pytest.raises(ReflowPairsError) as info:
        read_state(checkpoint)
    assert info.value.what.startswith(
        f"{checkpoint / 'training_state' / STATE_FILE} is not valid JSON (JSONDecodeError"
    )
    assert "damaged" in info.value.hint
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_read_state_unreadable_path_names_the_file(tmp_path):
    checkpoint = _state_file(tmp_path, None)
    (checkpoint / "training_state" / STATE_FILE).mkdir()  # an OSError other than FileNotFoundError
    with pytest.raises(
        ReflowPairsError, match=rf"Cannot read {checkpoint / 'training_state' / STATE_FILE} \("
    ):
        read_state(checkpoint)


@pytest.mark.parametrize(
    "state",
    [
        {"format": "something.else", "version": STATE_VERSION, "step": 1},
        {"format": STATE_FORMAT, "version": STATE_VERSION + 1, "step": 1},
        {"format": STATE_FORMAT, "step": 1},
        {},
    ],
    ids=["other-format", "newer-version", "no-version", "empty"],
)
def test_read_state_wrong_format_or_version(tmp_path, state):
    checkpoint = _state_file(tmp_path, json.dumps(state))
    with pytest.raises(ReflowPairsError) as info:
        read_state(checkpoint)
    assert info.value.what == (
        f"{checkpoint / 'training_state' / STATE_FILE} is not a version {STATE_VERSION} {STATE_FORMAT} state file."
    )


def test_read_state_non_utf8_is_a_clear_error(tmp_path):
    checkpoint = _state_file(tmp_path, b'{"format": "\xff\xfe"}')
    with pytest.raises(ReflowPairsError, match=str(checkpoint / "training_state" / STATE_FILE)):
        read_state(checkpoint)


@pytest.mark.parametrize("text", ["[1, 2]", '"reflowpairs.train"', "3", "null"])
def test_read_state_non_object_json_is_a_clear_error(tmp_path, text):
    checkpoint = _state_file(tmp_path, text)
    with pytest.raises(ReflowPairsError, match=str(checkpoint / "training_state" / STATE_FILE)):
        read_state(checkpoint)


# ----------------------------------------------------------------------------------------------- save_checkpoint


def test_save_checkpoint_writes_lerobots_layout(student, tmp_path):
    from lerobot.common.train_utils import get_step_identifier
    from lerobot.configs.policies import PreTrainedConfig

    out = tmp_path / "run"
    final = student.save(out, 5, state={"position": 40, "settings": {"lr": 1e-4}}, batch_size=3)

    assert final == checkpoints_dir(out) / "000005" == checkpoints_dir(out) / get_step_identifier(5, TOTAL)
    assert _entries(checkpoints_dir(out)) == ["000005", "last"], "no .tmp-/.old- leftovers after a clean save"
    assert _entries(final) == ["pretrained_model", "training_state"]
    model = final / "pretrained_model"
    assert {
        "config.json",
        "model.safetensors",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
    } <= set(_entries(model))
    training = final / "training_state"
    assert {
        "training_step.json",
        "optimizer_state.safetensors",
        "optimizer_param_groups.json",
        "scheduler_state.json",
        "rng_state.safetensors",
        STATE_FILE,
    } <= set(_entries(training))
    assert MASTER_FILE not in _entries(training), "no master copies were given"

    # config.json is exactly the config_json given (not re-serialised from the loaded config).
    assert json.loads((model / "config.json").read_text()) == student_config_json(
        student.init_config, str(student.init_dir), 1
    )
    # ... and lerobot reads it back as the student's config.
    loaded = PreTrainedConfig.from_pretrained(model)
    assert loaded.type == "smolvla" and loaded.num_steps == 1 and loaded.load_vlm_weights is False

    assert read_state(final) == {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": 5,
        "position": 40,
        "settings": {"lr": 1e-4},
    }
    assert json.loads((training / "training_step.json").read_text())["step"] == 5

    link = last_link(out)
    assert link.is_symlink() and os.readlink(link) == "000005"
    assert last_checkpoint(out) == final.resolve()


def test_later_saves_repoint_last_and_keep_earlier_checkpoints(student, tmp_path):
    out = tmp_path / "run"
    first = student.save(out, 10)
    second = student.save(out, 20)
    assert _entries(checkpoints_dir(out)) == ["000010", "000020", "last"]
    assert os.readlink(last_link(out)) == "000020"
    assert last_checkpoint(out) == second.resolve()
    assert read_state(first)["step"] == 10 and read_state(second)["step"] == 20


def test_resaving_a_step_replaces_it_whole(student, tmp_path):
    out = tmp_path / "run"
    final = student.save(out, 10, state={"position": 1})
    (final / "pretrained_model" / "stale.txt").write_text("from the earlier run")
    again = student.save(out, 10, state={"position": 2})
    assert again == final
    assert read_state(again)["position"] == 2
    assert not (again / "pretrained_model" / "stale.txt").exists()
    assert _entries(checkpoints_dir(out)) == ["000010", "last"], "the replaced copy (.old-*) is removed"


def test_master_params_round_trip(student, tmp_path):
    # A transposed (non-contiguous) master, as a master of a transposed parameter view would be.
    masters = {"model.expert.weight": torch.randn(3, 4), "model.proj.weight": torch.randn(4, 6).t()}
    final = student.save(tmp_path / "run", 3, master_params=masters)
    assert (final / "training_state" / MASTER_FILE).is_file()
    loaded = load_master_params(final)
    assert loaded.keys() == masters.keys()
    for name, tensor in masters.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == torch.float32


def test_empty_master_params_write_no_file(student, tmp_path):
    final = student.save(tmp_path / "run", 3, master_params={})
    assert not (final / "training_state" / MASTER_FILE).exists()
    assert load_master_params(final) is None


def test_damaged_master_params_is_a_clear_error(student, tmp_path):
    final = student.save(tmp_path / "run", 3, master_params={"w": torch.ones(2)})
    path = final / "training_state" / MASTER_FILE
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ReflowPairsError) as info:
        load_master_params(final)
    assert info.value.what.startswith(f"Cannot read {path} (")
    assert "damaged" in info.value.hint


def test_training_state_round_trip(student, tmp_path):
    optimizer, scheduler = student.optimisation()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    scheduler.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    final = student.save(tmp_path / "run", 12, optimisation=(optimizer, scheduler))

    fresh_optimizer, fresh_scheduler = student.optimisation()
    assert load_training_state(final, fresh_optimizer, fresh_scheduler) == 12
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 2
    restored = fresh_optimizer.state_dict()["state"][0]
    assert torch.equal(restored["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_damaged_training_state_is_a_clear_error(student, tmp_path):
    final = student.save(tmp_path / "run", 12)
    (final / "training_state" / "optimizer_state.safetensors").write_bytes(b"garbage")
    optimizer, scheduler = student.optimisation()
    with pytest.raises(ReflowPairsError) as info:
        load_training_state(final, optimizer, scheduler)
    assert info.value.what.startswith(f"Cannot restore the training state in {final / 'training_state'} (")


def test_a_crash_mid_save_leaves_last_on_the_complete_checkpoint(student, tmp_path):
    out = tmp_path / "run"
    good = student.save(out, 10)
    # A real failure late in the save, after weights, processors and training state are in .tmp-000020:
    # safetensors refuses tensors that share memory.
    shared = torch.ones(4)
    with pytest.raises(RuntimeError, match="share memory"):  # not a write failure: it propagates as it is
        student.save(out, 20, master_params={"a": shared, "b": shared})
    root = checkpoints_dir(out)
    assert _entries(root) == ["000010", "last"]  # the failed save removed its half-written .tmp-000020
    assert last_checkpoint(out) == good.resolve()
    assert read_state(last_checkpoint(out))["step"] == 10
    assert clean_leftovers(out) == []


def test_a_leftover_tmp_of_the_same_step_is_replaced_not_merged(student, tmp_path):
    out = tmp_path / "run"
    root = checkpoints_dir(out)
    leftover = root / ".tmp-000010"
    (leftover / "pretrained_model").mkdir(parents=True)
    (leftover / "pretrained_model" / "junk.bin").write_bytes(b"partial write from a crashed run")
    (root / ".tmp-last").symlink_to("nowhere")
    final = student.save(out, 10)
    assert not (final / "pretrained_model" / "junk.bin").exists()
    assert _entries(root) == ["000010", "last"]
    assert last_checkpoint(out) == final.resolve()
