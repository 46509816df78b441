"""The pure format readers behind `galray ingest` (no Ray): FITS band naming, planning, duplicate ids, checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits

from galray.data.cutouts import CutoutError
from galray.data.formats import (CutoutPolicy, FitsConfig, Unit, check_cutout, fits_cutout, image_spec,
                                 object_id_of, plan_files, read_fits, FITS_EXTENSIONS)
from galray.data.cutouts import CropResizeConfig


def _write(hdus) -> bytes:
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def test_fits_band_names_from_cube_keywords_extnames_and_fallback():
    cube = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    hdu = fits.PrimaryHDU(cube)
    hdu.header["BANDS"] = "grz"
    names, planes = read_fits(_write([hdu]))
    assert names == ("g", "r", "z") and np.array_equal(np.stack(planes), cube)
    exts = [fits.PrimaryHDU()] + [fits.ImageHDU(cube[k], name=n) for k, n in enumerate("GRI")]
    assert read_fits(_write(exts))[0] == ("G", "R", "I")
    exts[2].header["BAND"] = "r"  # BAND wins over EXTNAME
    assert read_fits(_write(exts))[0] == ("G", "r", "I")
    assert read_fits(_write([fits.PrimaryHDU(cube)]))[0] == ("b0", "b1", "b2")


def test_fits_cutout_orders_bands_and_reports_missing_ones():
    cube = np.random.default_rng(0).normal(0, 1, (3, 8, 8)).astype(np.float32)
    data = _write([fits.PrimaryHDU()] + [fits.ImageHDU(cube[k], name=n) for k, n in enumerate("grz")])
    policy, crop = CutoutPolicy(), CropResizeConfig(size=8)
    out = fits_cutout(data, ("z", "g"), policy, crop, FitsConfig())
    assert out.dtype == np.float32 and np.array_equal(out, cube[[2, 0]])
    with pytest.raises(CutoutError, match=r"missing band\(s\) i"):
        fits_cutout(data, ("g", "i"), policy, crop, FitsConfig())
    nan_band = cube.copy()
    nan_band[1] = np.nan
    with pytest.raises(CutoutError, match="band r are NaN"):
        fits_cutout(_write([fits.PrimaryHDU()] + [fits.ImageHDU(nan_band[k], name=n) for k, n in enumerate("grz")]),
                    ("g", "r", "z"), policy, crop, FitsConfig())
    with pytest.raises(CutoutError, match="empty file"):
        read_fits(b"")


def test_plan_files_groups_in_sorted_order_and_first_id_wins():
    paths = ["/d/a.png", "/d/b.png", "/d/c.png", "/d/x/a.png", "/d/y/b.jpg"]
    units = plan_files(paths, 2, (".png", ".jpg"), "/d")
    assert [u.paths for u in units] == [("/d/a.png", "/d/b.png"), ("/d/c.png", "/d/x/a.png"), ("/d/y/b.jpg",)]
    assert [u.rows for u in units] == [2, 2, 1]
    assert units[1].known_errors == ((1, "duplicate object_id (kept /d/a.png)"),)
    assert units[2].known_errors == ((0, "duplicate object_id (kept /d/b.png)"),)
    assert Unit.from_json(units[1].to_json()) == units[1]
    assert object_id_of("s3://b/p/J12+34.fits.gz", FITS_EXTENSIONS) == "J12+34"


def test_cutout_checks_give_reasons():
    policy = CutoutPolicy(max_aspect=1.5, min_size=8)
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    check_cutout(img, "HWC", policy, channels=3)
    with pytest.raises(CutoutError, match="aspect ratio 2.00"):
        check_cutout(img[:, :8], "HWC", policy, channels=3)
    with pytest.raises(CutoutError, match="smaller than 8"):
        check_cutout(img[:4, :4], "HWC", policy, channels=3)
    with pytest.raises(CutoutError, match="blank"):
        check_cutout(np.full((16, 16, 3), 7, np.uint8), "HWC", policy, channels=3)
    check_cutout(np.full((16, 16, 3), 7, np.uint8), "HWC", CutoutPolicy(reject_blank=False), channels=3)
    assert policy.output_size(424) == 424 and CutoutPolicy(crop_fraction=0.75).output_size(424) == 318


def test_image_spec_per_mode():
    assert image_spec("images", 64, (), FitsConfig()).shape == (64, 64, 3)
    flux = image_spec("fits", 32, ("g", "r", "z"), FitsConfig())
    assert (flux.layout, flux.dtype, flux.shape) == ("CHW", "float32", (3, 32, 32))
    rgb = image_spec("fits", 32, ("g", "r", "z"), FitsConfig(mode="rgb"))
    assert (rgb.layout, rgb.dtype, rgb.bands) == ("HWC", "uint8", ("z", "r", "g"))
