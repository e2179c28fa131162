"""The bfloat16 tiny teacher computes as real SmolVLA checkpoints do: VLM text layers and expert in bfloat16."""

from __future__ import annotations

import torch

from reflowpairs.teacher import load_policy


def test_bf16_teacher_has_bf16_text_and_expert_and_fp32_projections(bf16_world):
    policy = load_policy(str(bf16_world.teacher_dir), "cpu").policy
    dtypes = {name: p.dtype for name, p in policy.named_parameters()}
    # the expert's layers are bfloat16, except the cross-attention K/V projections lerobot re-creates in float32
    expert = {n: d for n, d in dtypes.items() if ".lm_expert." in n}
    assert all(
        d == torch.bfloat16 for n, d in expert.items() if not n.endswith(("k_proj.weight", "v_proj.weight"))
    )
    assert set(expert.values()) == {torch.bfloat16, torch.float32}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".text_model." in n)
    assert all(d == torch.float32 for n, d in dtypes.items() if ".vision_model." in n)
    assert dtypes["model.action_out_proj.weight"] == torch.float32
