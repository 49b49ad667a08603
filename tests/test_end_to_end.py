"""The shipped model end to end: DCMTK storescu -> node -> Orthanc (acceptance of the worker)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_node.work.dicom_io import read_hu
from pacs_node.work.quality import measure
from tests.conftest import BIN, require_tool, wait_for
from tests.peers import Orthanc
from tests.shipped import acceptance
from train import synth
from unit_model.checkpoint import SHIPPED


@pytest.fixture(scope="module")
def quarter_dose(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 30-slice quarter-dose synthetic series (256^2 over a 380 mm field of view)."""
    out = tmp_path_factory.mktemp("ld")
    synth.synthesize(
        out, cases=1, dose=0.25, seed=42, size=256, slices=30, fov_mm=380.0, extras=False
    )
    return sorted(out.rglob("1.000000-Low Dose Images-*/*.dcm"))


def _config(dest: Orthanc, extra: str = "") -> str:
    return (
        f'[queue]\nseries_quiet_seconds = 1\n[destination]\nae_title = "{dest.aet}"\n'
        f"port = {dest.port}\n{extra}"
    )


def _send_and_wait(node, files: list[Path], round_: int = 1) -> dict:  # type: ignore[no-untyped-def]
    assert node.storescu(*map(str, files)).returncode == 0
    wait_for(
        lambda: (
            node.status()
            and node.status()[0]["round"] == round_
            and node.status()[0]["state"] in ("done", "failed")
        ),
        300,
        "job",
    )
    return dict(node.status()[0])


def _derived_from_orthanc(orthanc: Orthanc, tmp_path: Path) -> list[Path]:
    series = [
        s
        for s in orthanc.series()
        if "(UNIT denoised)" in s["MainDicomTags"].get("SeriesDescription", "")
    ]
    assert len(series) == 1
    paths = []
    for iid in series[0]["Instances"]:
        path = tmp_path / f"{iid}.dcm"
        path.write_bytes(orthanc.get_bytes(f"/instances/{iid}/file"))
        paths.append(path)
    return paths


@pytest.mark.slow
def test_series_into_orthanc_same_study_valid_and_idempotent(
    tmp_path: Path, node_factory, quarter_dose: list[Path]
) -> None:
    """The pipeline with the shipped model, forwarding whatever the gate says (so that this holds
    for any weights): Orthanc gets one derived series of 30 in the source's study, every file
    passes dciodvfy, and sending the series again leaves 30 derived instances, not 60."""
    orthanc = Orthanc(tmp_path).start()
    try:
        gate = "[quality]\nforward_on_failure = true\n"
        node = node_factory(_config(orthanc, gate), workers=1).start()
        job = _send_and_wait(node, quarter_dose)
        assert job["state"] == "done", job
        derived = _derived_from_orthanc(orthanc, tmp_path)
        assert len(derived) == 30
        source = pydicom.dcmread(quarter_dose[0], stop_before_pixels=True)
        for path in derived:
            check = subprocess.run(
                [require_tool("dciodvfy"), str(path)], capture_output=True, text=True
            )
            assert "Error" not in check.stdout + check.stderr, check.stdout + check.stderr
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert orthanc.instance_count() == 30
        _send_and_wait(node, quarter_dose, round_=2)
        assert orthanc.instance_count() == 30
    finally:
        orthanc.stop()


@pytest.mark.slow
@acceptance
def test_shipped_model_lowers_noise_without_hu_bias(
    tmp_path: Path, node_factory, quarter_dose: list[Path]
) -> None:
    """With the default quality gate, the shipped model's series is forwarded, less noisy."""
    assert SHIPPED.exists(), "the shipped checkpoint is missing"
    orthanc = Orthanc(tmp_path).start()
    try:
        node = node_factory(_config(orthanc), workers=1).start()
        job = _send_and_wait(node, quarter_dose)
        assert job["state"] == "done", job["last_error"]
        derived = {}
        for path in _derived_from_orthanc(orthanc, tmp_path):
            ds = pydicom.dcmread(path)
            derived[ds.SourceImageSequence[0].ReferencedSOPInstanceUID] = read_hu(ds)
        src = {pydicom.dcmread(p).SOPInstanceUID: read_hu(pydicom.dcmread(p)) for p in quarter_dose}
        keys = sorted(src)
        figures = measure(np.stack([src[k] for k in keys]), np.stack([derived[k] for k in keys]))
        assert figures.regions > 0
        assert figures.noise_out < figures.noise_in, figures
        assert abs(figures.hu_bias) < 10, figures
    finally:
        orthanc.stop()


def test_jpeg_lossless_copy_gives_identical_derived_pixels(
    tmp_path: Path, quarter_dose: list[Path]
) -> None:
    plain, jpeg = tmp_path / "plain", tmp_path / "jpeg"
    plain.mkdir()
    jpeg.mkdir()
    for p in quarter_dose[:6]:
        (plain / p.name).write_bytes(p.read_bytes())
        subprocess.run([require_tool("dcmcjpeg"), "+e1", str(p), str(jpeg / p.name)], check=True)
    outs = []
    for src in (plain, jpeg):
        out = tmp_path / f"out-{src.name}"
        res = subprocess.run(
            [str(BIN / "pacs-node"), "denoise", str(src), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stderr
        outs.append(
            {
                pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).pixel_array
                for f in out.rglob("*.dcm")
            }
        )
    assert len(outs[0]) == 6 and outs[0].keys() == outs[1].keys()
    for uid in outs[0]:
        assert np.array_equal(outs[0][uid], outs[1][uid])
