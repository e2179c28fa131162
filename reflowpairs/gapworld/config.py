# RENOVATION SHIM: removed at merge
from reflowpairs.tiny.gapworld.config import GYM_ID, GapWorldEnvConfig, register_gym_env  # noqa: F401
