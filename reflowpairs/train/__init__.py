"""Stage 2: train a student on stored pairs with the straight-line (reflow) loss, no teacher in memory.

The student starts as the teacher: the checkpoint the store's manifest names (``teacher.source``, or
``--init``), loaded once with ``reflowpairs.teacher.load_policy``; nothing else builds a policy and
nothing integrates an ODE. Each step takes a batch of stored pairs (``reflowpairs.pairdata``) and
computes, in lerobot's convention (t=1 noise, t=0 action, ``x_t = t*X_0 + (1-t)*X_1``, target
``u = X_0 - X_1``), the policy's *own* training loss with the stored pair substituted:

    batch = preprocessor(observation without action keys)      # images, state, language tokens
    batch["action"] = X_1                                        # (B, T, A), already normalised
    loss, _ = policy.forward(batch, noise=X_0, time=t)           # X_0: (B, T, max_action_dim)

``policy.prepare_action`` zero-pads X_1 to ``max_action_dim`` as lerobot pads actions; no
``action_is_pad`` is passed, so every chunk position counts; the loss is the MSE over the action's
own dimensions, exactly as lerobot trains. X_1 never passes the normaliser (it was stored normalised).

Trainable parameters are whatever the checkpoint's config leaves trainable (``train_expert_only``,
``freeze_vision_encoder``, ``train_state_proj``: lerobot sets ``requires_grad`` when it builds the
policy). Optimiser and schedule are the policy's lerobot presets (``get_optimizer_preset``,
``get_scheduler_preset``); see ``plan_optimizer`` for how ``--lr``/``--warmup-steps``/``--grad-clip``
change them and how lerobot's automatic warmup/decay rescaling is made explicit.

Before the first step every input is checked and nothing is written before the checks pass: the
store's manifest is complete and sound; the manifest's teacher and dataset fingerprints match the init
checkpoint and the dataset (unless ``--allow-mismatch``); the store's shapes match the policy. These checks
read the manifest only, so start-up (and ``--resume``) takes the same time for any store size. Each shard is
checked when it is first read, in the DataLoader workers (``reflowpairs.pairdata.read_checked``: row counts,
shapes, dtypes, sha256, origin, every ``obs_index`` a frame of the dataset); a damaged shard stops training with
an error naming it before any of its pairs reaches a step.

Processes: one, or several launched by ``torchrun`` / ``accelerate launch`` (``processes``). Several run through an
``accelerate.Accelerator`` (as in ``lerobot-train``): it wraps the student in DDP, says which process is the main one
(the only one that saves and logs) and reduces the loss across processes; one process needs none of that. Each
process reads only its own shards (``PairSampler`` with ``rank``/``world``). Precision stays this package's
(``train_step``: float32 master copies of low-precision parameters, our own autocast): accelerate's
``mixed_precision`` is left at ``"no"``.

The package, by concept: ``config`` (settings, defaults, checks, results), ``loss``, ``masters`` (float32 master
copies), ``optim`` (optimiser and schedule), ``step`` (one optimiser step), ``inputs`` (the store, init checkpoint,
dataset and student, checked), ``resume``, ``processes`` (one, or several through accelerate), ``planning``
(``TrainPlan``), ``signals`` (Ctrl-C), ``logfile`` (``train_log.jsonl``), ``checkpointing``, ``loop`` (``train``) and
``next_commands``.
"""
