# RENOVATION SHIM: removed at merge
from reflowpairs.tiny.world import (  # noqa: F401
    PUSHT_REPO_ID,
    TINY_REPO_ID,
    TinyDatasetSpec,
    TinyTeacherSpec,
    TinyWorld,
    VLMSpec,
    build_pusht_dataset,
    build_tiny_dataset,
    build_tiny_teacher,
    build_tiny_vlm,
    build_tiny_world,
    save_untrained_policy,
    tiny_smolvla_config,
)
