"""Paired evaluation: the low-dose input, classical baselines tuned per data set, and
checkpoints, against the regular-dose reference.

Figures per method: PSNR / SSIM / RMSE in the [-160, 240] HU window; in uniform regions of the
reference, the HU bias against it and the noise SD, also as a fraction of the low-dose input's.

The classical baselines are tuned as their users would tune them: the noise level sigma of each
series is measured on the low-dose image itself, in the uniform soft-tissue regions the node's
quality gate uses, and the strength (a multiple of sigma, or the Gaussian's width) is picked from a
small grid by PSNR on a held-out set, then applied unchanged to the data being scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.restoration import denoise_nl_means

from pacs_node.work.images import save_grid
from pacs_node.work.quality import RegionTally, find_uniform_regions
from train.data import Series

logger = logging.getLogger(__name__)

WINDOW = (-160.0, 240.0)
Method = Callable[[np.ndarray], np.ndarray]  # [N, H, W] HU -> same

KEYS = ("psnr", "ssim", "rmse", "bias", "noise_sd", "noise_fraction")
_FORMAT = {"psnr": ".3f", "ssim": ".4f", "rmse": ".2f", "bias": "+.2f", "noise_sd": ".2f"}


def image_metrics(
    pred: np.ndarray, ref: np.ndarray, lo: float = WINDOW[0], hi: float = WINDOW[1]
) -> dict[str, float]:
    """PSNR (dB), SSIM and RMSE (HU) of [N, H, W] ``pred`` against ``ref``, both clipped to the
    display window [lo, hi]; PSNR and SSIM are means over slices."""
    p, r = np.clip(pred, lo, hi), np.clip(ref, lo, hi)
    rng = hi - lo
    psnr = float(
        np.mean([peak_signal_noise_ratio(r[i], p[i], data_range=rng) for i in range(len(r))])
    )
    ssim = float(
        np.mean([structural_similarity(r[i], p[i], data_range=rng) for i in range(len(r))])
    )
    rmse = float(np.sqrt(np.mean((p - r) ** 2)))
    return {"psnr": psnr, "ssim": ssim, "rmse": rmse}


def noise_sigma(slices: np.ndarray) -> float:
    """The noise SD (HU) of a low-dose series, measured in its own uniform soft-tissue regions;
    NaN when it has none."""
    regions = find_uniform_regions(slices)
    tally = RegionTally()
    tally.add(slices, slices, regions)
    return tally.figures().noise_out


# -- classical baselines -------------------------------------------------------------------------


def _gaussian(s: np.ndarray, sigma: float, strength: float) -> np.ndarray:
    return ndimage.gaussian_filter(s, strength)


def _nlm(s: np.ndarray, sigma: float, strength: float) -> np.ndarray:
    return denoise_nl_means(
        s, h=strength * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
    )


def _bm3d(s: np.ndarray, sigma: float, strength: float) -> np.ndarray:
    import bm3d

    return np.asarray(bm3d.bm3d(s, sigma_psd=strength * sigma))


@dataclass(frozen=True)
class Baseline:
    """A classical denoiser whose strength is one number, tuned over ``grid``."""

    name: str
    grid: tuple[float, ...]
    setting: str  # how a strength reads in the report, with {s} for the value
    _one: Callable[[np.ndarray, float, float], np.ndarray]  # (slice, sigma HU, strength)

    def method(self, strength: float) -> Method:
        """The baseline at ``strength``, sigma measured per series."""

        def run(slices: np.ndarray) -> np.ndarray:
            sigma = noise_sigma(slices)
            if not np.isfinite(sigma):
                sigma = float(np.std(slices - ndimage.median_filter(slices, (1, 3, 3))))
            out = [self._one(s.astype(np.float64), sigma, strength) for s in slices]
            return np.stack(out).astype(np.float32)

        return run

    def describe(self, strength: float) -> str:
        return self.setting.format(s=f"{strength:g}")


BASELINES = {
    "gaussian": Baseline("Gaussian", (0.3, 0.5, 0.7, 1.0, 1.5), "σ = {s} px", _gaussian),
    "nlm": Baseline(
        "NLM",
        (0.4, 0.6, 0.8, 1.0, 1.3),
        "h = {s}·σ (5×5 patches, 13×13 search)",
        _nlm,
    ),
    "bm3d": Baseline("BM3D", (0.75, 1.0, 1.25, 1.5, 2.0), "sigma_psd = {s}·σ", _bm3d),
}


def parse_baselines(text: str) -> list[Baseline]:
    """``"gaussian,nlm,bm3d"`` (or ``none``) -> the baselines, unknown names refused."""
    names = [b.strip().lower() for b in text.split(",") if b.strip() and b.strip() != "none"]
    unknown = [n for n in names if n not in BASELINES]
    if unknown:
        raise ValueError(
            f"unknown baseline {unknown[0]!r}: choose from {', '.join(BASELINES)} or none"
        )
    return [BASELINES[n] for n in names]


def tune(
    baseline: Baseline, pairs: list[tuple[Series, Series]], max_slices: int | None = None
) -> tuple[float, dict[float, float]]:
    """The strength of ``baseline`` with the best mean PSNR on ``pairs``; and every grid
    point's PSNR."""
    scores: dict[float, float] = {}
    for strength in baseline.grid:
        run = baseline.method(strength)
        psnr = []
        for ld, nd in _selected(pairs, max_slices):
            psnr.append(image_metrics(run(ld), nd)["psnr"])
        scores[strength] = float(np.mean(psnr))
        logger.info(
            "tuning %s: %s -> %.3f dB", baseline.name, baseline.describe(strength), scores[strength]
        )
    best = max(scores, key=lambda k: scores[k])
    return best, scores


def _selected(
    pairs: list[tuple[Series, Series]], max_slices: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for low, full in pairs:
        ld, nd = low.slices, full.slices
        if max_slices and len(ld) > max_slices:
            start = max(0, len(ld) // 2 - max_slices // 2)
            ld, nd = ld[start : start + max_slices], nd[start : start + max_slices]
        out.append((ld, nd))
    return out


# -- scoring -------------------------------------------------------------------------------------


def evaluate_pairs(
    pairs: list[tuple[Series, Series]],
    methods: dict[str, Method],
    out_dir: Path | None = None,
    max_slices: int | None = None,
    montage_method: str | None = None,
    settings: dict[str, str] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{series or 'overall': {method: {metric: value}}}; montages and table into ``out_dir``.

    The first method is taken as the low-dose input for ``noise_fraction``.
    """
    results: dict[str, dict[str, dict[str, float]]] = {}
    metrics: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    tallies = {m: RegionTally() for m in methods}
    for (ld, nd), (low, _) in zip(_selected(pairs, max_slices), pairs, strict=True):
        regions = find_uniform_regions(nd)
        name = f"{low.patient}"
        results[name] = {}
        outputs = {}
        for m, fn in methods.items():
            pred = fn(ld)
            outputs[m] = pred
            row = image_metrics(pred, nd)
            series_tally = RegionTally()
            series_tally.add(nd, pred, regions)
            tallies[m].add(nd, pred, regions)
            q = series_tally.figures()
            row.update(bias=q.hu_bias, noise_sd=q.noise_out)
            results[name][m] = row
            metrics[m].append(row)
        if out_dir is not None:
            shown = montage_method or list(methods)[-1]
            mid = len(ld) // 2
            den = outputs[shown][mid]
            save_grid(
                out_dir / f"{name}.png",
                [[ld[mid], den, nd[mid], den - ld[mid] + 40.0]],
                labels=[["low dose", shown, "regular dose", "difference"]],
            )
    overall: dict[str, dict[str, float]] = {}
    for m, rows in metrics.items():
        if not rows:
            continue
        q = tallies[m].figures()  # region figures pooled over every region of every series
        overall[m] = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "rmse")}
        overall[m].update(bias=q.hu_bias, noise_sd=q.noise_out, reference_sd=q.noise_in)
    base = next(iter(overall.values()), {}).get("noise_sd", float("nan"))
    for row in overall.values():
        row["noise_fraction"] = row["noise_sd"] / base if base else float("nan")
    results["overall"] = overall
    if out_dir is not None:
        (out_dir / "evaluation.md").write_text(
            markdown_table(overall, pairs_count=len(pairs), settings=settings)
        )
        (out_dir / "evaluation.json").write_text(
            json.dumps({"overall": overall, "settings": settings or {}}, indent=2)
        )
    return results


def unmet(overall: dict[str, dict[str, float]], model: str) -> list[str]:
    """The points of the shipped model's acceptance that ``model`` misses on one evaluated set
    (``overall`` as ``evaluate_pairs`` returns it, low dose first, classical baselines by their
    names): PSNR at least 1 dB above the best classical method's and SSIM at least the best
    classical SSIM; noise SD in uniform regions at most half the low dose's; |HU bias| at most
    2 HU."""
    low, got = overall["low dose"], overall[model]
    names = {b.name for b in BASELINES.values()}
    classical = {m: r for m, r in overall.items() if m in names}
    problems = []
    if classical:
        best_name, best = max(classical.items(), key=lambda kv: kv[1]["psnr"])
        if got["psnr"] < best["psnr"] + 1.0:
            problems.append(f"PSNR {got['psnr']:.2f} dB < {best_name} {best['psnr']:.2f} + 1 dB")
        ssim_name, ssim_best = max(classical.items(), key=lambda kv: kv[1]["ssim"])
        if got["ssim"] < ssim_best["ssim"]:
            problems.append(f"SSIM {got['ssim']:.4f} < {ssim_name} {ssim_best['ssim']:.4f}")
    if got["noise_sd"] > 0.5 * low["noise_sd"]:
        problems.append(
            f"noise SD {got['noise_sd']:.2f} HU > half the low dose's {low['noise_sd']:.2f} HU"
        )
    if abs(got["bias"]) > 2.0:
        problems.append(f"HU bias {got['bias']:+.2f} beyond 2 HU")
    return problems


def markdown_table(
    overall: dict[str, dict[str, float]],
    pairs_count: int,
    settings: dict[str, str] | None = None,
) -> str:
    floor = next(iter(overall.values()), {}).get("reference_sd", float("nan"))
    lines = [
        f"Series: {pairs_count}. PSNR (dB), SSIM and RMSE (HU) against the regular dose in the "
        f"[{WINDOW[0]:g}, {WINDOW[1]:g}] HU window; HU bias against it and noise SD (HU) in its "
        f"uniform regions (the regular dose's own SD there: {floor:.2f} HU); noise fraction = "
        "noise SD ÷ the low-dose input's.",
        "",
        "| method | setting | PSNR | SSIM | RMSE | bias | noise SD | noise fraction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, row in overall.items():
        cells = [f"{row[k]:{_FORMAT[k]}}" for k in KEYS[:-1]]
        cells.append(f"{row['noise_fraction']:.0%}")
        setting = (settings or {}).get(m, "")
        lines.append(f"| {m} | {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
