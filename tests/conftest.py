"""Shared offline fixtures: the tiny world (VLM dir, dataset, trained teacher) built once per session,
a second, differently shaped world the main code paths never special-case, a generated store, and tiny pi0/pi05
teachers.

And the fast tier's guard. ``make test-fast`` runs ``pytest -m "not slow"``: the tests marked
``@pytest.mark.slow`` (end-to-end runs, child processes, training, lerobot's own commands) are left out. While a
run leaves them out, every test it runs is guarded through its setup (its fixtures) and its call: starting a process
(``subprocess``, ``os.fork``/``os.system``/``os.posix_spawn``, ``multiprocessing``), training a student
(``reflowpairs.train.loop.run_steps``, the step loop of ``train()``) or running lerobot-train/lerobot-eval in this process
fails the test with "mark it @pytest.mark.slow", so the marks stay honest. ``make test`` runs everything, unguarded.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from reflowpairs.tiny.pi import TinyPiSpec, build_tiny_pi_teacher
from reflowpairs.tiny.world import TinyDatasetSpec, TinyTeacherSpec, TinyWorld, VLMSpec, build_tiny_world

from .helpers import generate_store, no_network, tiny_store_settings

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


@pytest.fixture(scope="session")
def pi_teachers(tiny_world, tmp_path_factory) -> dict[str, Path]:
    """Tiny pi0 and pi05 teachers (``reflowpairs.tiny.pi``, ~41 M parameters, 2 training steps) for the tiny world's
    dataset, each with its own ``tokenizer/``, built with every socket connection refused: ``{variant: checkpoint}``.
    Tests copy a checkpoint before changing it."""
    root = tmp_path_factory.mktemp("pi_teachers")
    with no_network():
        return {
            variant: build_tiny_pi_teacher(
                root / variant,
                variant,
                tiny_world.repo_id,
                tiny_world.dataset_root,
                spec=TinyPiSpec(train_steps=2),
            )
            for variant in ("pi0", "pi05")
        }


# --- the fast tier's guard ----------------------------------------------------------------------------------------

FAST_TIER_ENV = "REFLOWPAIRS_FAST_TIER"
"""Set to 1 to guard every unmarked test even without ``-m "not slow"``."""

SLOW_HINT = (
    "mark it @pytest.mark.slow: tests that start a process, train a student or run lerobot's commands belong to "
    "the slow tier (`make test` runs them, `make test-fast` leaves them out)"
)

_OS_STARTS = ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp")
"""``os`` functions that start a process (``os.popen`` and ``os.spawn*`` go through ``subprocess`` or ``os.fork``)."""


def slow_left_out(markexpr: str, environ: dict[str, str] | None = None) -> bool:
    """Whether a run with ``-m MARKEXPR`` leaves the slow tests out (``not slow`` in the expression), or
    ``REFLOWPAIRS_FAST_TIER=1`` asks for the guard."""
    environ = os.environ if environ is None else environ
    return environ.get(FAST_TIER_ENV) == "1" or re.search(r"\bnot\s+slow\b", markexpr) is not None


def _guarded_targets() -> list[tuple[Any, str, str]]:
    """``(owner, attribute, what it does)`` for each entry point the guard refuses."""
    import lerobot.scripts.lerobot_eval as lerobot_eval
    import lerobot.scripts.lerobot_train as lerobot_train

    import reflowpairs.tiny.pi_patch
    import reflowpairs.train.loop

    targets = [
        (subprocess.Popen, "__init__", "started a process (subprocess)"),
        (multiprocessing.process.BaseProcess, "start", "started a process (multiprocessing)"),
        (reflowpairs.train.loop, "run_steps", "trained a student (reflowpairs.train.train's step loop)"),
        (
            reflowpairs.tiny.pi_patch,
            "run_lerobot",
            "ran a lerobot command (reflowpairs.tiny.pi_patch.run_lerobot)",
        ),
        (lerobot_train, "train", "ran lerobot-train"),
        (lerobot_train, "main", "ran lerobot-train"),
        (lerobot_eval, "eval_main", "ran lerobot-eval"),
        (lerobot_eval, "main", "ran lerobot-eval"),
    ]
    targets += [(os, name, f"started a process (os.{name})") for name in _OS_STARTS if hasattr(os, name)]
    return targets


def _refusal(test: str, what: str, refused: list[str]) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # the failure points at the caller
        message = f"{test} {what} in the fast tier: {SLOW_HINT}."
        refused.append(message)
        pytest.fail(message)

    refuse.fast_tier_guard = test  # type: ignore[attr-defined]
    return refuse


@contextmanager
def refuse_slow_work(test: str) -> Iterator[list[str]]:
    """Inside the block, every entry point of ``_guarded_targets`` fails the test ``test`` (a node id) with a message
    saying to mark it slow; the list it yields collects the messages (a refusal that the code under test caught and
    swallowed is still reported). The entry points are restored on leaving."""
    refused: list[str] = []
    saved = []
    try:
        for owner, name, what in _guarded_targets():
            saved.append(
                (owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
            )
            setattr(owner, name, _refusal(test, what, refused))
        yield refused
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _guarded(item: pytest.Item) -> bool:
    return item.config.stash.get(_FAST_TIER, False) and item.get_closest_marker("slow") is None


_FAST_TIER = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_FAST_TIER] = slow_left_out(config.getoption("markexpr", "") or "")


@contextmanager
def _phase_guard(item: pytest.Item) -> Iterator[None]:
    if not _guarded(item):
        yield
        return
    with refuse_slow_work(item.nodeid) as refused:
        yield
    if refused:  # the code under test caught the refusal: the test still fails
        pytest.fail(refused[0])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """The guard covers the fixtures a test sets up (a module fixture that trains counts as the test training)."""
    with _phase_guard(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _phase_guard(item):
        return (yield)
