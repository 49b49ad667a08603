"""Event-driven wake-ups for pynetdicom's two polling loops.

pynetdicom's association reactor sleeps 1 ms between looks at its DIMSE queue, and its DUL reactor
sleeps 1 ms (then ``select(..., 0)``) between looks at the socket; each C-STORE waits through
several of those naps. Here both naps become waits that end as soon as there is work: the DUL
thread selects on its socket plus a wake-up socketpair that is written whenever something is
queued for it; the association thread waits on an Event set whenever a DIMSE message or an ACSE
primitive is queued for it. Every wait is bounded (50 ms), so timers and kill flags are still
seen. It also closes a race in which the reactor steals a response meant for a sender on the
same association (see ``guarded_get_msg``). Nothing else in pynetdicom changes.

This reaches into pynetdicom internals, so it is written for, and only installed on, the 3.0
release line (pinned in pyproject.toml). On any other version, or if the internals it needs are
missing, :func:`install` logs why and leaves pynetdicom as it is.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_PREFIX = "3.0."
NAP = 0.001  # the naps being replaced
BOUND = 0.05  # the longest any replacement wait lasts

_installed = False


def _notify_on_put(q: Any, notify: Callable[[], None]) -> None:
    put = q.put

    def put_and_notify(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        notify()

    q.put = put_and_notify


class _TimeShim(types.SimpleNamespace):
    """Stands in for the ``time`` module inside pynetdicom.dul and pynetdicom.association: the
    reactor naps go to the calling thread's wait function, everything else to ``time``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == NAP:
            wait = getattr(threading.current_thread(), "_ldct_wait", None)
            if wait is not None:
                wait()
                return
        time.sleep(seconds)


_SHIM = _TimeShim()


class _Checkpoint(threading.Event):
    """pynetdicom's _reactor_checkpoint, which also wakes the reactor when it is cleared."""

    def __init__(self, on_clear: Callable[[], None]) -> None:
        super().__init__()
        self.set()
        self._on_clear = on_clear

    def clear(self) -> None:
        super().clear()
        self._on_clear()


def _dul_wait(dul: Any) -> Callable[[], None]:
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    dul._ldct_wake = w
    weakref.finalize(dul, r.close)
    weakref.finalize(dul, w.close)

    def wait() -> None:
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            ready, _, _ = select.select([r] if sock is None else [sock, r], [], [], BOUND)
        except (OSError, ValueError):
            time.sleep(NAP)
            return
        if r in ready:
            try:
                while r.recv(4096):
                    pass
            except OSError:
                pass

    return wait


def _wake_dul(dul: Any) -> None:
    if threading.current_thread() is dul:  # it queued for itself, so it is not waiting
        return
    with contextlib.suppress(OSError):  # buffer full (already awake) or closed
        dul._ldct_wake.send(b"\0")


def _patched_init(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        dul, dimse = self.dul, self.dimse
        woke = threading.Event()
        # A sender (send_c_store, release, ...) pauses the reactor by clearing this checkpoint and
        # spinning until the reactor shows _is_paused, which it does only once its nap is over:
        # the clear wakes it, or each request would wait out the whole bounded wait.
        self._reactor_checkpoint = _Checkpoint(woke.set)

        def assoc_wait() -> None:
            if dimse.msg_queue.empty() and dul.to_user_queue.empty():
                woke.wait(BOUND)
            woke.clear()

        _notify_on_put(dimse.msg_queue, woke.set)
        _notify_on_put(dul.to_user_queue, woke.set)
        _notify_on_put(dul.to_provider_queue, lambda: _wake_dul(dul))
        _notify_on_put(dul.event_queue, lambda: _wake_dul(dul))
        self._ldct_wait = assoc_wait
        dul._ldct_wait = _dul_wait(dul)

        # Close pynetdicom's reactor race (its issues #435, #875): a sender pauses the reactor by
        # clearing _reactor_checkpoint and waiting for _is_paused, but a reactor that has just
        # passed the checkpoint still shows _is_paused and can take the sender's response off
        # the queue ("Received unexpected C-STORE service message", then a DIMSE time-out).
        # Here the reactor's own look at the queue yields nothing while a sender holds it.
        get_msg = dimse.get_msg
        checkpoint = self._reactor_checkpoint

        def guarded_get_msg(block: bool = False) -> Any:
            if threading.current_thread() is self and not checkpoint.is_set():
                return None, None
            return get_msg(block)

        dimse.get_msg = guarded_get_msg

    return __init__


def supported() -> bool:
    """Whether pynetdicom is the release line, with the internals, that this module and
    :mod:`pacs_node.stream` are written for."""
    try:
        import pynetdicom
        from pynetdicom import association, dul
    except ImportError:  # pragma: no cover
        return False
    version = str(pynetdicom.__version__)
    if not version.startswith(SUPPORTED_PREFIX):
        logger.info(
            "pynetdicom %s: keeping its own receive path (pacs_node's patches are for %sx)",
            version,
            SUPPORTED_PREFIX,
        )
        return False
    needed = (
        hasattr(dul.DULServiceProvider, "run_reactor")
        and hasattr(association.Association, "_run_reactor")
        and getattr(dul, "time", None) in (time, _SHIM)
        and getattr(association, "time", None) in (time, _SHIM)
    )
    if not needed:
        logger.warning("pynetdicom %s internals differ; keeping its own receive path", version)
    return needed


def install() -> bool:
    """Install the event-driven waits once; return whether they are active."""
    global _installed
    if _installed:
        return True
    if not supported():
        return False
    from pynetdicom import association, dul

    association.Association.__init__ = _patched_init(association.Association.__init__)  # type: ignore[method-assign]
    dul.time = _SHIM  # type: ignore[assignment]
    association.time = _SHIM  # type: ignore[assignment]
    _installed = True
    return True


def installed() -> bool:
    return _installed
