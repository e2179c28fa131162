"""The bundled tiny worlds and teachers: test and demo fixtures built offline in seconds, never imported by the
production path (``reflowpairs.teacher.load_policy`` reaches the tiny pi size patch only through its
checkpoint-load hook, ``reflowpairs.load_hooks``).

- ``world``: the tiny reach world (a local SmolVLM, a LeRobotDataset with a bimodal task, a SmolVLA teacher) and the
  PushT-shaped dataset;
- ``pi_patch``: lerobot's pi0/pi05 at test sizes (``tiny_gemma_patch``), the checkpoint marker, the load hook and
  ``python -m reflowpairs.tiny.pi_patch lerobot-eval ...``;
- ``pi``: tiny pi0/pi05 teachers (tokenizer, config, processors);
- ``training``: the one training loop the tiny teachers share;
- ``eo1``: a tiny EO-1 teacher (an offline tiny Qwen2.5-VL directory, trained on the reach world);
- ``gapworld``: the closed-loop world (env, lerobot ``EnvConfig``, scripted expert, recording, teacher).

Modules are imported on demand; this package's ``__init__`` imports nothing (the load hook must stay light).
"""
