"""Several processes receiving on one port (node.receive_processes): DCMTK storescu and pynetdicom
senders, the node as a process."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
from pathlib import Path

import pydicom

from tests.conftest import dcmtk_env, make_series, require_tool, wait_for
from tests.test_http import samples

SHARED = "receive_processes = 3\n"


def _node(node_factory, max_associations: int = 8):  # type: ignore[no-untyped-def]
    node = node_factory()
    text = node.config.read_text().replace(
        "[storage]", f"{SHARED}max_associations = {max_associations}\n[storage]", 1
    )
    node.config.write_text(text)
    node.start()
    wait_for(lambda: node.log().count("listening as") >= 3, 60, "three receiving processes")
    return node


def _receivers(node) -> list[int]:  # type: ignore[no-untyped-def]
    """The receiving processes `serve` started for ``node`` (from /proc, no procps needed)."""
    wanted = ["receive", "--config", str(node.config)]
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if proc.name.isdigit() and any(
            args[k : k + 3] == wanted for k in range(len(args)) if args[k - 1].endswith("pacs-node")
        ):
            pids.append(int(proc.name))
    return pids


def _serving(pids: list[int], node_port: int, peer_port: int) -> int | None:
    """Which of ``pids`` holds the node's end of the connection from ``peer_port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote = f[1], f[2]
        if int(local.split(":")[1], 16) == node_port and int(remote.split(":")[1], 16) == peer_port:
            inodes.add(f[9])
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    return None


def _recorded(node) -> set[str]:  # type: ignore[no-untyped-def]
    with sqlite3.connect(node.tmp / "var" / "jobs.sqlite") as con:
        return {r[0] for r in con.execute("SELECT sop_instance_uid FROM instances")}


def test_concurrent_senders_spread_over_the_processes(tmp_path: Path, node_factory) -> None:
    node = _node(node_factory)
    assert len(_receivers(node)) == 2
    series = [make_series(tmp_path / f"s{k}", n=12, size=64, seed=k) for k in range(4)]
    procs = [
        subprocess.Popen(
            [
                require_tool("storescu"),
                "-aet",
                "STORESCU",
                "-aec",
                "LDCT_DENOISE",
                "127.0.0.1",
                str(node.port),
                *map(str, files),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dcmtk_env(),
        )
        for files in series
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for s in series for f in s}
    assert _recorded(node) == sent
    assert sorted(j["received"] for j in node.status()) == [12, 12, 12, 12]
    # /metrics counts what every process received (the others publish once a second)
    received = ("pacs_node_instances_received_total", ())
    released = ("pacs_node_associations_total", (("outcome", "released"),))

    def both() -> tuple[float | None, float | None]:
        scraped = samples(node.http_port)  # one scrape: both figures from the same moment
        return scraped.get(received), scraped.get(released)

    wait_for(lambda: both() == (48, 4), 10, "48 instances and 4 released associations in /metrics")


def test_max_associations_counts_every_process(tmp_path: Path, node_factory) -> None:
    from pynetdicom import AE

    node = _node(node_factory, max_associations=2)
    # Connections that never negotiate (port probes) are no associations: a few on every process.
    probes = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(18)]
    ae = AE("STORESCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", node.port, ae_title="LDCT_DENOISE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        files = make_series(tmp_path / "s", n=2, size=64)
        for _ in range(3):  # whichever process the kernel hands it to
            third = node.storescu(*map(str, files))
            assert third.returncode != 0
            assert "Local Limit Exceeded" in third.stdout + third.stderr
        assert "node.max_associations (2) reached across receiving processes" in node.log()
    finally:
        for a in held:
            a.release()
        for p in probes:
            p.close()
    assert node.storescu(*map(str, files)).returncode == 0  # slots given back


def test_sigkill_of_a_receiving_process_loses_nothing_acknowledged(
    tmp_path: Path, node_factory
) -> None:
    """A receiving process is killed in the middle of an association: every instance its sender
    got Success for is recorded and on disk; the node starts another process; the rest can be
    sent again."""
    from pynetdicom import AE

    node = _node(node_factory)
    files = make_series(tmp_path / "s", n=30, size=128)
    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE("STORESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    children = _receivers(node)
    victim = None
    for _ in range(30):  # until the kernel hands our association to a child, not the parent
        assoc = ae.associate("127.0.0.1", node.port, ae_title="LDCT_DENOISE")
        assert assoc.is_established
        victim = _serving(children, node.port, assoc.local["port"])
        if victim is not None:
            break
        assoc.release()
    assert victim is not None, "no association landed on a child process"
    acked = []
    for k, ds in enumerate(datasets):
        if k == 10:
            os.kill(victim, signal.SIGKILL)
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            break
        if not assoc.is_established or not status or status.Status != 0:
            break
        acked.append(str(ds.SOPInstanceUID))
    assert 10 <= len(acked) < 30
    assoc.abort()
    recorded = _recorded(node)
    assert set(acked) <= recorded
    for uid in acked:
        assert list((node.tmp / "var" / "received").glob(f"*/{uid}.dcm")), uid
    wait_for(lambda: f"receiving process {victim} ended (exit -9)" in node.log(), 30, "restart")
    wait_for(lambda: len(_receivers(node)) == 2, 30, "a new receiving process")
    assert node.storescu(*map(str, files)).returncode == 0
    assert _recorded(node) == {str(ds.SOPInstanceUID) for ds in datasets}
