"""Pure-numpy operations on single cutouts: decode, check, stretch, crop and resize.

Every function takes and returns plain arrays (HWC for colour images, CHW for multi-band flux)
and raises :class:`CutoutError` with a short reason a person can read when the input is bad;
stages catch it and send the row to the errors output. No Ray, no torch.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from galray.config import check
from galray.data.limits import DecodeLimits, LimitError


class CutoutError(ValueError):
    """A cutout that cannot be used; ``str(err)`` is the reason that goes to the errors output."""


def decode_image(data: bytes | None, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """PNG/JPEG/... bytes -> (H, W, 3) uint8 RGB. Grayscale is repeated to 3 channels, alpha dropped.

    The bytes and the size the header declares are checked against ``limits`` before decoding (a
    170 kB PNG may declare 150 megapixels); over a limit raises CutoutError naming the limit."""
    if data is None or len(data) == 0:
        raise CutoutError("empty file (0 bytes)")
    try:
        limits.check_file_bytes(len(data))
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            # Decoded as RGB (3 bytes a pixel) after the mode's own bands: bound both before load().
            limits.check_image(im.width, im.height, im.width * im.height * (len(im.getbands()) + 3))
            im.load()  # forces a full decode, so a truncated file fails here and not later
            arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    except LimitError as err:
        raise CutoutError(str(err)) from None
    except Image.DecompressionBombError as err:  # PIL's own guard (2x its MAX_IMAGE_PIXELS), should ours be set higher
        raise CutoutError(f"image is a decompression bomb: {err}") from None
    except Exception as err:  # PIL raises several types: UnidentifiedImageError, OSError, SyntaxError
        text = str(err).lower()
        reason = "truncated image" if "truncated" in text or "broken data stream" in text else "cannot decode image"
        # PIL puts the BytesIO's address in some messages; drop it so reasons are stable across reruns
        detail = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)).strip()
        raise CutoutError(f"{reason}: {detail}" if detail else reason) from None
    if arr.size == 0:
        raise CutoutError("decoded image is empty")
    return np.ascontiguousarray(arr)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (for figures, reports and tests)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def check_finite(image: np.ndarray) -> np.ndarray:
    """Reject empty or all-NaN cutouts; replace scattered NaN/inf by 0."""
    if image.size == 0:
        raise CutoutError("empty image array")
    finite = np.isfinite(image)
    if not finite.any():
        raise CutoutError("all pixels are NaN or inf")
    if not finite.all():
        image = np.where(finite, image, 0).astype(image.dtype, copy=False)
    return image


def check_shape(image: np.ndarray, ndim: int = 3, channels: int | None = None, layout: str = "HWC",
                min_size: int = 4) -> None:
    if image.ndim != ndim:
        raise CutoutError(f"wrong shape {image.shape}: expected {ndim} axes ({layout})")
    c = image.shape[2] if layout == "HWC" else image.shape[0]
    h, w = (image.shape[0], image.shape[1]) if layout == "HWC" else (image.shape[1], image.shape[2])
    if channels is not None and c != channels:
        raise CutoutError(f"wrong shape {image.shape}: expected {channels} channels ({layout})")
    if min(h, w) < min_size:
        raise CutoutError(f"wrong shape {image.shape}: smaller than {min_size} pixels")


@dataclass(frozen=True)
class StretchConfig:
    """Flux -> display conversion: per-band percentile clip, then an arcsinh stretch.

    Defaults follow the spirit of Galaxy Zoo DECaLS / Legacy Survey colour renderings (Lupton et al.
    2004 arcsinh; Walmsley et al. 2022): a soft arcsinh that keeps faint outskirts visible without
    saturating bright cores, with the sky level and the brightest pixels clipped per band.
    """

    lower_percentile: float = 0.5
    """Pixels below this percentile of each band become black (sky level)."""
    upper_percentile: float = 99.7
    """Pixels above this percentile of each band become white (saturated core, bright stars)."""
    nonlinearity: float = 8.0
    """arcsinh softening Q: 0 is linear, larger compresses the bright end more."""

    def __post_init__(self) -> None:
        check(0 <= self.lower_percentile < self.upper_percentile <= 100, "lower_percentile",
              "need 0 <= lower_percentile < upper_percentile <= 100")
        check(self.nonlinearity >= 0, "nonlinearity", "must be >= 0")


def asinh_stretch(flux_CHW: np.ndarray, cfg: StretchConfig = StretchConfig()) -> np.ndarray:
    """Multi-band float flux (C, H, W) -> values in [0, 1], per band: clip percentiles, then arcsinh."""
    flux = check_finite(np.asarray(flux_CHW, dtype=np.float32))
    lo = np.percentile(flux, cfg.lower_percentile, axis=(1, 2), keepdims=True)
    hi = np.percentile(flux, cfg.upper_percentile, axis=(1, 2), keepdims=True)
    scaled = np.clip((flux - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    if cfg.nonlinearity > 0:
        q = cfg.nonlinearity
        scaled = np.arcsinh(q * scaled) / np.arcsinh(q)
    return np.clip(scaled, 0, 1).astype(np.float32)


def flux_to_rgb(flux_CHW: np.ndarray, cfg: StretchConfig = StretchConfig()) -> np.ndarray:
    """Multi-band flux (C, H, W) -> (H, W, 3) uint8 for colour backbones.

    Three bands map to RGB reddest-first (e.g. z, r, g -> R, G, B when given in g, r, z order);
    one band is repeated to gray; two bands get their mean as the middle channel; more than three
    keep the reddest, middle and bluest.
    """
    x = asinh_stretch(flux_CHW, cfg)
    c = x.shape[0]
    if c == 1:
        rgb = np.repeat(x, 3, axis=0)
    elif c == 2:
        rgb = np.stack([x[1], x.mean(0), x[0]])
    else:
        rgb = np.stack([x[-1], x[c // 2], x[0]])
    return np.rint(np.moveaxis(rgb, 0, -1) * 255).astype(np.uint8)


def center_crop(image: np.ndarray, fraction: float, layout: Literal["HWC", "CHW"] = "HWC") -> np.ndarray:
    """Keep the central ``fraction`` of each side (1.0 keeps everything)."""
    if fraction >= 1.0:
        return image
    h, w = (image.shape[0], image.shape[1]) if layout == "HWC" else (image.shape[1], image.shape[2])
    ch, cw = max(1, int(round(h * fraction))), max(1, int(round(w * fraction)))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return image[y0:y0 + ch, x0:x0 + cw] if layout == "HWC" else image[:, y0:y0 + ch, x0:x0 + cw]


def center_square(image: np.ndarray, layout: Literal["HWC", "CHW"] = "HWC") -> np.ndarray:
    """Crop the longer side so the cutout is square, keeping the centre (objects sit at the centre)."""
    h, w = (image.shape[0], image.shape[1]) if layout == "HWC" else (image.shape[1], image.shape[2])
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return image[y0:y0 + s, x0:x0 + s] if layout == "HWC" else image[:, y0:y0 + s, x0:x0 + s]


def resize(image: np.ndarray, size: int, layout: Literal["HWC", "CHW"] = "HWC") -> np.ndarray:
    """Square-resize with antialiasing (PIL bilinear with area pre-filter on downscale); dtype kept."""
    h, w = (image.shape[0], image.shape[1]) if layout == "HWC" else (image.shape[1], image.shape[2])
    if (h, w) == (size, size):
        return image
    if image.dtype == np.uint8 and layout == "HWC" and image.shape[2] in (1, 3, 4):
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
        im = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
        out = np.asarray(im.resize((size, size), Image.BILINEAR, reducing_gap=None))
        return out[..., None] if mode == "L" else out
    planes = image if layout == "CHW" else np.moveaxis(image, -1, 0)
    resized = np.stack([np.asarray(Image.fromarray(p.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
                        for p in planes])
    out = resized if layout == "CHW" else np.moveaxis(resized, 0, -1)
    return out.astype(image.dtype) if image.dtype != np.uint8 else np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CropResizeConfig:
    """How a cutout of any size becomes a fixed-size one: square centre crop, then crop fraction, then resize."""

    size: int = 64
    """Output side in pixels."""
    crop_fraction: float = 1.0
    """Keep this central fraction of each side before resizing (Galaxy Zoo cutouts often use ~0.75)."""

    def __post_init__(self) -> None:
        check(self.size >= 4, "size", "must be at least 4 pixels")
        check(0 < self.crop_fraction <= 1, "crop_fraction", "must be in (0, 1]")


def crop_resize(image: np.ndarray, cfg: CropResizeConfig, layout: Literal["HWC", "CHW"] = "HWC") -> np.ndarray:
    return resize(center_crop(center_square(image, layout), cfg.crop_fraction, layout), cfg.size, layout)


def to_float01(images_NHWC: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 in [0, 1]; float input is clipped to [0, 1]."""
    if images_NHWC.dtype == np.uint8:
        return images_NHWC.astype(np.float32) / 255.0
    return np.clip(images_NHWC.astype(np.float32), 0, 1)


def normalize(images_NCHW: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """Channel-wise (x - mean) / std; None leaves the values as they are (Zoobot wants plain [0, 1])."""
    if mean is None or std is None:
        return images_NCHW
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return (images_NCHW - m) / s
