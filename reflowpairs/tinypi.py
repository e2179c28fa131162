# RENOVATION SHIM: removed at merge
from reflowpairs.tiny.pi import TinyPiSpec, build_tiny_pi_teacher  # noqa: F401
from reflowpairs.tiny.pi_patch import (  # noqa: F401
    PALIGEMMA_VOCAB,
    TINY_MARKER,
    TinyGemmaSpec,
    active_spec,
    install_for_checkpoint,
    read_marker,
    run_lerobot,
    tiny_gemma_patch,
    uninstall,
)

if __name__ == "__main__":  # `python -m reflowpairs.tinypi lerobot-eval ...` (tests/test_pusht_eval.py)
    import sys

    from reflowpairs.tiny import pi_patch

    sys.exit(pi_patch.run_lerobot(sys.argv[1] if len(sys.argv) > 1 else "", sys.argv[2:]))
