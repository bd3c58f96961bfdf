"""How many drafts each request proposes: those expected to pay for their verification.

A verify step's draft rows are not free: on a CPU a step of 1 + k rows costs about
1 + `draft_row_cost` * k one-row decode steps (`SpeculativeConfig.draft_row_cost`, measured:
docs/benchmarks.md). The i-th draft yields a token only when drafts 1..i are all accepted; with a
request's acceptance rate a (each draft kept with probability a once the ones before it were) it
yields a^i tokens in expectation. In a step of B requests a token costs its share of the step,
(1 + cost * (B - 1)) / B decode steps, so the i-th draft pays while a^i * share > cost: a request
proposes the most drafts that pay (up to `num_speculative_tokens`), none where even the first
does not. Large batches thus stop speculating by themselves (the share falls towards the cost),
as does a request whose text its drafts do not predict (open-ended chat).

The rate is estimated per request from its own verify steps (drafts accepted over drafts
accepted plus rejections, the maximum-likelihood rate of that geometric model), decayed so that
it follows the text as it changes, from a prior that gives a new request a first try. A request
whose estimate rules drafts out proposes a single draft every `PROBE_INTERVAL` of its steps, to
notice when its text turns predictable (a quote, a code block to repeat).
"""

from __future__ import annotations

from dataclasses import dataclass

# What a draft row adds to a verify step, in one-row decode steps: the default of
# `SpeculativeConfig.draft_row_cost`, measured with the compiled step on the default model
# (docs/benchmarks.md).
DRAFT_ROW_COST = 0.3
# Weight of each earlier verify step's counts after one more (memory of about five steps).
DECAY = 0.8
# The prior: one draft accepted in two trials (a rate of 1/2) until the request's own counts.
PRIOR_ACCEPTED = 1.0
PRIOR_TRIALS = 2.0
# Steps a request without drafts waits before probing again with one.
PROBE_INTERVAL = 8


@dataclass
class AcceptanceEstimate:
    """One request's draft acceptance rate, from its verify steps."""

    accepted: float = PRIOR_ACCEPTED
    trials: float = PRIOR_TRIALS
    steps_without_drafts: int = 0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """A verify step of `num_drafts` drafts kept its first `num_accepted`."""
        rejected = 1 if num_accepted < num_drafts else 0
        self.accepted = DECAY * self.accepted + num_accepted
        self.trials = DECAY * self.trials + num_accepted + rejected

    @property
    def rate(self) -> float:
        return self.accepted / self.trials


class DraftPolicy:
    def __init__(self, max_drafts: int, draft_row_cost: float) -> None:
        """`draft_row_cost` 0: always propose `max_drafts` (verification taken as free)."""
        self.max_drafts = max_drafts
        self.draft_row_cost = draft_row_cost

    def num_drafts(self, estimate: AcceptanceEstimate, batch_size: int) -> int:
        """How many drafts a request with `estimate` proposes in a step of `batch_size`
        requests."""
        if self.draft_row_cost <= 0:
            return self.max_drafts
        count = self.paying_drafts(estimate.rate, batch_size)
        if count > 0:
            estimate.steps_without_drafts = 0
            return count
        estimate.steps_without_drafts += 1
        if estimate.steps_without_drafts < PROBE_INTERVAL:
            return 0
        estimate.steps_without_drafts = 0
        return 1

    def paying_drafts(self, rate: float, batch_size: int) -> int:
        """The most drafts whose expected tokens outweigh their rows' cost: the largest i with
        rate^i * share > cost, share being a token's part of a step without drafts."""
        cost = self.draft_row_cost
        share = (1 + cost * (batch_size - 1)) / batch_size
        count, expected = 0, rate
        while count < self.max_drafts and expected * share > cost:
            count += 1
            expected *= rate
        return count
