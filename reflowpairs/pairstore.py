# RENOVATION SHIM: removed at merge

from reflowpairs.atomic import TMP_PREFIX  # noqa: F401
from reflowpairs.store.contract import manifest_format  # noqa: F401
from reflowpairs.store.jobs import JobDifference  # noqa: F401
from reflowpairs.store.layout import (  # noqa: F401
    ARRAYS,
    DTYPES,
    FORMAT,
    GENERATE_OPTIONS,
    MANIFEST,
    PARTS_DIR,
    SHARD_SUFFIX,
    SHARDS_DIR,
    STORE_ENTRIES,
    X0_MODES,
    remove_path,
    unlisted_entries,
)
from reflowpairs.store.manifest import StoreManifest  # noqa: F401
from reflowpairs.store.pairs import Pairs, array_sha256  # noqa: F401
from reflowpairs.store.reader import PairStore  # noqa: F401
from reflowpairs.store.shards import read_shard, write_shard  # noqa: F401
from reflowpairs.store.soundness import LAYOUT  # noqa: F401
from reflowpairs.store.writer import PairStoreWriter  # noqa: F401
