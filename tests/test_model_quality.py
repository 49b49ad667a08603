"""The shipped model against the classical denoisers, tuned, on the model card's data sets.

Each set is regenerated from its seed exactly as the model card says; the baselines run at the
strengths `unit-train evaluate --tune-on` picked on each set's held-out twin (recorded beside the
weights in ``evaluation.json``). Acceptance (issue: image quality, ``train.evaluate.unmet``): PSNR
at least 1 dB above the best tuned classical method and SSIM at least the best classical SSIM;
noise SD in uniform regions at most half the low dose's; |HU bias| at most 2 HU. Where the record
says the shipped weights miss it, those tests are expected to fail (``tests/shipped.py``); that
the record matches what the weights do is checked here on every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pacs_node.work.quality import judge, measure
from tests.shipped import MISSES, SETS, acceptance, record, shipped_name
from train import synth
from train.data import pairs, read_series, split_by_dose
from train.evaluate import BASELINES, evaluate_pairs, unmet
from unit_model.denoiser import Denoiser

_EVALUATED: dict[str, dict[str, dict[str, float]]] = {}


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


def _evaluated(kind: str, tmp: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    """The set regenerated and scored once per run: low dose, the recorded baselines, shipped."""
    if kind not in _EVALUATED:
        data = _make(kind, tmp.mktemp(kind) / kind)
        matched = pairs(*split_by_dose(read_series(data)))
        strengths = record()["sets"][kind]["strengths"]
        methods = {"low dose": lambda x: x}
        for b in BASELINES.values():
            methods[b.name] = b.method(strengths[b.name])
        methods[shipped_name()] = Denoiser.from_checkpoint(None, device="cpu").denoise_hu
        _EVALUATED[kind] = evaluate_pairs(matched, methods)["overall"]
    return _EVALUATED[kind]


def test_the_record_covers_the_shipped_weights() -> None:
    sets = record()["sets"]
    assert set(SETS) <= set(sets), "evaluation.json lacks a set: run `unit-train evaluate --record`"
    for kind in SETS:
        assert shipped_name() in sets[kind]["overall"], f"{kind}: recorded for other weights"
        assert set(sets[kind]["strengths"]) == {b.name for b in BASELINES.values()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", SETS)
def test_the_record_is_what_the_weights_and_baselines_do(
    tmp_path_factory: pytest.TempPathFactory, kind: str
) -> None:
    got, kept = _evaluated(kind, tmp_path_factory), record()["sets"][kind]["overall"]
    assert set(got) == set(kept)
    for method, row in got.items():
        assert row["psnr"] == pytest.approx(kept[method]["psnr"], abs=0.05), method
        assert row["ssim"] == pytest.approx(kept[method]["ssim"], abs=0.002), method
        assert row["noise_sd"] == pytest.approx(kept[method]["noise_sd"], abs=0.1), method


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            k,
            marks=pytest.mark.xfail(k in MISSES, reason=f"recorded: {MISSES.get(k)}", strict=True),
        )
        for k in SETS
    ],
)
def test_the_shipped_model_beats_tuned_classical_denoisers(
    tmp_path_factory: pytest.TempPathFactory, kind: str
) -> None:
    assert unmet(_evaluated(kind, tmp_path_factory), shipped_name()) == []


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


def _gate_case(tmp_path: Path) -> np.ndarray:
    synth.synthesize(tmp_path, cases=1, size=512, slices=2, seed=31, extras=False)
    ((low, _),) = pairs(*split_by_dose(read_series(tmp_path)))
    return low.slices


@pytest.mark.slow
@acceptance
def test_the_gate_passes_the_shipped_model(tmp_path: Path) -> None:
    ld = _gate_case(tmp_path)
    model = measure(ld, Denoiser.from_checkpoint(None, device="cpu").denoise_hu(ld))
    assert judge(model, 10, 4).passed, model
    assert model.noise_out < 0.5 * model.noise_in


@pytest.mark.slow
def test_the_gate_holds_a_blur_that_lowers_noise_as_much(tmp_path: Path) -> None:
    from scipy import ndimage

    ld = _gate_case(tmp_path)
    blurred = measure(ld, ndimage.gaussian_filter(ld, (0, 1.5, 1.5)))
    assert blurred.noise_out < 0.5 * blurred.noise_in, blurred
    assert not judge(blurred, 10, 4).passed, blurred
