# RENOVATION SHIM: removed at merge
"""Stand-in for two policy-family members this branch does not have yet (FAMILY_PROTOCOL.md): ``sample_chunk`` and
``chunk_methods``. ``family(policy_type)`` is ``reflowpairs.policies.family`` with them added, implementing today's
behaviour; at merge the eval modules import ``family`` from ``reflowpairs.policies`` and this file goes."""

from __future__ import annotations

from typing import Any

from reflowpairs.policies import family as registered_family


class _FamilyWithChunkMembers:
    """A registered family, plus ``sample_chunk`` and ``chunk_methods`` as the protocol defines them."""

    def __init__(self, policy_type: str):
        self._family = registered_family(policy_type)
        self.chunk_methods: tuple[str, ...] = (
            ("predict_action_chunk", "_get_action_chunk")
            if policy_type == "smolvla"
            else ("predict_action_chunk",)
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._family, name)

    @staticmethod
    def sample_chunk(policy, batch: dict[str, Any], noise):
        """The policy's own ``predict_action_chunk(batch)`` with its noise draw replaced by ``noise`` (B, T, D0)."""
        return policy.predict_action_chunk(batch, noise=noise)


def family(policy_type: str) -> _FamilyWithChunkMembers:
    """``reflowpairs.policies.family(policy_type)`` with ``sample_chunk`` and ``chunk_methods``."""
    return _FamilyWithChunkMembers(policy_type)
