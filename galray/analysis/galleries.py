"""Galleries: which galaxies a feature picks, as small PNG thumbnails.

- :func:`display_pixels`: a stored cutout (any layout the cutout store allows: uint8 colour, float
  flux, encoded bytes) as a (S, S, 3) uint8 picture, through the same preprocessing the models saw
  (:mod:`galray.data.preprocess`), so a gallery shows what the model was given;
- :func:`thumbnail_png`: PNG bytes of a picture, a few kB each, so a report of hundreds of them stays
  small and the browser decodes them lazily;
- :func:`extremes`: the objects at both ends of a PCA component;
- :func:`gallery_rows`: the rows of a gallery table (``galleries.parquet`` of `galray analyze`).

Pure numpy + PIL + pyarrow: no torch, no Ray.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from galray.data.cutouts import CutoutError
from galray.data.preprocess import ImagePlan, prepare_image

GALLERY_COLUMNS = ("gallery", "rank", "object_id", "value", "png", "source")
"""``source``: "" for the analysed store's objects, else the name of the store they come from (e.g. XDF)."""


def display_pixels(image: np.ndarray | bytes, plan: ImagePlan) -> np.ndarray:
    """One stored image -> (S, S, 3) uint8 picture (grey images repeated to 3 channels). Raises CutoutError."""
    chw = prepare_image(image, plan)
    if chw.dtype != np.uint8:
        chw = np.clip(np.rint(chw * 255.0), 0, 255).astype(np.uint8)
    hwc = np.moveaxis(chw, 0, -1)
    if hwc.shape[-1] == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    return np.ascontiguousarray(hwc[..., :3])


def thumbnail_png(picture_HWC: np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of a uint8 (H, W, 3) picture, resized to ``size`` pixels square when given."""
    img = Image.fromarray(np.asarray(picture_HWC, np.uint8))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def extremes(scores_N: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the ``n`` lowest (most negative first) and ``n`` highest (largest first) scores."""
    order = np.argsort(np.asarray(scores_N), kind="stable")
    return order[:n], order[::-1][:n]


def gallery_rows(gallery: str, objects: Sequence[tuple[str, str]], values: Sequence[float],
                 pictures: Mapping[tuple[str, str], np.ndarray], size: int | None = None) -> list[dict[str, Any]]:
    """Rows of one gallery in rank order; ``objects`` are ``(source, object_id)`` pairs (ids are unique only
    within a store) and key ``pictures``; objects without a picture (unreadable cutouts) are left out."""
    rows = []
    for key, value in zip(objects, values):
        if key in pictures:
            rows.append({"gallery": gallery, "rank": len(rows), "object_id": str(key[1]), "value": float(value),
                         "png": thumbnail_png(pictures[key], size), "source": str(key[0])})
    return rows


def pictures_from_table(ids: Sequence[str], images: np.ndarray, plan: ImagePlan) -> dict[str, np.ndarray]:
    """``{object_id: picture}`` for a cutout table's rows; a cutout that cannot be shown is skipped."""
    out = {}
    for oid, image in zip(ids, images):
        try:
            out[str(oid)] = display_pixels(image, plan)
        except CutoutError:
            continue
    return out
