"""The pi05 family (lerobot 0.6 ``PI05Policy``): no state argument (its preprocessor normalises the state by
quantiles and writes it, discretised into 256 bins, into the prompt), and the time conditions the action expert
through adaRMS (``embed_suffix(x_t, t)`` returns the condition). Everything else is shared with pi0
(``_pi_common``)."""

from __future__ import annotations

from reflowpairs.policies._pi_common import PiFamily

FAMILY = PiFamily("pi05", uses_state=False)
