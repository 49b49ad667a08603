"""PNG montages in a CT window: training previews, evaluation, the demo report, thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def window_u8(hu: np.ndarray, center: float = 40.0, width: float = 400.0) -> np.ndarray:
    lo = center - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).astype(np.uint8)


def save_grid(
    path: Path,
    rows: list[list[np.ndarray]],
    labels: list[list[str]] | None = None,
    center: float = 40.0,
    width: float = 400.0,
) -> None:
    """Tiles of HU images (same shape per row) in a C/W window, with optional labels."""
    tiles = [np.concatenate([window_u8(t, center, width) for t in row], axis=1) for row in rows]
    grid = np.concatenate(tiles, axis=0)
    img = Image.fromarray(grid).convert("RGB")
    if labels:
        draw = ImageDraw.Draw(img)
        for i, row in enumerate(labels):
            for j, text in enumerate(row):
                y = sum(r[0].shape[0] for r in rows[:i])
                x = sum(t.shape[1] for t in rows[i][:j])
                draw.text((x + 4, y + 4), text, fill=(255, 220, 0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_thumbnail(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    """Middle slice before | after, C40/W400, as a small PNG (the status page's thumbnails),
    written to a temporary name and renamed so the page never serves half a file."""
    img = Image.fromarray(np.concatenate([window_u8(before), window_u8(after)], axis=1))
    img.thumbnail((512, 256))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
