"""The quality gate's figures and its verdict.

* HU bias and noise SD in uniform regions: regions are found on the input series (flat anatomy in
  a soft-tissue HU range, judged on a smoothed copy so noise does not hide them); the same
  regions are then measured on the output.
* Structure: what the model removed (input - output) must look like noise, not anatomy. Noise is
  about as strong on the input's edges as on its flat tissue; a filter that blurs removes far more
  on edges. ``edge_ratio`` = mean squared removal on the strongest 10 % of the input's edges ÷ on
  its flattest half, in the body.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Self

import numpy as np
from scipy import ndimage

Region = tuple[int, int, int, int]  # slice index, row, col, half size


@dataclass(frozen=True)
class QualityFigures:
    hu_bias: float  # mean(output - input) over the regions, HU
    noise_in: float  # mean SD of the input in the regions, HU
    noise_out: float  # mean SD of the output in the regions, HU
    regions: int
    edge_ratio: float = float("nan")  # removal on edges ÷ removal on flat tissue (see above)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on a series: what is wrong with it (nothing = passed)."""

    problems: tuple[str, ...]
    measurable: bool  # False: no uniform region to measure on

    @property
    def passed(self) -> bool:
        return not self.problems


def judge(q: QualityFigures, max_hu_bias: float, max_edge_ratio: float) -> Verdict:
    """Figures in, verdict out: the HU bias within bounds, the noise lower than the input's, and
    what was removed no more concentrated on edges than ``max_edge_ratio`` allows."""
    if not q.regions:
        return Verdict((), measurable=False)
    problems = []
    if abs(q.hu_bias) > max_hu_bias:
        problems.append(f"|HU bias| {abs(q.hu_bias):.1f} > quality.max_hu_bias {max_hu_bias:g}")
    if not q.noise_out < q.noise_in:
        problems.append(f"noise SD {q.noise_out:.1f} HU is not below the input's {q.noise_in:.1f}")
    if np.isfinite(q.edge_ratio) and q.edge_ratio > max_edge_ratio:
        problems.append(
            f"removed structure: {q.edge_ratio:.1f}x more removed on edges than on flat tissue "
            f"> quality.max_edge_ratio {max_edge_ratio:g}"
        )
    return Verdict(tuple(problems), measurable=True)


def _half(img: np.ndarray) -> np.ndarray:
    """2 x 2 block means (even sizes; odd ones lose their last row or column)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    # four strided sums: ~15 times faster than reshape(...).mean(axis=(1, 3)) at 512 x 512
    out = img[0:h:2, 0:w:2] + img[1:h:2, 0:w:2]
    out += img[0:h:2, 1:w:2]
    out += img[1:h:2, 1:w:2]
    out *= 0.25
    return out


def edge_removal(
    inp: np.ndarray, out: np.ndarray, body: tuple[float, float] = (-500.0, 1500.0)
) -> tuple[float, int, float, int]:
    """Squared removal (input - output) summed over the input's strongest edges and over its
    flattest tissue, with the pixel counts: (edge sum, edge pixels, flat sum, flat pixels).

    Judged at half resolution (2 x 2 means, a quarter of the cost; noise removal is averaged
    down alike on edges and flat tissue, so the ratio keeps its meaning), edges on a smoothed
    input (Gaussian, 0.75 half-resolution pixels) so that its noise does not count as edges.
    """
    edge_sum = flat_sum = 0.0
    edge_n = flat_n = 0
    for k in range(inp.shape[0]):
        src = _half(inp[k].astype(np.float32, copy=False))
        smooth = ndimage.gaussian_filter(src, 0.75)
        grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1))
        mask = (smooth > body[0]) & (smooth < body[1])
        if mask.sum() < 64:
            continue
        g = grad[mask]
        hi, lo = np.percentile(g, [90, 50])
        removed = (src - _half(out[k].astype(np.float32, copy=False))).astype(np.float64) ** 2
        edges, flat = mask & (grad >= hi), mask & (grad <= lo)
        edge_sum += float(removed[edges].sum())
        edge_n += int(edges.sum())
        flat_sum += float(removed[flat].sum())
        flat_n += int(flat.sum())
    return edge_sum, edge_n, flat_sum, flat_n


def _smoothed(img: np.ndarray, step: int) -> np.ndarray:
    """Gaussian (sigma 2 px) smoothing, then every ``step``-th pixel; for step 2 on even sizes the
    same from 2 x 2 block means and sigma 1, at a quarter of the cost."""
    x = img.astype(np.float32)
    h, w = x.shape
    if step == 2 and h % 2 == 0 and w % 2 == 0:
        return ndimage.gaussian_filter(_half(x), 1.0)
    return ndimage.gaussian_filter(x, 2.0)[::step, ::step]


def find_uniform_regions(
    slices: np.ndarray,
    half: int = 0,
    per_slice: int = 2,
    hu_range: tuple[float, float] = (-150.0, 250.0),
) -> list[Region]:
    """Up to ``per_slice`` flat soft-tissue squares of side 2*half per slice of [N, H, W] HU."""
    n, h, w = slices.shape
    half = half or max(3, min(h, w) // 40)
    # The search runs on a smoothed slice at half resolution: four times less filtering,
    # regions placed to within a pixel.
    step = 2 if half >= 6 else 1
    hs = half // step
    size = 2 * hs
    regions: list[Region] = []
    for k in range(n):
        smooth = _smoothed(slices[k], step)
        mean = ndimage.uniform_filter(smooth, size)
        sq = ndimage.uniform_filter(smooth * smooth, size)
        flatness = np.sqrt(np.clip(sq - mean * mean, 0, None))
        ok = (mean > hu_range[0]) & (mean < hu_range[1])
        # the whole square must be tissue in range, not just its mean: no pixel out of range in
        # it (a box mean of the out-of-range mask; the same squares as a minimum and a maximum
        # filter, at a fifth of their cost)
        outside = (smooth <= hu_range[0] - 100) | (smooth >= hu_range[1] + 100)
        ok &= ndimage.uniform_filter(outside.astype(np.float32), size) < 0.5 / (size * size)
        margin = hs + 1
        ok[:margin, :] = ok[-margin:, :] = False
        ok[:, :margin] = ok[:, -margin:] = False
        score = np.where(ok, flatness, np.inf)
        ws = smooth.shape[1]
        for _ in range(per_slice):
            idx = int(np.argmin(score))
            if not np.isfinite(score.flat[idx]):
                break
            r, c = divmod(idx, ws)
            regions.append((k, r * step, c * step, half))
            score[max(0, r - 2 * size) : r + 2 * size, max(0, c - 2 * size) : c + 2 * size] = np.inf
    return regions


def _patch(slices: np.ndarray, reg: Region) -> np.ndarray:
    k, r, c, half = reg
    return slices[k, r - half : r + half, c - half : c + half]


@dataclass
class RegionTally:
    """Figures of an image against a reference in uniform regions, gathered over chunks as
    running sums (so a series' figures can be kept between the chunks and the workers that
    denoise it): the mean difference (bias) and the mean SD of each. One definition for the
    node's gate, ``measure`` and the training evaluation."""

    regions: int = 0
    bias_sum: float = 0.0
    sd_ref_sum: float = 0.0
    sd_out_sum: float = 0.0
    edges: list[float] = field(default_factory=lambda: [0.0, 0, 0.0, 0])  # see edge_removal

    def add(self, ref: np.ndarray, out: np.ndarray, regions: list[Region]) -> None:
        """Measure ``out`` against ``ref`` (both [N, H, W] HU) in ``regions``."""
        for g in regions:
            a, b = _patch(ref, g), _patch(out, g)
            self.regions += 1
            self.bias_sum += float(np.mean(b - a))
            self.sd_ref_sum += float(np.std(a))
            self.sd_out_sum += float(np.std(b))

    def add_edges(self, ref: np.ndarray, out: np.ndarray) -> None:
        """Also gather what ``out`` removed from ``ref`` on edges and on flat tissue."""
        for i, v in enumerate(edge_removal(ref, out)):
            self.edges[i] += v

    def figures(self) -> QualityFigures:
        if not self.regions:
            return QualityFigures(float("nan"), float("nan"), float("nan"), 0)
        edge_sum, edge_n, flat_sum, flat_n = self.edges
        ratio = float("nan")
        if edge_n and flat_n and flat_sum > 0:
            ratio = (edge_sum / edge_n) / (flat_sum / flat_n)
        n = self.regions
        return QualityFigures(self.bias_sum / n, self.sd_ref_sum / n, self.sd_out_sum / n, n, ratio)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | None) -> Self:
        return cls(**json.loads(text)) if text else cls()


def measure(
    inp: np.ndarray, out: np.ndarray, regions: list[Region] | None = None
) -> QualityFigures:
    """Bias and noise of ``out`` against ``inp`` (both [N, H, W] HU) in uniform regions (found
    on ``inp`` unless given)."""
    tally = RegionTally()
    tally.add(inp, out, find_uniform_regions(inp) if regions is None else regions)
    tally.add_edges(inp, out)
    return tally.figures()
