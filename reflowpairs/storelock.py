# RENOVATION SHIM: removed at merge

from reflowpairs.store.lock import StoreLock  # noqa: F401
