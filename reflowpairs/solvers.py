"""ODE solvers for lerobot's flow-matching convention: integrate dx/dt = v(x, t) from t=1 (noise)
to t=0 (action).

``euler`` is the teacher's own sampler (lerobot's ``euler_integrate``, bit for bit); ``midpoint``
and ``rk4`` are fixed-step and ``dopri5`` adaptive (``rtol``/``atol``), all from torchdiffeq. Every
solver only calls ``velocity(x_t, t)``, so they all reuse the engine's shared prefix cache.

``dopri5`` picks one step sequence for the whole state it integrates (torchdiffeq's error norm spans
it), so the engine gives each frame its own adaptive solve (``SolverConfig.adaptive``): X_1 then depends
on the frame and its K noises only, not on which frames were batched together. ``num_steps`` does not
apply to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from reflowpairs.errors import ReflowPairsError

Velocity = Callable[[Tensor, Tensor], Tensor]
"""``velocity(x_t (B, T, D), t (B,) float32) -> v_t (B, T, D)``."""

SOLVERS = ("euler", "midpoint", "rk4", "dopri5")
ADAPTIVE_SOLVERS = ("dopri5",)


@dataclass(frozen=True)
class SolverConfig:
    """Which solver, how many steps (fixed-step solvers), and tolerances (``dopri5``)."""

    name: str = "euler"
    num_steps: int = 10
    rtol: float = 1e-5
    atol: float = 1e-5

    @property
    def adaptive(self) -> bool:
        """True for step-size-controlled solvers, whose steps depend on everything integrated together."""
        return self.name in ADAPTIVE_SOLVERS

    def __post_init__(self):
        if self.name not in SOLVERS:
            raise ReflowPairsError(f"Unknown solver {self.name!r}.", f"Choose one of: {', '.join(SOLVERS)}.")
        if self.num_steps < 1:
            raise ReflowPairsError(f"num_steps must be at least 1, got {self.num_steps}.")
        if not (self.rtol > 0 and self.atol > 0):
            raise ReflowPairsError(f"`rtol` and `atol` must be positive, got {self.rtol} and {self.atol}.")


def integrate(velocity: Velocity, noise: Tensor, solver: SolverConfig) -> Tensor:
    """Integrate from ``noise`` (the x at t=1, shape (B, T, D)) to t=0 and return x_0, the action."""
    if solver.name == "euler":
        # lazy: lerobot's policy utilities are heavy (transformers); loaded by then with the teacher
        from lerobot.policies.common.flow_matching import euler_integrate

        return euler_integrate(velocity, noise, solver.num_steps)
    from torchdiffeq import odeint  # lazy: only the adaptive/RK solvers need it

    batch = noise.shape[0]

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        return velocity(x, t.to(torch.float32).expand(batch))

    if solver.name == "dopri5":
        # step_t: land a step exactly on t=0 instead of stepping past it and interpolating back, so the policy is
        # never asked for a velocity at t < 0, outside the times it was trained on
        times = torch.tensor([1.0, 0.0], dtype=torch.float32, device=noise.device)
        end = torch.zeros(1, dtype=torch.float32, device=noise.device)
        path = odeint(
            rhs, noise, times, method="dopri5", rtol=solver.rtol, atol=solver.atol, options={"step_t": end}
        )
    else:
        # the grid itself, not a step size: a float32 step size lets rounding add a tiny extra step for some counts
        times = torch.linspace(1.0, 0.0, solver.num_steps + 1, dtype=torch.float32, device=noise.device)
        path = odeint(rhs, noise, times, method=solver.name)
    return path[-1]
