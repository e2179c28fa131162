"""X_0, the initial noise of each pair, as a pure function of (seed, obs_index, sample).

Every pair's noise comes from its own ``torch.Generator`` seeded from ``(seed, obs_index, sample)``
through numpy's ``SeedSequence`` (a well-mixed hash), so X_0 does not depend on batch size, worker
count, device, process rank or the order frames are visited in. That is what lets stage 1 batch,
resume and split across machines by frame and still produce the same pairs, and what lets a store
leave X_0 out (``generate --x0 implicit``): every reader regenerates it with ``pair_noise``.

The generator is versioned: ``GENERATOR`` (``"reflowpairs.noise/v1"``) names exactly the recipe below,
and a store whose X_0 is not stored records that name (``docs/pair-store.md``, "X_0"). A change to
the recipe must get a new name, never reuse this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from reflowpairs.errors import ReflowPairsError

if TYPE_CHECKING:
    import torch

# torch is heavy; inspect and the CLI's start-up need none of it: each function below that draws noise imports it.

GENERATOR = "reflowpairs.noise/v1"
"""The recipe of ``initial_noise``: ``SeedSequence([seed, obs_index, sample]).generate_state(2, uint32)`` ->
63-bit seed ``(s0 << 31) ^ s1`` -> ``torch.Generator().manual_seed(seed)`` -> ``torch.randn(shape, float32)`` on CPU."""
GENERATORS = (GENERATOR,)
"""Every generator this build can regenerate X_0 with."""


def pair_seed(seed: int, obs_index: int, sample: int) -> int:
    """A 63-bit generator seed mixed from ``(seed, obs_index, sample)`` (all non-negative ints)."""
    state = np.random.SeedSequence([int(seed), int(obs_index), int(sample)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def initial_noise(seed: int, obs_index: int, sample: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard-normal float32 noise of ``shape`` (for SmolVLA ``(chunk_size, max_action_dim)``) on CPU."""
    import torch  # lazy: torch is heavy, and this module also serves work that does not need it

    generator = torch.Generator().manual_seed(pair_seed(seed, obs_index, sample))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def batch_noise(
    seed: int, obs_indices: Sequence[int], num_samples: int, shape: Sequence[int]
) -> torch.Tensor:
    """Noise for every sample of every frame: ``(len(obs_indices), num_samples, *shape)`` float32 on CPU."""
    import torch  # lazy: torch is heavy, and this module also serves work that does not need it

    return torch.stack(
        [
            torch.stack([initial_noise(seed, int(i), k, shape) for k in range(num_samples)])
            for i in obs_indices
        ]
    )


def check_generator(generator: str, store: str = "the store") -> None:
    """Raise ``ReflowPairsError`` (naming ``store``) unless this build knows ``generator``, a store's recorded
    ``x0.generator``."""
    if generator not in GENERATORS:
        raise ReflowPairsError(
            f"X_0 of {store} is not stored and must be regenerated with generator {generator!r}, which this build of "
            f"reflowpairs does not know (it knows {', '.join(GENERATORS)}).",
            "Read the store with the reflowpairs version that wrote it (its manifest's software.reflowpairs).",
        )


def pair_noise(
    seed: int, obs_index: np.ndarray, sample: np.ndarray, shape: Sequence[int], generator: str = GENERATOR
) -> np.ndarray:
    """X_0 of pairs ``(obs_index[r], sample[r])``: float32 ``(n, *shape)``, row ``r`` equal bit for bit to
    ``initial_noise(seed, obs_index[r], sample[r], shape)``. ``obs_index`` and ``sample`` are ``(n,)`` ints.

    One CPU generator is reseeded per pair and each row drawn in place (about 30 us a pair at ``(50, 32)`` on one
    core). ``generator`` is the recipe's name (``GENERATOR``); an unknown one raises ``ReflowPairsError``."""
    import torch  # lazy: torch is heavy, and this module also serves work that does not need it

    check_generator(generator)
    obs_index, sample = np.asarray(obs_index).reshape(-1), np.asarray(sample).reshape(-1)
    if len(obs_index) != len(sample):
        raise ValueError(f"obs_index ({len(obs_index)}) and sample ({len(sample)}) must have the same length")
    shape = tuple(int(v) for v in shape)
    out = torch.empty((len(obs_index), *shape), dtype=torch.float32)
    rng = torch.Generator()
    for row, (obs, k) in enumerate(zip(obs_index.tolist(), sample.tolist(), strict=True)):
        rng.manual_seed(pair_seed(seed, obs, k))
        torch.randn(shape, generator=rng, dtype=torch.float32, out=out[row])
    return out.numpy()
