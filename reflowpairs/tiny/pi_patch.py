"""The tiny pi0/pi05 size patch: lerobot's pi0/pi05 at test sizes, and the checkpoint-load hook that applies it.

lerobot 0.6's pi0/pi05 build their PaliGemma + action expert from sizes fixed in code: the Gemma widths come
from ``get_gemma_config`` (``gemma_300m`` or ``gemma_2b`` only) and the SigLIP tower is hard-coded (hidden 1152,
27 layers, ``projection_dim`` 2048), so the smallest model lerobot will build is ~3.3 B parameters.
``tiny_gemma_patch()`` swaps both for small ones *in lerobot's modules*, explicitly and reversibly:

- ``modeling_pi0.get_gemma_config`` / ``modeling_pi05.get_gemma_config`` return ``TinyGemmaSpec``'s widths
  (``gemma_2b`` -> the VLM, ``gemma_300m`` -> the action expert; 8 heads are required: lerobot's joint
  attention reshapes to ``8 * head_dim`` in ``compute_layer_complete``);
- ``PaliGemmaForConditionalGenerationWithPiGemma`` (as those modules see it) is a subclass that shrinks the
  SigLIP ``vision_config`` (hidden, layers, heads, patch) and sets its ``projection_dim`` to the VLM text width,
  which the image/language concatenation needs.

The vocabulary stays PaliGemma's 257,152 tokens (so any PaliGemma token id fits) unless
``TinyGemmaSpec.vocab_size`` says otherwise. The patch must be active in *every* process that builds or loads such a
checkpoint: without it lerobot's ``from_pretrained`` builds the 3 B model, fails to load the tiny weights into it and
silently returns random weights (the pi families' ``check_loaded`` catches that). A tiny checkpoint carries
``TINY_MARKER`` (the spec, as JSON); ``load_hook`` is registered as a checkpoint-load hook (``reflowpairs.load_hooks``,
entry point ``tiny_pi`` in reflowpairs' pyproject.toml), so ``reflowpairs.teacher.load_policy`` applies the patch
for such a checkpoint's ``from_pretrained`` in any process, without importing this package itself.

lerobot's own commands load checkpoints with no reflowpairs code involved, so the patch has to be installed in their
process first: ``python -m reflowpairs.tiny.pi_patch lerobot-eval --policy.path=DIR ...`` (or ``lerobot-train``)
installs the patch ``DIR``'s marker names and runs lerobot's command in the same process (``run_lerobot``); an
ordinary checkpoint runs unpatched. This is the test fixture for lerobot's CLI (``tests/test_pusht_eval.py``).

This module stays light (no lerobot import until a patch is installed): every ``load_policy`` asks its hook.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reflowpairs.load_hooks import LoadPatch

TINY_MARKER = "reflowpairs_tinypi.json"
"""File in a tiny pi checkpoint that holds its ``TinyGemmaSpec`` (JSON): the patch to install before loading it."""

PALIGEMMA_VOCAB = 257_152


@dataclass(frozen=True)
class TinyGemmaSpec:
    """Sizes of a tiny pi0/pi05. ``vlm_width``/``expert_width`` are the two Gemmas' hidden sizes (they share
    ``num_heads``, ``num_kv_heads`` and ``head_dim``, as the joint attention needs; ``num_heads`` must be 8)."""

    vlm_width: int = 64
    expert_width: int = 32
    depth: int = 2
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 8
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    patch_size: int = 8
    vocab_size: int = PALIGEMMA_VOCAB

    def gemma(self, variant: str):
        """lerobot's ``GemmaConfig`` for ``variant``: ``gemma_2b`` is the VLM, ``gemma_300m`` the action expert."""
        from lerobot.policies.pi0.modeling_pi0 import (
            GemmaConfig,  # lazy: heavy, and only a patched build needs it
        )

        if variant not in ("gemma_2b", "gemma_300m"):
            raise ValueError(f"Unknown variant: {variant}")
        width = self.vlm_width if variant == "gemma_2b" else self.expert_width
        return GemmaConfig(
            width=width,
            depth=self.depth,
            mlp_dim=2 * width,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )


def _patched_modules():
    # lazy: lerobot's pi models import transformers; only installing the patch needs them
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    return modeling_pi0, modeling_pi05


_saved: dict | None = None  # lerobot's own functions/classes while the patch is installed
_active: TinyGemmaSpec | None = None


def install(spec: TinyGemmaSpec = TinyGemmaSpec()) -> None:
    """Make lerobot's pi0/pi05 build tiny models of ``spec`` from now on in this process (``uninstall`` undoes it).
    Installing again replaces the spec."""
    global _saved, _active
    from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma  # lazy: heavy

    if spec.num_heads != 8:
        raise ValueError("lerobot's pi0/pi05 joint attention assumes 8 heads (compute_layer_complete)")

    class TinyPaliGemma(PaliGemmaForConditionalGenerationWithPiGemma):
        def __init__(self, config):
            vision = config.vision_config
            vision.hidden_size = spec.vision_hidden
            vision.intermediate_size = 2 * spec.vision_hidden
            vision.num_hidden_layers = spec.vision_layers
            vision.num_attention_heads = spec.vision_heads
            vision.patch_size = spec.patch_size
            vision.projection_dim = config.text_config.hidden_size
            if spec.vocab_size != PALIGEMMA_VOCAB:
                config.text_config.vocab_size = spec.vocab_size
            super().__init__(config)

    modules = _patched_modules()
    if _saved is None:
        _saved = {m: (m.get_gemma_config, m.PaliGemmaForConditionalGenerationWithPiGemma) for m in modules}
    for module in modules:
        module.get_gemma_config = spec.gemma
        module.PaliGemmaForConditionalGenerationWithPiGemma = TinyPaliGemma
    _active = spec


def uninstall() -> None:
    """Restore lerobot's own ``get_gemma_config`` and PaliGemma class (no-op when not installed)."""
    global _saved, _active
    if _saved is not None:
        for module, (gemma, paligemma) in _saved.items():
            module.get_gemma_config = gemma
            module.PaliGemmaForConditionalGenerationWithPiGemma = paligemma
    _saved = _active = None


def active_spec() -> TinyGemmaSpec | None:
    """The installed tiny spec, or None while lerobot builds its own sizes."""
    return _active


@contextmanager
def tiny_gemma_patch(spec: TinyGemmaSpec = TinyGemmaSpec()) -> Iterator[TinyGemmaSpec]:
    """Within the block, lerobot's pi0/pi05 build (and ``from_pretrained`` loads) tiny models of ``spec``; the
    previous state (lerobot's own sizes, or an earlier ``install``) is restored after."""
    previous = _active
    install(spec)
    try:
        yield spec
    finally:
        if previous is None:
            uninstall()
        else:
            install(previous)


def read_marker(checkpoint_dir: str | Path) -> TinyGemmaSpec | None:
    """The ``TinyGemmaSpec`` a tiny checkpoint was built with, or None for an ordinary checkpoint."""
    path = Path(checkpoint_dir) / TINY_MARKER
    if not path.is_file():
        return None
    return TinyGemmaSpec(**json.loads(path.read_text()))


def install_for_checkpoint(checkpoint_dir: str | Path) -> bool:
    """Install the tiny patch a checkpoint asks for (its ``TINY_MARKER``); True when it did. Call before loading a
    pi0/pi05 checkpoint in a fresh process (a CLI subprocess)."""
    spec = read_marker(checkpoint_dir)
    if spec is None:
        return False
    install(spec)
    return True


def load_hook(checkpoint_dir: Path) -> LoadPatch | None:
    """The checkpoint-load hook (``reflowpairs.load_hooks``) of tiny pi checkpoints: for a checkpoint with a
    ``TINY_MARKER``, ``tiny_gemma_patch`` of its spec around its ``from_pretrained`` and the marker carried into
    students made from it; None for any other checkpoint."""
    spec = read_marker(checkpoint_dir)
    if spec is None:
        return None
    marker = (Path(checkpoint_dir) / TINY_MARKER).read_text()
    return LoadPatch(tiny_gemma_patch(spec), {TINY_MARKER: marker})


# --- lerobot's own commands on a tiny checkpoint ------------------------------------------------------

LEROBOT_COMMANDS = {
    "lerobot-eval": "lerobot.scripts.lerobot_eval",
    "lerobot-train": "lerobot.scripts.lerobot_train",
}
"""The lerobot console commands ``run_lerobot`` runs, by the module whose ``main()`` each calls."""


def policy_path_argument(args: list[str]) -> str | None:
    """The value of ``--policy.path=DIR`` (or ``--policy.path DIR``) in lerobot command-line ``args``, or None."""
    for i, arg in enumerate(args):
        if arg.startswith("--policy.path="):
            return arg.split("=", 1)[1]
        if arg == "--policy.path" and i + 1 < len(args):
            return args[i + 1]
    return None


def run_lerobot(command: str, args: list[str]) -> int:
    """Run lerobot's ``command`` (``lerobot-eval`` or ``lerobot-train``) with ``args`` in this process, after
    installing the tiny patch that the ``--policy.path`` checkpoint's marker names (nothing for an ordinary
    checkpoint). Returns the command's exit status."""
    if command not in LEROBOT_COMMANDS:
        raise SystemExit(
            f"usage: python -m reflowpairs.tiny.pi_patch {{{','.join(LEROBOT_COMMANDS)}}} ARGS..."
        )
    path = policy_path_argument(args)
    if path is not None:
        install_for_checkpoint(path)
    module = importlib.import_module(LEROBOT_COMMANDS[command])
    sys.argv = [command, *args]
    result = module.main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    # run through the package's module (not this __main__ copy), so the patch state is the one everything shares
    from reflowpairs.tiny import pi_patch as _shared

    sys.exit(_shared.run_lerobot(sys.argv[1] if len(sys.argv) > 1 else "", sys.argv[2:]))
