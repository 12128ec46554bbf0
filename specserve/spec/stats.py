"""Speculation statistics, per request and per engine."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    steps: int = 0  # steps that drafted for the request(s)
    verify_steps: int = 0  # of those, steps whose target forward verified at least one node
    drafted: int = 0  # candidate nodes the drafter built
    verified: int = 0  # nodes the target scored
    accepted: int = 0  # drafted tokens the target accepted
    accepted_by_depth: list[int] = field(default_factory=list)  # steps that accepted depth k+1
    draft_time: float = 0.0  # seconds in drafting
    verify_time: float = 0.0  # seconds in target forwards that verified trees

    def record(self, drafted: int, verified: int, accepted: int) -> None:
        self.steps += 1
        self.verify_steps += verified > 0
        self.drafted += drafted
        self.verified += verified
        self.accepted += accepted
        if len(self.accepted_by_depth) < accepted:
            self.accepted_by_depth += [0] * (accepted - len(self.accepted_by_depth))
        for depth in range(accepted):
            self.accepted_by_depth[depth] += 1

    @property
    def mean_accepted_tokens(self) -> float:
        """MAT: tokens emitted per verification step (accepted drafts + the bonus token)."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        """Share of verification steps whose accepted path reached depth k+1."""
        return [n / self.verify_steps for n in self.accepted_by_depth] if self.verify_steps else []

    def merge(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.verify_steps += other.verify_steps
        self.drafted += other.drafted
        self.verified += other.verified
        self.accepted += other.accepted
        for depth, n in enumerate(other.accepted_by_depth):
            if depth < len(self.accepted_by_depth):
                self.accepted_by_depth[depth] += n
            else:
                self.accepted_by_depth.append(n)
        self.draft_time += other.draft_time
        self.verify_time += other.verify_time

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "verify_steps": self.verify_steps,
            "drafted": self.drafted,
            "verified": self.verified,
            "accepted": self.accepted,
            "mean_accepted_tokens": self.mean_accepted_tokens,
            "acceptance_by_depth": self.acceptance_by_depth,
            "draft_time_s": self.draft_time,
            "verify_time_s": self.verify_time,
        }
