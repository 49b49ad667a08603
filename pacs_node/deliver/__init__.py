"""Delivering to destinations: one sender per kind (DIMSE C-STORE, DICOMweb STOW-RS)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pacs_node.config import DestinationConfig


class Sender(Protocol):
    def send(self, items: list[tuple[int, Path]], delivered: Callable[[int, int], None]) -> int:
        """Send (id, file) items in order; ``delivered(id, status)`` for each one delivered.
        Raises RetryableError at a failure, after reporting what was delivered."""
        ...


def sender_for(dest: DestinationConfig) -> Sender:
    if dest.kind == "dicomweb":
        from pacs_node.deliver.dicomweb import StowSender

        return StowSender(dest)
    from pacs_node.deliver.dimse import Forwarder

    return Forwarder(dest)
