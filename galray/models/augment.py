"""Random views of galaxy cutouts that respect the physics, for self-supervised training (pure torch).

One call draws an independent view of every image of a batch, in this order:

1. **stretch jitter** ``x ** gamma``, log-uniform gamma: surveys render flux with other stretches;
2. **sky subtraction** each channel's median, so the padding of step 3 is sky, not black;
3. **geometry** one affine per image: rotation by any angle, flip, zoom, shift; the corners the
   image no longer covers are filled with noise at the image's own sky level (MAD of the outer
   frame). Morphology does not change under rotation or flip (Hayat et al. 2021, ApJL 911 L33;
   Stein et al. 2021, arXiv:2110.13151; Walmsley et al. 2022, MNRAS 513 1581 all rotate and flip);
   zoom and shift are Stein et al.'s "jitter and scaling" and Hayat et al.'s crop;
4. **PSF-like blur** a Gaussian of sigma ~ U(0, blur_max) pixels with probability p_blur (seeing
   varies; Hayat et al.'s "PSF smoothing");
5. **extinction-like colour jitter** per-channel gains ``exp(-tau * k_c)`` with k rising from the
   reddest to the bluest channel (galray's stores are (R, G, B) = (z, r, g)), so tau > 0 reddens
   (Hayat et al.'s "reddening"; off by default: colour is a morphology signal), times a brightness gain;
6. **noise** Gaussian of sigma ~ U(0, noise_max) of the [0, 1] image scale plus U(0, noise_rel) times
   the image's own sky noise (Hayat et al.; Stein et al.): a new noise realisation at about the
   image's own depth, which leaves its signal-to-noise, and so what the encoder reads of it, nearly as it was.

The output is not normalised: :meth:`galray.models.encoder.SurveyEncoder.normalize` does that, the same
way at training and at inference. Randomness comes only from ``generator`` (reproducible steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from galray.config import check


@dataclass(frozen=True)
class AugmentConfig:
    """The ranges of the random view.

    The defaults keep what a galaxy's embedding must still tell apart: its size and axis ratio
    (no zoom, so no random-resized-crop scale jitter; little blur, which rounds small galaxies;
    a narrow stretch range, which moves isophotes) and its signal-to-noise (noise relative to the
    image's own sky, brightness jitter that the asinh input scaling divides out). The views differ
    by any rotation, a flip, a small shift, a fresh noise realisation and mild blur; their colour is
    kept (``tau``).
    Measured with ``bench/encoder_probe.py`` (XDF axis ratio and size probes): the first defaults,
    with zoom (0.85, 1.3), blur up to 1.2 px and noise up to 0.04, taught the encoder to ignore both.
    """

    rotate: bool = True
    """Rotate by a uniform angle in [0, 2 pi)."""
    flip: bool = True
    """Mirror half of the images."""
    zoom: tuple[float, float] = (1.0, 1.0)
    """Magnification range, log-uniform (>1 zooms in, like a random-resized crop; <1 zooms out with sky padding)."""
    shift: float = 0.03
    """Largest shift, as a fraction of the side."""
    blur_max: float = 0.5
    """Largest Gaussian sigma in pixels of the model's input size."""
    p_blur: float = 0.3
    """Share of images blurred."""
    gamma: tuple[float, float] = (0.9, 1.11)
    """Stretch exponent range, log-uniform."""
    tau: float = 0.0
    """Extinction-like colour jitter: tau ~ U(-tau, tau); 0 (the default) keeps each galaxy's colour.
    Colour tells smooth, red galaxies from blue, star-forming disks. On the gz-examples smooth-vs-featured
    probe (bench/encoder_probe.py, 32 px) colour kept gave AUC 0.80 +- 0.02 over three seeds, tau 0.15
    (Hayat et al.'s reddening) 0.72-0.78 (one run a seed); at 64 px one seed went from 0.67 to 0.82.
    Set it for a survey whose extinction varies over the footprint."""
    brightness: float = 0.1
    """Brightness gain exp(U(-b, b))."""
    p_colour: float = 0.8
    """Share of images given colour and brightness jitter."""
    noise_max: float = 0.0
    """Largest added noise sigma, on the [0, 1] image scale."""
    noise_rel: float = 0.5
    """Largest added noise sigma, in units of the image's own sky noise (MAD of its outer frame)."""

    def __post_init__(self) -> None:
        check(0 < self.zoom[0] <= self.zoom[1], "zoom", "must be (low, high) with 0 < low <= high")
        check(0 < self.gamma[0] <= self.gamma[1], "gamma", "must be (low, high) with 0 < low <= high")
        for name in ("shift", "blur_max", "tau", "brightness", "noise_max", "noise_rel"):
            check(getattr(self, name) >= 0, name, "must be non-negative")
        for name in ("p_blur", "p_colour"):
            check(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]")


def gaussian_blur(x_BCHW: Tensor, sigma_B: Tensor) -> Tensor:
    """Per-image separable Gaussian blur, sigma in pixels (< 0.05: unchanged), reflect padding."""
    b, c, h, w = x_BCHW.shape
    top = float(sigma_B.max()) if b else 0.0
    if top < 0.05:
        return x_BCHW
    r = min(int(math.ceil(3 * top)), h - 1, w - 1)
    t = torch.arange(-r, r + 1, dtype=x_BCHW.dtype, device=x_BCHW.device)
    k_BK = torch.exp(-0.5 * (t[None] / sigma_B.clamp_min(1e-3)[:, None]) ** 2)
    k_BK = torch.where(sigma_B[:, None] < 0.05, (t[None] == 0).to(x_BCHW.dtype), k_BK)
    k_BK = k_BK / k_BK.sum(1, keepdim=True)
    # One kernel per image, repeated over its channels: a grouped convolution over (1, B*C, H, W).
    x = x_BCHW.reshape(1, b * c, h, w)
    k = k_BK.repeat_interleave(c, 0)[:, None, None, :]  # (B*C, 1, 1, K)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=b * c)
    return x.reshape(b, c, h, w)


def sky_sigma(x_BCHW: Tensor, frame: int = 4) -> Tensor:
    """(B, C, 1, 1) robust noise of each channel (1.4826 MAD) on the outer ``frame`` pixels, where the sky dominates."""
    f = min(frame, x_BCHW.shape[-1] // 4)
    edge = torch.cat([x_BCHW[..., :f, :].flatten(2), x_BCHW[..., -f:, :].flatten(2),
                      x_BCHW[..., f:-f, :f].flatten(2), x_BCHW[..., f:-f, -f:].flatten(2)], 2)
    mad = (edge - edge.median(dim=2, keepdim=True).values).abs().median(dim=2).values
    return (1.4826 * mad)[:, :, None, None]


def random_view(x_BCHW: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
                out_size: int | None = None) -> Tensor:
    """(B, C, H, W) images on the [0, 1] scale -> one random view (B, C, S, S) each, sky near 0."""
    b, c, h, w = x_BCHW.shape
    s = out_size or h
    dev, dt = x_BCHW.device, x_BCHW.dtype

    def u(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator, device=dev, dtype=dt)

    def normal(shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=generator, device=dev, dtype=dt)

    lg = math.log(cfg.gamma[0]), math.log(cfg.gamma[1])
    gamma = torch.exp(lg[0] + (lg[1] - lg[0]) * u(b))[:, None, None, None]
    x = x_BCHW.clamp_min(0) ** gamma
    x = x - x.flatten(2).median(dim=2).values[:, :, None, None]
    sky = sky_sigma(x)
    theta = u(b) * 2 * math.pi if cfg.rotate else torch.zeros(b, device=dev, dtype=dt)
    lz = math.log(cfg.zoom[0]), math.log(cfg.zoom[1])
    zoom = torch.exp(lz[0] + (lz[1] - lz[0]) * u(b))
    flip = torch.where(u(b) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(b, device=dev, dtype=dt)
    cos, sin = torch.cos(theta) / zoom, torch.sin(theta) / zoom
    shift = (u(b, 2) * 2 - 1) * cfg.shift * 2  # affine_grid's units span [-1, 1]: a side is 2
    # affine_grid maps output coordinates to input coordinates.
    A = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(A, [b, c, s, s], align_corners=False)
    inside = F.grid_sample(torch.ones(b, 1, h, w, device=dev, dtype=dt), grid, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x + (1 - inside) * sky * normal(x.shape)
    if cfg.blur_max > 0:
        x = gaussian_blur(x, u(b) * cfg.blur_max * (u(b) < cfg.p_blur))
    if cfg.tau > 0 or cfg.brightness > 0:
        on = (u(b) < cfg.p_colour).to(dt)
        tau = (u(b) * 2 - 1) * cfg.tau * on
        k_C = torch.linspace(0.5, 1.0, c, device=dev, dtype=dt) if c > 1 else torch.ones(1, device=dev, dtype=dt)
        gain = torch.exp(-tau[:, None] * k_C[None]) * torch.exp((u(b) * 2 - 1) * cfg.brightness * on)[:, None]
        x = x * gain[:, :, None, None]
        sky = sky * gain[:, :, None, None]
    if cfg.noise_max > 0 or cfg.noise_rel > 0:
        sigma = (u(b) * cfg.noise_max)[:, None, None, None] + u(b)[:, None, None, None] * cfg.noise_rel * sky
        x = x + normal(x.shape) * sigma
    return x
