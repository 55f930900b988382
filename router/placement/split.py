"""Split or whole: whether a disaggregated leg prefills on a prefill instance (split) or runs whole on the decode
instance it was placed on. Pure code.

`router.split_policy`:

- `always`: every leg whose context reaches `transfer.min_prompt_tokens` is split (the prefill pool binds every
  prompt).
- `sooner`: a leg runs whole on its decode instance when that instance would reach the first token sooner, and
  the requests already decoding there keep their TPOT objective.

Sooner. An instance computes the prompt tokens queued on it before a new prompt, at one pace (seconds per prompt
token) for every instance of one engine configuration. So the decode instance is sooner exactly when fewer prompt
tokens are queued on it (`decode_queue`, its own whole legs) than on the least-queued prefill instance
(`prefill_queue`); a tie splits. No pace is needed for that comparison.

TPOT. A prefill on the decode instance holds up every request decoding there for as long as the prompts queued
there take, this one included: `pace * (decode_queue + tokens)` seconds. A resident request that has produced
`generated` tokens of an expected `expected` (the leg's max_tokens, or the predicted p90 where a predictor runs)
over `elapsed` seconds since its first one ends, at the pace it has kept, with a TPOT of

    (elapsed + per_token * (expected - generated) + hold_up) / (expected - 1)

where `per_token = elapsed / (generated - 1)` (0 before its second token). A resident still before its first
token (its prompt prefilling on a prefill instance) counts with `generated` and `elapsed` 0: its decode starts
behind the hold-up too, and a short one feels it most. With `tpot_s` set, the leg runs whole only when every
resident stays within it; without a pace measured yet, it is split.

`PrefillPace` is that pace, learned from the prefills the router sees finish: the median seconds per computed
prompt token over the last `window` of them (prefill time grows about linearly with the prompt on these sizes;
the median ignores the odd slow one).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

SPLIT_POLICIES = ("always", "sooner")


@dataclass(frozen=True, slots=True)
class Resident:
    """A request decoding on the decode instance."""

    generated: int  # tokens of its leg so far
    expected: int  # tokens its leg is expected to produce in all
    elapsed_s: float  # since its leg's first token (0 before it)


@dataclass(frozen=True, slots=True)
class SplitView:
    """What the choice reads of one leg and the instances it could use."""

    tokens: int  # prompt tokens the leg computes
    prefill_queue: int  # prompt tokens queued on the least-queued prefill instance
    decode_queue: int  # prompt tokens queued on the decode instance
    residents: Sequence[Resident]


def projected_tpot(resident: Resident, hold_up_s: float) -> float:
    """The resident's TPOT at the end of its leg if it keeps its pace and is held up `hold_up_s` more."""
    per_token = resident.elapsed_s / (resident.generated - 1) if resident.generated > 1 else 0.0
    left = max(resident.expected - resident.generated, 0)
    return (resident.elapsed_s + per_token * left + hold_up_s) / max(resident.expected - 1, 1)


def runs_whole(view: SplitView, pace_s: float | None, tpot_s: float | None) -> bool:
    """`sooner`: whether the leg runs whole on its decode instance (see the module docstring)."""
    if view.decode_queue >= view.prefill_queue:
        return False
    if tpot_s is None:
        return True
    if pace_s is None:
        return False
    hold_up = pace_s * (view.decode_queue + view.tokens)
    return all(projected_tpot(r, hold_up) <= tpot_s for r in view.residents)


class PrefillPace:
    """Seconds per prompt token of the prefills seen last (see the module docstring)."""

    def __init__(self, window: int = 64) -> None:
        self._paces: deque[float] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._paces.append(seconds / tokens)

    @property
    def seconds_per_token(self) -> float | None:
        """None until a prefill was seen."""
        return statistics.median(self._paces) if self._paces else None
