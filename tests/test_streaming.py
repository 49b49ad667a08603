"""Denoising while a series arrives, and completing it on the sender's release (DCMTK storescu in,
a recording SCP out, the node as a process)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import make_series, wait_for
from tests.peers import RecordingSCP
from tests.test_worker import MECHANICS, node_config

ON_RELEASE = 'complete_on = ["quiet", "release"]\nrelease_grace_seconds = 0.5\n'


def _config(dest: RecordingSCP, checkpoint: Path, quiet: float, queue: str = "") -> str:
    base = node_config(dest.port, checkpoint, MECHANICS)
    return base.replace("series_quiet_seconds = 0.5\n", f"series_quiet_seconds = {quiet}\n{queue}")


def _table(node, sql: str) -> list[tuple]:  # type: ignore[no-untyped-def]
    with sqlite3.connect(node.tmp / "var" / "jobs.sqlite") as con:
        return list(con.execute(sql).fetchall())


def _sources(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


def _refs(dest: RecordingSCP) -> set[str]:
    return {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in dest.received.values()}


def test_released_series_are_forwarded_without_waiting_for_quiet(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """Two series in one association: both complete when it is released (plus the grace),
    long before the 60 s quiet time; each is delivered whole, once."""
    dest = RecordingSCP().start()
    try:
        node = node_factory(_config(dest, tiny_checkpoint, 60, ON_RELEASE), workers=1).start()
        a = make_series(tmp_path / "a", n=24, size=96, noise_sd=10)
        b = make_series(tmp_path / "b", n=12, size=96, seed=1, noise_sd=10)
        t0 = time.monotonic()
        assert node.storescu(*map(str, a + b)).returncode == 0
        wait_for(lambda: len(dest.received) == 36, 45, "both series delivered")
        assert time.monotonic() - t0 < 45
        jobs = node.status()
        assert sorted(j["state"] for j in jobs) == ["done", "done"]
        assert sorted(j["delivered"] for j in jobs) == [12, 24]
        assert dest.calls == 36 and _refs(dest) == _sources(a + b)
    finally:
        dest.stop()


def test_a_series_over_several_associations_is_one_job(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """Three associations back to back, each a third of the series and each released: the grace
    bridges the gaps, so the series completes once, with every instance, as one job."""
    dest = RecordingSCP().start()
    try:
        queue = 'complete_on = ["quiet", "release"]\nrelease_grace_seconds = 3\n'
        node = node_factory(_config(dest, tiny_checkpoint, 60, queue), workers=1).start()
        files = make_series(tmp_path / "s", n=30, size=96, noise_sd=10)
        for part in (files[:10], files[10:20], files[20:]):
            assert node.storescu(*map(str, part)).returncode == 0
        wait_for(lambda: len(dest.received) == 30, 45, "the series delivered")
        time.sleep(1)
        jobs = node.status()
        assert [(j["round"], j["state"], j["delivered"]) for j in jobs] == [(1, "done", 30)]
        assert dest.calls == 30 and _refs(dest) == _sources(files)
    finally:
        dest.stop()


def test_an_aborted_association_does_not_complete_its_series(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """storescu --abort: what arrived is denoised meanwhile (status shows it), but nothing is
    forwarded until the series has been quiet."""
    dest = RecordingSCP().start()
    try:
        node = node_factory(_config(dest, tiny_checkpoint, 8, ON_RELEASE), workers=1).start()
        files = make_series(tmp_path / "s", n=40, size=96, noise_sd=10)
        sent = time.monotonic()
        assert node.storescu(*map(str, files), opts=("--abort",)).returncode == 0
        wait_for(lambda: node.status()[0]["denoised"] >= 32, 30, "chunks denoised early")
        job = node.status()[0]
        assert job["state"] in ("receiving", "running") and dest.calls == 0, job
        assert time.monotonic() - sent < 8  # still inside the quiet time
        wait_for(lambda: len(dest.received) == 40, 60, "delivered once quiet")
        assert dest.calls == 40
    finally:
        dest.stop()


def test_a_series_denoised_whole_while_it_arrives_is_still_judged(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """Every slice denoised before the series completes: the gate still judges it once it is
    complete, and holds it (the tiny model does not lower the noise), so nothing leaves."""
    dest = RecordingSCP().start()
    try:
        queue = 'complete_on = ["quiet", "release"]\nrelease_grace_seconds = 3\n'
        config = node_config(dest.port, tiny_checkpoint).replace(
            "series_quiet_seconds = 0.5\n", f"series_quiet_seconds = 60\n{queue}"
        )
        node = node_factory(config, workers=1).start()
        files = make_series(tmp_path / "s", n=16, size=96, noise_sd=10)
        assert node.storescu(*map(str, files)).returncode == 0
        wait_for(lambda: node.status()[0]["denoised"] == 16, 30, "denoised while arriving")
        wait_for(lambda: node.status()[0]["state"] == "failed", 30, "judged once complete")
        job = node.status()[0]
        assert "quality gate" in job["last_error"] and job["quality"]["regions"] == 16, job
        assert "denoised as far as it has arrived" in node.log()  # the path this test is for
        assert dest.calls == 0
    finally:
        dest.stop()


@pytest.mark.parametrize("complete_on", ["quiet", "release"])
def test_sigkill_half_received_half_denoised_then_restart(
    tmp_path: Path, node_factory, tiny_checkpoint: Path, complete_on: str
) -> None:
    """The node is killed while the first part of a series is being denoised and the rest has
    not been sent; after a restart the rest arrives: every instance acknowledged is delivered,
    each derived instance exactly once."""
    dest = RecordingSCP().start()
    queue = ON_RELEASE if complete_on == "release" else ""
    try:
        node = node_factory(_config(dest, tiny_checkpoint, 6, queue), workers=1).start()
        files = make_series(tmp_path / "s", n=60, size=128, noise_sd=10)
        # first part without a release, so that neither rule can complete it before the kill
        assert node.storescu(*map(str, files[:40]), opts=("--abort",)).returncode == 0
        wait_for(
            lambda: (
                _table(node, "SELECT count(*) FROM instances WHERE state = 'denoised'")[0][0] >= 16
            ),
            60,
            "part of it denoised",
        )
        node.kill()
        assert dest.calls == 0
        node.start()
        assert node.storescu(*map(str, files[40:])).returncode == 0
        wait_for(lambda: node.status()[0]["state"] == "done", 120, "done after restart")
        assert dest.calls == 60 and _refs(dest) == _sources(files)
        assert [j["round"] for j in node.status()] == [1]
    finally:
        dest.stop()
