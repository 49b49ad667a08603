"""The job table: the only state of the node besides its data folder.

Its parts, one job each: :mod:`~pacs_node.jobs.schema` (tables, states, the map of allowed state
changes), :mod:`~pacs_node.jobs.queries` (every statement), :mod:`~pacs_node.jobs.db` (engine,
migrations), :mod:`~pacs_node.jobs.recording` (the intake's write),
:mod:`~pacs_node.jobs.leases` (claim, heartbeat, reaper), :mod:`~pacs_node.jobs.states` (what a
worker records, retry), :mod:`~pacs_node.jobs.delivery` (per destination),
:mod:`~pacs_node.jobs.reports` (status, metrics) and
:mod:`~pacs_node.jobs.retention` (removing delivered files). :class:`JobStore` is all of them
on one engine.
"""

from __future__ import annotations

from pacs_node.jobs.delivery import Deliveries
from pacs_node.jobs.leases import Claim, LostClaim
from pacs_node.jobs.recording import Recording
from pacs_node.jobs.reports import JobRow, Reports
from pacs_node.jobs.retention import Retention
from pacs_node.jobs.schema import (
    TRANSITIONS,
    Action,
    DeliveryState,
    InstanceState,
    InvalidTransition,
    JobState,
)
from pacs_node.jobs.states import StateChanges


class JobStore(Recording, StateChanges, Deliveries, Reports, Retention):
    """The job table on ``database_url`` (SQLite or PostgreSQL)."""


__all__ = [
    "TRANSITIONS",
    "Action",
    "Claim",
    "DeliveryState",
    "InstanceState",
    "InvalidTransition",
    "JobRow",
    "JobState",
    "JobStore",
    "LostClaim",
]
