"""CPU thread defaults: no oversubscription when the user set nothing, the user's setting when they did; library
callers of ``generate()`` and ``train()`` keep their own torch thread count unless they pass ``threads``."""

from __future__ import annotations

import pytest
import torch

from reflowpairs.errors import ReflowPairsError
from reflowpairs.generate.run import generate
from reflowpairs.threads import apply_threads, configure_threads, plan_threads
from reflowpairs.train.config import TrainConfig
from reflowpairs.train.loop import train

from .helpers import cli, generate_args, generate_config


def test_main_process_gets_the_cores_the_workers_leave():
    assert plan_threads(2, cores=2, environ={}).main == 1
    assert plan_threads(2, cores=16, environ={}).main == 14
    assert plan_threads(0, cores=16, environ={}).main == 16
    assert plan_threads(8, cores=4, environ={}).main == 1  # never fewer than one
    assert (
        plan_threads(2, cores=16, processes_on_node=4, environ={}).main == 2
    )  # 4 cores each, 2 to the workers


def test_a_users_thread_setting_is_kept_and_named():
    plan = plan_threads(2, cores=16, environ={"OMP_NUM_THREADS": "3"})
    assert plan.source == "OMP_NUM_THREADS" and plan.main == torch.get_num_threads()
    assert "from OMP_NUM_THREADS" in plan.describe()


def test_configure_threads_sets_torch_threads(monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("reflowpairs.threads.available_cores", lambda: 3)
    before = torch.get_num_threads()
    try:
        plan = configure_threads(num_workers=1)
        assert torch.get_num_threads() == plan.main == 2
        assert plan.describe() == "2 main threads, 1 DataLoader worker x 1 thread on 3 cores"
    finally:
        torch.set_num_threads(before)


# --- generate() and train() from Python: the caller's torch threads unless `threads` says otherwise ---------------

CORES = 3  # what the plan sees (patched): "auto" would give the main process 3 threads with no workers


@pytest.fixture
def no_thread_env(monkeypatch):
    """No thread variable set, the plan sees CORES cores, and torch's count is restored after the test."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("reflowpairs.threads.available_cores", lambda: CORES)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _generate_threads(world, out, **settings) -> tuple[str, int, int]:
    """(the plan's threads line, torch threads while generate sampled, torch threads after it)."""
    seen: dict = {}

    def on_plan(plan) -> None:
        seen["plan"], seen["during"] = plan.threads, torch.get_num_threads()

    generate(
        generate_config(world, out, episodes=[0], samples_per_frame=1, num_workers=0, **settings),
        on_plan=on_plan,
    )
    return seen["plan"], seen["during"], torch.get_num_threads()


def _train_threads(store, out, **settings) -> tuple[str, int, int]:
    seen: dict = {}

    def on_plan(plan) -> None:
        seen["plan"], seen["during"] = plan.threads, torch.get_num_threads()

    cfg = TrainConfig(pairs=store, out=out, steps=1, batch_size=4, num_workers=0, device="cpu", **settings)
    train(cfg, on_plan=on_plan)
    return seen["plan"], seen["during"], torch.get_num_threads()


def test_generate_leaves_the_callers_threads_alone(tiny_world, tmp_path, no_thread_env):
    torch.set_num_threads(2)
    plan, during, after = _generate_threads(tiny_world, tmp_path / "kept")
    assert (during, after) == (2, 2) and plan == "2 main threads on 3 cores (the caller's torch setting)"
    plan, during, after = _generate_threads(tiny_world, tmp_path / "one", threads=1)
    assert (during, after) == (1, 1) and plan == "1 main thread on 3 cores (from `threads`)"
    plan, during, after = _generate_threads(tiny_world, tmp_path / "auto", threads="auto")
    assert (during, after) == (CORES, CORES) and plan == "3 main threads on 3 cores"


@pytest.mark.slow
def test_train_leaves_the_callers_threads_alone(tiny_store, tmp_path, no_thread_env):
    torch.set_num_threads(2)
    plan, during, after = _train_threads(tiny_store, tmp_path / "kept")
    assert (during, after) == (2, 2) and plan == "2 main threads on 3 cores (the caller's torch setting)"
    plan, during, after = _train_threads(tiny_store, tmp_path / "one", threads=1)
    assert (during, after) == (1, 1) and "from `threads`" in plan
    plan, during, after = _train_threads(tiny_store, tmp_path / "auto", threads="auto")
    assert (during, after) == (CORES, CORES) and plan == "3 main threads on 3 cores"


def test_the_command_line_keeps_its_plan(tiny_world, tmp_path, no_thread_env):
    """`reflowpairs generate` still plans threads around its workers and prints the plan as before."""
    torch.set_num_threads(1)
    result = cli(
        *generate_args(tiny_world, tmp_path / "pairs", "--episodes", "0", "--samples-per-frame", "1")
    )
    assert "threads: 3 main threads on 3 cores" in " ".join(result.output.split())
    assert torch.get_num_threads() == CORES


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_a_bad_threads_setting_is_named(bad, tiny_world, tiny_store, tmp_path):
    before = torch.get_num_threads()
    with pytest.raises(ReflowPairsError, match="`threads` must be a number of at least 1") as err:
        apply_threads(bad, 0)
    assert "'auto'" in err.value.hint
    with pytest.raises(ReflowPairsError, match="`threads`"):
        generate(generate_config(tiny_world, tmp_path / "pairs", threads=bad))
    with pytest.raises(ReflowPairsError, match="`threads`"):
        train(TrainConfig(pairs=tiny_store, out=tmp_path / "student", device="cpu", threads=bad))
    assert torch.get_num_threads() == before and not (tmp_path / "pairs").exists()
