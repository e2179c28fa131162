"""The pi0 family (lerobot 0.6 ``PI0Policy``): the state token heads the action expert's suffix
(``embed_suffix(state, x_t, t)``), the state is normalised by mean/std. Everything else is shared with pi05
(``_pi_common``)."""

from __future__ import annotations

from reflowpairs.policies._pi_common import PiFamily

FAMILY = PiFamily("pi0", uses_state=True)
