"""`pacs-node demo`, smaller: a report with a montage and the figures, from a fresh folder."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from PIL import Image

from tests.conftest import BIN


def test_demo_writes_report_and_montage(tmp_path: Path) -> None:
    """At the default matrix, the low dose carries a quarter-dose abdomen's noise (15-25 HU in
    soft tissue) and the report states how much of it the node removed."""
    out = tmp_path / "report"
    res = subprocess.run(
        [str(BIN / "pacs-node"), "demo", "--out", str(out), "--slices", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"report: {out / 'report.html'}" in res.stdout
    figures = json.loads((out / "figures.json").read_text())
    assert figures["state"] == "done" and figures["derived_instances"] == 4
    assert {"hu_bias", "noise_low_dose", "noise_denoised", "noise_regular_dose"} <= set(figures)
    assert 15.0 <= figures["noise_low_dose"] <= 25.0, figures
    reduction = 1 - figures["noise_denoised"] / figures["noise_low_dose"]
    assert figures["noise_reduction"] == f"{reduction:.0%}", figures
    html = (out / "report.html").read_text()
    assert "series-1.png" in html and "noise_reduction" in html
    # the whole slice and, below it, the enlarged soft-tissue crop: both rows 512 high
    assert Image.open(out / "series-1.png").size == (4 * 512, 2 * 512)
