"""GalSim survey simulator: 3-band colour galaxy cutouts with a ground-truth catalog.

Pure numpy + GalSim (no Ray): ``render_galaxy`` draws one cutout, ``render_batch`` a column
batch ready for Parquet. The Ray Data orchestration (sharding, writing) lives in the Ray layer.

How a cutout is drawn (fast path: ~4 ms at 64 px, ~11 ms at 128 px, on one core)
----------------------------------------------------------------------------------
Everything is linear, so each *component* of the scene (bulge, disk, spiral arms, bar, ring,
knots, tidal tails, dust lane, companion, neighbours, stars) is turned into its Fourier
transform ONCE, on a fixed k-grid, and the bands are mixed per component with colour ratios:

    band_b(k) = PSF_b(k) * sum_c flux_c * sed_c[b] * F_c(k)          (then one inverse FFT per band)

which is what GalSim's ``Convolve(...).drawImage`` does internally, minus re-rendering per band
and minus GalSim's large, profile-dependent FFT sizes (a de Vaucouleurs profile makes GalSim
pick a 256-512 px FFT; ``drawImage`` of one such galaxy took ~50 ms here).

* Sérsic components (bulges, disks, smooth galaxies, neighbours) use GalSim's own Hankel
  transform of the Sérsic profile, tabulated once per Sérsic index (``_sersic_table``:
  ``galsim.Sersic(...).kValue``; ~1 s per process for all) and evaluated at the sheared radius
  ``|A^T k|`` — exactly GalSim's ``shear`` / ``shift`` transforms. Sérsic indices are quantised
  to steps of 0.5 in [0.5, 4] so the tables stay few; the truth records the quantised value.
* GalSim has no arms or bars: those are drawn as pre-PSF surface-brightness images on the pixel
  grid (the role ``galsim.InterpolatedImage`` would play) and FFT'd onto the same k-grid.
* Star-forming knots of disturbed galaxies come from ``galsim.RandomKnots`` (its point positions,
  seeded from the galaxy's generator), deposited on the grid and given a small Gaussian size.
  Knots along arms/rings and tidal tails are deposited the same way.
* Dust lanes of edge-on disks multiply the (band-limited) pre-PSF light by exp(-tau), stronger
  in the blue, before the PSF (``_Scene.attenuate``).
* The PSF (Moffat, per band, convolved with the pixel) is drawn once with
  ``galsim.drawKImage`` and cached; k-modes where every band's PSF is below ``psf_k_threshold``
  are skipped (they would be multiplied by ~0 anyway).

``tests/test_simulate.py`` checks this path against ``galsim.Convolve(...).drawImage``.

Geometry and units
------------------
Images are (row, col) with row 0 at the TOP (display order). Positions are in arcsec with x to
the right and y UP; position angles are degrees counter-clockwise from +x, in [0, 180). The main
object sits at pixel (size // 2, size // 2) plus a sub-pixel offset. Fluxes are in nanomaggies
(magnitude = 22.5 - 2.5 log10 flux), like the Legacy Surveys.

Sizes scale with the cutout: half-light radii are drawn in units of ``size / 64`` pixels (a
galaxy spans a similar fraction of a 64 px and of a 128 px cutout, like survey cutouts chosen to
fit their galaxy). The redshift-like parameter ``redshift`` then follows from a physical size
(kpc) and the apparent size, and the flux from an absolute magnitude and that redshift (with
(1+z) dimming and a simple k-correction), so small galaxies are fainter and redder.

Classes
-------
The class of galaxy ``index`` is drawn uniformly from ``cfg.classes`` by its own generator, so
classes are balanced in expectation for any set of indices. The label is the position in
``CLASS_NAMES`` (stable even when ``cfg.classes`` is a subset).

Ground-truth columns (``TRUTH_FIELDS``; NaN or 0 where a field does not apply):
    bulge_fraction        r-band flux of the spheroid / total of the main object (1 for the
                          smooth classes, 0 for bulgeless disks, NaN for stars)
    sersic_n              Sérsic index of the spheroid (the galaxy for smooth classes, the bulge
                          for disks; NaN when there is no spheroid; disks are exponential, n=1)
    half_light_radius     arcsec, semi-major axis of the half-light ellipse of the main
                          component: the spheroid for smooth classes, the disk for disk classes,
                          the primary's disk for mergers; 0 for stars. (GalSim's sheared
                          profiles use the circularised radius, half_light_radius * sqrt(q).)
    axis_ratio            b/a of that component (disk inclination for disks); 1 for stars
    position_angle        deg CCW from +x of that component's major axis; NaN for stars
    arm_count             number of spiral arms (0 without arms)
    arm_pitch             arm pitch angle, deg (NaN without arms)
    bar_strength          bar flux / total flux of the main object (0 without a bar)
    ring_radius           arcsec, in the disk plane (NaN without a ring)
    flux                  total r-band flux of the main object, nanomaggies
    mag_r                 22.5 - 2.5 log10(flux)
    color_gr, color_rz    g - r and r - z colour of the main object, mag (from its component SEDs)
    redshift              redshift-like dimming parameter (0 for stars)
    dust_lane             1 when an edge-on disk has a dust lane
    companion_flux_ratio  merger companion / primary flux (NaN otherwise)
    companion_separation  arcsec (NaN otherwise)
    n_neighbours, n_stars background galaxies / stars added to the cutout

Determinism: every random number of galaxy ``index`` comes from
``np.random.default_rng([cfg.seed, index])`` (GalSim's ``RandomKnots`` gets a ``BaseDeviate``
seeded from it), so any subset of indices renders identically in any order or process.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import galsim
import numpy as np

from galray.config import check
from galray.data.shards import ImageSpec

CLASS_NAMES: tuple[str, ...] = (
    "smooth_round",
    "smooth_cigar",
    "edge_on_disk",
    "edge_on_bulge",
    "spiral",
    "barred_spiral",
    "ring",
    "merger",
    "disturbed",
    "star",
)

# Ground-truth column -> dtype, in column order (see the module docstring for meanings).
TRUTH_FIELDS: dict[str, type] = {
    "bulge_fraction": np.float32,
    "sersic_n": np.float32,
    "half_light_radius": np.float32,
    "axis_ratio": np.float32,
    "position_angle": np.float32,
    "arm_count": np.int32,
    "arm_pitch": np.float32,
    "bar_strength": np.float32,
    "ring_radius": np.float32,
    "flux": np.float32,
    "mag_r": np.float32,
    "color_gr": np.float32,
    "color_rz": np.float32,
    "redshift": np.float32,
    "dust_lane": np.int32,
    "companion_flux_ratio": np.float32,
    "companion_separation": np.float32,
    "n_neighbours": np.int32,
    "n_stars": np.int32,
}

# Bands the colour model knows, blue to red. A component's SED is its g-r and r-z colour;
# r-i is taken as half of r-z (close to the SDSS/DECaLS galaxy locus).
KNOWN_BANDS: tuple[str, ...] = ("g", "r", "i", "z")

_ZP = 22.5  # nanomaggy zero point
_C_OVER_H0_MPC = 4283.0  # c / H0 for H0 = 70 km/s/Mpc; low-z distances D_c ~ (c/H0) z
_SERSIC_N_GRID = np.arange(0.5, 4.01, 0.5)  # quantised Sérsic indices (GalSim table set-up is
# ~0.3 s for n=4 and >1 s for n>=5, so we stop at 4)
_EXP_HLR_TO_SCALE = 1.0 / 1.6783469900166608  # exponential: scale length / half-light radius
_GSPARAMS = galsim.GSParams(kvalue_accuracy=1e-5)


@dataclass(frozen=True)
class SimConfig:
    """Survey and rendering settings of the simulator. Sizes in pixels, angles in arcsec."""

    size: int = 64
    """Cutout side in pixels (square)."""
    pixel_scale: float = 0.262
    """Arcsec per pixel (0.262 is DECaLS)."""
    bands: tuple[str, ...] = ("g", "r", "z")
    """Three bands from KNOWN_BANDS, blue to red; rendered to B, G, R of the colour image."""
    psf_fwhm: tuple[float, ...] = (1.3, 1.2, 1.1)
    """Moffat PSF FWHM in arcsec, one per band or one for all (seeing improves to the red)."""
    psf_beta: float = 3.0
    """Moffat beta (survey PSFs have extended wings, beta ~ 2.5-3.5)."""
    sky_noise: tuple[float, ...] = (0.004, 0.008, 0.018)
    """Gaussian sky noise per pixel, nanomaggies, one per band or one for all. The default
    matches Legacy Surveys DR9 depths (5 sigma point source g 24.7, r 23.9, z 23.0)."""
    classes: tuple[str, ...] = CLASS_NAMES
    """Families to draw (uniformly at random), a subset of CLASS_NAMES."""
    neighbour_rate: float = 0.6
    """Mean number (Poisson) of faint background galaxies per cutout."""
    star_rate: float = 0.3
    """Mean number (Poisson) of field stars per cutout."""
    stretch_q: float = 20.0
    """Softening Q of the arcsinh colour stretch (Lupton et al. 2004; Legacy Surveys uses 20)."""
    stretch_m: float = 0.03
    """Offset added to each scaled band before the stretch (sets the sky level grey)."""
    stretch_scales: tuple[float, ...] = (6.0, 3.4, 2.2)
    """Per-band multipliers of the flux before the stretch (Legacy Surveys g, r, z: 6.0, 3.4, 2.2).
    Fixed for all galaxies, so faint objects look faint."""
    size_scale: float = 1.0
    """Multiplier on every sampled galaxy size (1 keeps sizes in units of size/64 pixels)."""
    pad_factor: float = 1.5
    """FFT grid = next fast length >= pad_factor * size; light beyond folds back (wraps)."""
    psf_k_threshold: float = 1e-4
    """Skip k-modes where every band's PSF transform is below this (relative to 1 at k=0)."""
    keep_flux: bool = False
    """render_batch also returns the float32 flux cube (N, bands, size, size) as "flux_image"
    (not "flux": that column is the catalog's total flux)."""
    seed: int = 0
    """Dataset seed; galaxy i draws all its randomness from (seed, i)."""

    def __post_init__(self) -> None:
        check(self.size >= 16, "size", f"must be >= 16 pixels, got {self.size}")
        check(self.pixel_scale > 0, "pixel_scale", "must be > 0")
        check(len(self.bands) == 3, "bands", f"need exactly 3 bands for RGB, got {self.bands}")
        check(all(b in KNOWN_BANDS for b in self.bands), "bands", f"bands must be in {KNOWN_BANDS}")
        order = [KNOWN_BANDS.index(b) for b in self.bands]
        check(order == sorted(set(order)), "bands", "must be distinct and ordered blue to red")
        for name in ("psf_fwhm", "sky_noise", "stretch_scales"):
            value = getattr(self, name)
            check(len(value) in (1, len(self.bands)), name, f"give 1 or {len(self.bands)} values")
        check(all(f > 0 for f in self.psf_fwhm), "psf_fwhm", "must be > 0")
        check(min(self.psf_fwhm) / self.pixel_scale >= 1.5, "psf_fwhm",
              "must be >= 1.5 pixels so the PSF-convolved image is sampled (no aliasing)")
        check(self.psf_beta > 1.5, "psf_beta", "must be > 1.5")
        check(all(s >= 0 for s in self.sky_noise), "sky_noise", "must be >= 0")
        check(len(self.classes) > 0, "classes", "must name at least one class")
        check(all(c in CLASS_NAMES for c in self.classes), "classes", f"must be in {CLASS_NAMES}")
        check(len(set(self.classes)) == len(self.classes), "classes", "must not repeat")
        check(self.neighbour_rate >= 0, "neighbour_rate", "must be >= 0")
        check(self.star_rate >= 0, "star_rate", "must be >= 0")
        check(self.stretch_q > 0, "stretch_q", "must be > 0")
        check(self.stretch_m >= 0, "stretch_m", "must be >= 0")
        check(all(s > 0 for s in self.stretch_scales), "stretch_scales", "must be > 0")
        check(self.size_scale > 0, "size_scale", "must be > 0")
        check(1.0 <= self.pad_factor <= 4.0, "pad_factor", "must be in [1, 4]")
        check(0 < self.psf_k_threshold < 0.1, "psf_k_threshold", "must be in (0, 0.1)")
        check(self.seed >= 0, "seed", "must be >= 0")

    def image_spec(self) -> ImageSpec:
        """The store layout of simulated cutouts: uint8 HWC colour renderings, one channel per band."""
        return ImageSpec(shape=(self.size, self.size, len(self.bands)), layout="HWC", dtype="uint8",
                         bands=tuple(self.bands))

    def per_band(self, name: str) -> np.ndarray:
        """A per-band field as an array of len(bands) (a single value is broadcast)."""
        value = np.asarray(getattr(self, name), dtype=np.float64)
        return np.broadcast_to(value, (len(self.bands),)).copy()


# ----------------------------------------------------------------------------------------------
# Cached grids: PSF transforms, k-modes, pixel coordinates


@dataclass(frozen=True)
class _Grid:
    """The fixed k-grid shared by all cutouts of one geometry.

    Only the half-plane of modes that ``irfft2`` needs (kx >= 0 columns of the rfft layout) is
    kept, and of those only modes where some band's PSF is above the threshold."""

    size: int
    n_fft: int
    scale: float
    flat_index: np.ndarray  # (P,) kept modes, indices into the raveled (n_fft, n_fft//2+1) layout
    iy: np.ndarray  # (P,) row (ky) index of each mode
    ix: np.ndarray  # (P,) column (kx) index
    kx_axis: np.ndarray  # (n_fft//2+1,) kx of each column, rad/arcsec
    ky_axis: np.ndarray  # (n_fft,) ky of each row, y UP (numpy row order is y down, so -ky_row)
    kxx: np.ndarray  # (P,) kx^2
    kyy: np.ndarray  # (P,) ky^2
    kxy: np.ndarray  # (P,) 2 kx ky
    psf_k: np.ndarray  # (B, P) real: PSF x pixel transform per band
    wrap: np.ndarray  # (size,) rows/cols of the fft grid holding the stamp (origin at index 0)
    x: np.ndarray  # (size, size) arcsec of pixel centres, x right
    y: np.ndarray  # (size, size) arcsec, y up


def _fast_len(n: int) -> int:
    """Smallest even 2^a 3^b 5^c >= n (pocketfft is fastest on those)."""
    m = n + n % 2
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


@functools.lru_cache(maxsize=8)
def _grid(size: int, scale: float, psf_fwhm: tuple[float, ...], psf_beta: float, pad: float,
          k_threshold: float) -> _Grid:
    n_fft = _fast_len(math.ceil(pad * size))  # even, so the Nyquist row/column is one index
    dk = 2.0 * math.pi / (n_fft * scale)
    half = n_fft // 2 + 1
    psf_half = []
    for fwhm in psf_fwhm:
        psf = galsim.Convolve(galsim.Moffat(beta=psf_beta, fwhm=fwhm, gsparams=_GSPARAMS),
                              galsim.Pixel(scale, gsparams=_GSPARAMS))
        kimage = psf.drawKImage(nx=n_fft, ny=n_fft, scale=dk).array  # centred on k=0
        psf_half.append(np.fft.ifftshift(kimage).real[:, :half])  # rfft layout; real: symmetric
    psf_half = np.stack(psf_half)  # (B, n_fft, half)
    keep = (np.abs(psf_half) > k_threshold).any(axis=0)
    keep[n_fft // 2, :] = False  # Nyquist row and column: ambiguous sign, PSF ~ 0 there anyway
    keep[:, n_fft // 2] = False
    iy, ix = np.nonzero(keep)
    kx_axis = 2.0 * math.pi * np.fft.rfftfreq(n_fft, d=scale)
    ky_axis = -2.0 * math.pi * np.fft.fftfreq(n_fft, d=scale)
    kx, ky = kx_axis[ix], ky_axis[iy]
    centre = size // 2
    pix = (np.arange(size) - centre) * scale
    x, y_down = np.meshgrid(pix, pix, indexing="xy")
    return _Grid(size=size, n_fft=n_fft, scale=scale, flat_index=iy * half + ix, iy=iy, ix=ix,
                 kx_axis=kx_axis, ky_axis=ky_axis, kxx=kx * kx, kyy=ky * ky, kxy=2.0 * kx * ky,
                 psf_k=psf_half[:, iy, ix], wrap=(np.arange(size) - centre) % n_fft,
                 x=x, y=-y_down)


def _cfg_grid(cfg: SimConfig) -> _Grid:
    return _grid(cfg.size, cfg.pixel_scale, tuple(cfg.per_band("psf_fwhm")), cfg.psf_beta,
                 cfg.pad_factor, cfg.psf_k_threshold)


_U_STEP = 0.005  # table step in u = k * hlr; lerp error < 1e-4 for n <= 4
_U_MAX = 120.0  # covers PSF k-limit (< 10 rad/arcsec) x the largest half-light radii


@functools.lru_cache(maxsize=None)
def _sersic_table(n: float) -> np.ndarray:
    """GalSim's Fourier transform T(u) of a unit-flux, unit half-light-radius Sérsic profile on a
    uniform grid u = 0, _U_STEP, ... (real because the profile is circular)."""
    profile = galsim.Sersic(n=n, half_light_radius=1.0, gsparams=_GSPARAMS)
    u_log = np.geomspace(1e-3, 2 * _U_MAX, 1500)
    t_log = np.array([profile.kValue(galsim.PositionD(float(v), 0.0)).real for v in u_log])
    u = np.arange(0.0, _U_MAX + 2 * _U_STEP, _U_STEP)
    with np.errstate(divide="ignore"):
        return np.interp(np.log(u), np.log(u_log), t_log, left=1.0)


def quantize_sersic_n(n: float) -> float:
    """Nearest index of the tabulated Sérsic grid (0.5 steps in [0.5, 4])."""
    return float(_SERSIC_N_GRID[np.argmin(np.abs(_SERSIC_N_GRID - n))])


# ----------------------------------------------------------------------------------------------
# Colours


def _sed(gr: float, rz: float, bands: Sequence[str]) -> np.ndarray:
    """Flux in each band relative to r for a component with colours g-r and r-z (mag)."""
    mag_minus_r = {"g": gr, "r": 0.0, "i": -0.5 * rz, "z": -rz}
    return np.array([10.0 ** (-0.4 * mag_minus_r[b]) for b in bands])


# Rest-frame colours (g-r, r-z) of the stellar populations (SDSS / DECaLS loci, roughly).
_POP_COLOURS = {
    "bulge": (0.80, 0.70),  # old, red
    "disk": (0.55, 0.45),
    "arms": (0.30, 0.30),  # young, blue
    "knots": (0.10, 0.12),  # star-forming clumps, bluest
}
_DUST_LANE_RATIO = {"g": 1.3, "r": 1.0, "i": 0.85, "z": 0.7}  # extinction grows to the blue


# ----------------------------------------------------------------------------------------------
# The scene: components accumulated in k-space per band


class _Scene:
    """Accumulates components' Fourier transforms per band; ``main`` ones enter the truth."""

    def __init__(self, grid: _Grid, cfg: SimConfig, rng: np.random.Generator):
        self.grid = grid
        self.rng = rng
        self.bands = cfg.bands
        self.acc = np.zeros((len(cfg.bands), grid.ix.size), np.complex128)  # (B, P)
        self.main_flux = np.zeros(len(KNOWN_BANDS))  # main object's flux in g, r, i, z
        self.intrinsic_r = 0.0  # main object's r flux before dust
        self.bulge_flux_r = 0.0
        self.bar_flux_r = 0.0
        self._phases: dict[tuple[float, float], np.ndarray] = {}
        # Redshift reddening of the main object's (g-r, r-z), set by _set_distance.
        self.reddening = (0.0, 0.0)

    def colour(self, population: str, jitter: float = 0.04) -> tuple[float, float]:
        """Observed (g-r, r-z) of a main-object population, with per-galaxy scatter."""
        gr, rz = _POP_COLOURS[population]
        d = self.rng.normal(0.0, jitter, 2)
        return gr + self.reddening[0] + d[0], rz + self.reddening[1] + d[1]

    def _add(self, ft: np.ndarray, flux_r: float, gr: float, rz: float, main: bool) -> None:
        self.acc += (flux_r * _sed(gr, rz, self.bands))[:, None] * ft[None, :]
        if main:
            self.main_flux += flux_r * _sed(gr, rz, KNOWN_BANDS)
            self.intrinsic_r += flux_r

    def _phase(self, x0: float, y0: float) -> np.ndarray:
        """exp(-i k.x0) on the kept modes; separable in kx, ky, so 2 short exps + a gather."""
        key = (x0, y0)
        if key not in self._phases:
            g = self.grid
            self._phases[key] = (np.exp(-1j * g.kx_axis * x0)[g.ix]
                                 * np.exp(-1j * g.ky_axis * y0)[g.iy])
        return self._phases[key]

    def sersic(self, n: float, hlr: float, q: float, pa_deg: float, x0: float, y0: float,
               flux_r: float, gr: float, rz: float, main: bool = True) -> None:
        """A sheared Sérsic profile (GalSim ``Sersic(...).shear(q, pa).shift(x0, y0)``): its
        transform is T(hlr |A^T k|) with k_major^2 / q + k_minor^2 q under the square root."""
        g = self.grid
        table = _sersic_table(quantize_sersic_n(n))
        c, s = math.cos(math.radians(pa_deg)), math.sin(math.radians(pa_deg))
        h2 = hlr * hlr
        u = np.sqrt(g.kxx * (h2 * (c * c / q + s * s * q)) + g.kyy * (h2 * (s * s / q + c * c * q))
                    + g.kxy * (h2 * c * s * (1.0 / q - q)))
        t = np.minimum(u * (1.0 / _U_STEP), table.size - 2.0)
        i = t.astype(np.intp)
        lo = table[i]
        ft = lo + (t - i) * (table[i + 1] - lo)  # linear interpolation on the uniform table
        self._add(ft * self._phase(x0, y0), flux_r, gr, rz, main)

    def image(self, sb: np.ndarray, flux_r: float, gr: float, rz: float, main: bool = True,
              blur: float = 0.0) -> None:
        """A pre-PSF surface-brightness image on the stamp's pixels, normalised to ``flux_r``;
        ``blur`` (arcsec) is an extra Gaussian sigma."""
        total = float(sb.sum())
        if not total > 0:
            return
        g = self.grid
        wrapped = np.zeros((g.n_fft, g.n_fft))  # stamp placed with its origin at index 0
        wrapped[np.ix_(g.wrap, g.wrap)] = sb * (1.0 / total)
        ft = np.fft.rfft2(wrapped).ravel()[g.flat_index]
        if blur > 0:
            ft = ft * np.exp(-0.5 * (g.kxx + g.kyy) * blur * blur)
        self._add(ft, flux_r, gr, rz, main)

    def deposit(self, x: np.ndarray, y: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Bilinear deposit of points (arcsec, y up) on the stamp's pixels -> (size, size)."""
        g = self.grid
        col = x / g.scale + g.size // 2
        row = -y / g.scale + g.size // 2
        c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
        fc, fr = col - c0, row - r0
        out = np.zeros((g.size, g.size))
        for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc),
                          (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < g.size) & (cc >= 0) & (cc < g.size)
            np.add.at(out, (rr[ok], cc[ok]), (w * weight)[ok])
        return out

    def point(self, x0: float, y0: float, flux_r: float, gr: float, rz: float,
              main: bool = False) -> None:
        """A point source (a star: the PSF itself)."""
        self._add(self._phase(x0, y0), flux_r, gr, rz, main)

    def attenuate(self, tau_r: np.ndarray) -> None:
        """Dust in front of everything drawn so far: multiply the pre-PSF light by
        exp(-tau_b), tau_b = tau_r * _DUST_LANE_RATIO[b] (optical depth in r on the stamp).

        The pre-PSF image is the inverse FFT of the kept modes, tapered by a Gaussian much
        narrower than the PSF against ringing; the (negative) dust component is added back in
        k-space, so the light never goes below zero and the PSF then blurs the lane."""
        g = self.grid
        half = g.n_fft // 2 + 1
        sigma = 0.6 * g.scale  # taper well inside the PSF
        taper = np.exp(-0.5 * (g.kxx + g.kyy) * sigma * sigma)
        full = np.zeros((len(self.bands), g.n_fft * half), np.complex128)
        full[:, g.flat_index] = self.acc * taper
        pre = np.fft.irfft2(full.reshape(-1, g.n_fft, half), s=(g.n_fft, g.n_fft))
        pre = pre[:, g.wrap][:, :, g.wrap]  # (B, size, size)
        lost = np.zeros((len(self.bands), g.n_fft, g.n_fft))
        ratio = np.array([_DUST_LANE_RATIO[b] for b in self.bands])
        lost[np.ix_(np.arange(len(self.bands)), g.wrap, g.wrap)] = pre * np.expm1(
            -tau_r[None] * ratio[:, None, None])
        self.acc += np.fft.rfft2(lost).reshape(len(self.bands), -1)[:, g.flat_index]
        # Truth: the fraction of light lost in each known band, measured on the r-like image.
        ref = pre[list(self.bands).index("r")] if "r" in self.bands else pre.mean(0)
        total = ref.sum()
        for i, b in enumerate(KNOWN_BANDS):
            kept = (ref * np.exp(-tau_r * _DUST_LANE_RATIO[b])).sum() / total
            self.main_flux[i] *= kept

    def render(self) -> np.ndarray:
        """PSF-convolved noiseless flux, (B, size, size) float64, nanomaggies per pixel."""
        g = self.grid
        half = g.n_fft // 2 + 1
        full = np.zeros((len(self.bands), g.n_fft * half), np.complex128)
        full[:, g.flat_index] = self.acc * g.psf_k
        img = np.fft.irfft2(full.reshape(-1, g.n_fft, half), s=(g.n_fft, g.n_fft))
        return img[:, g.wrap][:, :, g.wrap]


# ----------------------------------------------------------------------------------------------
# Physical scalings


def _redshift_from_size(r_kpc: float, hlr_arcsec: float) -> float:
    """Redshift at which a galaxy of half-light radius r_kpc appears hlr_arcsec across.

    Low-z Hubble law: D_c = (c/H0) z, D_A = D_c / (1+z)."""
    d_a_mpc = r_kpc * 206.265 / hlr_arcsec  # 1 kpc at 1 Mpc subtends 206.265 arcsec
    x = min(d_a_mpc / _C_OVER_H0_MPC, 0.6)
    return float(np.clip(x / (1.0 - x), 0.003, 1.5))


def _flux_from_abs_mag(abs_mag: float, z: float) -> float:
    """r-band flux (nanomaggies) of absolute magnitude abs_mag at redshift z (+ ~z mag k-corr)."""
    d_l_mpc = _C_OVER_H0_MPC * z * (1.0 + z)
    mag = abs_mag + 5.0 * math.log10(d_l_mpc) + 25.0 + 1.0 * z
    return 10.0 ** (-0.4 * (mag - _ZP))


@dataclass
class _Ctx:
    """Per-galaxy helpers handed to the class builders."""

    rng: np.random.Generator
    scene: _Scene
    px: float  # arcsec per "reference pixel" (pixel_scale * size/64 * size_scale)
    x0: float  # main object centre, arcsec
    y0: float
    truth: dict = field(default_factory=dict)

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def log_uniform(self, lo: float, hi: float) -> float:
        return float(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def angle(self) -> float:
        return float(self.rng.uniform(0.0, 180.0))


def _set_distance(ctx: _Ctx, major: float, r_kpc_median: float, abs_mag_mean: float) -> float:
    """Draw physical size and luminosity, derive the redshift from the apparent half-light
    semi-major axis and the total r flux from the redshift; returns the flux."""
    rng = ctx.rng
    r_kpc = r_kpc_median * math.exp(rng.normal(0.0, 0.25))
    z = _redshift_from_size(r_kpc, major)
    flux = _flux_from_abs_mag(abs_mag_mean + rng.normal(0.0, 0.5), z)
    ctx.truth["redshift"] = z
    ctx.scene.reddening = (1.0 * z, 0.6 * z)  # k-correction-like reddening per unit z
    return flux


def _disk_coords(ctx: _Ctx, q: float, pa_deg: float, x0: float, y0: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Disk-plane radius and azimuth (rad) of every stamp pixel for a disk inclined to axis ratio
    q at position angle pa (the same area-preserving shear as ``_Scene.sersic``)."""
    g = ctx.scene.grid
    c, s = math.cos(math.radians(pa_deg)), math.sin(math.radians(pa_deg))
    dx, dy = g.x - x0, g.y - y0
    xm = (dx * c + dy * s) * math.sqrt(q)
    ym = (-dx * s + dy * c) / math.sqrt(q)
    return np.hypot(xm, ym), np.arctan2(ym, xm)


# ----------------------------------------------------------------------------------------------
# Class builders: each draws its parameters, adds components, fills ctx.truth


def _smooth(ctx: _Ctx, cigar: bool) -> None:
    major = ctx.log_uniform(3.5, 13.0) * ctx.px if cigar else ctx.log_uniform(2.5, 10.0) * ctx.px
    q = ctx.uniform(0.28, 0.5) if cigar else ctx.uniform(0.78, 1.0)
    hlr = major * math.sqrt(q)  # circularised: GalSim's convention for sheared profiles
    n = quantize_sersic_n(ctx.uniform(1.0, 4.0) if cigar else ctx.uniform(2.5, 4.0))
    pa = ctx.angle()
    flux = _set_distance(ctx, major, 3.0, -21.0 if cigar else -21.5)
    gr, rz = ctx.scene.colour("bulge")
    ctx.scene.sersic(n, hlr, q, pa, ctx.x0, ctx.y0, flux, gr - (0.05 if cigar else 0.0), rz)
    ctx.scene.bulge_flux_r += flux
    ctx.truth.update(sersic_n=n, half_light_radius=major, axis_ratio=q, position_angle=pa)


def _bulge_disk(ctx: _Ctx, hlr: float, q_disk: float, pa: float, flux: float, bt: float,
                x0: float, y0: float, main: bool = True, bulge_q: float | None = None,
                disk_share: float = 1.0) -> float:
    """Bulge (Sérsic n 1.5-4, red) + exponential disk (``disk_share`` of the disk light drawn
    here; the rest goes to arms/rings drawn by the caller). Returns the bulge's Sérsic index."""
    n_b = quantize_sersic_n(ctx.uniform(1.5, 4.0))
    if bt > 0:
        hlr_b = hlr * ctx.uniform(0.12, 0.3)
        q_b = bulge_q if bulge_q is not None else max(q_disk, ctx.uniform(0.7, 1.0))
        gr, rz = ctx.scene.colour("bulge")
        ctx.scene.sersic(n_b, hlr_b, q_b, pa, x0, y0, flux * bt, gr, rz, main=main)
        if main:
            ctx.scene.bulge_flux_r += flux * bt
    gr, rz = ctx.scene.colour("disk")
    ctx.scene.sersic(1.0, hlr, q_disk, pa, x0, y0, flux * (1 - bt) * disk_share, gr, rz,
                     main=main)
    return n_b


def _edge_on(ctx: _Ctx, bulge: bool) -> None:
    major = ctx.log_uniform(5.0, 16.0) * ctx.px
    q = ctx.uniform(0.1, 0.25) if bulge else ctx.uniform(0.07, 0.2)
    hlr = major * math.sqrt(q)
    pa = ctx.angle()
    flux = _set_distance(ctx, major, 5.0, -20.9 if not bulge else -21.3)
    bt = ctx.uniform(0.2, 0.55) if bulge else 0.0
    n_b = _bulge_disk(ctx, hlr, q, pa, flux, bt, ctx.x0, ctx.y0, bulge_q=ctx.uniform(0.55, 0.9))
    lane = bool(ctx.rng.random() < 0.65)
    if lane:
        # Dust lane along the midplane, slightly off-centre (the disk is not exactly edge-on),
        # as thick as a fraction of the disk's projected thickness; strong enough to hide the
        # bulge's midplane (optical depth in r of 1-3, larger to the blue).
        c, s = math.cos(math.radians(pa)), math.sin(math.radians(pa))
        g = ctx.scene.grid
        dx, dy = g.x - ctx.x0, g.y - ctx.y0
        along, across = dx * c + dy * s, -dx * s + dy * c
        thick = q * hlr * ctx.uniform(0.3, 0.5)
        shift = thick * ctx.uniform(-0.6, 0.6)
        tau = ctx.uniform(1.5, 4.0) * np.exp(-0.5 * ((across - shift) / thick) ** 2) * np.exp(
            -np.abs(along) / (2.0 * hlr))
        ctx.scene.attenuate(tau)
    ctx.truth.update(sersic_n=n_b if bulge else np.nan, half_light_radius=major, axis_ratio=q,
                     position_angle=pa, dust_lane=int(lane))


def _spiral_pattern(ctx: _Ctx, r: np.ndarray, theta: np.ndarray, arms: int, pitch_deg: float,
                    r0: float, theta0: float, r_in: float, scale_len: float) -> np.ndarray:
    """Logarithmic spiral arms: brightness along theta = theta0 + ln(r/r0)/tan(pitch)."""
    rng = ctx.rng
    winding = 1.0 if rng.random() < 0.5 else -1.0
    psi = arms * (theta - theta0 - winding * np.log(np.maximum(r, 1e-3) / r0)
                  / math.tan(math.radians(pitch_deg)))
    sharp = ctx.uniform(2.0, 5.0)  # larger -> narrower arms
    arm = (0.5 * (1.0 + np.cos(psi))) ** sharp
    # Uneven arms (flocculence): a slow random modulation along azimuth and radius.
    wobble = 1.0 + 0.35 * np.cos(theta + rng.uniform(0, 2 * np.pi)) * np.cos(
        r / scale_len * rng.uniform(1.0, 2.5) + rng.uniform(0, 2 * np.pi))
    envelope = np.exp(-r / scale_len) * (1.0 - np.exp(-((r / r_in) ** 2)))
    return arm * wobble * envelope


def _knots_on(ctx: _Ctx, sb: np.ndarray, count: int, flux: float, gr: float, rz: float,
              blur: float) -> None:
    """Star-forming knots placed where ``sb`` is bright (along arms or rings)."""
    p = np.maximum(sb, 0.0).ravel() ** 2
    if count <= 0 or not p.sum() > 0:
        return
    g = ctx.scene.grid
    idx = ctx.rng.choice(p.size, size=count, p=p / p.sum())
    jitter = ctx.rng.uniform(-0.5, 0.5, (2, count)) * g.scale
    weight = ctx.rng.lognormal(0.0, 0.6, count)
    dep = ctx.scene.deposit(g.x.ravel()[idx] + jitter[0], g.y.ravel()[idx] + jitter[1], weight)
    ctx.scene.image(dep, flux, gr, rz, blur=blur)


def _spiral(ctx: _Ctx, barred: bool) -> None:
    rng = ctx.rng
    major = ctx.log_uniform(8.0, 16.0) * ctx.px
    q = ctx.uniform(0.55, 1.0)
    hlr = major * math.sqrt(q)
    pa = ctx.angle()
    flux = _set_distance(ctx, major, 5.0, -21.45)
    bt = ctx.uniform(0.05, 0.2) if barred else ctx.uniform(0.05, 0.3)
    arms = int(rng.choice([2, 3, 4], p=[0.6, 0.25, 0.15] if barred else [0.45, 0.3, 0.25]))
    pitch = ctx.uniform(10.0, 32.0)
    bar_frac = ctx.uniform(0.15, 0.3) if barred else 0.0
    arm_frac = ctx.uniform(0.4, 0.6)  # share of the disk light in the arms
    knot_frac = ctx.uniform(0.04, 0.1)
    disk_flux = flux * (1 - bt - bar_frac)
    disk_share = 1 - arm_frac - knot_frac
    n_b = _bulge_disk(ctx, hlr, q, pa, flux, bt, ctx.x0, ctx.y0, disk_share=disk_share * (
        1 - bt - bar_frac) / (1 - bt))
    r, theta = _disk_coords(ctx, q, pa, ctx.x0, ctx.y0)
    scale_len = hlr * _EXP_HLR_TO_SCALE * ctx.uniform(1.0, 1.4)
    theta0 = rng.uniform(0, 2 * np.pi)
    if barred:
        # Ferrers-like bar (flat, sharp ends) in the disk plane; the arms start at its ends.
        bar_len = hlr * ctx.uniform(0.7, 1.1)
        bar_q = ctx.uniform(0.15, 0.28)
        bx, by = r * np.cos(theta - theta0), r * np.sin(theta - theta0)
        mu2 = (bx / bar_len) ** 2 + (by / (bar_len * bar_q)) ** 2
        bar = np.clip(1.0 - mu2, 0.0, None) ** 1.5
        gr, rz = ctx.scene.colour("bulge")
        ctx.scene.image(bar, flux * bar_frac, gr - 0.1, rz - 0.05)
        ctx.scene.bar_flux_r += flux * bar_frac
        r0, r_in = bar_len, bar_len * 0.9
    else:
        r0, r_in = hlr * ctx.uniform(0.3, 0.6), hlr * ctx.uniform(0.25, 0.45)
    pattern = _spiral_pattern(ctx, r, theta, arms, pitch, r0, theta0, r_in, scale_len)
    gr, rz = ctx.scene.colour("arms")
    ctx.scene.image(pattern, disk_flux * arm_frac, gr, rz)
    gr, rz = ctx.scene.colour("knots")
    count = int(rng.integers(8, 30))
    _knots_on(ctx, pattern, count, disk_flux * knot_frac, gr, rz, blur=0.4 * ctx.px)
    ctx.truth.update(sersic_n=n_b, half_light_radius=major, axis_ratio=q, position_angle=pa,
                     arm_count=arms, arm_pitch=pitch, bar_strength=bar_frac)


def _ring(ctx: _Ctx) -> None:
    rng = ctx.rng
    major = ctx.log_uniform(7.0, 14.0) * ctx.px
    q = ctx.uniform(0.5, 1.0)
    hlr = major * math.sqrt(q)
    pa = ctx.angle()
    flux = _set_distance(ctx, major, 5.0, -21.0)
    bt = ctx.uniform(0.1, 0.3)
    ring_frac = ctx.uniform(0.4, 0.6)
    disk_share = 1 - ring_frac / (1 - bt)
    n_b = _bulge_disk(ctx, hlr * ctx.uniform(0.35, 0.6), q, pa, flux, bt, ctx.x0, ctx.y0,
                      disk_share=disk_share)
    r, theta = _disk_coords(ctx, q, pa, ctx.x0, ctx.y0)
    radius = hlr * ctx.uniform(0.9, 1.4)
    width = radius * ctx.uniform(0.06, 0.12)
    # A slightly lopsided ring (brightness varies ~20% around it) looks less artificial.
    ring = np.exp(-0.5 * ((r - radius) / width) ** 2) * (
        1.0 + 0.2 * np.cos(theta - rng.uniform(0, 2 * np.pi)))
    gr, rz = ctx.scene.colour("arms")
    ctx.scene.image(ring, flux * ring_frac * 0.85, gr, rz)
    gr, rz = ctx.scene.colour("knots")
    _knots_on(ctx, ring, int(rng.integers(6, 20)), flux * ring_frac * 0.15, gr, rz,
              blur=0.4 * ctx.px)
    ctx.truth.update(sersic_n=n_b, half_light_radius=major, axis_ratio=q, position_angle=pa,
                     ring_radius=radius)


def _tidal_tail(ctx: _Ctx, xc: float, yc: float, direction: float, length: float,
                flux: float, main: bool) -> None:
    """A curved stream of light leaving (xc, yc): points along an arc, deposited and blurred."""
    rng = ctx.rng
    t = np.linspace(0.0, 1.0, 160)
    bend = rng.uniform(0.6, 1.6) * (1 if rng.random() < 0.5 else -1)
    ang = direction + bend * t
    rad = length * (0.25 + t)
    w = (1.0 - 0.8 * t) * rng.lognormal(0.0, 0.25, t.size)
    dep = ctx.scene.deposit(xc + rad * np.cos(ang), yc + rad * np.sin(ang), w)
    gr, rz = ctx.scene.colour("disk")
    ctx.scene.image(dep, flux, gr - 0.1, rz - 0.05, main=main, blur=ctx.uniform(0.7, 1.4) * ctx.px)


def _merger(ctx: _Ctx) -> None:
    rng = ctx.rng
    g = ctx.scene.grid
    q1, q2 = ctx.uniform(0.4, 1.0), ctx.uniform(0.4, 1.0)
    major1 = ctx.log_uniform(4.0, 10.0) * ctx.px
    hlr1 = major1 * math.sqrt(q1)
    hlr2 = hlr1 * ctx.uniform(0.5, 1.0)
    ratio = ctx.uniform(0.3, 1.0)
    sep = min((hlr1 + hlr2) * ctx.uniform(0.9, 1.8), 0.36 * g.size * g.scale)
    phi = rng.uniform(0, 2 * np.pi)
    xc, yc = ctx.x0 + sep * math.cos(phi), ctx.y0 + sep * math.sin(phi)
    flux = _set_distance(ctx, major1, 4.0, -21.2)
    pa1, pa2 = ctx.angle(), ctx.angle()
    bt1, bt2 = ctx.uniform(0.0, 0.8), ctx.uniform(0.0, 0.8)
    n_b = _bulge_disk(ctx, hlr1, q1, pa1, flux, bt1, ctx.x0, ctx.y0)
    _bulge_disk(ctx, hlr2, q2, pa2, flux * ratio, bt2, xc, yc, main=False)
    if rng.random() < 0.75:  # tidal tails, pointing away from the partner
        _tidal_tail(ctx, ctx.x0, ctx.y0, phi + np.pi + rng.normal(0, 0.5),
                    (hlr1 + sep) * 0.7, flux * ctx.uniform(0.12, 0.25), main=True)
        _tidal_tail(ctx, xc, yc, phi + rng.normal(0, 0.5), (hlr2 + sep) * 0.7,
                    flux * ratio * ctx.uniform(0.12, 0.25), main=False)
    ctx.truth.update(sersic_n=n_b if bt1 > 0 else np.nan, half_light_radius=major1, axis_ratio=q1,
                     position_angle=pa1, companion_flux_ratio=ratio, companion_separation=sep)


def _disturbed(ctx: _Ctx) -> None:
    rng = ctx.rng
    major = ctx.log_uniform(4.0, 11.0) * ctx.px
    q = ctx.uniform(0.4, 1.0)
    hlr = major * math.sqrt(q)
    pa = ctx.angle()
    flux = _set_distance(ctx, major, 3.0, -20.5)
    knot_frac = ctx.uniform(0.35, 0.65)
    lopsided = ctx.uniform(0.15, 0.35)
    gr, rz = ctx.scene.colour("arms")
    ctx.scene.sersic(1.0, hlr, q, pa, ctx.x0, ctx.y0, flux * (1 - knot_frac) * (1 - lopsided),
                     gr + 0.15, rz + 0.1)
    off = hlr * ctx.uniform(0.4, 0.9)
    phi = rng.uniform(0, 2 * np.pi)
    ctx.scene.sersic(1.0, hlr * ctx.uniform(0.5, 0.9), ctx.uniform(0.4, 1.0), ctx.angle(),
                     ctx.x0 + off * math.cos(phi), ctx.y0 + off * math.sin(phi),
                     flux * (1 - knot_frac) * lopsided, gr, rz)
    # GalSim's RandomKnots draws clump positions from an exponential-like profile (a random walk).
    knots = galsim.RandomKnots(int(rng.integers(12, 50)), half_light_radius=hlr * 1.1,
                               flux=1.0, rng=galsim.BaseDeviate(int(rng.integers(1, 2**31 - 1))))
    pts = np.asarray(knots.points)  # (npoints, 2) arcsec
    # Incline the clumps with the disk: the same area-preserving shear as the disk.
    c, s = math.cos(math.radians(pa)), math.sin(math.radians(pa))
    a, b = pts[:, 0] / math.sqrt(q), pts[:, 1] * math.sqrt(q)
    dep = ctx.scene.deposit(ctx.x0 + a * c - b * s, ctx.y0 + a * s + b * c,
                            rng.lognormal(0.0, 0.7, len(pts)))
    gr, rz = ctx.scene.colour("knots")
    ctx.scene.image(dep, flux * knot_frac, gr, rz, blur=ctx.uniform(0.3, 0.8) * ctx.px)
    ctx.truth.update(sersic_n=np.nan, half_light_radius=major, axis_ratio=q, position_angle=pa)


def _star(ctx: _Ctx) -> None:
    rng = ctx.rng
    flux = 10.0 ** (-0.4 * (ctx.uniform(15.0, 20.5) - _ZP))
    gr = ctx.uniform(-0.3, 0.2) if rng.random() < 0.15 else ctx.uniform(0.2, 1.5)
    ctx.scene.point(ctx.x0, ctx.y0, flux, gr, _star_rz(gr, rng), main=True)
    ctx.truth.update(bulge_fraction=np.nan, half_light_radius=0.0, axis_ratio=1.0,
                     position_angle=np.nan, redshift=0.0)


def _star_rz(gr: float, rng: np.random.Generator) -> float:
    """r-z along the stellar locus (roughly linear in g-r for main-sequence stars)."""
    return float(0.75 * gr - 0.1 + rng.normal(0.0, 0.05))


_BUILDERS: dict[str, Callable[[_Ctx], None]] = {
    "smooth_round": lambda c: _smooth(c, cigar=False),
    "smooth_cigar": lambda c: _smooth(c, cigar=True),
    "edge_on_disk": lambda c: _edge_on(c, bulge=False),
    "edge_on_bulge": lambda c: _edge_on(c, bulge=True),
    "spiral": lambda c: _spiral(c, barred=False),
    "barred_spiral": lambda c: _spiral(c, barred=True),
    "ring": _ring,
    "merger": _merger,
    "disturbed": _disturbed,
    "star": _star,
}
assert tuple(_BUILDERS) == CLASS_NAMES


def _background(ctx: _Ctx, cfg: SimConfig) -> tuple[int, int]:
    """Faint neighbour galaxies and field stars at random positions (not on the main object)."""
    rng = ctx.rng
    g = ctx.scene.grid
    half = 0.5 * g.size * g.scale
    n_gal, n_star = int(rng.poisson(cfg.neighbour_rate)), int(rng.poisson(cfg.star_rate))

    def position() -> tuple[float, float]:
        for _ in range(20):
            x, y = rng.uniform(-half, half, 2)
            if math.hypot(x, y) > 4.0 * ctx.px:
                break
        return float(x), float(y)

    for _ in range(n_gal):
        x, y = position()
        n = 1.0 if rng.random() < 0.7 else 4.0
        flux = 10.0 ** (-0.4 * (ctx.uniform(19.5, 23.0) - _ZP))
        gr = ctx.uniform(0.4, 1.6)
        ctx.scene.sersic(n, ctx.log_uniform(1.0, 4.0) * ctx.px, ctx.uniform(0.3, 1.0),
                         ctx.angle(), x, y, flux, gr, 0.6 * gr + ctx.uniform(-0.1, 0.2),
                         main=False)
    for _ in range(n_star):
        x, y = position()
        gr = ctx.uniform(-0.2, 1.5)
        ctx.scene.point(x, y, 10.0 ** (-0.4 * (ctx.uniform(16.0, 22.0) - _ZP)), gr,
                        _star_rz(gr, rng))
    return n_gal, n_star


# ----------------------------------------------------------------------------------------------
# Public API


def sdss_rgb(flux_BHW: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """Arcsinh colour stretch of a (3, H, W) flux cube (bands blue to red) -> (H, W, 3) uint8.

    The Legacy Surveys' ``sdss_rgb`` (Lupton et al. 2004): each band is scaled, offset by m, and
    all three share one arcsinh stretch of their mean, which keeps colours. The stretch is fixed
    (no per-image normalisation), so faint objects stay faint. The reddest band goes to R. (Stores of
    real flux use the per-image percentile stretch of :func:`galray.data.cutouts.flux_to_rgb` instead.)"""
    scales = cfg.per_band("stretch_scales").astype(np.float32)[:, None, None]
    img = np.maximum(np.asarray(flux_BHW, np.float32) * scales + np.float32(cfg.stretch_m), 0)
    mean = img.mean(axis=0)  # (H, W)
    q = np.float32(cfg.stretch_q)
    gain = np.arcsinh(q * mean) / (np.sqrt(q) * np.maximum(mean, np.float32(1e-12)))
    rgb = img[::-1] * (gain * np.float32(255.0))  # reddest band -> R; blue band last -> B
    return np.ascontiguousarray(np.rint(np.clip(rgb, 0, 255)).astype(np.uint8).transpose(1, 2, 0))


def _render(index: int, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """(uint8 HWC RGB, float32 flux (B, H, W), truth dict) of galaxy ``index``."""
    rng = np.random.default_rng([cfg.seed, index])
    name = cfg.classes[int(rng.integers(len(cfg.classes)))]
    grid = _cfg_grid(cfg)
    scene = _Scene(grid, cfg, rng)
    px = cfg.pixel_scale * cfg.size / 64.0 * cfg.size_scale
    x0, y0 = rng.uniform(-0.5, 0.5, 2) * cfg.pixel_scale  # sub-pixel centring
    ctx = _Ctx(rng=rng, scene=scene, px=px, x0=float(x0), y0=float(y0))
    ctx.truth.update(bulge_fraction=0.0, sersic_n=np.nan, arm_count=0, arm_pitch=np.nan,
                     bar_strength=0.0, ring_radius=np.nan, dust_lane=0,
                     companion_flux_ratio=np.nan, companion_separation=np.nan)
    _BUILDERS[name](ctx)
    n_gal, n_star = _background(ctx, cfg)

    flux_g, flux_r, _, flux_z = scene.main_flux
    truth = ctx.truth
    if name != "star":
        truth["bulge_fraction"] = scene.bulge_flux_r / scene.intrinsic_r
        truth["bar_strength"] = scene.bar_flux_r / scene.intrinsic_r
    truth.update(flux=flux_r, mag_r=_ZP - 2.5 * math.log10(flux_r),
                 color_gr=-2.5 * math.log10(flux_g / flux_r),
                 color_rz=-2.5 * math.log10(flux_r / flux_z),
                 n_neighbours=n_gal, n_stars=n_star)
    truth = {k: TRUTH_FIELDS[k](truth[k]) for k in TRUTH_FIELDS}
    truth["label"] = CLASS_NAMES.index(name)
    truth["class_name"] = name

    flux = scene.render().astype(np.float32)
    noise = rng.standard_normal(flux.shape, dtype=np.float32)
    flux += noise * cfg.per_band("sky_noise").astype(np.float32)[:, None, None]
    return sdss_rgb(flux, cfg), flux, truth


def warm_up(cfg: SimConfig) -> None:
    """Build the cached k-grid, PSF and all Sérsic tables (~1 s, once per process), so that
    timing the first galaxies measures rendering, not set-up."""
    _cfg_grid(cfg)
    for n in _SERSIC_N_GRID:
        _sersic_table(float(n))


def render_galaxy(index: int, cfg: SimConfig) -> tuple[np.ndarray, dict]:
    """Galaxy ``index``: uint8 (size, size, 3) RGB image and its truth dict (label, class_name
    and every TRUTH_FIELDS key). Depends only on (cfg, index)."""
    rgb, _, truth = _render(index, cfg)
    return rgb, truth


def object_id(index: int, cfg: SimConfig) -> str:
    return f"sim-{cfg.seed}-{index:09d}"


def render_batch(indices: Sequence[int], cfg: SimConfig) -> dict[str, np.ndarray]:
    """Columns for ``indices``: object_id (str), image uint8 (N, size, size, 3), label int64,
    class_name (str), one column per TRUTH_FIELDS key, and "flux_image" float32
    (N, bands, size, size) in nanomaggies per pixel, with noise, when ``cfg.keep_flux``."""
    n = len(indices)
    images = np.empty((n, cfg.size, cfg.size, 3), np.uint8)
    fluxes = (np.empty((n, len(cfg.bands), cfg.size, cfg.size), np.float32) if cfg.keep_flux
              else None)
    truths = []
    for i, index in enumerate(indices):
        rgb, flux, truth = _render(int(index), cfg)
        images[i] = rgb
        if fluxes is not None:
            fluxes[i] = flux
        truths.append(truth)
    out: dict[str, np.ndarray] = {
        "object_id": np.array([object_id(int(i), cfg) for i in indices], dtype=str),
        "image": images,
        "label": np.array([t["label"] for t in truths], dtype=np.int64),
        "class_name": np.array([t["class_name"] for t in truths], dtype=str),
    }
    for key, dtype in TRUTH_FIELDS.items():
        out[key] = np.array([t[key] for t in truths], dtype=dtype)
    if fluxes is not None:
        out["flux_image"] = fluxes
    return out
