"""Checkpoint-load hooks: how a checkpoint that lerobot cannot build unaided still loads through
``reflowpairs.teacher.load_policy``, in any process (the CLI's included), without the loader importing test code.

A *hook* is a callable ``hook(checkpoint_dir: Path) -> LoadPatch | None``, asked for every local checkpoint before
lerobot's ``from_pretrained`` builds it: None leaves the checkpoint alone; a ``LoadPatch`` names a context to hold
around ``from_pretrained`` (e.g. a patch of lerobot's model sizes) and the files to carry into every student
checkpoint made from this one (so the student loads the same way).

Hooks come from two places:

- the ``reflowpairs.checkpoint_load_hooks`` entry-point group (``[project.entry-points]`` of a distribution's
  pyproject.toml; ``name = "module:callable"``), loaded once per process: reflowpairs registers its tiny pi0/pi05
  test checkpoints' size patch there (``reflowpairs.tiny.pi_patch:load_hook``), so they load wherever reflowpairs is
  installed;
- ``register_load_hook(name, hook)`` in this process (a test, a script).

A hook must be cheap for a checkpoint it does not concern (look for a marker file, return None) and must not import
heavy packages at module level: every ``load_policy`` call asks each hook.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ENTRY_POINT_GROUP = "reflowpairs.checkpoint_load_hooks"
"""The entry-point group hooks are registered under (pyproject ``[project.entry-points."reflowpairs.checkpoint_load_hooks"]``)."""


@dataclass
class LoadPatch:
    """What a hook asks for one checkpoint: ``context`` is held around lerobot's ``from_pretrained`` of it (entered
    once); ``carried_files`` (file name -> text) are written into every student checkpoint made from it."""

    context: AbstractContextManager[Any] = field(default_factory=nullcontext)
    carried_files: dict[str, str] = field(default_factory=dict)


LoadHook = Callable[[Path], "LoadPatch | None"]

_registered: dict[str, LoadHook] = {}
_from_entry_points: dict[str, LoadHook] | None = None  # loaded on first use


def register_load_hook(name: str, hook: LoadHook) -> None:
    """Ask ``hook`` about every checkpoint loaded in this process from now on (``name`` replaces a hook of that
    name registered here before)."""
    _registered[name] = hook


def unregister_load_hook(name: str) -> None:
    """Stop asking the hook registered here as ``name`` (no-op when there is none)."""
    _registered.pop(name, None)


def _entry_point_hooks() -> dict[str, LoadHook]:
    """The hooks installed distributions declare in ``ENTRY_POINT_GROUP``, loaded once. One that cannot be imported
    is skipped with a warning naming it (its checkpoints then load as lerobot builds them)."""
    global _from_entry_points
    if _from_entry_points is None:
        hooks = {}
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                hooks[entry.name] = entry.load()
            except Exception as err:  # noqa: BLE001 - a broken plugin must not stop every checkpoint from loading
                warnings.warn(
                    f"reflowpairs checkpoint-load hook {entry.name} ({entry.value}) cannot be loaded: {err}",
                    stacklevel=2,
                )
        _from_entry_points = hooks
    return _from_entry_points


def load_hooks() -> dict[str, LoadHook]:
    """Every hook, by name: the entry points' then those registered in this process (which win on a name clash)."""
    return {**_entry_point_hooks(), **_registered}


def checkpoint_load_patch(checkpoint_dir: str | Path) -> LoadPatch:
    """The combined ``LoadPatch`` every hook asks for local checkpoint ``checkpoint_dir``: one context entering each
    hook's context in turn, and all their carried files. No hook concerned: a no-op context and no files."""
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    patches = [patch for hook in load_hooks().values() if (patch := hook(checkpoint_dir)) is not None]
    if not patches:
        return LoadPatch()
    carried = {name: text for patch in patches for name, text in patch.carried_files.items()}
    return LoadPatch(_all_of([patch.context for patch in patches]), carried)


@contextmanager
def _all_of(contexts: list[AbstractContextManager[Any]]) -> Iterator[None]:
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
