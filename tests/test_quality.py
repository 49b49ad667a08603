"""The quality gate's figures and verdict, without a network: a perfect denoiser and a blur."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pacs_node.work.quality import QualityFigures, judge, measure
from train import synth
from train.data import pairs, read_series, split_by_dose


@pytest.fixture(scope="module")
def quarter_dose(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    out: Path = tmp_path_factory.mktemp("pair")
    synth.synthesize(out, cases=1, size=384, slices=2, seed=4, extras=False, fov_mm=285)
    ((ld, nd),) = pairs(*split_by_dose(read_series(out)))
    return ld.slices, nd.slices


def test_judge_names_each_problem() -> None:
    ok = QualityFigures(hu_bias=0.5, noise_in=20, noise_out=8, regions=4, edge_ratio=1.2)
    assert judge(ok, 10, 4).passed
    bad = QualityFigures(hu_bias=-12, noise_in=20, noise_out=21, regions=4, edge_ratio=9)
    verdict = judge(bad, 10, 4)
    assert not verdict.passed and len(verdict.problems) == 3
    assert "max_hu_bias" in verdict.problems[0] and "not below" in verdict.problems[1]
    assert "max_edge_ratio" in verdict.problems[2]
    none = QualityFigures(float("nan"), float("nan"), float("nan"), 0)
    assert not judge(none, 10, 4).measurable and judge(none, 10, 4).passed


def test_removing_noise_passes_and_blurring_anatomy_fails(
    quarter_dose: tuple[np.ndarray, np.ndarray],
) -> None:
    ld, nd = quarter_dose
    perfect = measure(ld, nd)  # removes exactly the added noise
    assert perfect.edge_ratio < 2.0, perfect
    assert judge(perfect, 10, 4).passed
    # a Gaussian blur lowers the noise just as well, but what it removes is mostly edges
    for sigma in (1.0, 2.0):
        blurred = measure(ld, ndimage.gaussian_filter(ld, (0, sigma, sigma)))
        assert blurred.noise_out < 0.8 * blurred.noise_in
        verdict = judge(blurred, 10, 4)
        assert blurred.edge_ratio > 4.0 and not verdict.passed, blurred
        assert any("removed structure" in p for p in verdict.problems)
