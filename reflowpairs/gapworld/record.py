# RENOVATION SHIM: removed at merge
from reflowpairs.tiny.gapworld.record import GapDatasetSpec  # noqa: F401
