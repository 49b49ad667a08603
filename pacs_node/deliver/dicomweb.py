"""STOW-RS to a DICOMweb destination (``dicomweb-client``), several instances per request.

The response is honoured per instance: those in its ReferencedSOPSequence are delivered, those in
its FailedSOPSequence are not (they are sent again on the next try, with the destination's
back-off). A transport error or an HTTP failure without that detail raises RetryableError after
what was delivered so far has been reported.

Credentials come from the environment variable the destination's ``auth_env`` names: either
``Bearer <token>`` (sent as the Authorization header) or ``user:password`` (HTTP basic).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

from pacs_node.config import DestinationConfig
from pacs_node.errors import PermanentError, RetryableError

logger = logging.getLogger(__name__)

Delivered = Callable[[int, int], None]


def session_for(dest: DestinationConfig) -> requests.Session:
    """A requests session carrying the destination's credentials (PermanentError when the
    variable named by auth_env is not set)."""
    session = requests.Session()
    if dest.auth_env:
        secret = os.environ.get(dest.auth_env, "")
        if not secret:
            raise PermanentError(
                f"destination {dest.name}: environment variable {dest.auth_env} (auth_env) "
                "is not set"
            )
        if secret.lower().startswith("bearer "):
            session.headers["Authorization"] = secret
        elif ":" in secret:
            user, _, password = secret.partition(":")
            session.auth = (user, password)
        else:
            raise PermanentError(
                f"destination {dest.name}: {dest.auth_env} holds neither 'Bearer <token>' nor "
                "'user:password'"
            )
    return session


def _uids(response: pydicom.Dataset, keyword: str) -> dict[str, str]:
    """SOP instance UID -> failure reason (or '') of a STOW-RS response sequence."""
    out = {}
    for item in response.get(keyword) or []:
        reason = item.get("FailureReason")
        out[str(item.get("ReferencedSOPInstanceUID", ""))] = "" if reason is None else str(reason)
    return out


class StowSender:
    def __init__(self, dest: DestinationConfig) -> None:
        assert dest.url is not None
        self.dest = dest
        self.client = DICOMwebClient(
            url=dest.url, session=session_for(dest), timeout=dest.timeout_seconds
        )

    def _store(self, datasets: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
        d = self.dest
        try:
            return self.client.store_instances(datasets)
        except requests.HTTPError as err:
            rsp = err.response
            if rsp is not None and "json" in rsp.headers.get("Content-Type", ""):
                try:  # 409 and the like: some failed, and the body says which
                    return pydicom.Dataset.from_json(rsp.json())
                except (ValueError, json.JSONDecodeError, TypeError):
                    pass
            code = rsp.status_code if rsp is not None else "?"
            raise RetryableError(f"destination {d.name}: STOW-RS answered HTTP {code}") from None
        except requests.RequestException as err:
            raise RetryableError(f"destination {d.name}: {type(err).__name__}: {err}") from None

    def send(self, items: list[tuple[int, Path]], delivered: Delivered) -> int:
        """STOW-RS the files in batches of ``batch_size``; ``delivered(id, 0)`` for each one the
        destination stored. Raises RetryableError if any was refused or the request failed."""
        sent = 0
        for start in range(0, len(items), self.dest.batch_size):
            batch = items[start : start + self.dest.batch_size]
            datasets = [pydicom.dcmread(path) for _, path in batch]
            response = self._store(datasets)
            stored = _uids(response, "ReferencedSOPSequence")
            failed = _uids(response, "FailedSOPSequence")
            for (item_id, _), ds in zip(batch, datasets, strict=True):
                uid = str(ds.SOPInstanceUID)
                if uid in failed:
                    continue
                if stored and uid not in stored:  # neither stored nor refused: not confirmed
                    failed[uid] = "not in the response"
                    continue
                # a success response without a ReferencedSOPSequence covers every instance
                delivered(item_id, 0)
                sent += 1
            if failed:
                reasons = sorted({r for r in failed.values() if r})
                raise RetryableError(
                    f"destination {self.dest.name}: {len(failed)} of {len(batch)} instances "
                    f"refused (failure reasons {', '.join(reasons) or 'not given'})"
                )
        return sent
