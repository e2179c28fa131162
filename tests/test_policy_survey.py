"""The refusal survey: every lerobot policy type is either straightened or refused with its own reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from lerobot.configs.policies import PreTrainedConfig

from reflowpairs.policies import SUPPORTED_POLICIES
from reflowpairs.teacher import UNSUPPORTED_POLICIES, unsupported_policy_problem

DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


def _lerobot_policy_types() -> list[str]:
    import lerobot.policies  # noqa: F401 - registers every built-in policy config

    return sorted(PreTrainedConfig.get_known_choices())


def test_every_lerobot_policy_type_is_surveyed():
    known = _lerobot_policy_types()
    assert "smolvla" in known and "act" in known
    missing = [t for t in known if t not in SUPPORTED_POLICIES and t not in UNSUPPORTED_POLICIES]
    assert not missing, f"lerobot policy types with no refusal reason: {missing}"
    assert not set(SUPPORTED_POLICIES) & set(UNSUPPORTED_POLICIES)


def test_docs_list_every_policy_type():
    text = DOC.read_text()
    for policy_type in [*SUPPORTED_POLICIES, *UNSUPPORTED_POLICIES]:
        assert f"| `{policy_type}` |" in text, policy_type


@pytest.mark.parametrize("policy_type", sorted(UNSUPPORTED_POLICIES))
def test_refusal_names_the_reason(policy_type):
    problem, fix = unsupported_policy_problem(policy_type)
    assert repr(policy_type) in problem and UNSUPPORTED_POLICIES[policy_type][1] in problem
    assert "smolvla, pi0, pi05" in fix and "docs/families.md" in fix


def test_unknown_type_is_named():
    problem, fix = unsupported_policy_problem("my_plugin_policy")
    assert "'my_plugin_policy'" in problem and "does not know" in problem and "docs/families.md" in fix
