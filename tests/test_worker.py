"""The worker with real peers: DCMTK storescu in, Orthanc or a recording SCP out."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_node.work.dicom_io import derive, derived_uid, read_hu
from tests.conftest import BIN, NodeProcess, make_series, wait_for
from tests.peers import RecordingSCP


def node_config(
    dest_port: int, checkpoint: Path | None, extra: str = "", database_url: str | None = None
) -> str:
    model = f'checkpoint = "{checkpoint}"\n' if checkpoint else ""
    db = f'database_url = "{database_url}"\n' if database_url else ""
    return (
        f"[queue]\n{db}series_quiet_seconds = 0.5\nheartbeat_seconds = 0.5\n"
        "stale_after_seconds = 3\n"
        f"[model]\n{model}batch_size = 8\n"
        f'[destination]\nae_title = "PACS"\nport = {dest_port}\nretry_backoff_seconds = 0.5\n'
        f"retry_backoff_max_seconds = 2\nmax_attempts = 30\ntimeout_seconds = 10\n{extra}"
    )


MECHANICS = "[quality]\nforward_on_failure = true\n"


def test_derive_sets_provenance_and_keeps_geometry(tmp_path: Path) -> None:
    src = pydicom.dcmread(make_series(tmp_path, n=1)[0])
    hu = read_hu(src) - 5
    d = derive(
        src,
        hu,
        model_version="abc123def456",
        software_version="0.1.0",
        series_number_offset=1000,
        series_description_suffix=" (UNIT denoised)",
    )
    assert d.StudyInstanceUID == src.StudyInstanceUID and d.PatientID == src.PatientID
    assert d.SeriesInstanceUID != src.SeriesInstanceUID and d.SOPInstanceUID != src.SOPInstanceUID
    assert d.SOPInstanceUID == derived_uid(src.SOPInstanceUID, "abc123def456", "instance")
    assert d.SeriesNumber == src.SeriesNumber + 1000
    blended = derive(
        src,
        hu,
        model_version="abc123def456 strength 0.7",
        strength=0.7,
        software_version="0.1.0",
        series_number_offset=1000,
        series_description_suffix=" (UNIT denoised)",
    )
    assert blended.SeriesDescription.endswith(" (UNIT denoised) [strength 0.7]")
    assert blended.SOPInstanceUID != d.SOPInstanceUID
    assert "strength 0.7" in blended.DerivationDescription
    assert d.SeriesDescription == "Low Dose Images (UNIT denoised)"
    assert list(d.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert d.DerivationCodeSequence[0].CodeValue == "113087"
    assert d.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "abc123def456" in d.DerivationDescription
    assert d.ContributingEquipmentSequence[-1].Manufacturer == "ldct-pacs-node"
    for key in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "FrameOfReferenceUID",
        "WindowCenter",
        "WindowWidth",
        "BitsStored",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        assert d[key].value == src[key].value, key
    assert d.BurnedInAnnotation == "NO" and d.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    np.testing.assert_allclose(read_hu(d), np.clip(np.rint(hu), -1024, 3071))


def test_pipeline_to_recording_scp_with_retries(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    """Destination answering 0xA700 first, then accepting: everything delivered, once."""
    dest = RecordingSCP(fail_first=3).start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1).start()
        files = make_series(tmp_path / "s", n=12, noise_sd=10)
        assert node.storescu(*map(str, files)).returncode == 0
        wait_for(lambda: node.status()[0]["state"] == "done", 120, "job done")
        assert len(dest.received) == 12 and dest.calls == 15
        jobs = node.status()
        job = jobs[0]
        assert len(jobs) == 1 and job["quality"] is not None, (jobs, node.log())
        assert job["delivered"] == 12 and job["quality"]["regions"] > 0
        assert "0xA700" in node.log()
        # retention: files of a delivered job are gone
        assert list((node.tmp / "var" / "received").glob("*/*.dcm")) == []
        assert list((node.tmp / "var" / "derived").glob("*/*.dcm")) == []
    finally:
        dest.stop()


def test_destination_down_then_up(tmp_path: Path, node_factory, tiny_checkpoint: Path) -> None:
    dest = RecordingSCP()
    node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1).start()
    files = make_series(tmp_path / "s", n=8, noise_sd=10)
    assert node.storescu(*map(str, files)).returncode == 0
    wait_for(
        lambda: node.status()[0]["destinations"]["default"].get("attempts", 0) >= 2,
        60,
        "failed attempts",
    )
    job = node.status()[0]
    assert job["state"] in ("ready", "running", "forwarding")
    assert "PACS@127.0.0.1" in (job["last_error"] or "")
    assert "PACS@127.0.0.1" in job["destinations"]["default"]["last_error"]
    time.sleep(max(0.0, 20 - 5))  # the destination stays down for ~20 s in all
    dest.start()
    try:
        wait_for(lambda: node.status()[0]["state"] == "done", 60, "delivery")
        assert len(dest.received) == 8
    finally:
        dest.stop()


def test_failed_job_visible_and_retry_requeues(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    dest = RecordingSCP()
    node = node_factory(
        node_config(dest.port, tiny_checkpoint, MECHANICS).replace(
            "max_attempts = 30", "max_attempts = 2"
        ),
        workers=1,
    ).start()
    assert node.storescu(*map(str, make_series(tmp_path / "s", n=4, noise_sd=10))).returncode == 0
    wait_for(lambda: node.status()[0]["state"] == "failed", 60, "job to fail")
    job = node.status()[0]
    assert job["destinations"]["default"]["attempts"] == 2
    assert job["denoised"] == 4 and job["delivered"] == 0
    dest.start()
    try:
        retry = [str(BIN / "pacs-node"), "retry", str(job["id"]), "--config", str(node.config)]
        wrong = subprocess.run([*retry, "--destination", "nowhere"], capture_output=True, text=True)
        assert wrong.returncode != 0 and "has no destination 'nowhere'" in wrong.stderr
        out = subprocess.run(
            [*retry, "--destination", "default"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        wait_for(lambda: node.status()[0]["state"] == "done", 60, "delivery after retry")
        assert len(dest.received) == 4
        again = subprocess.run(
            [str(BIN / "pacs-node"), "retry", str(job["id"]), "--config", str(node.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode != 0 and "is done, not failed" in again.stderr
    finally:
        dest.stop()


def test_quality_gate_holds_a_series_the_model_does_not_improve(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    dest = RecordingSCP().start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint), workers=1).start()
        assert (
            node.storescu(*map(str, make_series(tmp_path / "s", n=4, noise_sd=10))).returncode == 0
        )
        wait_for(lambda: node.status()[0]["state"] == "failed", 60, "held series")
        job = node.status()[0]
        assert "quality gate" in job["last_error"] and "not below" in job["last_error"]
        assert dest.received == {}
        # `pacs-node retry` is the admin's override: the held series is forwarded as it is
        retry = [str(BIN / "pacs-node"), "retry", str(job["id"]), "--config", str(node.config)]
        assert subprocess.run(retry, capture_output=True, timeout=60).returncode == 0
        wait_for(lambda: node.status()[0]["state"] == "done", 60, "forwarded after retry")
        assert len(dest.received) == 4
    finally:
        dest.stop()


def test_missing_checkpoint_refuses_to_start(tmp_path: Path, node_factory) -> None:
    node = node_factory(node_config(4242, tmp_path / "absent.safetensors"), workers=1)
    node.start(wait=False)
    assert node.proc is not None
    assert node.proc.wait(60) == 1
    assert "no usable model checkpoint" in node.log() and "Traceback" not in node.log()


def _processed(node: NodeProcess) -> int:
    """Instances denoised (or further) so far."""
    import sqlite3

    with sqlite3.connect(node.tmp / "var" / "jobs.sqlite") as con:
        return int(
            con.execute("SELECT count(*) FROM instances WHERE state != 'received'").fetchone()[0]
        )


@pytest.mark.parametrize("phase", ["denoising", "forwarding"])
def test_sigkill_then_restart_delivers_exactly_the_series(
    tmp_path: Path, node_factory, tiny_checkpoint: Path, phase: str
) -> None:
    dest = RecordingSCP().start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1).start()
        files = make_series(tmp_path / "s", n=60, size=128, noise_sd=10)
        assert node.storescu(*map(str, files)).returncode == 0
        if phase == "denoising":
            # Read the job table directly: `pacs-node status` takes longer to start than the
            # rest of this small job takes to finish.
            wait_for(lambda: _processed(node) >= 16, 120, "some denoised")
        else:
            wait_for(lambda: len(dest.received) >= 5, 120, "some forwarded")
        node.kill()
        state = node.status()[0]
        assert state["delivered"] < 60
        node.start()
        wait_for(lambda: node.status()[0]["state"] == "done", 180, "done after restart")
        assert len(dest.received) == 60
        src = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        refs = {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in dest.received.values()}
        assert refs == src
    finally:
        dest.stop()


def test_keep_days_keeps_files_until_the_sweep_finds_them_old(
    tmp_path: Path, node_factory, tiny_checkpoint: Path
) -> None:
    import sqlite3

    from pacs_node.config import load
    from pacs_node.jobs import JobStore
    from pacs_node.storage import Storage

    dest = RecordingSCP().start()
    try:
        node = node_factory(node_config(dest.port, tiny_checkpoint, MECHANICS), workers=1)
        node.config.write_text(
            node.config.read_text().replace(
                "min_free_bytes = 0", "min_free_bytes = 0\nkeep_days = 1"
            )
        )
        node.start()
        assert (
            node.storescu(*map(str, make_series(tmp_path / "s", n=3, noise_sd=10))).returncode == 0
        )
        wait_for(lambda: node.status()[0]["state"] == "done", 60, "job done")
        node.stop()
        received = list((node.tmp / "var" / "received").glob("*/*.dcm"))
        assert len(received) == 3 and len(list((node.tmp / "var" / "derived").glob("*/*.dcm"))) == 3
        cfg = load(node.config)
        jobs, storage = JobStore(cfg.queue.database_url), Storage(cfg.storage.data_dir)
        assert jobs.sweep(storage, cfg.storage.keep_days) == 0  # delivered just now: kept
        with sqlite3.connect(node.tmp / "var" / "jobs.sqlite") as con:
            con.execute("UPDATE jobs SET updated_at = updated_at - 2 * 86400")
        assert jobs.sweep(storage, cfg.storage.keep_days) == 3
        assert list((node.tmp / "var" / "received").glob("*/*.dcm")) == []
        assert list((node.tmp / "var" / "derived").glob("*/*.dcm")) == []
        assert jobs.sweep(storage, cfg.storage.keep_days) == 0
    finally:
        dest.stop()


def test_what_arrives_while_a_series_is_denoised_joins_the_same_run(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A series still arriving is denoised in one run: instances stored while the network works
    are read and queued behind what it has, not left for another round (on two cores a round per
    arrival left a core idle at each end)."""
    import threading

    from pacs_node.config import Config
    from pacs_node.jobs import InstanceState, JobStore
    from pacs_node.jobs.queries import Completion
    from pacs_node.storage import Storage
    from pacs_node.work.series import SeriesProcessor, SeriesQuality
    from unit_model.denoiser import Denoiser

    files = make_series(tmp_path / "s", n=40, size=64, noise_sd=10)
    jobs = JobStore(f"sqlite:///{tmp_path}/jobs.sqlite")
    jobs.migrate()

    def arrive(part: list[Path]) -> None:
        for f in part:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            jobs.record_instance(
                sop_uid=ds.SOPInstanceUID,
                series_uid=ds.SeriesInstanceUID,
                study_uid=ds.StudyInstanceUID,
                path=str(f),
            )

    arrive(files[:8])
    claim = jobs.claim("w", Completion(60), early_chunk=1)
    assert claim is not None
    denoiser = Denoiser.from_checkpoint(tiny_checkpoint, device="cpu")
    submitted: list[int] = []
    submit = denoiser.submit_hu

    def arriving(hu: np.ndarray):  # type: ignore[no-untyped-def]
        submitted.append(len(hu))
        if len(submitted) == 1:
            arrive(files[8:])  # the rest comes while the first chunk is in the network
        return submit(hu)

    denoiser.submit_hu = arriving  # type: ignore[method-assign]
    series = SeriesProcessor(Config(), jobs, Storage(tmp_path / "data", 0), denoiser)
    assert series.denoise(claim, threading.Event(), "w", SeriesQuality()) == 40
    assert submitted == [8, 16, 16]
    assert jobs.pending_instances(claim, InstanceState.RECEIVED) == []
    assert len(jobs.pending_instances(claim, InstanceState.DENOISED)) == 40
