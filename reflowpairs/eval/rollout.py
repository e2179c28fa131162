"""One closed-loop cell: a (model, step count) through lerobot's own ``eval_policy``, unchanged, with two things it
does not report measured around it:

- the episode length: the vector env's ``step``/``reset`` are wrapped on the instance (``EpisodeLengths``) to note
  the step at which each sub-env first ends (terminated or truncated), as ``eval_policy``'s own ``done`` mask does;
- the latency per action chunk: the policy's chunk-making methods (its family's ``chunk_methods``: SmolVLA's
  ``select_action`` calls its private ``_get_action_chunk`` directly) are wrapped on the instance (``ChunkTimer``) to
  time each call that makes a chunk (for the whole batch of envs), synchronising the device first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from reflowpairs.eval.closed_loop_cells import summarise_cell
from reflowpairs.eval.config import ClosedLoopConfig
from reflowpairs.policies import configured_num_steps, family


class EpisodeLengths:
    """Notes each episode's length (the step at which its sub-env first ends) by wrapping ``env.step`` and
    ``env.reset`` on the instance; behaviour unchanged. ``on_batch_done(n)`` is called with the batch size when a
    batch of episodes ends (at the next reset, or at ``finish``)."""

    def __init__(self, env, on_batch_done: Callable[[int], None]):
        self.env = env
        self.on_batch_done = on_batch_done
        self.lengths: list[int] = []
        self._batch: list[int | None] | None = None
        self._steps = 0

    def _close_batch(self) -> None:
        if self._batch is not None:
            self.lengths += [self._steps if n is None else n for n in self._batch]
            self.on_batch_done(len(self._batch))
        self._batch = None

    def reset(self, *args, **kwargs):
        self._close_batch()
        self._batch = [None] * self.env.num_envs
        self._steps = 0
        return self._reset(*args, **kwargs)

    def step(self, actions):
        result = self._step(actions)
        self._steps += 1
        terminated, truncated = result[2], result[3]
        for i, ended in enumerate((terminated | truncated).tolist()):
            if ended and self._batch is not None and self._batch[i] is None:
                self._batch[i] = self._steps
        return result

    @contextmanager
    def installed(self) -> Iterator[EpisodeLengths]:
        self._reset, self._step = self.env.reset, self.env.step
        self.env.reset, self.env.step = self.reset, self.step
        try:
            yield self
            self._close_batch()
        finally:
            del self.env.reset, self.env.step  # the class's methods again


class ChunkTimer:
    """Times each call that makes an action chunk, by wrapping ``methods`` (the policy family's ``chunk_methods``:
    ``predict_action_chunk``, and for SmolVLA also ``_get_action_chunk``, which its ``select_action`` calls directly)
    on the policy instance; a call nested in another is not counted twice; behaviour unchanged. Seconds per call in
    ``times``."""

    def __init__(self, policy, device: str, methods: tuple[str, ...]):
        self.policy = policy
        self.methods = methods
        self.cuda = str(device).startswith("cuda")
        self.times: list[float] = []
        self._depth = 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _wrap(self, method):
        def timed(*args, **kwargs):
            if self._depth:
                return method(*args, **kwargs)
            self._depth += 1
            self._sync()
            start = time.perf_counter()
            try:
                out = method(*args, **kwargs)
                self._sync()
                self.times.append(time.perf_counter() - start)
                return out
            finally:
                self._depth -= 1

        return timed

    @contextmanager
    def installed(self) -> Iterator[ChunkTimer]:
        # only the methods this policy has (``_get_action_chunk`` is SmolVLA's private one: a policy or a lerobot
        # without it is timed through ``predict_action_chunk`` alone, or not at all: latency None, no crash)
        names = [n for n in self.methods if callable(getattr(self.policy, n, None))]
        for name in names:
            setattr(self.policy, name, self._wrap(getattr(self.policy, name)))
        try:
            yield self
        finally:
            for name in names:
                delattr(self.policy, name)


@contextmanager
def quiet_lerobot_bars(quiet: bool = True) -> Iterator[None]:
    """Within the block, lerobot_eval's own tqdm bars (per batch and per rollout step) are off, so that the caller's
    one progress display is the only one; what the rollout does is unchanged. It swaps lerobot_eval's module-global
    ``trange`` (lerobot 0.6.1's), restored after; a no-op when ``quiet`` is False or lerobot_eval has no ``trange``."""
    import lerobot.scripts.lerobot_eval as lerobot_eval  # lerobot lazily: importing it takes seconds

    saved = getattr(lerobot_eval, "trange", None)
    if not quiet or not callable(
        saved
    ):  # a lerobot without the module-level trange: its bars stay, nothing breaks
        yield
        return

    def silent(*args, **kwargs):
        return saved(*args, **{**kwargs, "disable": True})

    lerobot_eval.trange = silent
    try:
        yield
    finally:
        lerobot_eval.trange = saved


def run_cell(
    envs: dict[str, dict[int, Any]],
    env_cfg,
    loaded,
    label: str,
    num_steps: int,
    cfg: ClosedLoopConfig,
    on_episodes: Callable[[int], None],
    quiet: bool = False,
) -> dict[str, Any]:
    """Run one (model, steps) cell: ``eval_policy`` on every task's vector env, ``n_episodes`` each from
    ``cfg.seed``, with the policy's step count set to ``num_steps``; returns ``summarise_cell``'s dict. ``quiet``:
    lerobot's own tqdm bars off (``quiet_lerobot_bars``)."""
    # lerobot lazily: importing it takes seconds
    from lerobot.envs import make_env_pre_post_processors
    from lerobot.scripts.lerobot_eval import eval_policy
    from lerobot.utils.random_utils import set_seed

    policy = loaded.policy
    env_pre, env_post = make_env_pre_post_processors(env_cfg=env_cfg, policy_cfg=policy.config)
    episodes: list[dict[str, Any]] = []
    timer = ChunkTimer(policy, str(policy.config.device), family(policy.config.type).chunk_methods)
    set_seed(cfg.seed)
    with (
        configured_num_steps(policy, num_steps),
        timer.installed(),
        torch.no_grad(),
        quiet_lerobot_bars(quiet),
    ):
        for group, tasks in envs.items():
            for task_id, env in tasks.items():
                remaining = [cfg.n_episodes]

                def done(batch: int, remaining=remaining) -> None:
                    counted = min(batch, remaining[0])
                    remaining[0] -= counted
                    on_episodes(counted)

                with EpisodeLengths(env, done).installed() as lengths:
                    info = eval_policy(
                        env=env,
                        policy=policy,
                        env_preprocessor=env_pre,
                        env_postprocessor=env_post,
                        preprocessor=loaded.preprocessor,
                        postprocessor=loaded.postprocessor,
                        n_episodes=cfg.n_episodes,
                        start_seed=cfg.seed,
                    )
                for episode, length in zip(info["per_episode"], lengths.lengths, strict=False):
                    episodes.append(
                        {
                            "task": f"{group}/{task_id}",
                            "seed": episode["seed"],
                            "success": bool(episode["success"]),
                            "return": float(episode["sum_reward"]),
                            "length": int(length),
                        }
                    )
    return summarise_cell(label, num_steps, episodes, timer.times, min(cfg.batch_size, cfg.n_episodes))
