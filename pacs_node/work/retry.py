"""What happens to a job after an error: retried later with exponential back-off, failed, or
left alone (another worker has it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pacs_node.errors import PermanentError, RetryableError
from pacs_node.jobs import LostClaim


class Outcome(enum.Enum):
    RETRY = "retry"  # back to ready after the back-off (failed at max_attempts)
    FAIL = "fail"  # failed now, with the error
    LEAVE = "leave"  # the claim was lost: another worker owns the job


@dataclass(frozen=True)
class RetryPolicy:
    backoff_seconds: float
    backoff_max_seconds: float
    max_attempts: int

    def delay(self, attempt: int) -> float:
        """Seconds before the next try after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.backoff_seconds * 2 ** max(attempt - 1, 0), self.backoff_max_seconds))

    @staticmethod
    def outcome(err: BaseException) -> Outcome:
        if isinstance(err, LostClaim):
            return Outcome.LEAVE
        if isinstance(err, RetryableError):
            return Outcome.RETRY
        if isinstance(err, PermanentError):
            return Outcome.FAIL
        return Outcome.FAIL  # a bug: fail the job with the error, keep the node up
