"""Shared offline fixtures: the tiny world (VLM dir, dataset, trained teacher) built once per session,
a second, differently shaped world the main code paths never special-case, and a generated store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from reflowpairs.tinyworld import TinyDatasetSpec, TinyTeacherSpec, TinyWorld, VLMSpec, build_tiny_world

from .helpers import generate_store, tiny_store_settings

logging.getLogger("lerobot.utils.import_utils").setLevel(logging.CRITICAL)
torch.set_num_threads(1)  # tiny models; and subprocess tests share the 2 cores
# ... and the same for the command line's thread planning (`threads="auto"`, which the CLI passes to generate() and
# train()): it gives the main process every core unless OMP_NUM_THREADS is set, undoing the line above for the rest of
# the session (called from Python with the default `threads=None`, they leave the count alone). On a
# shared 2-core machine two OpenMP threads on these tiny tensors make a generate run up to 20x slower (busy-waiting).
# Tests of the default thread plan clear the variable themselves (monkeypatch.delenv); a user's setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _root_log_handlers_restored():
    """Log handlers a test adds to the root logger (lerobot's ``init_logging`` replaces them with a handler on the
    test's captured stream, closed after it) are taken away again, so a later test's log records do not go to a
    closed stream ("--- Logging error ---")."""
    root = logging.getLogger()
    before = list(root.handlers)
    yield
    root.handlers[:] = before


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    """The bundled tiny world, with a briefly trained teacher (tests need a real ODE, not a good one)."""
    return build_tiny_world(
        tmp_path_factory.mktemp("tiny") / "world", teacher_spec=TinyTeacherSpec(train_steps=60)
    )


@pytest.fixture(scope="session")
def other_world(tmp_path_factory) -> TinyWorld:
    """Another shape of world: 3-d state and action, chunk 5, max_action_dim 4, 3 short episodes."""
    return build_tiny_world(
        tmp_path_factory.mktemp("other") / "world",
        dataset_spec=TinyDatasetSpec(num_episodes=3, episode_length=10, state_dim=3, seed=7),
        teacher_spec=TinyTeacherSpec(
            chunk_size=5, max_action_dim=4, max_state_dim=4, num_steps=6, train_steps=10, batch_size=8
        ),
    )


@pytest.fixture(scope="session")
def bf16_world(tmp_path_factory) -> TinyWorld:
    """The tiny world with a bfloat16 teacher: its VLM config says ``text_config.torch_dtype = "bfloat16"``, as the
    real SmolVLM2 config does, so the VLM text layers and the action expert compute in bfloat16."""
    return build_tiny_world(
        tmp_path_factory.mktemp("bf16") / "world",
        teacher_spec=TinyTeacherSpec(train_steps=30),
        vlm_spec=VLMSpec().with_dtype("bfloat16"),
    )


@pytest.fixture(scope="session")
def tiny_store(tiny_world, tmp_path_factory) -> Path:
    """A complete zarr pair store over episodes 0-5 of the tiny world, K=2, small shards."""
    return generate_store(tiny_world, tmp_path_factory.mktemp("store") / "pairs", **tiny_store_settings())
