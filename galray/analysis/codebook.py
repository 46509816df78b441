"""What each VQ-VAE code draws: decodes of the most and least used codes, where codes sit in the
grid, and a t-SNE of the quantized latents coloured by class.

Code grids (from a code store, `galray encode`) and a :class:`~galray.models.vqvae.VQVAE` in,
figures out. Usage counts, the histogram + CDF and perplexity are
:func:`galray.analysis.figures.codebook_usage` and :mod:`galray.models.codebook_metrics`.

- :func:`code_decodes`: each chosen code decoded from a grid filled with it
  (:meth:`VQVAE.codebook_image`): the texture the code stands for;
- :func:`heatmaps`: for each chosen code, how often it occurs at each grid position
  (:func:`~galray.models.vqvae.code_heatmap`): background codes ring the edges, galaxy codes the centre;
- :func:`pooled_latents` + :func:`tsne_figure`: every image as the mean of its codes' vectors,
  embedded in 2-D with scikit-learn's t-SNE (van der Maaten & Hinton 2008), coloured by label.

Pure torch + matplotlib (no pyplot) + scikit-learn: no Ray.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from einops import rearrange
from matplotlib import colormaps
from matplotlib.figure import Figure

from galray.models.vqvae import VQVAE, code_heatmap, model_to_pixels


def used_codes(counts_K: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most used codes (most first) and the ``n`` least used among those used at least once."""
    counts = np.asarray(counts_K)
    order = np.argsort(-counts, kind="stable")
    used = order[counts[order] > 0]
    return used[:n], used[::-1][:n]


@torch.no_grad()
def code_decodes(vqvae: VQVAE, codes: Sequence[int]) -> np.ndarray:
    """(N, H, W, 3) uint8 images, each decoded from a grid filled with one code."""
    if not len(codes):
        return np.zeros((0, vqvae.cfg.image_size, vqvae.cfg.image_size, 3), np.uint8)
    imgs = torch.stack([vqvae.codebook_image(int(c)) for c in codes])
    pix = rearrange(model_to_pixels(imgs), "n c h w -> n h w c").cpu().numpy()
    return np.repeat(pix, 3, axis=-1) if pix.shape[-1] == 1 else pix[..., :3]


def heatmaps(codes_NT: np.ndarray, grid: int, codes: Sequence[int]) -> np.ndarray:
    """(len(codes), grid, grid) share of images having each code at each position."""
    grids = np.asarray(codes_NT).reshape(len(codes_NT), grid, grid)
    return np.stack([code_heatmap(grids, int(c)).numpy() / max(len(grids), 1) for c in codes]) if len(codes) \
        else np.zeros((0, grid, grid))


def tiles_figure(images: np.ndarray, titles: Sequence[str], title: str, cols: int = 8,
                 cmap: str | None = None) -> Figure:
    """A grid of small images (RGB uint8, or 2-D maps drawn with ``cmap``), each with a short title."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(1.15 * cols, 1.3 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, img, t in zip(axes, images, titles):
        ax.imshow(img, cmap=cmap, interpolation="nearest", vmin=0 if cmap else None)
        ax.set_title(t, fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


@torch.no_grad()
def pooled_latents(vqvae: VQVAE, codes_NT: np.ndarray, batch: int = 1024) -> np.ndarray:
    """(N, D) mean of each image's code vectors (the quantized latent, pooled over the grid)."""
    out = []
    for i in range(0, len(codes_NT), batch):
        idx = torch.as_tensor(np.asarray(codes_NT[i:i + batch]), dtype=torch.long)
        out.append(vqvae.quantizer.lookup(idx).mean(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, vqvae.cfg.code_dim), np.float32)


def tsne_figure(latents_ND: np.ndarray, labels_N: np.ndarray, class_names: Mapping[int, str], seed: int = 0,
                title: str = "t-SNE of the quantized latents") -> Figure:
    """2-D t-SNE (scikit-learn, PCA init) of ``latents_ND``, one colour per label."""
    from sklearn.manifold import TSNE

    x = np.asarray(latents_ND, np.float64)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    labels_N = np.asarray(labels_N)
    cmap = colormaps["tab20" if len(np.unique(labels_N)) > 10 else "tab10"]
    for i, c in enumerate(np.unique(labels_N)):
        sel = labels_N == c
        name = class_names.get(int(c), "no label" if c < 0 else str(int(c)))
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(i % cmap.N), label=name, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_title(title, fontsize=10)
    return fig
