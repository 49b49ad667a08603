"""Paired evaluation: the low-dose input, non-local means, BM3D and a checkpoint against the
regular-dose reference. PSNR / SSIM / RMSE in two display windows; HU bias and noise SD in
uniform regions of the reference."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.restoration import denoise_nl_means, estimate_sigma

from pacs_node.images import save_grid
from pacs_node.quality import find_uniform_regions
from train.data import Series

logger = logging.getLogger(__name__)

WINDOWS = {"[-160,240]": (-160.0, 240.0), "C50/W400": (-150.0, 250.0)}
Method = Callable[[np.ndarray], np.ndarray]  # [N, H, W] HU -> same


# Small differences matter here (a model barely above its input): one more digit than usual.
_DIGITS = {"psnr": 3, "ssim": 4}


def image_metrics(pred: np.ndarray, ref: np.ndarray, lo: float, hi: float) -> dict[str, float]:
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


def region_figures(
    pred: np.ndarray, ref: np.ndarray, regions: list[tuple[int, int, int, int]]
) -> dict[str, float]:
    if not regions:
        return {"bias": float("nan"), "noise_sd": float("nan")}
    bias, sd = [], []
    for k, r, c, h in regions:
        p = pred[k, r - h : r + h, c - h : c + h]
        q = ref[k, r - h : r + h, c - h : c + h]
        bias.append(float(np.mean(p - q)))
        sd.append(float(np.std(p)))
    return {"bias": float(np.mean(bias)), "noise_sd": float(np.mean(sd))}


def nlm(slices: np.ndarray) -> np.ndarray:
    """skimage non-local means per slice, sigma estimated, in a soft-tissue scaling."""
    out = np.empty_like(slices)
    for i, s in enumerate(slices):
        x = (s + 1024.0) / 400.0
        sigma = float(estimate_sigma(x))
        out[i] = (
            denoise_nl_means(
                x, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True
            )
            * 400.0
            - 1024.0
        )
    return out.astype(np.float32)


def bm3d_method(slices: np.ndarray) -> np.ndarray:
    """BM3D (``bm3d`` package) per slice, sigma estimated."""
    import bm3d

    out = np.empty_like(slices)
    for i, s in enumerate(slices):
        x = (s + 1024.0) / 400.0
        sigma = float(estimate_sigma(x))
        out[i] = np.asarray(bm3d.bm3d(x, sigma_psd=sigma)) * 400.0 - 1024.0
    return out.astype(np.float32)


def evaluate_pairs(
    pairs: list[tuple[Series, Series]],
    methods: dict[str, Method],
    out_dir: Path | None = None,
    max_slices: int | None = None,
    montage_method: str | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """{series or 'overall': {method: {metric: value}}}; montages and table into ``out_dir``."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    collected: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for low, full in pairs:
        ld, nd = low.slices, full.slices
        if max_slices and len(ld) > max_slices:
            mid = len(ld) // 2
            sel = slice(max(0, mid - max_slices // 2), max(0, mid - max_slices // 2) + max_slices)
            ld, nd = ld[sel], nd[sel]
        regions = find_uniform_regions(nd)
        name = f"{low.patient}"
        results[name] = {}
        outputs = {}
        for m, fn in methods.items():
            pred = fn(ld)
            outputs[m] = pred
            row: dict[str, float] = {}
            for wname, (lo, hi) in WINDOWS.items():
                for k, v in image_metrics(pred, nd, lo, hi).items():
                    row[f"{k} {wname}"] = v
            row.update(region_figures(pred, nd, regions))
            results[name][m] = row
            collected[m].append(row)
        if out_dir is not None:
            shown = montage_method or list(methods)[-1]
            mid = len(ld) // 2
            den = outputs[shown][mid]
            save_grid(
                out_dir / f"{name}.png",
                [[ld[mid], den, nd[mid], den - ld[mid] + 40.0]],
                labels=[["low dose", shown, "regular dose", "difference"]],
            )
    results["overall"] = {
        m: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        for m, rows in collected.items()
        if rows
    }
    if out_dir is not None:
        (out_dir / "evaluation.md").write_text(
            markdown_table(results["overall"], pairs_count=len(pairs))
        )
    return results


def markdown_table(overall: dict[str, dict[str, float]], pairs_count: int) -> str:
    keys = [
        "psnr [-160,240]",
        "ssim [-160,240]",
        "rmse [-160,240]",
        "psnr C50/W400",
        "ssim C50/W400",
        "bias",
        "noise_sd",
    ]
    lines = [
        f"Held-out series: {pairs_count}. PSNR (dB) / SSIM / RMSE (HU) against the regular "
        "dose; bias and noise SD (HU) in uniform regions of the regular dose.",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for m, row in overall.items():
        lines.append(
            f"| {m} | "
            + " | ".join(f"{row[k]:.{_DIGITS.get(k.split()[0], 2)}f}" for k in keys)
            + " |"
        )
    return "\n".join(lines) + "\n"
