# RENOVATION SHIM: removed at merge

from reflowpairs.store.merge import absorb_parts, merge_stores  # noqa: F401
