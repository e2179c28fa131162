"""The statistics of closed-loop evaluation, as pure functions: Wilson intervals, paired counts on shared seeds,
McNemar's exact test and the verdict (the fewest steps at which a student matches the teacher).

Success is a per-episode boolean; a model's success rate over ``n`` episodes is ``k / n``. Every model runs the
same episodes (the same start seeds), so two models can be compared episode by episode (``paired_counts``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

Z_95 = 1.959963984540054
"""The two-sided 95% normal quantile."""


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of a success rate ``successes / n`` (95% for the default ``z``).

    ``n == 0`` gives ``(0.0, 1.0)`` (nothing is known). Unlike the normal ("Wald") interval it stays inside [0, 1]
    and is not empty at 0 or ``n`` successes: 0 of 20 gives (0, 0.161)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes={successes} is outside 0..n={n}")
    p = successes / n
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    low = 0.0 if successes == 0 else max(0.0, center - half)  # exact ends, not float residue
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def episode_successes(episodes: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], bool]:
    """``{(task, seed): success}`` of a cell's episodes (``{task, seed, success, ...}`` each); ``ValueError`` when an
    episode (task, seed) appears twice."""
    out: dict[tuple[str, int], bool] = {}
    for e in episodes:
        key = (str(e["task"]), int(e["seed"]))
        if key in out:
            raise ValueError(f"episode {key} appears twice")
        out[key] = bool(e["success"])
    return out


def paired_counts(
    a: Mapping[Hashable, bool] | Sequence[bool], b: Mapping[Hashable, bool] | Sequence[bool]
) -> dict[str, int]:
    """Episode-by-episode comparison of two models on the same episodes.

    ``a`` and ``b``: ``{episode: success}`` keyed by the episode (``(task, seed)``, ``episode_successes``), paired by
    key; ``ValueError`` when the two do not hold the same episodes. (Plain sequences pair by position: ``a[i]`` and
    ``b[i]`` must be the same episode.) Returns ``{"both", "only_a", "only_b", "neither"}``: episodes both succeed
    in, only ``a`` does, only ``b`` does, neither does."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise TypeError("paired_counts takes two mappings or two sequences")
        if set(a) != set(b):
            only_a = sorted(set(a) - set(b), key=repr)[:5]
            only_b = sorted(set(b) - set(a), key=repr)[:5]
            raise ValueError(
                f"the two models ran different episodes (only the first: {only_a}; only the second: {only_b}); "
                "paired counts need the same ones"
            )
        keys = list(a)
        a, b = [a[k] for k in keys], [b[k] for k in keys]
    if len(a) != len(b):
        raise ValueError(
            f"the two models ran {len(a)} and {len(b)} episodes; paired counts need the same ones"
        )
    counts = {"both": 0, "only_a": 0, "only_b": 0, "neither": 0}
    for x, y in zip(a, b, strict=True):
        key = "both" if x and y else "only_a" if x else "only_b" if y else "neither"
        counts[key] += 1
    return counts


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value for paired successes: under "the two models succeed equally often" the
    discordant episodes split as a fair coin, so p = P(a Binomial(only_a + only_b, 1/2) split at least this uneven).
    1.0 when there is no discordant episode."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


def fewest_matching_steps(rates: dict[int, float], reference_low: float) -> int | None:
    """The verdict for one model: the fewest steps whose success rate ``rates[steps]`` is at least
    ``reference_low`` (the low end of the teacher's Wilson interval at its full step count): within that interval
    or above it (a student better than its teacher passes too). None when no step count reaches it."""
    matching = [steps for steps, rate in rates.items() if rate >= reference_low - 1e-12]
    return min(matching) if matching else None
