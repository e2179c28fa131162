"""Evaluation of students against their teacher: open loop (errors to the teacher's reference, straightness,
latency) and closed loop (success in an environment through lerobot's own rollout), their reports and comparisons.

Modules (``docs/eval.md`` describes what each measures):

- ``config``: the settings of both evaluations (``EvalConfig``, ``ClosedLoopConfig``), checked without torch;
- ``open_loop``: ``evaluate(cfg)``, the open-loop evaluation, in steps; ``checkpoints`` (the two checkpoints'
  configs, files and compatibility), ``student_training`` (what the student trained on, and which episodes are held
  out), ``sampling`` (the engine samples and their errors), ``latency``, ``training_pairs`` (``--pairs``),
  ``metrics`` (pure error and straightness functions) and ``summary`` (headline, labels, the next command);
- ``closed_loop``: ``evaluate_closed_loop(cfg)``; ``closed_loop_cells`` (finished cells on disk),
  ``rollout`` (one cell through lerobot's ``eval_policy``), ``closed_loop_env``, ``closed_loop_metrics``
  (Wilson intervals, paired counts, McNemar) and ``closed_loop_report``;
- ``report``: the open-loop report files and table; ``compare``: several students side by side;
- ``progress``: the ``PhaseProgress`` callback both evaluations report to.

This package imports nothing at load time, so ``reflowpairs.eval.config`` stays free of torch and lerobot.
"""
