"""The closed-loop statistics (reflowpairs.eval.closed_loop_metrics) against known values, and the CLI's translation of
lerobot-eval's --env.* / --eval.* options. Fast: no env, no model."""

from __future__ import annotations

import pytest
import typer.main

from reflowpairs.cli.app import app
from reflowpairs.cli.lerobot_names import translate_args
from reflowpairs.cli.options import parse_env_options
from reflowpairs.errors import ReflowPairsError
from reflowpairs.eval.closed_loop_metrics import (
    fewest_matching_steps,
    mcnemar_p,
    paired_counts,
    wilson_interval,
)
from reflowpairs.eval.config import ClosedLoopConfig
from reflowpairs.policies import family


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (5, 10, 0.2366, 0.7634),  # Wilson (1927); e.g. statsmodels proportion_confint(5, 10, method="wilson")
        (0, 20, 0.0, 0.1611),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (81, 100, 0.7222, 0.8749),
    ],
)
def test_wilson_interval_matches_known_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 7)[0] == 0.0 and wilson_interval(7, 7)[1] == 1.0
    narrow, wide = wilson_interval(80, 100), wilson_interval(8, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]  # more episodes, tighter interval
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_paired_counts_and_mcnemar():
    a = [True, True, False, False, True, False]
    b = [True, False, True, False, False, False]
    assert paired_counts(a, b) == {"both": 1, "only_a": 2, "only_b": 1, "neither": 2}
    with pytest.raises(ValueError, match="same ones"):
        paired_counts(a, b[:-1])
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(3, 3) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)  # all 5 discordant episodes one way: 2 * 0.5**5
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)


def test_verdict_is_the_fewest_steps_within_or_above_the_reference_interval():
    assert fewest_matching_steps({1: 0.30, 2: 0.80, 10: 0.90}, reference_low=0.75) == 2
    assert fewest_matching_steps({1: 0.99, 2: 0.80}, reference_low=0.75) == 1  # above the interval passes
    assert fewest_matching_steps({1: 0.10, 2: 0.20}, reference_low=0.75) is None
    assert fewest_matching_steps({4: 0.75}, reference_low=0.75) == 4  # the interval's end counts


def test_env_and_eval_options_are_translated():
    args = ["--env.type", "pusht", "--env.episode_length=20", "--eval.batch_size", "4"]
    args += ["--eval.use_async_envs", "true", "--eval.n_episodes=3", "--out", "x"]
    command = typer.main.get_command(app).commands["eval"]
    ctx = command.make_context("eval", [], resilient_parsing=True)
    assert translate_args(command, ctx, args) == [
        "--env-option",
        "type=pusht",
        "--env-option",
        "episode_length=20",
        "--eval-batch-size",
        "4",
        "--eval-use-async-envs",
        "--n-episodes=3",
        "--out",
        "x",
    ]
    assert parse_env_options(["type=pusht", "episode_length=20"]) == ("pusht", {"episode_length": "20"})
    assert parse_env_options(None) == (None, {})


def test_closed_loop_config_refuses_bad_settings(tmp_path):
    base = {"env_type": "pusht", "teacher": "t", "out": tmp_path}
    with pytest.raises(ReflowPairsError, match="n_episodes"):
        ClosedLoopConfig(**base, n_episodes=0)
    with pytest.raises(ReflowPairsError, match="eval.batch_size"):
        ClosedLoopConfig(**base, batch_size=0)
    with pytest.raises(ReflowPairsError, match="cannot label"):
        ClosedLoopConfig(**base, students={"teacher": "x"})
    with pytest.raises(ReflowPairsError, match="positive"):
        ClosedLoopConfig(**base, num_steps=(0, 1))


def test_every_lerobot_env_type_names_what_installs_it():
    import importlib.metadata

    from lerobot.envs.configs import EnvConfig

    from reflowpairs.eval.closed_loop_env import ENV_EXTRAS, ENV_PACKAGES, install_fix, known_env_types

    known_env_types()  # plugins registered too
    lerobot_types = {
        name
        for name in EnvConfig.get_known_choices()
        if EnvConfig.get_choice_class(name).__module__.startswith("lerobot.")
    }
    assert {"pusht", "aloha", "libero", "metaworld"} <= lerobot_types
    assert lerobot_types <= set(ENV_EXTRAS) | set(ENV_PACKAGES)
    extras = set(importlib.metadata.metadata("lerobot").get_all("Provides-Extra"))
    assert set(ENV_EXTRAS.values()) <= extras  # each a real lerobot extra
    assert install_fix("aloha", "gym_aloha") == 'Install it: pip install "lerobot[aloha]".'
    fallback = install_fix("someplugin", "gym_someplugin")
    assert (
        "lerobot extra or package that provides `gym_someplugin`" in fallback
        and "lerobot_env_" not in fallback
    )


def test_model_fingerprint_covers_weights_and_processor_stats(tmp_path):
    import json
    import shutil

    from reflowpairs.eval.closed_loop_cells import model_fingerprint

    ckpt = tmp_path / "a"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"type": "smolvla", "num_steps": 10}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    for side in ("preprocessor", "postprocessor"):
        step = {"registry_name": "normalizer", "state_file": f"policy_{side}_step_0.safetensors"}
        (ckpt / f"policy_{side}.json").write_text(json.dumps({"name": side, "steps": [step, {"config": {}}]}))
        (ckpt / step["state_file"]).write_bytes(b"stats")
    first = model_fingerprint(str(ckpt))
    same = tmp_path / "b"
    shutil.copytree(ckpt, same)
    assert model_fingerprint(str(same)) == first  # content, not place
    (same / "policy_postprocessor_step_0.safetensors").write_bytes(b"other stats")
    assert model_fingerprint(str(same)) != first
    shutil.copy(ckpt / "policy_postprocessor_step_0.safetensors", same)
    assert model_fingerprint(str(same)) == first
    (same / "model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(str(same)) != first


def test_cells_match_on_device_and_tokenizer(tmp_path):
    from reflowpairs.atomic import write_json_atomically
    from reflowpairs.eval.closed_loop_cells import MATCHED_SETTINGS, cell_settings, read_cell

    assert {"device", "tokenizer", "checkpoint_fingerprint"} <= set(MATCHED_SETTINGS)
    cfg = ClosedLoopConfig(env_type="pusht", teacher="t", out=tmp_path, device="cpu")
    path = tmp_path / "cells" / "teacher-1.json"
    path.parent.mkdir()
    write_json_atomically(path, {"settings": cell_settings(cfg, "teacher", 1, "f"), "cell": {"ok": 1}})
    assert read_cell(path, cell_settings(cfg, "teacher", 1, "f")) == {"ok": 1}
    other = ClosedLoopConfig(env_type="pusht", teacher="t", out=tmp_path, device="cpu", tokenizer="/tok")
    with pytest.raises(ReflowPairsError, match="tokenizer: None there, '/tok' now"):
        read_cell(path, cell_settings(other, "teacher", 1, "f"))
    recorded = cell_settings(cfg, "teacher", 1, "f") | {"device": "cuda"}  # as a run on a GPU wrote it
    write_json_atomically(path, {"settings": recorded, "cell": {"ok": 1}})
    with pytest.raises(ReflowPairsError, match="device: 'cuda' there, 'cpu' now"):
        read_cell(path, cell_settings(cfg, "teacher", 1, "f"))


def test_paired_counts_pair_episodes_by_task_and_seed():
    from reflowpairs.eval.closed_loop_metrics import episode_successes

    a = [{"task": "t/0", "seed": s, "success": ok} for s, ok in [(1, True), (2, False), (3, True)]]
    b = [{"task": "t/0", "seed": s, "success": ok} for s, ok in [(3, True), (1, False), (2, True)]]
    # by position: 2 both, 1 neither; by seed: seed 1 only a, seed 2 only b, seed 3 both
    assert paired_counts(episode_successes(a), episode_successes(b)) == {
        "both": 1,
        "only_a": 1,
        "only_b": 1,
        "neither": 0,
    }
    c = [{**e, "seed": e["seed"] + 10} if e["seed"] == 3 else e for e in b]
    with pytest.raises(ValueError, match="different episodes"):
        paired_counts(episode_successes(a), episode_successes(c))
    with pytest.raises(ValueError, match="twice"):
        episode_successes(a + a[:1])


def test_rollout_wrappers_fall_back_when_lerobot_lacks_what_they_wrap(monkeypatch):
    import lerobot.scripts.lerobot_eval as lerobot_eval

    from reflowpairs.eval.rollout import ChunkTimer, quiet_lerobot_bars

    class Policy:  # a policy without SmolVLA's private _get_action_chunk
        def predict_action_chunk(self, x):
            return x + 1

    policy = Policy()
    timer = ChunkTimer(
        policy, "cpu", ("predict_action_chunk", "_get_action_chunk")
    )  # SmolVLA's chunk methods
    with timer.installed():
        assert policy.predict_action_chunk(1) == 2
    assert len(timer.times) == 1 and "predict_action_chunk" not in vars(policy)  # unwrapped after
    bare = object()
    with ChunkTimer(
        bare, "cpu", ("predict_action_chunk",)
    ).installed() as nothing:  # nothing to time: no latency, no crash
        pass
    assert nothing.times == []
    saved = lerobot_eval.trange
    with quiet_lerobot_bars():
        assert lerobot_eval.trange is not saved  # lerobot's bars silenced
    assert lerobot_eval.trange is saved
    monkeypatch.delattr(lerobot_eval, "trange")
    with quiet_lerobot_bars():  # a lerobot without the module-global trange: left alone
        assert not hasattr(lerobot_eval, "trange")


def test_chunk_latency_times_the_methods_each_family_makes_chunks_with():
    # SmolVLA's select_action calls its private _get_action_chunk directly: both are timed; pi0/pi05 make chunks
    # through predict_action_chunk alone
    assert family("smolvla").chunk_methods == ("predict_action_chunk", "_get_action_chunk")
    assert family("pi0").chunk_methods == family("pi05").chunk_methods == ("predict_action_chunk",)
    with pytest.raises(ReflowPairsError, match="Supported"):
        family("act")
