"""Acceptance counts: how many drafts were verified and how many of them the target kept."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Running totals over every verify step (a request's step that carried drafts)."""

    num_drafts: int = 0  # verify steps
    num_draft_tokens: int = 0  # draft tokens verified
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts at i kept

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        missing = num_draft_tokens - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(0, missing)
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    def record_all(self, other: SpecStats) -> None:
        """Add another tally to this one."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        missing = len(other.accepted_per_position) - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(0, missing)
        for position, count in enumerate(other.accepted_per_position):
            self.accepted_per_position[position] += count

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step yields: the accepted drafts plus the one sampled after them."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_record(self) -> dict[str, object]:
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": self.num_draft_tokens,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_acceptance_rate": round(self.acceptance_rate, 4),
            "spec_mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "spec_accepted_per_position": list(self.accepted_per_position),
        }

    def since(self, earlier: SpecStats) -> SpecStats:
        """What was counted after the snapshot `earlier` (a copy taken with `snapshot`)."""
        per_position = [
            now
            - (earlier.accepted_per_position[i] if i < len(earlier.accepted_per_position) else 0)
            for i, now in enumerate(self.accepted_per_position)
        ]
        return SpecStats(
            self.num_drafts - earlier.num_drafts,
            self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            per_position,
        )

    def snapshot(self) -> SpecStats:
        return SpecStats(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.accepted_per_position),
        )
