"""Scale-out on PostgreSQL: several receiving nodes and workers sharing one job table and one
data folder (acceptance of the scale-out issue)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest

from pacs_node.jobs import JobStore
from tests.conftest import make_series, wait_for
from tests.peers import RecordingSCP
from tests.test_worker import MECHANICS, node_config


class CountingSCP(RecordingSCP):
    def __init__(self) -> None:
        super().__init__()
        self.per_uid: Counter[str] = Counter()

    def _store(self, event):  # type: ignore[no-untyped-def]
        status = super()._store(event)
        with self.lock:
            self.per_uid[str(event.request.AffectedSOPInstanceUID)] += 1
        return status


def _shared_config(dest_port: int, checkpoint: Path, url: str) -> str:
    """Nodes sharing one PostgreSQL job table, with room for slow deliveries under load."""
    return node_config(dest_port, checkpoint, MECHANICS, database_url=url).replace(
        "timeout_seconds = 10", "timeout_seconds = 120"
    )


def _all_done(node) -> bool:  # type: ignore[no-untyped-def]
    jobs = node.status()
    return bool(jobs) and all(j["state"] == "done" for j in jobs)


@pytest.mark.slow
def test_two_nodes_three_workers_deliver_every_series_once(
    tmp_path: Path,
    node_factory,
    postgres,
    tiny_checkpoint: Path,
) -> None:
    url = postgres.create_db("scaleout")
    data = tmp_path / "shared-data"
    dest = CountingSCP().start()
    try:
        cfg = _shared_config(dest.port, tiny_checkpoint, url)
        receivers = [node_factory(cfg, data_dir=data).start() for _ in range(2)]
        workers = [
            node_factory(cfg, verb="worker", data_dir=data, workers=1).start(wait=False)
            for _ in range(3)
        ]
        series = [make_series(tmp_path / f"s{k}", n=50, size=32, seed=100 + k) for k in range(18)]
        results = []

        def sender(k: int) -> None:
            node = receivers[k % 2]
            for files in series[3 * k : 3 * k + 3]:
                results.append(node.storescu(*map(str, files)).returncode)

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0] * 18
        wait_for(
            lambda: len(receivers[0].status()) == 18 and _all_done(receivers[0]),
            600,
            "every job done",
        )
        assert len(dest.per_uid) == 900
        assert set(dest.per_uid.values()) == {1}, "an instance was delivered twice"
        served = Counter(w.log().count("job ") > 0 for w in workers)
        assert served[True] >= 2, "the work was not shared"
    finally:
        dest.stop()


@pytest.mark.slow
def test_killed_worker_job_finished_by_another(
    tmp_path: Path,
    node_factory,
    postgres,
    tiny_checkpoint: Path,
) -> None:
    url = postgres.create_db("killworker")
    data = tmp_path / "shared-data"
    dest = CountingSCP().start()
    try:
        cfg = _shared_config(dest.port, tiny_checkpoint, url).replace(
            "batch_size = 8", "batch_size = 1"
        )
        receiver = node_factory(cfg, data_dir=data).start()
        first = node_factory(cfg, verb="worker", data_dir=data, workers=1).start(wait=False)
        files = make_series(tmp_path / "s", n=120, size=256, seed=7, noise_sd=5)
        assert receiver.storescu(*map(str, files)).returncode == 0
        # Read the job table directly: `pacs-node status` takes about a second to start, long
        # enough for the small job to finish before the kill.
        table = JobStore(url)
        try:
            wait_for(lambda: table.list_jobs()[0].denoised >= 16, 300, "denoising under way")
            first.kill()
            job = table.list_jobs()[0]
        finally:
            table.dispose()
        assert job.state == "running" and job.denoised < 120, job
        second = node_factory(cfg, verb="worker", data_dir=data, workers=1).start(wait=False)
        wait_for(
            lambda: receiver.status()[0]["state"] == "done", 600, "the second worker to finish"
        )
        assert len(dest.per_uid) == 120 and set(dest.per_uid.values()) == {1}
        assert (
            "requeued" in second.log()
            or "requeued" in receiver.log()
            or "worker stopped beating" in str(receiver.status()[0]["last_error"])
        )
    finally:
        dest.stop()
