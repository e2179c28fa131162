"""CPU thread defaults: no oversubscription when the user set nothing, the user's setting when they did."""

from __future__ import annotations

import torch

from reflowpairs.threads import configure_threads, plan_threads


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
