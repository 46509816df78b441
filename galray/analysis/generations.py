"""What the prior generates: one labelled row per class (and an unconditional row) per sampling setting.

A class-conditional :class:`~galray.models.prior.Prior` samples code grids
(:func:`galray.models.sampling.sample`: KV-cached, classifier-free guidance, temperature, top-k,
top-p) and the :class:`~galray.models.vqvae.VQVAE` decodes them. Each setting gives one figure:
rows are the classes by name, then "unconditional" (the null class), columns are samples; the
setting is the title. The same seed for every setting, so rows differ only by the setting.

Pure torch + matplotlib (no pyplot): no Ray.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from einops import rearrange
from matplotlib.figure import Figure

from galray.models.prior import Prior
from galray.models.sampling import SamplingConfig, sample
from galray.models.vqvae import VQVAE, model_to_pixels

# Settings shown by default: plain conditional sampling, guided, guided and sharper.
DEFAULT_SETTINGS: tuple[SamplingConfig, ...] = (
    SamplingConfig(cfg_scale=1.0, temperature=1.0),
    SamplingConfig(cfg_scale=3.0, temperature=1.0, top_p=0.95),
    SamplingConfig(cfg_scale=3.0, temperature=0.7, top_k=32),
)


def setting_label(s: SamplingConfig) -> str:
    parts = [f"cfg_scale {s.cfg_scale:g}", f"temperature {s.temperature:g}"]
    if s.top_k:
        parts.append(f"top-k {s.top_k}")
    if s.top_p < 1:
        parts.append(f"top-p {s.top_p:g}")
    return ", ".join(parts)


@torch.no_grad()
def generate_rows(prior: Prior, vqvae: VQVAE, setting: SamplingConfig, per_class: int, seed: int = 0
                  ) -> np.ndarray:
    """(num_classes + 1, per_class, H, W, 3) uint8: ``per_class`` samples of every class, then unconditional."""
    if prior.cfg.vocab_size != vqvae.cfg.codebook_size:
        raise ValueError(f"the prior has {prior.cfg.vocab_size} codes, the VQ-VAE {vqvae.cfg.codebook_size}")
    n_rows = prior.cfg.num_classes + 1  # the null class (index num_classes) samples unconditionally
    device = next(prior.parameters()).device
    labels = torch.arange(n_rows, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = sample(prior.eval(), labels, setting, generator=gen)
    side = vqvae.cfg.latent_size
    images = vqvae.eval().decode_indices(rearrange(codes, "b (h w) -> b h w", h=side, w=side))
    pix = rearrange(model_to_pixels(images), "(r n) c h w -> r n h w c", r=n_rows).cpu().numpy()
    return np.repeat(pix, 3, axis=-1) if pix.shape[-1] == 1 else pix[..., :3]


def rows_figure(rows: np.ndarray, row_names: list[str], title: str) -> Figure:
    """Rows of images, each row named at its left."""
    n_rows, per_row = rows.shape[:2]
    fig = Figure(figsize=(1.9 + 0.9 * per_row, 0.9 * n_rows + 0.5), layout="constrained")
    axes = fig.subplots(n_rows, per_row, squeeze=False)
    for r in range(n_rows):
        for c in range(per_row):
            ax = axes[r, c]
            ax.imshow(rows[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        axes[r, 0].set_ylabel(row_names[r], rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def generation_figures(prior: Prior, vqvae: VQVAE, class_names: Mapping[int, str],
                       settings: tuple[SamplingConfig, ...] = DEFAULT_SETTINGS, per_class: int = 6,
                       seed: int = 0) -> list[tuple[str, Figure]]:
    """``[(setting label, figure)]``: one labelled grid per sampling setting."""
    names = [class_names.get(c, f"class {c}") for c in range(prior.cfg.num_classes)] + ["unconditional"]
    out = []
    for s in settings:
        label = setting_label(s)
        out.append((label, rows_figure(generate_rows(prior, vqvae, s, per_class, seed), names, label)))
    return out
