"""Stage 1: run the teacher's sampler over every frame of a dataset and store (X_0, X_1, obs_index) pairs.

The teacher is loaded once. Frames are loaded in DataLoader workers, the engine samples K pairs
per frame with one shared prefix per frame, and a background thread writes atomic shards while
the device works on the next batch. X_0 is a pure function of (seed, obs_index, sample), so runs
that batch differently, resume, or split the frames give the same pairs.

The package, by concept:

- ``run``: ``generate`` (the store lock, one process or one part per rank);
- ``config``: ``GenerateConfig``, ``GeneratePlan``, ``GenerateResult`` and ``COMPUTE_DTYPES``;
- ``checks``: the settings and ``--out`` checks made before anything loads;
- ``job``: what a run loads once (teacher, dataset, engine, the manifest it would start), the frames left, the plan;
- ``out``: opening ``--out`` under the lock (new, resumed or overwritten);
- ``sampling``: the loop over frames and the batch sampler; ``writer``: the background shard writer.
"""
