"""Pure cutout operations: decode errors with reasons, stretch, crop and resize."""

from __future__ import annotations

import numpy as np
import pytest

from galray.data.cutouts import (CropResizeConfig, CutoutError, StretchConfig, asinh_stretch, check_finite,
                                 crop_resize, decode_image, encode_png, flux_to_rgb, resize)


def test_png_roundtrip_and_bad_bytes():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png = encode_png(img)
    assert np.array_equal(decode_image(png), img)
    with pytest.raises(CutoutError, match="empty file"):
        decode_image(b"")
    with pytest.raises(CutoutError, match="cannot decode"):
        decode_image(b"\x00garbage" * 50)
    with pytest.raises(CutoutError, match="truncated|cannot decode"):
        decode_image(png[: len(png) // 2])


def test_all_nan_rejected_partial_nan_filled():
    with pytest.raises(CutoutError, match="NaN"):
        check_finite(np.full((3, 8, 8), np.nan, np.float32))
    x = np.ones((3, 4, 4), np.float32)
    x[0, 0, 0] = np.nan
    assert np.isfinite(check_finite(x)).all()


def test_stretch_is_monotonic_and_bounded():
    flux = np.random.default_rng(1).normal(0, 1, (3, 32, 32)).astype(np.float32)
    flux[:, 16, 16] = 100
    out = asinh_stretch(flux, StretchConfig())
    assert out.min() >= 0 and out.max() <= 1
    order = np.argsort(flux[0].ravel())
    assert np.all(np.diff(out[0].ravel()[order]) >= -1e-6)
    rgb = flux_to_rgb(flux)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 and rgb[16, 16].min() == 255


def test_crop_resize_shapes_and_centre():
    img = np.zeros((100, 80, 3), np.uint8)
    img[45:55, 35:45] = 255  # a bright square in the centre
    out = crop_resize(img, CropResizeConfig(size=32, crop_fraction=0.5))
    assert out.shape == (32, 32, 3)
    assert out[16, 16].min() > 200 and out[0, 0].max() == 0
    flux = np.random.default_rng(0).normal(size=(4, 50, 50)).astype(np.float32)
    assert resize(flux, 25, layout="CHW").shape == (4, 25, 25)
    # a constant image stays constant through resize
    assert np.allclose(resize(np.full((40, 40, 3), 7, np.uint8), 17), 7)
