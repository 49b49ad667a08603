"""`pacs-node demo`, smaller: a report with a montage and the figures, from a fresh folder."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from PIL import Image

from tests.conftest import BIN


def test_demo_writes_report_and_montage(tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = subprocess.run(
        [str(BIN / "pacs-node"), "demo", "--out", str(out), "--slices", "6", "--size", "128"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"report: {out / 'report.html'}" in res.stdout
    figures = json.loads((out / "figures.json").read_text())
    assert figures["state"] == "done" and figures["derived_instances"] == 6
    assert {"hu_bias", "noise_low_dose", "noise_denoised", "noise_regular_dose"} <= set(figures)
    html = (out / "report.html").read_text()
    assert "series-1.png" in html and "noise_denoised" in html
    assert Image.open(out / "series-1.png").size[0] == 4 * 128
