"""Small parts tested alone: the retry policy and the status names."""

from __future__ import annotations

import pytest

from pacs_node.errors import PermanentError, RetryableError
from pacs_node.jobs import LostClaim
from pacs_node.status import Status, category, describe
from pacs_node.work.retry import Outcome, RetryPolicy


def test_retry_policy_backs_off_exponentially_to_its_cap() -> None:
    policy = RetryPolicy(backoff_seconds=2, backoff_max_seconds=30, max_attempts=8)
    assert [policy.delay(n) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert policy.outcome(RetryableError("destination down")) is Outcome.RETRY
    assert policy.outcome(PermanentError("undecodable")) is Outcome.FAIL
    assert policy.outcome(ValueError("a bug")) is Outcome.FAIL
    assert policy.outcome(LostClaim("requeued")) is Outcome.LEAVE


@pytest.mark.parametrize(
    ("code", "text", "kind"),
    [
        (0xB006, "Element Discarded", "Warning"),
        (0xB007, "Data Set Does Not Match SOP Class", "Warning"),
        (0xA700, "Refused: Out of Resources", "Failure"),
        (0x0122, "Refused: SOP Class Not Supported", "Failure"),
    ],
)
def test_status_descriptions_come_from_pynetdicoms_table(code: int, text: str, kind: str) -> None:
    assert describe(code) == text and category(code) == kind


def test_every_status_the_node_answers_is_a_known_storage_status() -> None:
    for status in Status:
        assert category(status) == ("Success" if status == Status.SUCCESS else "Failure")
        assert status == Status.SUCCESS or describe(status), status
