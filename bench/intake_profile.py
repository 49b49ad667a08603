"""Where one C-STORE's time goes in the node: the intake timed piece by piece, in one process.

    .venv/bin/python bench/intake_profile.py [--images 200] [--pynetdicom] [--no-op]

DCMTK storescu sends 512² CT instances in one association to the node's Storage SCP running in
this process; ``perf_counter`` hooks around the intake's pieces give medians per instance.
``--pynetdicom`` serves C-STORE through pynetdicom's own receive path (EVT_C_STORE) instead of
pacs_node.receive.stream; ``--no-op`` answers Success without storing anything, which leaves the
protocol, the sender and the header check (done while the data set arrives; on pynetdicom's
path, once it has).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DCMTK_ENV, free_port, storescu_args

from pacs_node import storage
from pacs_node.config import NodeConfig
from pacs_node.jobs import JobStore
from pacs_node.receive import incoming, intake, rules
from pacs_node.receive.scp import StorageSCP
from train.synth import simple_series

spans: dict[str, list[float]] = defaultdict(list)
order: list[str] = []
responses: list[float] = []


def timed(owner: Any, name: str, label: str) -> None:
    original = getattr(owner, name)
    order.append(label)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spans[label].append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--pynetdicom", action="store_true", help="pynetdicom's receive path")
    ap.add_argument("--no-op", action="store_true", help="answer Success, store nothing")
    args = ap.parse_args()

    from pynetdicom import transport

    send = transport.AssociationSocket.send

    def send_and_note(sock: Any, data: bytes) -> None:
        send(sock, data)
        responses.append(time.perf_counter())

    transport.AssociationSocket.send = send_and_note  # type: ignore[method-assign]
    if args.no_op:
        incoming.Incoming.finish = lambda self: (self.abort(), 0)[1]  # type: ignore[method-assign]
    timed(incoming, "read_header", "while arriving: read the header")
    timed(incoming, "validate", "while arriving: checks")
    timed(incoming.Incoming, "finish", "answering: durable write + record")
    timed(storage.Storage, "commit_temp", "  of answering: fsync, rename, folder fsync")
    timed(JobStore, "record_instance", "  of answering: job-table transaction")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = simple_series(work / "series", n=args.images, size=512, seed=1, noise_sd=15)
        store = storage.Storage(work / "data", 0)
        jobs = JobStore(f"sqlite:///{work / 'jobs.sqlite'}")
        jobs.migrate()
        node_intake = intake.Intake(store, jobs)
        scp = StorageSCP(
            NodeConfig(bind="127.0.0.1", port=free_port()),
            node_intake.handlers(),
            rules.TRANSFER_SYNTAXES,
            None if args.pynetdicom else node_intake,
        )
        scp.start()
        try:
            for _ in range(2):  # the first association warms caches; the second is measured
                spans.clear()
                responses.clear()
                subprocess.run(storescu_args(scp.port, files), check=True, env=DCMTK_ENV)
        finally:
            scp.stop()
            jobs.dispose()
    stores = responses[1:-1]  # without the A-ASSOCIATE-AC and the A-RELEASE-RP
    cycle = [b - a for a, b in itertools.pairwise(stores)]
    path = "pynetdicom's receive path" if args.pynetdicom else "pacs_node.stream"
    print(f"{args.images} instances through {path}{' (no-op handler)' if args.no_op else ''}")
    print(f"{'response to response':44s} {statistics.median(cycle) * 1e3:6.2f} ms")
    for label in order:
        if spans[label]:
            print(f"{label:44s} {statistics.median(spans[label]) * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
