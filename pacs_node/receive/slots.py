"""node.max_associations across every process receiving on the port.

One lock file per slot; an association holds one (``flock``) from the moment its connection
opens until it closes. The kernel drops a process's locks when it dies, SIGKILL included, so a
crashed receiver never keeps slots taken.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


class AssociationSlots:
    def __init__(self, folder: Path, count: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"association-{k}.lock" for k in range(count)]
        self._held: dict[object, int] = {}  # association key -> open, locked descriptor
        self._lock = threading.Lock()

    def take(self, key: object) -> bool:
        """Lock a free slot for ``key``; False when every slot is held, here or elsewhere."""
        for path in self.paths:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            with self._lock:
                self._held[key] = fd
            return True
        return False

    def give_back(self, key: object) -> None:
        with self._lock:
            fd = self._held.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops its lock
