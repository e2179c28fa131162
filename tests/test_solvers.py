"""reflowpairs.solvers: dx/dt = v(x, t) integrated from t=1 (noise) to t=0 (action), lerobot's convention.

Velocity fields here have known exact solutions, so every check compares against a closed form; the teacher's own
sampler is lerobot's ``euler_integrate``, and ``euler`` must be it bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from reflowpairs.errors import ReflowPairsError
from reflowpairs.solvers import ADAPTIVE_SOLVERS, SOLVERS, SolverConfig, integrate

FIXED = ("euler", "midpoint", "rk4")


def _noise(batch=2, dtype=torch.float32, seed=0):
    return torch.randn(batch, 5, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cos_field(x, t):
    """dx/dt = cos(t) x, so x(t) = C exp(sin t) and x(0) = x(1) exp(-sin 1). Integrating the wrong way
    (0 -> 1) would give exp(+sin 1) instead; a solver that ignored t would give exp(-1)."""
    return torch.cos(t.to(x.dtype))[:, None, None] * x


EXACT_COS = math.exp(-math.sin(1.0))


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_straight_line_reaches_the_action(name, steps):
    # lerobot: x_t = t*noise + (1-t)*action, u = noise - action. Integrating u from the noise at t=1 must land on
    # the action at t=0, exactly enough for every solver and any step count (the path is straight).
    noise = _noise(3)
    action = _noise(3, seed=1)
    u = noise - action
    out = integrate(lambda x, t: u, noise, SolverConfig(name, num_steps=steps))
    assert out.shape == noise.shape and out.dtype == noise.dtype
    torch.testing.assert_close(out, action, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SOLVERS)
def test_time_runs_from_one_to_zero_as_float32_batch_vectors(name):
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return _cos_field(x, t)

    noise = _noise(4, dtype=torch.float64)
    integrate(velocity, noise, SolverConfig(name, num_steps=4))
    assert seen, "the velocity was never called"
    for t in seen:
        assert t.dtype == torch.float32 and t.shape == (4,)
        assert torch.all(t == t[0])
    assert seen[0][0].item() == 1.0, "integration starts at the noise, t=1"
    assert seen[-1][0].item() < 0.5, "integration ends near the action, t=0"


@pytest.mark.parametrize("name", [*FIXED, "dopri5"])  # dopri5 once stepped past t=0 and interpolated back
@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_velocity_is_only_queried_for_t_in_zero_one(name, tol):
    seen = []

    def velocity(x, t):
        seen.append(t[0].item())
        return _cos_field(x, t)

    integrate(velocity, _noise(2), SolverConfig(name, num_steps=5, rtol=tol, atol=tol))
    assert min(seen) >= 0.0 and max(seen) <= 1.0, (min(seen), max(seen))


def test_euler_visits_lerobots_time_grid():
    seen = []

    def velocity(x, t):
        seen.append(t[0].item())
        return x

    integrate(velocity, _noise(1), SolverConfig("euler", num_steps=4))
    assert seen == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_euler_is_lerobots_euler_integrate_bit_for_bit(steps):
    from lerobot.policies.common.flow_matching import euler_integrate

    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))

    def velocity(x, t):  # non-linear and time-dependent, so any reordering of the arithmetic shows
        return torch.tanh(x @ weight) * (1.0 + t[:, None, None]) - 0.3 * x

    noise = _noise(4)
    ours = integrate(velocity, noise, SolverConfig("euler", num_steps=steps))
    theirs = euler_integrate(velocity, noise.clone(), steps)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_euler_matches_its_closed_form_on_a_linear_field(steps):
    # Euler with dt = -h on dx/dt = cos(t) x: x <- x (1 - h cos(t_k)), t_k = 1 - k h, k = 0..N-1.
    noise = _noise(2, dtype=torch.float64)
    h = 1.0 / steps
    factor = math.prod(1.0 - h * math.cos(1.0 - k * h) for k in range(steps))
    out = integrate(_cos_field, noise, SolverConfig("euler", num_steps=steps))
    torch.testing.assert_close(out, noise * factor, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_solvers_converge_at_their_order(name, order):
    noise = _noise(2, dtype=torch.float64)  # float64, so rk4's error is not lost in float32 round-off
    errors = []
    for steps in (8, 16, 32):
        out = integrate(_cos_field, noise, SolverConfig(name, num_steps=steps))
        errors.append((out - noise * EXACT_COS).abs().max().item())
    for coarse, fine in zip(errors, errors[1:], strict=False):
        ratio = coarse / fine
        # Halving the step divides the error by ~2^order (asymptotically; loose bounds).
        assert 2**order * 0.75 < ratio < 2**order * 1.5, (name, errors)
    assert errors[-1] < {1: 5e-3, 2: 5e-5, 4: 1e-8}[order]


@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-7])
def test_dopri5_is_within_its_tolerance(tol):
    noise = _noise(2, dtype=torch.float64)
    scale = noise.abs().max().item()
    out = integrate(_cos_field, noise, SolverConfig("dopri5", rtol=tol, atol=tol))
    error = (out - noise * EXACT_COS).abs().max().item()
    # Global error of an adaptive solve tracks the local tolerance within a small factor.
    assert error < 10 * tol * (1 + scale)


def test_dopri5_tighter_tolerance_is_more_accurate_and_ignores_num_steps():
    noise = _noise(2, dtype=torch.float64)
    loose = integrate(_cos_field, noise, SolverConfig("dopri5", rtol=1e-3, atol=1e-3))
    tight = integrate(_cos_field, noise, SolverConfig("dopri5", rtol=1e-8, atol=1e-8))
    exact = noise * EXACT_COS
    assert (tight - exact).abs().max() < (loose - exact).abs().max() / 100
    # num_steps does not apply to the adaptive solver.
    for steps in (1, 50):
        again = integrate(_cos_field, noise, SolverConfig("dopri5", num_steps=steps, rtol=1e-3, atol=1e-3))
        assert torch.equal(again, loose)


def _per_row_field(rates):
    """Each row has its own rate; a row's velocity depends on that row only."""

    def velocity(x, t):
        r = rates.to(x.dtype)[:, None, None]
        return (
            r * torch.cos(3 * t.to(x.dtype))[:, None, None] * x + torch.sin(5 * t.to(x.dtype))[:, None, None]
        )

    return velocity


@pytest.mark.parametrize("name", FIXED)
def test_fixed_step_solvers_do_not_depend_on_batching(name):
    # Why only dopri5 is `adaptive`: for fixed-step solvers a row's result is the same alone or batched, bit for bit.
    rates = torch.tensor([0.5, 8.0, -3.0])
    noise = _noise(3)
    cfg = SolverConfig(name, num_steps=7)
    together = integrate(_per_row_field(rates), noise, cfg)
    for i in range(3):
        alone = integrate(_per_row_field(rates[i : i + 1]), noise[i : i + 1], cfg)
        assert torch.equal(together[i : i + 1], alone)


def test_dopri5_steps_depend_on_the_whole_batch():
    # The documented reason dopri5 is `adaptive` (the engine then solves each frame on its own): one step sequence
    # for everything integrated together, so a row's result changes with its batch-mates.
    rates = torch.tensor([0.5, 8.0, -3.0])
    noise = _noise(3)
    cfg = SolverConfig("dopri5", rtol=1e-4, atol=1e-4)
    together = integrate(_per_row_field(rates), noise, cfg)
    alone = integrate(_per_row_field(rates[:1]), noise[:1], cfg)
    assert not torch.equal(together[:1], alone)
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-2)  # both still solve the same ODE


@pytest.mark.parametrize(("name", "evals_per_step"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 10, 16, 32, 50, 100])
def test_fixed_step_solvers_take_num_steps_steps(name, evals_per_step, steps):
    calls = []

    def velocity(x, t):
        calls.append(t[0].item())
        return x

    integrate(velocity, _noise(1), SolverConfig(name, num_steps=steps))
    assert len(calls) == evals_per_step * steps


@pytest.mark.parametrize("name", ["midpoint", "rk4"])
def test_fixed_step_solvers_take_num_steps_steps_for_61(name):
    """A float32 step size once let torchdiffeq add a tiny extra step for some counts (61, 109, ...); the grid does not."""
    calls = []

    def velocity(x, t):
        calls.append(t[0].item())
        return x

    integrate(velocity, _noise(1), SolverConfig(name, num_steps=61))
    assert len(calls) == {"midpoint": 2, "rk4": 4}[name] * 61


def test_adaptive_flag():
    assert ADAPTIVE_SOLVERS == ("dopri5",)
    assert SolverConfig("dopri5").adaptive is True
    for name in FIXED:
        assert SolverConfig(name).adaptive is False


def test_defaults_are_the_teachers_sampler():
    cfg = SolverConfig()
    assert (cfg.name, cfg.num_steps) == ("euler", 10)
    assert cfg.rtol > 0 and cfg.atol > 0


def test_unknown_solver_is_refused_with_the_choices():
    with pytest.raises(ReflowPairsError) as info:
        SolverConfig("heun")
    assert info.value.what == "Unknown solver 'heun'."
    for name in SOLVERS:
        assert name in info.value.hint


@pytest.mark.parametrize("steps", [0, -1])
def test_num_steps_below_one_is_refused(steps):
    with pytest.raises(ReflowPairsError, match=rf"num_steps must be at least 1, got {steps}\."):
        SolverConfig("euler", num_steps=steps)
    with pytest.raises(ReflowPairsError, match="num_steps must be at least 1"):
        SolverConfig("rk4", num_steps=steps)


@pytest.mark.parametrize(
    ("rtol", "atol"), [(0.0, 1e-5), (1e-5, 0.0), (-1e-3, 1e-5), (1e-5, -1.0), (float("nan"), 1e-5)]
)
def test_non_positive_tolerances_are_refused(rtol, atol):
    with pytest.raises(ReflowPairsError) as info:
        SolverConfig("dopri5", rtol=rtol, atol=atol)
    assert str(info.value).startswith("`rtol` and `atol` must be positive, got")
    assert f"got {rtol} and {atol}." in str(info.value)


def test_config_is_frozen():
    cfg = SolverConfig("euler", 3)
    with pytest.raises(AttributeError):
        cfg.num_steps = 0  # a frozen dataclass: validation cannot be bypassed after construction
