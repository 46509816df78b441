"""Class montage: one row of example cutouts per class, the class name at the left.

Arrays in, PNG out (matplotlib, Agg backend); never imports ray. The figure has a fixed layout,
``montage_shape`` pixels, so callers and tests can rely on its size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CELL_INCHES = 1.0  # each cutout is drawn in a 1x1 inch cell
LABEL_INCHES = 1.6  # the class-name column
DPI = 100


def montage_shape(n_classes: int, per_class: int) -> tuple[int, int]:
    """(height, width) in pixels of the PNG ``class_montage`` writes."""
    return (round(n_classes * CELL_INCHES * DPI),
            round((LABEL_INCHES + per_class * CELL_INCHES) * DPI))


def class_montage(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  out_png: str | Path, per_class: int = 8) -> Path:
    """Write a grid of ``images`` (N, H, W, 3) uint8: row c shows the first ``per_class`` images
    with ``labels == c`` (empty cells where a class has fewer), labelled ``class_names[c]``."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (N, H, W, 3), got {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    n_rows = len(class_names)
    height, width = montage_shape(n_rows, per_class)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="black")
    label_frac = LABEL_INCHES * DPI / width
    cell_w, cell_h = (1.0 - label_frac) / per_class, 1.0 / n_rows
    pad = 0.03  # fraction of a cell left between cutouts
    for row, name in enumerate(class_names):
        top = 1.0 - row * cell_h
        fig.text(0.5 * label_frac, top - 0.5 * cell_h, f"{row}: {name}", color="white",
                 ha="center", va="center", fontsize=9)
        for col, idx in enumerate(np.flatnonzero(labels == row)[:per_class]):
            ax = fig.add_axes((label_frac + (col + pad) * cell_w, top - (1 - pad) * cell_h,
                               (1 - 2 * pad) * cell_w, (1 - 2 * pad) * cell_h))
            ax.imshow(images[idx], interpolation="nearest")
            ax.set_axis_off()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor=fig.get_facecolor())
    plt.close(fig)
    return out
