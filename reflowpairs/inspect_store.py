# RENOVATION SHIM: removed at merge

from reflowpairs.store.inspect import pair, summarize  # noqa: F401
