"""The shipped model against the classical denoisers, tuned, on the model card's data sets.

Each set is regenerated from its seed exactly as the model card says; the baselines run at the
strengths `unit-train evaluate --tune-on` picked on each set's held-out twin (recorded beside the
weights in ``evaluation.json``). Acceptance (issue: image quality): PSNR at least 1 dB above the
best tuned classical method and SSIM at least its SSIM; noise SD in uniform regions at most half
the low dose's; |HU bias| at most 2 HU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pacs_node.work.quality import judge, measure
from train import synth
from train.data import pairs, read_series, split_by_dose
from train.evaluate import BASELINES, evaluate_pairs
from unit_model import checkpoint as ckpt
from unit_model.denoiser import Denoiser

RECORD = ckpt.SHIPPED.parent / "evaluation.json"


def _record() -> dict[str, Any]:
    return dict(json.loads(RECORD.read_text()))


def _make(kind: str, out: Path) -> Path:
    """The model card's data sets, by name."""
    if kind == "test":  # ramp filter, quarter dose: as trained
        synth.synthesize(out, cases=5, size=512, slices=4, seed=200, extras=False)
    elif kind == "unseen":  # a filter and a dose the training never used
        synth.synthesize(
            out,
            cases=5,
            size=512,
            slices=4,
            seed=400,
            extras=False,
            filters=("shepp-logan",),
            dose=synth.DoseChoice(0.33, 0.33),
        )
    elif kind == "ctsmall":  # real anatomy the training never saw
        from pydicom.data import get_testdata_file

        src = out.parent / f"{out.name}-src"
        src.mkdir()
        (src / "CT_small.dcm").write_bytes(
            Path(str(get_testdata_file("CT_small.dcm", download=False))).read_bytes()
        )
        synth.synthesize_from(
            src,
            out,
            dose=synth.DoseChoice(0.25, 0.25),
            filters=("ramp",),
            seed=600,
            repeat=8,
            progress=False,
        )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["test", "unseen", "ctsmall"])
def test_the_shipped_model_beats_tuned_classical_denoisers(tmp_path: Path, kind: str) -> None:
    record = _record()["sets"][kind]
    data = _make(kind, tmp_path / kind)
    matched = pairs(*split_by_dose(read_series(data)))
    den = Denoiser.from_checkpoint(None, device="cpu")
    methods = {"low dose": lambda x: x}
    for b in BASELINES.values():
        methods[b.name] = b.method(record["strengths"][b.name])
    methods["shipped"] = den.denoise_hu
    overall = evaluate_pairs(matched, methods)["overall"]
    low, model = overall["low dose"], overall["shipped"]
    classical = {b.name: overall[b.name] for b in BASELINES.values()}
    best = max(classical.values(), key=lambda r: r["psnr"])
    assert model["psnr"] >= best["psnr"] + 1.0, (model, classical)
    assert model["ssim"] >= best["ssim"], (model, classical)
    assert model["noise_sd"] <= 0.5 * low["noise_sd"], (model, low)
    assert abs(model["bias"]) <= 2.0, model


@pytest.mark.slow
def test_the_shipped_model_passes_values_outside_its_window_unchanged() -> None:
    den = Denoiser.from_checkpoint(None, device="cpu")
    rng = np.random.default_rng(0)
    hu = (40 + 20 * rng.standard_normal((1, 256, 256))).astype(np.float32)
    hu[0, :20] = -2048.0  # padding outside the field of view
    hu[0, 100:110, 100:110] = 3000.0  # metal
    hu[0, 200:210, 30:40] = 1500.0  # dense bone
    out = den.denoise_hu(hu)
    outside = (hu < den.window.lower) | (hu > den.window.upper)
    assert outside.sum() > 5000
    assert np.array_equal(out[outside], hu[outside])
    assert not np.array_equal(out[~outside], hu[~outside])  # and it does denoise the rest


@pytest.mark.slow
def test_the_gate_passes_the_shipped_model_and_holds_a_blur(tmp_path: Path) -> None:
    from scipy import ndimage

    synth.synthesize(tmp_path, cases=1, size=512, slices=2, seed=31, extras=False)
    ((low, _),) = pairs(*split_by_dose(read_series(tmp_path)))
    ld = low.slices
    model = measure(ld, Denoiser.from_checkpoint(None, device="cpu").denoise_hu(ld))
    assert judge(model, 10, 4).passed, model
    assert model.noise_out < 0.5 * model.noise_in
    blurred = measure(ld, ndimage.gaussian_filter(ld, (0, 1.5, 1.5)))
    assert not judge(blurred, 10, 4).passed and blurred.noise_out < model.noise_in, blurred
