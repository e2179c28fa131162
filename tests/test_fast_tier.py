"""The fast tier's guard (tests/conftest.py): while a run leaves the slow tests out, an unmarked test that starts a
process, trains a student or runs a lerobot command fails with "mark it @pytest.mark.slow". Nothing here starts a
process: the guard refuses before the start, and the runs of a test suite inside this one (``pytester``) stay in
this process."""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import subprocess
import sys

import pytest

import reflowpairs.train.loop
from reflowpairs.tiny import pi_patch

from .conftest import SLOW_HINT, refuse_slow_work, slow_left_out


def test_which_runs_leave_the_slow_tests_out():
    assert slow_left_out("not slow", {})
    assert slow_left_out("not slow and not gpu", {})
    assert slow_left_out("gpu and not   slow", {})
    assert not slow_left_out("", {})
    assert not slow_left_out("slow", {})
    assert not slow_left_out("gpu", {})
    assert not slow_left_out("not slowest", {})
    assert slow_left_out("", {"REFLOWPAIRS_FAST_TIER": "1"})


def _refused(start) -> str:
    """The message of the failure ``start()`` raises inside the guard."""
    with refuse_slow_work("t.py::test_x") as refused, pytest.raises(pytest.fail.Exception) as failure:
        start()
    assert refused == [str(failure.value)]
    return str(failure.value)


POPEN = (subprocess.Popen, "__init__")
PROCESS = (multiprocessing.process.BaseProcess, "start")


@pytest.mark.parametrize(
    ("start", "entry", "what"),
    [
        (lambda: subprocess.run([sys.executable, "-c", "pass"]), POPEN, "subprocess"),
        (lambda: subprocess.Popen(["true"]), POPEN, "subprocess"),
        (lambda: os.popen("true"), POPEN, "subprocess"),
        (lambda: os.fork(), (os, "fork"), "os.fork"),
        (lambda: os.system("true"), (os, "system"), "os.system"),
        (lambda: multiprocessing.Process(target=print).start(), PROCESS, "multiprocessing"),
        (
            lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
            PROCESS,
            "multiprocessing",
        ),
        (
            lambda: reflowpairs.train.loop.run_steps(*[None] * 7),
            (reflowpairs.train.loop, "run_steps"),
            "step loop",
        ),
        (
            lambda: pi_patch.run_lerobot("lerobot-eval", ["--help"]),
            (pi_patch, "run_lerobot"),
            "lerobot command",
        ),
    ],
)
def test_the_guard_refuses_before_the_start(start, entry, what):
    def checked_start():
        # a broken guard must not start a real process (a forked copy of this test run): check the entry first
        assert getattr(getattr(*entry), "fast_tier_guard", None) == "t.py::test_x", f"{entry} is not guarded"
        start()

    message = _refused(checked_start)
    assert message.startswith("t.py::test_x ") and what in message
    assert "mark it @pytest.mark.slow" in message and SLOW_HINT in message


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("lerobot_train", "main"),
        ("lerobot_train", "train"),
        ("lerobot_eval", "main"),
        ("lerobot_eval", "eval_main"),
    ],
)
def test_the_guard_refuses_lerobots_commands_in_this_process(module, name):
    import importlib

    script = importlib.import_module(f"lerobot.scripts.{module}")
    command = module.replace("_", "-")
    assert f"ran {command}" in _refused(lambda: getattr(script, name)())  # looked up inside the guard


def test_the_guarded_loop_is_the_one_train_runs():
    """``train()`` looks ``run_steps`` up in its module when it runs, so replacing the module's ``run_steps`` stops it."""
    assert "run_steps" in reflowpairs.train.loop.train.__code__.co_names


def test_the_guard_restores_what_it_replaced():
    before = (subprocess.Popen.__init__, os.fork, reflowpairs.train.loop.run_steps, pi_patch.run_lerobot)
    with refuse_slow_work("t.py::test_x"):
        assert (
            subprocess.Popen.__init__ is not before[0] and reflowpairs.train.loop.run_steps is not before[2]
        )
    assert (
        subprocess.Popen.__init__,
        os.fork,
        reflowpairs.train.loop.run_steps,
        pi_patch.run_lerobot,
    ) == before


INNER_CONFTEST = "from tests.conftest import pytest_configure, pytest_runtest_call, pytest_runtest_setup\n"
INNER_TESTS = """
import subprocess

import pytest


@pytest.fixture(scope="module")
def started():
    return subprocess.Popen(["true"])


def test_starts_a_process():
    subprocess.run(["true"])


def test_swallows_the_refusal():
    try:
        subprocess.run(["true"])
    except BaseException:
        pass


def test_uses_a_fixture_that_starts_a_process(started):
    pass


@pytest.mark.slow
def test_marked():
    subprocess.run(["true"])


def test_pure():
    assert 1 + 1 == 2


def test_is_unguarded_in_the_full_run():
    assert getattr(subprocess.Popen.__init__, "fast_tier_guard", "") != (
        "test_inner.py::test_is_unguarded_in_the_full_run"
    )
"""


def test_the_fast_tier_fails_unmarked_tests_that_start_processes(pytester):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-m", "not slow")
    result.assert_outcomes(passed=1, failed=3, errors=1, deselected=1)
    result.stdout.fnmatch_lines(["*ERROR at setup of test_uses_a_fixture_that_starts_a_process*"])
    result.stdout.fnmatch_lines(
        [
            "*test_inner.py::test_starts_a_process started a process (subprocess) in the fast tier: "
            "mark it @pytest.mark.slow*"
        ]
    )
    for name in ("test_starts_a_process", "test_swallows_the_refusal"):
        result.stdout.fnmatch_lines([f"FAILED test_inner.py::{name} - *"])
    result.stdout.fnmatch_lines(
        ["*test_swallows_the_refusal started a process (subprocess)*mark it @pytest.mark.slow*"]
    )
    result.stdout.fnmatch_lines(["FAILED test_inner.py::test_is_unguarded_in_the_full_run - AssertionError*"])


def test_the_full_run_does_not_guard(pytester, monkeypatch):
    """Without ``-m "not slow"`` the guard stays off (the inner tests would start processes: only the unguarded check
    and the pure test are selected here)."""
    monkeypatch.delenv("REFLOWPAIRS_FAST_TIER", raising=False)
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-k", "pure or unguarded")
    result.assert_outcomes(passed=2, deselected=4)
