"""The intake journal: what a crash of the machine (not only of the process) leaves, and what
recovery makes of it. The writing process is a real one, killed with SIGKILL; a power loss is
played by changing the boot id and by damaging the files the page cache held."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pacs_node.receive.journal import BLOCK, Journal, Spool, recover_idle_slots
from pacs_node.storage import Storage

FILE = 64 * BLOCK  # 256 KiB per journal file: the tests' records switch files often

WRITER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    from pacs_node.receive.journal import Journal
    from pacs_node.storage import Storage

    root, count, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    storage = Storage(root)
    journal = Journal(root / "journal", int(sys.argv[4]), boot=b"boot-before")
    journal.recover(storage)
    written = []
    for n in range(count):
        path = storage.received_path("1.2.3", f"1.2.3.{n}")
        spool = journal.spool()
        spool.write(bytes([n % 251]) * (size + n))
        ticket = journal.append(str(path), spool)
        fd, tmp = storage.open_temp()
        os.write(fd, spool.payload())
        storage.commit_temp(fd, tmp, path, sync=False)
        journal.written(ticket)
        written.append(str(path))
    print(json.dumps(written), flush=True)
    time.sleep(600)
    """
)


def _killed_writer(root: Path, count: int, size: int = 20_000) -> list[Path]:
    """A process that journals ``count`` instances, then is SIGKILLed: their paths."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(count), str(size), str(FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert line, "the writer died before journaling"
    return [Path(p) for p in json.loads(line)]


def _content(n: int, size: int = 20_000) -> bytes:
    return bytes([n % 251]) * (size + n)


def test_after_a_power_loss_the_files_not_yet_synced_are_rewritten(tmp_path: Path) -> None:
    paths = _killed_writer(tmp_path, 30)
    # what a power loss can leave of files that only the page cache held
    paths[-1].unlink()
    paths[-2].write_bytes(b"\0" * 100)  # torn
    journal = Journal(tmp_path / "journal", FILE, boot=b"boot-after")
    rewritten = journal.recover(Storage(tmp_path))
    journal.close()
    assert rewritten == 2
    assert paths[-1].read_bytes() == _content(29)
    assert paths[-2].read_bytes() == _content(28)
    for n, p in enumerate(paths[:-2]):  # whole files are left as they are
        assert p.read_bytes() == _content(n)
    assert not list((tmp_path / "tmp").iterdir())


def test_records_already_synced_are_not_replayed(tmp_path: Path) -> None:
    # ten records of ~20 KB fill a 256 KiB journal file: records 0-9 went to file a, 10-19 to
    # b, 20-29 to a again, which waited for a's files to be synced first; b's may be syncing
    paths = _killed_writer(tmp_path, 30)
    for p in paths:
        p.unlink()
    journal = Journal(tmp_path / "journal", FILE, boot=b"boot-after")
    rewritten = journal.recover(Storage(tmp_path))
    journal.close()
    assert rewritten in (10, 20)
    restored = [n for n, p in enumerate(paths) if p.exists()]
    assert restored == list(range(30 - rewritten, 30))  # the newest, none synced before


def test_a_killed_process_replays_nothing_on_the_same_boot(tmp_path: Path) -> None:
    paths = _killed_writer(tmp_path, 5)
    paths[0].unlink()  # a process kill cannot lose page cache: this was removed on purpose
    journal = Journal(tmp_path / "journal", FILE, boot=b"boot-before")
    assert journal.recover(Storage(tmp_path)) == 0
    journal.close()
    assert not paths[0].exists()
    # and it is clean now: a later reboot replays nothing either
    journal = Journal(tmp_path / "journal", FILE, boot=b"boot-after")
    assert journal.recover(Storage(tmp_path)) == 0
    journal.close()


@pytest.mark.parametrize("where", [10, BLOCK + 5000], ids=["header", "payload"])
def test_a_torn_record_ends_the_replay(tmp_path: Path, where: int) -> None:
    paths = _killed_writer(tmp_path, 3)
    log = next(p for p in (tmp_path / "journal").glob("*.log") if p.read_bytes()[8] == 0)
    raw = bytearray(log.read_bytes())
    second = BLOCK + BLOCK + -(-len(_content(0)) // BLOCK) * BLOCK  # the second record's header
    raw[second + where] ^= 0xFF
    log.write_bytes(bytes(raw))
    for p in paths:
        p.unlink()
    journal = Journal(tmp_path / "journal", FILE, boot=b"boot-after")
    assert journal.recover(Storage(tmp_path)) == 1
    journal.close()
    assert [p.exists() for p in paths] == [True, False, False]


def test_a_record_naming_a_path_outside_the_data_folder_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "node"
    storage = Storage(root)
    journal = Journal(root / "journal", FILE, boot=b"boot-before")
    journal.recover(storage)
    outside = tmp_path / "elsewhere.dcm"
    spool = journal.spool()
    spool.write(b"x" * 100)
    journal.written(journal.append(str(outside), spool))
    os.close(journal._lock_fd)  # the process "dies" holding nothing; its journal is unclean
    journal = Journal(root / "journal", FILE, boot=b"boot-after")
    assert journal.recover(storage) == 0
    journal.close()
    assert not outside.exists()


def test_slots_are_per_process_and_idle_ones_are_recovered(tmp_path: Path) -> None:
    paths = _killed_writer(tmp_path, 4)  # took slot 0
    for p in paths:
        p.unlink()
    storage = Storage(tmp_path)
    mine = Journal(tmp_path / "journal", FILE, boot=b"boot-after")
    assert mine.slot == 0  # the killed process let go of it
    other = Journal(tmp_path / "journal", FILE, boot=b"boot-after")
    assert other.slot == 1
    other.recover(storage)
    mine.close()  # slot 0 still holds the killed writer's records, unrecovered
    # the serving process, at start: every slot no process holds
    assert recover_idle_slots(tmp_path / "journal", FILE, storage) == 4
    assert all(p.exists() for p in paths)
    other.close()


def test_spool_grows_and_keeps_its_bytes() -> None:
    spool = Spool(capacity=2 * BLOCK)
    data = os.urandom(3 * BLOCK + 17)
    spool.write(data[:100])
    spool.write(data[100:])
    assert bytes(spool.payload()) == data
    assert spool.reset().size == 0


def test_journal_refuses_a_record_it_cannot_hold(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", FILE)
    journal.recover(Storage(tmp_path))
    spool = journal.spool()
    spool.write(bytes(journal.limit + 1))
    with pytest.raises(ValueError, match="too large"):
        journal.append(str(tmp_path / "received" / "x.dcm"), spool)
    journal.close()
