"""Flow-matching times t for the reflow loss, in lerobot's convention: t=1 is noise, t=0 the action.

Every sampler returns float32 ``t`` of shape ``(B,)`` in ``[offset, offset + scale]`` =
``[0.001, 1.0]`` (lerobot's ``scale=0.999, offset=0.001``), so t is never exactly 0, where
``x_t`` would be the action itself and the velocity target carries no information about the noise.

- ``beta``: lerobot's own training distribution, ``sample_time_beta(B, alpha=1.5, beta=1.0,
  scale=0.999, offset=0.001)`` from ``lerobot/policies/common/flow_matching.py`` (density rising
  towards t=1, the noise end);
- ``uniform``: ``s ~ U[0, 1)`` (rectified flow's original choice);
- ``u-shaped``: density proportional to ``cosh(a (s - 1/2))`` with ``a = 4`` (rectified flow++,
  Lee et al. 2024): more weight near both ends, where a 1-step student is judged (t=1) and where
  the target is sharpest (t=0); sampled exactly by its inverse CDF;
- ``logit-normal``: ``s = sigmoid(m + s_d z)``, ``z ~ N(0, 1)``, ``m = 0``, ``s_d = 1`` (Stable
  Diffusion 3): more weight in the middle;
- ``noise-end``: ``t = 1`` exactly, where ``x_t`` is the noise ``x_0`` itself and the target velocity
  ``x_0 - x_1`` makes one Euler step (``x_0 - v``) land on ``x_1``: the loss fits the 1-step map
  ``x_0 -> x_1`` directly (one-step distillation from the stored pairs, InstaFlow's last stage). It trains
  nothing at other t, so multi-step sampling of the student can get worse (docs/train.md).

Each non-beta ``s`` is mapped through the same ``s * scale + offset``.

Times are drawn from a ``torch.Generator`` the caller seeds (``step_generator``: one per training
step, from ``(seed, step)``), never from the global RNG, so a resumed run draws exactly the times an
uninterrupted one would. ``beta`` calls lerobot's sampler, which draws from the global RNG, inside
``torch.random.fork_rng`` seeded from that generator, so the global RNG is left untouched.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from reflowpairs.train.config import check_time_sampling

SCALE = 0.999
OFFSET = 0.001
U_SHAPED_A = 4.0
LOGIT_NORMAL_MEAN = 0.0
LOGIT_NORMAL_STD = 1.0


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step)`` through numpy's ``SeedSequence`` (well mixed)."""
    state = np.random.SeedSequence([int(seed), int(step), 0x7153]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def _unit_uniform(bsize: int, generator: torch.Generator) -> Tensor:
    return torch.rand(bsize, generator=generator, dtype=torch.float32)


def _u_shaped(bsize: int, generator: torch.Generator, a: float = U_SHAPED_A) -> Tensor:
    """Inverse CDF of the density ``cosh(a (s - 1/2)) / Z`` on [0, 1]:
    ``F(s) = (sinh(a (s - 1/2)) + sinh(a/2)) / (2 sinh(a/2))``."""
    u = _unit_uniform(bsize, generator).double()
    s = 0.5 + torch.asinh((2.0 * u - 1.0) * math.sinh(a / 2.0)) / a
    return s.float().clamp(0.0, 1.0)


def _logit_normal(bsize: int, generator: torch.Generator) -> Tensor:
    z = torch.randn(bsize, generator=generator, dtype=torch.float32)
    return torch.sigmoid(LOGIT_NORMAL_MEAN + LOGIT_NORMAL_STD * z)


def _beta(bsize: int, generator: torch.Generator) -> Tensor:
    from lerobot.policies.common.flow_matching import sample_time_beta  # heavy: imported when used

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return sample_time_beta(bsize, "cpu", alpha=1.5, beta=1.0, scale=SCALE, offset=OFFSET)


def sample_time(
    name: str, bsize: int, generator: torch.Generator, device: str | torch.device = "cpu"
) -> Tensor:
    """``(bsize,)`` float32 flow-matching times in ``[0.001, 1.0]`` from distribution ``name``, on ``device``."""
    check_time_sampling(name)
    if name == "beta":
        t = _beta(bsize, generator)
    elif name == "noise-end":
        t = torch.ones(bsize, dtype=torch.float32)  # the generator is not drawn from: nothing is random
    else:
        s = {"uniform": _unit_uniform, "u-shaped": _u_shaped, "logit-normal": _logit_normal}[name](
            bsize, generator
        )
        t = s * SCALE + OFFSET
    return t.to(device=device, dtype=torch.float32)
