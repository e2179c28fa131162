"""Prove a pair store is sound before training on it: every check of ``reflowpairs validate``.

``validate(cfg)`` runs the checks below and returns a ``ValidationReport``: one ``CheckResult``
(name, result, detail) per check, and an overall status:

- ``sound``: every check passed (warnings allowed: leftovers of an interrupted run are reported
  but never counted);
- ``incomplete``: nothing is wrong with what is there, but generation has not finished (the
  manifest says ``complete: false`` or selected frames are missing); ``generate --resume`` finishes it;
- ``corrupt``: at least one check failed.

Every problem names the shard (its path in the store) and what is wrong with it. Each check catches
its own exceptions and reports them as failures, so a damaged store never produces a traceback.
Shards are read one at a time (memory: one shard, plus 16 bytes per pair for the frame checks).
A store that does not keep X_0 (``x0.stored: false``) is checked on the arrays it stores; its ``x0 noise``
check proves the recorded generator is known and regenerates X_0 of the manifest's shape and dtype.
``docs/validate.md`` describes each check.

The package, by concept:

- ``checks``: ``validate`` and its table of checks, each a function of one ``ValidationContext``;
- ``config``: ``ValidateConfig`` and the spot check's default tolerance;
- ``report``: ``CheckResult``, ``ValidationReport`` and the check names (``CHECKS``);
- ``manifest``: the manifest's contract, the leftovers under ``shards/`` and the resume command;
- ``shards``: the one read of every shard the per-shard checks share; ``frames``; ``sources`` (dataset and
  teacher fingerprints); ``spot`` (re-sampling pairs with the teacher).
"""
