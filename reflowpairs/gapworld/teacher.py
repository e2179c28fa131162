# RENOVATION SHIM: removed at merge
from reflowpairs.tiny.gapworld.teacher import GAP_REFLOW, GAP_TEACHER, build_gap_world  # noqa: F401
