"""`galray generate`: galaxy images from a trained prior + VQ-VAE, written as one PNG grid.

The prior samples code grids (KV-cached, with classifier-free guidance, temperature, top-k and
top-p; :mod:`galray.models.sampling`); the VQ-VAE decodes them. The CLI calls :func:`generate`
with a :class:`GenerateJob`; :func:`generate_grid` is the same with plain arguments. Runs in one
process (no Ray) on the accelerator torch sees, else the CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from galray.config import check
from galray.models.checkpoint import load_model
from galray.models.prior import Prior
from galray.models.sampling import SamplingConfig, sample
from galray.models.vqvae import VQVAE, model_to_pixels
from galray.stages.summary import FieldsSummary


@dataclass(frozen=True)
class GenerateJob:
    """`galray generate`: which checkpoints, how many images, how to sample them."""

    prior: str = ""
    """Prior checkpoint folder (config.json + model.safetensors, as `galray train prior` writes it)."""
    vqvae: str = ""
    """VQ-VAE checkpoint folder whose codebook the prior was trained on (same codebook size)."""
    output: str = ""
    """Output PNG path."""
    n: int = 16
    """Number of images."""
    label: int | None = None
    """Class index to generate; -1 for unconditional; null cycles through the classes."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Guidance scale, temperature, top-k and top-p of each code."""
    seed: int = 0
    """Random seed of the sampling."""

    def __post_init__(self) -> None:
        check(bool(self.prior), "prior", "a prior checkpoint folder is required")
        check(bool(self.vqvae), "vqvae", "a VQ-VAE checkpoint folder is required")
        check(bool(self.output), "output", "an output PNG path is required")
        check(self.n >= 1, "n", "must be at least 1")


@dataclass(frozen=True)
class GenerateSummary(FieldsSummary):
    """What `galray generate` prints."""

    output: str
    n: int
    seconds: float

    def format(self) -> str:
        return f"wrote {self.n} generated galaxies to {self.output}"


def default_device() -> torch.device:
    """The current accelerator if torch sees one, else the CPU."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        return torch.device(acc.current_accelerator())
    return torch.device("cpu")


def resolve_labels(label: int | None, n: int, num_classes: int) -> torch.Tensor:
    """None: cycle through the classes; 0..num_classes-1: that class; -1 or num_classes: unconditional."""
    if label is None:
        return torch.arange(n) % num_classes
    if label == -1:
        label = num_classes
    if not 0 <= label <= num_classes:
        raise ValueError(f"label must be None, -1 (unconditional) or in [0, {num_classes}], got {label}")
    return torch.full((n,), label, dtype=torch.long)


def image_grid(images_BCHW: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """Tile images in [-1, 1] into one uint8 (rows*H, cols*W, C) array, blank cells padding the last row."""
    B = images_BCHW.shape[0]
    cols = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / cols)
    x = model_to_pixels(images_BCHW).cpu()
    if rows * cols > B:
        x = torch.cat([x, torch.zeros(rows * cols - B, *x.shape[1:], dtype=torch.uint8)])
    return rearrange(x, "(r c) ch h w -> (r h) (c w) ch", r=rows, c=cols).numpy()


def grid_shape(seq_len: int, grid_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """(h, w) of the code grid: given (the VQ-VAE's latent grid), or square when seq_len is a perfect square."""
    if grid_hw is not None:
        if grid_hw[0] * grid_hw[1] != seq_len:
            raise ValueError(f"grid {grid_hw} does not hold the prior's {seq_len} codes")
        return grid_hw
    side = math.isqrt(seq_len)
    if side * side != seq_len:
        raise ValueError(f"seq_len {seq_len} is not square; pass grid_hw")
    return side, side


@torch.no_grad()
def generate_grid(prior_dir: str | Path, vqvae_dir: str | Path, out_png: str | Path, n: int = 16,
                  label: int | None = None, cfg_scale: float = 1.0, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  device: str | torch.device | None = None,
                  grid_hw: tuple[int, int] | None = None) -> Path:
    """Sample ``n`` images and write them to ``out_png`` as a near-square grid; return the path.

    ``label``: None cycles through the classes, an int picks one class, -1 is unconditional.
    """
    device = torch.device(device) if device is not None else default_device()
    prior = load_model(Prior, prior_dir, map_location=device).eval()
    vqvae = load_model(VQVAE, vqvae_dir, map_location=device).eval()
    h, w = grid_shape(prior.cfg.seq_len, grid_hw or (vqvae.cfg.latent_size, vqvae.cfg.latent_size))
    if prior.cfg.vocab_size != vqvae.cfg.codebook_size:
        raise ValueError(f"prior has {prior.cfg.vocab_size} codes, the VQ-VAE {vqvae.cfg.codebook_size}")
    labels_B = resolve_labels(label, n, prior.cfg.num_classes).to(device)
    cfg = SamplingConfig(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes_BT = sample(prior, labels_B, cfg, generator=gen)
    images = vqvae.decode_indices(rearrange(codes_BT, "b (h w) -> b h w", h=h, w=w))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    grid_HWC = image_grid(images)
    Image.fromarray(grid_HWC[..., 0] if grid_HWC.shape[-1] == 1 else grid_HWC).save(out_png)
    return out_png


def generate(job: GenerateJob) -> GenerateSummary:
    """Sample ``job.n`` images and write the PNG grid; returns the summary."""
    t0 = time.perf_counter()
    s = job.sampling
    out = generate_grid(job.prior, job.vqvae, job.output, n=job.n, label=job.label, cfg_scale=s.cfg_scale,
                        temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=job.seed)
    return GenerateSummary(output=str(out), n=job.n, seconds=round(time.perf_counter() - t0, 2))
