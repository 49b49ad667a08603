"""The intake journal: one synchronous disk write per received instance, where a file of its own
needs two (the file's fsync, then its folder's after the rename).

Before a C-STORE is answered Success, the instance's bytes and the path they belong at are
appended to a preallocated journal file in one direct, synchronous write (``O_DIRECT |
O_DSYNC``: the blocks exist already, so no metadata changes, one round trip to the device). The
file at that path is then written through the page cache and renamed into place without waiting
for the disk, and the instance is recorded. A record stays in the journal until a background
``syncfs`` has put the files written before it on disk. After an operating-system crash or a
power loss (the journal's boot id is not the running kernel's), :meth:`Journal.recover`
rewrites from the records not yet synced every file that is missing or holds other bytes,
before the node receives again; the node's start-up then records any file the job table lost
(its commits are not synced either). A file removed after delivery just before the power loss
comes back too and is delivered again, under the same derived UIDs: after a power loss the node
delivers at least once; after a crash of its processes, exactly once. A process that was merely
killed lost nothing from the page cache: its journal is synced and marked clean. An instance
larger than :data:`SPOOL_MAX` (or than a journal file) is not held in memory: it goes to a file
of its own, synced before its answer, as without a journal.

Layout: ``<data_dir>/journal/<slot>-a.log`` and ``-b.log``, two preallocated files per
receiving process, which holds an exclusive lock on its slot. Appends go to one file until the
next record does not fit; then to the other, once a background thread has synced the file
system and marked it clean. Each file: a 4 KiB header (state, first sequence number, boot id,
CRC), then records aligned to 4 KiB: a 4 KiB record header (sequence number, payload length,
payload CRC, path, CRC) and the payload, the Part-10 file. Replay ends at the first record that
is not whole (a write the crash cut short: its instance was never answered).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pacs_node.storage import fsync_dir

if TYPE_CHECKING:
    from pacs_node.storage import Storage

logger = logging.getLogger(__name__)

BLOCK = 4096
SPOOL_MAX = 16 << 20  # the most an association holds in memory; larger instances: own file
SLOTS = 64  # receiving processes (node.receive_processes <= 64) and restarts overlapping them
_FILE = struct.Struct("<8sBQ36s")  # magic, clean, first sequence number, boot id
_RECORD = struct.Struct("<8sQQIH")  # magic, sequence number, payload length and CRC, path length
FILE_MAGIC, RECORD_MAGIC = b"LDCTJNL1", b"LDCTREC1"


def boot_id() -> bytes:
    """This kernel's boot id: a journal written under another one may have lost page cache."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()[:36]
    except OSError:
        return b"unknown"  # no /proc: every start replays


def _libc_syncfs() -> object:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _libc_syncfs()


def sync_filesystem(fd: int) -> None:
    """Everything written to the file system holding ``fd`` is on disk when this returns."""
    if _syncfs is None:
        os.sync()
        return
    if _syncfs(fd) != 0:  # type: ignore[operator]
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def _sealed(body: bytes) -> bytes:
    """``body`` with its CRC-32, padded to one block."""
    out = body + struct.pack("<I", zlib.crc32(body))
    return out + bytes(BLOCK - len(out))


def _unsealed(block: bytes, size: int) -> bytes | None:
    """The first ``size`` bytes of a block made by :func:`_sealed`, or None if its CRC fails."""
    body, crc = block[:size], block[size : size + 4]
    if len(crc) < 4 or struct.unpack("<I", crc)[0] != zlib.crc32(body):
        return None
    return body


def _record_block(seq: int, length: int, crc: int, path: bytes) -> bytes:
    return _sealed(_RECORD.pack(RECORD_MAGIC, seq, length, crc, len(path)) + path)


def _record_head(block: bytes) -> tuple[int, int, int, str] | None:
    """(sequence number, payload length, payload CRC, path) of a record header, or None."""
    if len(block) < _RECORD.size:
        return None
    magic, seq, length, crc, path_len = _RECORD.unpack_from(block)
    body = _unsealed(block, _RECORD.size + path_len) if magic == RECORD_MAGIC else None
    if body is None:
        return None
    return seq, length, crc, body[_RECORD.size :].decode("utf-8", "replace")


class Spool:
    """A growing, page-aligned buffer for one instance's bytes, with a block in front for its
    record header (what a direct write needs). One per receiving thread, reused."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self.buf = mmap.mmap(-1, capacity)
        self.size = 0  # payload bytes

    def reset(self) -> Spool:
        self.size = 0
        return self

    def write(self, data: bytes | memoryview) -> None:
        end = BLOCK + self.size + len(data)
        if end > len(self.buf):
            bigger = mmap.mmap(-1, max(2 * len(self.buf), -(-end // BLOCK) * BLOCK))
            bigger[: BLOCK + self.size] = self.buf[: BLOCK + self.size]
            self.buf.close()
            self.buf = bigger
        self.buf[BLOCK + self.size : end] = data
        self.size += len(data)

    def payload(self) -> memoryview:
        return memoryview(self.buf)[BLOCK : BLOCK + self.size]


@dataclass
class _File:
    path: Path
    fd: int
    clean: bool
    first_seq: int
    boot: bytes = b""
    size: int = 0
    pos: int = BLOCK
    pending: int = 0  # appended, their files not yet written


@dataclass(frozen=True)
class Record:
    seq: int
    path: str
    payload: bytes


class Journal:
    """One receiving process's journal (see the module's description). Thread-safe."""

    def __init__(
        self, folder: Path, file_size: int, slot: int | None = None, boot: bytes | None = None
    ) -> None:
        """Take ``slot`` (or the first free one: OSError EBUSY if taken) in ``folder``."""
        self.folder = folder
        self.file_size = max(4 * BLOCK, file_size // BLOCK * BLOCK)
        self.boot = boot or boot_id()
        folder.mkdir(parents=True, exist_ok=True)
        self.slot, self._lock_fd = self._take_slot(slot)
        self.direct = True
        self.files = [self._open(f"{self.slot}-{k}.log") for k in "ab"]
        self._header = mmap.mmap(-1, BLOCK)
        self._spools = threading.local()
        self._cond = threading.Condition()
        self._active = 0
        self._seq = 0
        self._syncing: _File | None = None
        self._stopping = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None

    # -- set-up ------------------------------------------------------------------------------
    def _take_slot(self, wanted: int | None) -> tuple[int, int]:
        for slot in range(SLOTS) if wanted is None else [wanted]:
            fd = os.open(self.folder / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return slot, fd
            except BlockingIOError:
                os.close(fd)
        raise OSError(errno.EBUSY, f"journal slot {wanted} in {self.folder} is taken")

    def _open(self, name: str) -> _File:
        path = self.folder / name
        new = not path.exists()
        if new:
            self._create(path)
        return self._load(path, clean=new)

    def _create(self, path: Path) -> None:
        """A zero-filled file of ``file_size`` (direct writes into it change no metadata)."""
        tmp = path.with_suffix(".new")
        with open(tmp, "wb") as f:
            zeros = bytes(1 << 20)
            for start in range(0, self.file_size, len(zeros)):
                f.write(zeros[: self.file_size - start])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.folder)

    def _load(self, path: Path, clean: bool) -> _File:
        flags = os.O_RDWR | os.O_DSYNC | os.O_CLOEXEC
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as err:  # tmpfs and a few others: no direct I/O, a synced write instead
            if err.errno != errno.EINVAL:
                raise
            fd = os.open(path, flags)
            self.direct = False
        size = path.stat().st_size
        header = _unsealed(self._read(path, 0), _FILE.size)
        if clean or header is None:
            return _File(path, fd, True, 0, size=size)
        magic, was_clean, first, boot = _FILE.unpack(header)
        clean = bool(was_clean) or magic != FILE_MAGIC
        return _File(path, fd, clean, first, boot.rstrip(b"\0"), size=size)

    @staticmethod
    def _read(path: Path, offset: int, size: int = BLOCK) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)

    def records(self, f: _File, payloads: bool = True) -> Iterator[Record]:
        """The records of an unclean file, in order, up to the first that is not whole."""
        with open(f.path, "rb") as src:
            pos, seq = BLOCK, f.first_seq
            while pos + BLOCK <= f.size:
                src.seek(pos)
                head = _record_head(src.read(BLOCK))
                if head is None or head[0] != seq or pos + BLOCK + head[1] > f.size:
                    return
                payload = src.read(head[1]) if payloads else b""
                if payloads and zlib.crc32(payload) != head[2]:
                    return  # torn: the write never completed, nor anything after it
                yield Record(seq, head[3], payload)
                pos += BLOCK + -(-head[1] // BLOCK) * BLOCK
                seq += 1

    def recover(self, storage: Storage) -> int:
        """Before receiving: where the boot changed since the journal was written, rewrite from
        its records each file that is missing or holds other bytes; then sync, mark clean and
        start the sync thread. Returns how many files were rewritten."""
        unclean = sorted((f for f in self.files if not f.clean), key=lambda f: f.first_seq)
        replay = any(f.boot != self.boot for f in unclean)
        rewritten = 0
        last_seq = max(f.first_seq for f in self.files)
        for f in unclean:
            for r in self.records(f, payloads=replay):
                last_seq = max(last_seq, r.seq + 1)
                if replay and self._rewrite(r, storage):
                    rewritten += 1
        if rewritten:
            logger.warning(
                "journal: the machine restarted since instances were received; %d files "
                "rewritten from journal slot %d",
                rewritten,
                self.slot,
            )
        sync_filesystem(self.files[0].fd)
        for k, f in enumerate(self.files):
            if f.size != self.file_size:  # made with another storage.journal_mib
                os.close(f.fd)
                f.path.unlink()
                self._create(f.path)
                self.files[k] = f = self._load(f.path, clean=True)
            self._write_header(f, clean=True, first_seq=last_seq)
        self._seq = last_seq
        self._activate(self.files[0])
        self._thread = threading.Thread(target=self._sync_loop, name="journal-sync", daemon=True)
        self._thread.start()
        return rewritten

    @staticmethod
    def _rewrite(r: Record, storage: Storage) -> bool:
        path = Path(r.path)
        if storage.received_dir.resolve() not in path.resolve().parents:
            logger.warning("journal: record %d names a path outside the data folder", r.seq)
            return False
        try:
            if path.read_bytes() == r.payload:
                return False
        except FileNotFoundError:
            pass
        storage.write_atomic(path, r.payload)
        return True

    # -- appending ---------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """The largest payload a record takes; larger instances take the file path."""
        return min(self.file_size - 2 * BLOCK, SPOOL_MAX)

    def spool(self) -> Spool:
        """This thread's buffer, emptied."""
        spool: Spool | None = getattr(self._spools, "spool", None)
        if spool is None:
            spool = self._spools.spool = Spool()
        return spool.reset()

    def append(self, path: str, spool: Spool) -> _File:
        """Write the record durably; returns a ticket for :meth:`written`, to be called once
        the file at ``path`` is written (the record is kept until then)."""
        raw = path.encode()
        if spool.size > self.limit or _RECORD.size + 4 + len(raw) > BLOCK:
            raise ValueError("record too large for the journal")
        length = BLOCK + -(-spool.size // BLOCK) * BLOCK
        crc = zlib.crc32(spool.payload())
        with self._cond:
            if self._error is not None:
                raise self._error
            f = self.files[self._active]
            if f.pos + length > self.file_size:
                f = self._switch()
            spool.buf[:BLOCK] = _record_block(self._seq, spool.size, crc, raw)
            view = memoryview(spool.buf)[:length]
            if self.direct:
                written = os.pwritev(f.fd, [view], f.pos)
            else:
                written = os.pwrite(f.fd, view, f.pos)
            if written != length:
                raise OSError(errno.EIO, f"journal: short write ({written} of {length} bytes)")
            f.pos += length
            f.pending += 1
            self._seq += 1
        return f

    def written(self, ticket: _File) -> None:
        with self._cond:
            ticket.pending -= 1
            self._cond.notify_all()

    def _switch(self) -> _File:
        """The active file is full: hand it to the sync thread, continue in the other (waiting
        until it is clean). Called with the condition held."""
        full = self.files[self._active]
        other = self.files[1 - self._active]
        while not other.clean or self._syncing is not None:
            if self._error is not None:
                raise self._error
            self._cond.wait(1.0)
        self._activate(other)
        self._active = 1 - self._active
        self._syncing = full
        self._cond.notify_all()
        return other

    def _activate(self, f: _File) -> None:
        self._write_header(f, clean=False, first_seq=self._seq)
        f.pos = BLOCK

    def _write_header(self, f: _File, clean: bool, first_seq: int) -> None:
        self._header[:] = _sealed(_FILE.pack(FILE_MAGIC, int(clean), first_seq, self.boot))
        if self.direct:
            os.pwritev(f.fd, [memoryview(self._header)], 0)
        else:
            os.pwrite(f.fd, self._header[:], 0)
        f.clean, f.first_seq, f.boot = clean, first_seq, self.boot

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while self._syncing is None and not self._stopping:
                    self._cond.wait()
                if self._syncing is None:
                    return
                f = self._syncing
                while f.pending:
                    self._cond.wait()
            try:
                sync_filesystem(f.fd)
                with self._cond:
                    self._write_header(f, clean=True, first_seq=f.first_seq)
                    self._syncing = None
                    self._cond.notify_all()
            except OSError as err:  # the disk failed: no more Success answers from this journal
                logger.error("journal: syncing the received files failed: %s", err)
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return

    def close(self) -> None:
        """Sync and mark clean (nothing to replay after a normal stop); release the slot."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            while self._syncing is not None and self._error is None:
                self._cond.wait(1.0)
        if self._thread is not None:
            self._thread.join()
        try:
            if self._error is None and self._thread is not None:
                sync_filesystem(self.files[0].fd)
                for f in self.files:
                    if not f.clean:
                        self._write_header(f, clean=True, first_seq=f.first_seq)
        finally:
            for f in self.files:
                os.close(f.fd)
            os.close(self._lock_fd)


def recover_idle_slots(folder: Path, file_size: int, storage: Storage) -> int:
    """Recover the journals no running process holds (those of receiving processes of an
    earlier run); returns how many files were rewritten."""
    rewritten = 0
    for lock in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        if not lock.stem.isdigit():
            continue
        try:
            journal = Journal(folder, file_size, slot=int(lock.stem))
        except OSError as err:
            if err.errno != errno.EBUSY:
                raise
            continue  # a running process holds it
        try:
            rewritten += journal.recover(storage)
        finally:
            journal.close()
    return rewritten
