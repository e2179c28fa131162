"""X_0, the initial noise of each pair, as a pure function of (seed, obs_index, sample).

Every pair's noise comes from its own ``torch.Generator`` seeded from ``(seed, obs_index, sample)``
through numpy's ``SeedSequence`` (a well-mixed hash), so X_0 does not depend on batch size, worker
count, device, process rank or the order frames are visited in. That is what lets stage 1 batch,
resume and split across machines by frame and still produce the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pair_seed(seed: int, obs_index: int, sample: int) -> int:
    """A 63-bit generator seed mixed from ``(seed, obs_index, sample)`` (all non-negative ints)."""
    state = np.random.SeedSequence([int(seed), int(obs_index), int(sample)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def initial_noise(seed: int, obs_index: int, sample: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal float32 noise of ``shape`` (for SmolVLA ``(chunk_size, max_action_dim)``) on CPU."""
    generator = torch.Generator().manual_seed(pair_seed(seed, obs_index, sample))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def batch_noise(seed: int, obs_indices: Sequence[int], num_samples: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise for every sample of every frame: ``(len(obs_indices), num_samples, *shape)`` float32 on CPU."""
    return torch.stack(
        [
            torch.stack([initial_noise(seed, int(i), k, shape) for k in range(num_samples)])
            for i in obs_indices
        ]
    )
