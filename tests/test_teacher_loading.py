"""Loading teachers as real fine-tuned checkpoints are saved: load_vlm_weights true, weights all in the checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from reflowpairs.errors import ReflowPairsError
from reflowpairs.teacher import load_policy


def _with_load_vlm_weights(teacher_dir, out):
    shutil.copytree(teacher_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["load_vlm_weights"] = True  # as a checkpoint fine-tuned from the pretrained SmolVLA says
    (out / "config.json").write_text(json.dumps(config, indent=4))
    return out


def test_load_vlm_weights_true_loads_from_the_checkpoint_without_the_base_vlm(tiny_world, tmp_path):
    """The VLM dir holds a config and processor but no weights: honouring load_vlm_weights would fail (offline) or
    download the base VLM; the checkpoint's own model.safetensors has every weight, so the policy equals the teacher."""
    assert not list(tiny_world.vlm_dir.glob("*.safetensors"))
    copy = _with_load_vlm_weights(tiny_world.teacher_dir, tmp_path / "teacher")
    loaded = load_policy(str(copy), "cpu")
    reference = load_policy(str(tiny_world.teacher_dir), "cpu")
    assert (
        json.loads((copy / "config.json").read_text())["load_vlm_weights"] is True
    )  # the file is left as it is
    ours, theirs = loaded.policy.state_dict(), reference.policy.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_load_vlm_weights_true_with_an_incomplete_safetensors_names_the_file(tiny_world, tmp_path):
    copy = _with_load_vlm_weights(tiny_world.teacher_dir, tmp_path / "teacher")
    weights = load_file(copy / "model.safetensors")
    dropped = next(k for k in weights if ".text_model.layers.0." in k)
    save_file(
        {k: v for k, v in weights.items() if k != dropped},
        copy / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ReflowPairsError) as err:
        load_policy(str(copy), "cpu")
    assert "model.safetensors lacks weights" in err.value.what and dropped in err.value.what
