"""Survey simulator: determinism, ground truth vs label and vs pixels, the fast path vs GalSim,
the colour stretch and the class montage."""

from __future__ import annotations

import math

import galsim
import numpy as np
import pytest

from galray.analysis.montage import class_montage, montage_shape
from galray.config import ConfigError, from_dict
from galray.data.galsim_survey import (CLASS_NAMES, TRUTH_FIELDS, SimConfig, _cfg_grid, _Scene,
                                  render_batch, render_galaxy, sdss_rgb)

PER_CLASS = 5


@pytest.fixture(scope="module")
def by_class() -> dict[str, dict[str, np.ndarray]]:
    """PER_CLASS noiseless, uncrowded galaxies of every class, with their flux cubes."""
    out = {}
    for name in CLASS_NAMES:
        cfg = SimConfig(size=48, classes=(name,), sky_noise=(0.0,), neighbour_rate=0.0,
                        star_rate=0.0, keep_flux=True, seed=3)
        out[name] = render_batch(range(PER_CLASS), cfg)
    return out


def test_same_seed_same_bytes_any_order_and_subset():
    cfg = SimConfig(size=32, seed=7, neighbour_rate=2.0, star_rate=1.0)
    a = render_batch(range(12), cfg)
    b = render_batch(range(12), cfg)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    sub = render_batch([9, 2, 5], cfg)  # other order, other batch: same rows
    for key in a:
        assert sub[key].tobytes() == a[key][[9, 2, 5]].tobytes(), key
    image, truth = render_galaxy(5, cfg)
    assert image.tobytes() == a["image"][5].tobytes()
    assert truth["flux"] == a["flux"][5]


def test_different_seed_differs():
    a = render_batch(range(4), SimConfig(size=32, seed=0))
    b = render_batch(range(4), SimConfig(size=32, seed=1))
    for i in range(4):
        assert a["image"][i].tobytes() != b["image"][i].tobytes()
    assert list(a["object_id"]) != list(b["object_id"])


def test_batch_columns_shapes_and_dtypes():
    cfg = SimConfig(size=40, seed=2, keep_flux=True)
    batch = render_batch([3, 1, 4], cfg)
    assert batch["image"].shape == (3, 40, 40, 3) and batch["image"].dtype == np.uint8
    assert batch["flux_image"].shape == (3, 3, 40, 40) and batch["flux_image"].dtype == np.float32
    assert list(batch["object_id"]) == ["sim-2-000000003", "sim-2-000000001", "sim-2-000000004"]
    assert batch["label"].dtype == np.int64
    assert [CLASS_NAMES[i] for i in batch["label"]] == list(batch["class_name"])
    for key, dtype in TRUTH_FIELDS.items():
        assert batch[key].shape == (3,) and batch[key].dtype == dtype, key
    assert "flux_image" not in render_batch([0], SimConfig(size=32))


def test_classes_are_balanced_and_restricted():
    labels = render_batch(range(200), SimConfig(size=16, sky_noise=(0.0,), neighbour_rate=0.0,
                                                star_rate=0.0))["label"]
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert counts.min() >= 8  # 20 expected per class; P(any < 8) is ~1e-3
    sub = render_batch(range(20), SimConfig(size=16, classes=("ring", "star")))
    assert set(sub["class_name"]) <= {"ring", "star"}


def test_truth_consistent_with_label(by_class):
    t = by_class
    for name, batch in t.items():
        assert (batch["class_name"] == name).all()
        assert (batch["label"] == CLASS_NAMES.index(name)).all()
        assert (batch["flux"] > 0).all() and np.isfinite(batch["color_gr"]).all()
        if name not in ("spiral", "barred_spiral"):
            assert (batch["arm_count"] == 0).all() and np.isnan(batch["arm_pitch"]).all(), name
        if name != "barred_spiral":
            assert (batch["bar_strength"] == 0).all(), name
        if name != "star":
            assert (batch["half_light_radius"] > 0).all() and (batch["redshift"] > 0).all()
            assert ((batch["axis_ratio"] > 0) & (batch["axis_ratio"] <= 1)).all()
    assert (t["smooth_round"]["axis_ratio"] > 0.75).all()
    assert (t["smooth_cigar"]["axis_ratio"] < 0.55).all()
    for name in ("smooth_round", "smooth_cigar"):
        assert (t[name]["bulge_fraction"] == 1).all()
        assert np.isfinite(t[name]["sersic_n"]).all()
    for name in ("edge_on_disk", "edge_on_bulge"):
        assert (t[name]["axis_ratio"] < 0.3).all()
    assert (t["edge_on_disk"]["bulge_fraction"] == 0).all()
    assert (t["edge_on_bulge"]["bulge_fraction"] > 0.1).all()
    for name in ("spiral", "barred_spiral"):
        assert np.isin(t[name]["arm_count"], [2, 3, 4]).all()
        assert ((t[name]["arm_pitch"] > 5) & (t[name]["arm_pitch"] < 40)).all()
    assert (t["barred_spiral"]["bar_strength"] > 0).all()
    assert (t["ring"]["ring_radius"] > 0).all()
    assert np.isnan(t["spiral"]["ring_radius"]).all()
    merger = t["merger"]
    assert ((merger["companion_flux_ratio"] > 0) & (merger["companion_flux_ratio"] <= 1)).all()
    assert (merger["companion_separation"] > 0).all()
    assert np.isnan(t["disturbed"]["companion_separation"]).all()
    star = t["star"]
    assert (star["half_light_radius"] == 0).all() and (star["redshift"] == 0).all()
    assert np.isnan(star["sersic_n"]).all() and np.isnan(star["bulge_fraction"]).all()


def _moments(img: np.ndarray) -> tuple[float, float, float]:
    """(axis ratio, position angle deg CCW from +x with y up, rms size px) from flux moments."""
    rows, cols = np.indices(img.shape)
    w = np.clip(img, 0, None)
    w = w / w.sum()
    x, y = cols - (w * cols).sum(), -(rows - (w * rows).sum())  # y up
    xx, yy, xy = (w * x * x).sum(), (w * y * y).sum(), (w * x * y).sum()
    lam = np.linalg.eigvalsh([[xx, xy], [xy, yy]])
    pa = 0.5 * math.degrees(math.atan2(2 * xy, xx - yy)) % 180
    return math.sqrt(lam[0] / lam[1]), pa, math.sqrt(lam.sum())


def test_pixels_agree_with_truth(by_class):
    """Shape, orientation, flux and colour measured on the noiseless image match the truth."""
    q_meas = {}
    for name in ("smooth_round", "smooth_cigar", "edge_on_disk", "star"):
        batch = by_class[name]
        q_meas[name] = []
        for i in range(PER_CLASS):
            r_band = batch["flux_image"][i, 1]
            q, pa, size = _moments(r_band)
            q_meas[name].append(q)
            if name in ("smooth_cigar", "edge_on_disk"):
                diff = abs((pa - batch["position_angle"][i] + 90) % 180 - 90)
                assert diff < 8, (name, i, pa, batch["position_angle"][i])
            # Total flux and g-r colour: what the image holds is what the catalog says.
            g, r = batch["flux_image"][i, 0].sum(), r_band.sum()
            # Sérsic wings beyond the stamp are lost (a de Vaucouleurs profile holds ~15% of its
            # light beyond 4 half-light radii), so small galaxies must match tightly.
            compact = batch["half_light_radius"][i] < 0.06 * 48 * 0.262
            assert 0.8 < r / batch["flux"][i] < 1.01, (name, i)
            if compact:
                assert r == pytest.approx(batch["flux"][i], rel=0.05), (name, i)
            assert -2.5 * np.log10(g / r) == pytest.approx(batch["color_gr"][i], abs=0.05)
    # Measured roundness orders the classes as their labels say (the PSF rounds everything).
    assert min(q_meas["smooth_round"]) > max(q_meas["edge_on_disk"])
    assert np.median(q_meas["smooth_cigar"]) < np.median(q_meas["smooth_round"])
    assert min(q_meas["star"]) > 0.95
    # Stars are the most compact objects: PSF-sized.
    star_size = max(_moments(by_class["star"]["flux_image"][i, 1])[2] for i in range(PER_CLASS))
    gal_size = min(_moments(by_class["smooth_round"]["flux_image"][i, 1])[2]
                   for i in range(PER_CLASS))
    assert star_size < gal_size


def test_bulges_redder_than_arms_and_knots(by_class):
    assert np.median(by_class["smooth_round"]["color_gr"]) > np.median(
        by_class["disturbed"]["color_gr"]) + 0.2


@pytest.mark.parametrize("n,hlr,q,pa,x0,y0", [(1.0, 1.5, 0.3, 30.0, 0.2, -0.1),
                                              (4.0, 0.8, 0.7, 120.0, -0.5, 0.3),
                                              (2.5, 1.2, 0.5, 75.0, 1.0, 1.5)])
def test_fast_path_matches_galsim_drawimage(n, hlr, q, pa, x0, y0):
    """One Sérsic component through the k-space path == galsim.Convolve(...).drawImage."""
    cfg = SimConfig(size=64)
    scene = _Scene(_cfg_grid(cfg), cfg, np.random.default_rng(0))
    scene.sersic(n, hlr, q, pa, x0, y0, 100.0, 0.0, 0.0)
    fast = scene.render()
    for band, fwhm in enumerate(cfg.per_band("psf_fwhm")):
        profile = galsim.Sersic(n=n, half_light_radius=hlr, flux=100.0).shear(
            q=q, beta=pa * galsim.degrees).shift(x0, y0)
        psf = galsim.Moffat(beta=cfg.psf_beta, fwhm=fwhm)
        # GalSim arrays have row 0 at the bottom; our origin is pixel (size//2, size//2).
        ref = galsim.Convolve(profile, psf).drawImage(
            nx=64, ny=64, scale=cfg.pixel_scale, offset=(0.5, -0.5)).array[::-1]
        assert np.abs(fast[band] - ref).max() < 2e-3 * ref.max()


def test_colour_stretch_is_fixed_across_galaxies():
    cfg = SimConfig()
    rng = np.random.default_rng(0)
    flux = np.abs(rng.normal(0, 0.5, (3, 16, 16)))
    bright, faint = sdss_rgb(flux, cfg), sdss_rgb(0.1 * flux, cfg)
    assert bright.dtype == np.uint8 and bright.shape == (16, 16, 3)
    assert faint.astype(int).sum() < bright.astype(int).sum()  # no per-image normalisation
    sky = sdss_rgb(np.zeros((3, 4, 4)), cfg)
    assert (sky == sky[0, 0]).all() and sky[0, 0, 0] == sky[0, 0, 1] == sky[0, 0, 2]
    red = sdss_rgb(np.array([0.1, 1.0, 3.0])[:, None, None] * np.ones((3, 2, 2)), cfg)
    assert red[0, 0, 0] > red[0, 0, 2]  # reddest band -> R channel


def test_config_validation():
    with pytest.raises(ConfigError, match="^bands"):
        SimConfig(bands=("z", "r", "g"))
    with pytest.raises(ConfigError, match="^classes"):
        SimConfig(classes=("spiral", "blob"))
    with pytest.raises(ConfigError, match="^sky_noise"):
        SimConfig(sky_noise=(0.1, 0.2))
    cfg = from_dict(SimConfig, {"size": 32, "classes": ["ring"], "psf_fwhm": [1.0]})
    assert cfg.classes == ("ring",) and cfg.per_band("psf_fwhm").tolist() == [1.0] * 3


def test_montage_one_row_per_class(tmp_path):
    per_class, size = 4, 24
    labels = np.repeat(np.arange(len(CLASS_NAMES)), per_class)
    labels = labels[labels != 2]  # class 2 has no examples: its row stays empty
    images = np.full((len(labels), size, size, 3), 200, np.uint8)
    out = class_montage(images, labels, CLASS_NAMES, tmp_path / "m.png", per_class=per_class)
    from PIL import Image

    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    height, width = montage_shape(len(CLASS_NAMES), per_class)
    assert png.shape[:2] == (height, width)
    row_h = height // len(CLASS_NAMES)
    cells = png[:, int(width * 0.2):]  # right of the class-name column
    filled = [cells[r * row_h:(r + 1) * row_h].mean() for r in range(len(CLASS_NAMES))]
    assert filled[2] < 5 and min(f for i, f in enumerate(filled) if i != 2) > 100
