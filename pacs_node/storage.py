"""The data folder: layout, atomic durable writes, disk watermark, retention.

Layout (names built from validated UIDs only, never raw received strings)::

    <data_dir>/received/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   as received, with file meta
    <data_dir>/derived/<job id>/<SOPInstanceUID>.dcm                the denoised instances
    <data_dir>/tmp/                                                  partial writes
    <data_dir>/thumbs/<job id>.png                                   status-page thumbnails
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# PS3.5 9.1: components of digits, no leading zeros (except "0"), separated by dots, <= 64 chars.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def valid_uid(uid: object) -> bool:
    return isinstance(uid, str) and len(uid) <= 64 and UID_RE.match(uid) is not None


def _safe_name(uid: str) -> str:
    if not valid_uid(uid):
        raise ValueError(f"not a valid UID, refusing to use it in a file name: {uid!r}")
    return uid


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    def __init__(self, data_dir: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(data_dir)
        self.min_free_bytes = min_free_bytes
        self.received_dir = self.root / "received"
        self.derived_dir = self.root / "derived"
        self.tmp_dir = self.root / "tmp"
        self.thumbs_dir = self.root / "thumbs"
        for d in (self.received_dir, self.derived_dir, self.tmp_dir, self.thumbs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()

    def received_path(self, series_uid: str, sop_uid: str) -> Path:
        return self.received_dir / _safe_name(series_uid) / f"{_safe_name(sop_uid)}.dcm"

    def derived_path(self, job_id: int, sop_uid: str) -> Path:
        return self.derived_dir / str(int(job_id)) / f"{_safe_name(sop_uid)}.dcm"

    def thumb_path(self, job_id: int) -> Path:
        return self.thumbs_dir / f"{int(job_id)}.png"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self) -> bool:
        return self.min_free_bytes <= 0 or self.free_bytes() >= self.min_free_bytes

    def write_atomic(self, path: Path, chunks: bytes | Sequence[bytes | memoryview]) -> None:
        """Write to a temporary file, fsync, rename into place, fsync the folder.

        Either the whole file is at ``path`` afterwards (replacing any earlier one) or nothing
        changed there. On error the temporary file is removed.
        """
        fd, tmp = self.open_temp()
        try:
            for c in [chunks] if isinstance(chunks, bytes | bytearray | memoryview) else chunks:
                write_all(fd, c)
        except BaseException:
            self.discard_temp(fd, tmp)
            raise
        self.commit_temp(fd, tmp, path)

    def open_temp(self) -> tuple[int, Path]:
        """A new, empty temporary file in the data folder: (descriptor, path)."""
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644), tmp

    def commit_temp(self, fd: int, tmp: Path, path: Path) -> None:
        """fsync and close a temporary file from :meth:`open_temp`, rename it to ``path`` and
        fsync the folder. On error the temporary file is removed and ``path`` is unchanged."""
        try:
            os.fsync(fd)
            os.close(fd)
            fd = -1
            folder = path.parent
            if folder not in self._known_dirs:
                folder.mkdir(parents=True, exist_ok=True)
                fsync_dir(folder.parent)
                self._known_dirs.add(folder)
            os.replace(tmp, path)
        except BaseException:
            self.discard_temp(fd, tmp)
            raise
        fsync_dir(folder)

    @staticmethod
    def discard_temp(fd: int, tmp: Path) -> None:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)

    def clean_tmp(self) -> int:
        """Remove partial writes left by a crash; return how many."""
        n = 0
        for p in self.tmp_dir.glob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # only when empty
            self._known_dirs.discard(path.parent)
        except OSError:
            pass
