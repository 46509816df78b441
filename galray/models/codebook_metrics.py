"""Codebook metrics from code indices over a full validation pass.

- utilisation: share of the K codes used at least once.
- perplexity: exp(entropy) of the code-usage distribution (the reference blog's formula;
  K for perfectly uniform use, 1 for collapse onto one code).
- foreground perplexity: the same over non-background tokens only. A token is *background*
  when its input patch is near-empty sky: the patch's mean brightness (max over channels) is
  less than ``background_threshold`` above the image's sky level, the per-channel median of the
  image (galaxy cutouts are mostly sky, so the median is the sky). Brightness is in the model's
  [-1, 1] scale, so the default 0.05 is 2.5% of the dynamic range; averaging over the patch
  beats the pixel noise down. Without images, ``background="mode"`` treats the single most
  common code as background instead.
- reconstruction MSE, on the [-1, 1] scale.

Pure torch (see ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import reduce


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Usage counts (K,) of the codes in ``indices`` (any shape)."""
    return torch.bincount(indices.reshape(-1).long().cpu(), minlength=codebook_size).double()


def utilisation(counts_K: torch.Tensor) -> float:
    return float((counts_K > 0).double().mean())


def perplexity(counts_K: torch.Tensor) -> float:
    """exp(entropy) of the usage distribution ``counts / counts.sum()``; 0 for no tokens."""
    total = counts_K.sum()
    if total <= 0:
        return 0.0
    p = counts_K[counts_K > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def background_mask(x_BCHW: torch.Tensor, grid_hw: tuple[int, int], threshold: float = 0.05) -> torch.Tensor:
    """(B, h, w) bool: True where the grid cell's input patch is near-empty sky (see module doc)."""
    h, w = grid_hw
    B, C, H, W = x_BCHW.shape
    x = x_BCHW.detach().float()
    sky_BC = x.flatten(2).median(dim=2).values
    patch_BChw = reduce(x, "b c (h ph) (w pw) -> b c h w", "mean", h=h, w=w)
    excess_Bhw = (patch_BChw - sky_BC[:, :, None, None]).amax(dim=1)
    return excess_Bhw < threshold


class CodebookReport(NamedTuple):
    codebook_size: int
    utilisation: float
    perplexity: float
    perplexity_foreground: float
    background_share: float
    """Share of tokens counted as background."""
    mse: float
    n_tokens: int


class CodebookMetrics:
    """Accumulates code usage (all and non-background tokens) and squared error over batches.

    ``update(indices_Bhw, x=..., x_hat=...)`` per validation batch, then ``compute()``. Without
    ``x`` the background is the most common code over the whole pass (``background="mode"``).
    """

    def __init__(self, codebook_size: int, background_threshold: float = 0.05):
        self.K = codebook_size
        self.background_threshold = background_threshold
        self.counts = torch.zeros(codebook_size, dtype=torch.float64)
        self.counts_fg = torch.zeros(codebook_size, dtype=torch.float64)
        self.n_bg = 0
        self.have_images = True
        self.sq_err = 0.0
        self.n_values = 0

    @torch.no_grad()
    def update(self, indices_Bhw: torch.Tensor, x: torch.Tensor | None = None, x_hat: torch.Tensor | None = None) -> None:
        self.counts += code_counts(indices_Bhw, self.K)
        if x is None:
            self.have_images = False
        elif self.have_images:
            bg = background_mask(x, tuple(indices_Bhw.shape[-2:]), self.background_threshold).to(indices_Bhw.device)
            self.counts_fg += code_counts(indices_Bhw[~bg], self.K)
            self.n_bg += int(bg.sum())
        if x is not None and x_hat is not None:
            self.sq_err += float((x_hat.float() - x.float()).pow(2).sum())
            self.n_values += x.numel()

    def compute(self) -> CodebookReport:
        n = int(self.counts.sum())
        if self.have_images:
            fg, n_bg = self.counts_fg, self.n_bg
        else:
            fg = self.counts.clone()
            mode = int(fg.argmax())
            n_bg = int(fg[mode])
            fg[mode] = 0
        return CodebookReport(
            codebook_size=self.K,
            utilisation=utilisation(self.counts),
            perplexity=perplexity(self.counts),
            perplexity_foreground=perplexity(fg),
            background_share=n_bg / max(n, 1),
            mse=self.sq_err / self.n_values if self.n_values else float("nan"),
            n_tokens=n,
        )
