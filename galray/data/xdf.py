"""Real galaxies with no download: cutouts from the Hubble eXtreme Deep Field that scikit-image ships.

``skimage.data.hubble_deep_field()`` is an 872x1000 RGB rendering of the XDF (NASA/ESA, STScI)
inside the scikit-image wheel. We detect sources with SEP (Source Extractor as a library;
Barbary 2016, JOSS 1, 58) on the summed image after background subtraction, then cut out
each object in a box scaled to its size and resize it to a fixed size. Each row keeps the
shape parameters SEP measured, in pixels of the original image.

Pure numpy + sep + scikit-image; no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from galray.config import check


@dataclass(frozen=True)
class XDFConfig:
    """Detection and cutout settings for `galray sample xdf`."""

    size: int = 64
    """Output cutout size in pixels (each box is resized to this)."""
    detect_sigma: float = 3.0
    """Detection threshold in units of the background RMS."""
    min_area: int = 30
    """Minimum connected pixels above threshold for a detection."""
    box_scale: float = 5.0
    """Box half-width in units of the object's half-light radius."""
    min_box: int = 24
    """Smallest box side in original pixels (small objects keep some sky around them)."""
    max_box: int = 256
    """Largest box side in original pixels."""
    deblend_cont: float = 0.005
    """SEP deblending contrast: lower splits blended neighbours more readily."""

    def __post_init__(self) -> None:
        check(self.size >= 8, "size", "must be at least 8 pixels")
        check(self.detect_sigma > 0, "detect_sigma", "must be positive")
        check(self.min_area >= 1, "min_area", "must be at least 1")
        check(self.box_scale > 0, "box_scale", "must be positive")
        check(0 < self.min_box <= self.max_box, "min_box", "must be positive and at most max_box")


def load_xdf() -> np.ndarray:
    """The XDF colour image, (872, 1000, 3) uint8, from the scikit-image wheel."""
    from skimage.data import hubble_deep_field

    return hubble_deep_field()


def detect(image: np.ndarray, cfg: XDFConfig):
    """SEP detections on the band-summed image: (objects record array, r50 in pixels, background-subtracted)."""
    import sep

    lum = np.ascontiguousarray(image.astype(np.float32).mean(axis=2))
    bkg = sep.Background(lum)
    data = lum - bkg.back()
    objects = sep.extract(data, cfg.detect_sigma, err=bkg.globalrms, minarea=cfg.min_area,
                          deblend_cont=cfg.deblend_cont)
    r50, _ = sep.flux_radius(data, objects["x"], objects["y"], 6.0 * objects["a"], 0.5,
                             normflux=objects["flux"], subpix=5)
    return objects, np.asarray(r50, dtype=np.float32), bkg.globalrms


def cutout(image: np.ndarray, x: float, y: float, side: int, size: int) -> tuple[np.ndarray, float]:
    """Square box of ``side`` pixels centred on (x, y), edge-padded at the image border, resized to ``size``.

    Returns the cutout (size, size, 3) uint8 and the fraction of the box that fell outside the image.
    """
    from skimage.transform import resize

    half = side / 2
    x0, y0 = int(round(x - half)), int(round(y - half))
    h, w = image.shape[:2]
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge") if pad else image
    box = padded[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side]
    inside_w = min(x0 + side, w) - max(x0, 0)
    inside_h = min(y0 + side, h) - max(y0, 0)
    outside = 1.0 - max(inside_w, 0) * max(inside_h, 0) / (side * side)
    if side != size:
        box = resize(box, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    return np.clip(np.rint(box), 0, 255).astype(np.uint8), float(outside)


def xdf_sample(cfg: XDFConfig | None = None) -> dict[str, np.ndarray]:
    """Detect XDF sources and cut them out. Columns: object_id, image (N, size, size, 3) uint8, measurements."""
    cfg = cfg or XDFConfig()
    image = load_xdf()
    objects, r50, rms = detect(image, cfg)
    images, outside, boxes = [], [], []
    for obj, r in zip(objects, r50):
        radius = r if np.isfinite(r) and r > 0 else obj["a"]
        side = int(np.clip(2 * cfg.box_scale * radius, cfg.min_box, cfg.max_box))
        img, frac = cutout(image, float(obj["x"]), float(obj["y"]), side, cfg.size)
        images.append(img)
        outside.append(frac)
        boxes.append(side)
    n = len(objects)
    a, b = objects["a"].astype(np.float32), objects["b"].astype(np.float32)
    return {
        "object_id": np.array([f"xdf-{i:04d}" for i in range(n)], dtype=object),
        "image": np.stack(images) if images else np.zeros((0, cfg.size, cfg.size, 3), np.uint8),
        "x": objects["x"].astype(np.float32),
        "y": objects["y"].astype(np.float32),
        "a": a,
        "b": b,
        "axis_ratio": np.where(a > 0, b / np.maximum(a, 1e-6), np.nan).astype(np.float32),
        "position_angle": np.degrees(objects["theta"]).astype(np.float32),
        "half_light_radius": r50,
        "flux": objects["flux"].astype(np.float32),
        "peak": objects["peak"].astype(np.float32),
        "snr": (objects["flux"] / (rms * np.sqrt(objects["npix"]))).astype(np.float32),
        "npix": objects["npix"].astype(np.int32),
        "box_pixels": np.array(boxes, dtype=np.int32),
        "outside_fraction": np.array(outside, dtype=np.float32),
        "sep_flag": objects["flag"].astype(np.int32),
    }
