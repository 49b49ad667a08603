"""The fixed HU window between Hounsfield units and the network's range, shared with training.

Never a per-image min-max rescale: that would destroy absolute HU values. Values outside the
window are clipped for the network only; :meth:`HUWindow.apply_correction` passes them through
unchanged, so bone, metal and contrast keep their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HUWindow:
    """Maps [lower, upper] HU linearly onto [-1, 1]."""

    lower: float = -1024.0
    upper: float = 3071.0

    def __post_init__(self) -> None:
        if not self.upper > self.lower:
            raise ValueError(f"HU window upper ({self.upper}) must exceed lower ({self.lower})")

    @property
    def half_width(self) -> float:
        return (self.upper - self.lower) / 2.0

    @property
    def center(self) -> float:
        return (self.upper + self.lower) / 2.0

    def to_network(self, hu: Tensor) -> Tensor:
        """HU -> [-1, 1], clipped."""
        return ((hu - self.center) / self.half_width).clamp(-1.0, 1.0)

    def to_hu(self, y: Tensor) -> Tensor:
        """[-1, 1] -> HU; the exact inverse of :meth:`to_network` inside the window."""
        return y * self.half_width + self.center

    def apply_correction(self, hu: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """The network's output in HU, built as input + correction.

        ``hu`` is the input in HU, ``x = to_network(hu)`` and ``y`` the network's output. Where the
        input lies inside the window the result is ``hu + (y - x) * half_width`` (so an identity
        network returns ``hu`` bit for bit); outside it, ``hu`` unchanged.
        """
        inside = (hu >= self.lower) & (hu <= self.upper)
        return torch.where(inside, hu + (y - x) * self.half_width, hu)

    def to_dict(self) -> dict[str, float]:
        return {"lower": self.lower, "upper": self.upper}
