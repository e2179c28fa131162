# RENOVATION SHIM: removed at merge

from reflowpairs.atomic import write_json_atomically  # noqa: F401
from reflowpairs.cached_features import (  # noqa: F401
    AppliedFeatureCache,
    FeatureSink,
    add_features,
    assemble_captured,
    cache_family,
    cache_for_training,
    recompute_features,
    refuse_uncacheable,
    source_cache,
    student_cache_problems,
    validate_features,
)
from reflowpairs.cached_features import AppliedFeatureCache as TrainingCache  # noqa: F401
from reflowpairs.cached_features import cache_for_training as plan_training  # noqa: F401
from reflowpairs.store_features import (  # noqa: F401
    FEATURE_KEY,
    FEATURES_DIR,
    FeatureReader,
    bytes_per_frame,
    cached_frames,
    cached_obs_index,
    check,
    check_feature_dtype,
    coverage_problem,
    describe,
    features_dir,
    from_storage,
    merge_caches,
    missing_frames_error,
    read_checked_shard,
    read_index,
    to_storage,
)
