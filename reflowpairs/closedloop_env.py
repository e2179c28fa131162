# RENOVATION SHIM: removed at merge
"""Moved to ``reflowpairs.eval.closed_loop_env``."""

from reflowpairs.eval.closed_loop_env import check_env_package, check_features, make_env_config  # noqa: F401
