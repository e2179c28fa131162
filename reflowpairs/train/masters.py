"""Float32 master copies of the trainable low-precision parameters, and which parameters are trainable."""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (
    torch.bfloat16,
    torch.float16,
)  # trainable parameters of these dtypes get float32 master copies


def trainable_parameters(policy) -> list[torch.nn.Parameter]:
    """Parameters the checkpoint's config leaves trainable (``requires_grad``, as lerobot set it)."""
    groups = (
        policy.get_optim_params()
    )  # parameters, or param-group dicts (multi_task_dit: vision lr multiplier)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return [p for p in params if p.requires_grad]


def trainable_named_parameters(policy) -> list[tuple[str, torch.nn.Parameter]]:
    """``trainable_parameters`` with their ``named_parameters`` names (the names of ``model.safetensors``)."""
    names = {id(p): name for name, p in policy.named_parameters()}
    return [(names[id(p)], p) for p in trainable_parameters(policy)]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class MasterWeights:
    """Float32 master copies of the trainable bfloat16/float16 parameters (classic mixed-precision training).

    A bfloat16 parameter holds 8 significant bits: an AdamW update smaller than half its spacing (about
    ``|w| * 2**-9``) rounds away, and at fine-tuning learning rates most updates do. So the optimiser steps
    float32 *masters* instead: ``params`` (what the optimiser is built on) holds, for each trainable parameter,
    the parameter itself when it is float32 and its float32 master when it is bfloat16/float16. The model keeps
    computing, and is saved, in its own dtypes: after each optimiser step every low-precision parameter is set
    to its master rounded to nearest (``Tensor.copy_``). Parameters without a master copy cost nothing extra.

    ``step`` is one update in lerobot's order (``lerobot_train.update_policy``: backward, clip, ``step``,
    ``zero_grad``), so no gradient lives through the next forward."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]):
        self.names = [name for name, _ in named]
        self.model_params = [p for _, p in named]
        self.params: list[torch.nn.Parameter] = [
            torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) if p.dtype in LOW_PRECISION else p
            for p in self.model_params
        ]

    def _copies(self):
        """``(name, model parameter, float32 master)`` of each parameter that has a master copy."""
        return [
            (n, p, m)
            for n, p, m in zip(self.names, self.model_params, self.params, strict=True)
            if m is not p
        ]

    def dtype_counts(self) -> dict[str, int]:
        """Trainable elements per model dtype, e.g. ``{"bfloat16": 1200, "float32": 300}``."""
        counts: dict[str, int] = {}
        for p in self.model_params:
            counts[dtype_name(p.dtype)] = counts.get(dtype_name(p.dtype), 0) + p.numel()
        return counts

    @property
    def has_copies(self) -> bool:
        return bool(self._copies())

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float) -> Tensor:
        """After ``loss.backward()``: move the model's gradients onto the masters (as float32; the low-precision
        gradients are freed), clip on the masters, step the optimiser, round the masters into the model and clear
        every gradient. Returns the total gradient norm before clipping (``clip_grad_norm_``)."""
        for _, param, master in self._copies():
            master.grad = None if param.grad is None else param.grad.to(torch.float32)
            param.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        optimizer.step()
        self._round_into_model()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _round_into_model(self) -> None:
        with torch.no_grad():
            for _, param, master in self._copies():
                param.copy_(master)

    def state_dict(self) -> dict[str, Tensor]:
        """The float32 masters by parameter name (empty when no parameter has a master copy)."""
        return {name: master.detach() for name, _, master in self._copies()}

    def load_state_dict(self, masters: dict[str, Tensor]) -> None:
        """Restore the masters (``state_dict``'s names and shapes) and round them into the model."""
        expected = {name: tuple(m.shape) for name, _, m in self._copies()}
        given = {name: tuple(t.shape) for name, t in masters.items()}
        if given != expected:
            missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
            reshaped = sorted(n for n in set(expected) & set(given) if expected[n] != given[n])
            raise ValueError(
                f"master copies differ from the trainable parameters: missing {missing[:3]}, "
                f"unexpected {extra[:3]}, other shapes {reshaped[:3]}"
            )
        with torch.no_grad():
            for name, _, master in self._copies():
                master.copy_(masters[name])
        self._round_into_model()
