"""VQ-VAE for galaxy cutouts: CNN encoder, EMA vector quantizer, mirrored CNN decoder.

The default architecture follows the reference blog post (VQ-VAE on Galaxy10 DECaLS): 128x128
inputs in [-1, 1]; encoder 3 -> 32 -> 64 -> 128 -> D with stride-2 3x3 convs, BatchNorm and ReLU,
down to a 16x16 grid; 1024 codes of dimension 256; the decoder mirrors the encoder with
nearest-neighbour upsampling and a Tanh output. Everything is configurable.

Decoding helpers for the prior and for analysis: ``decode_indices`` (images from code grids),
``codebook_image`` (the grid filled with one code) and ``code_heatmap`` (where a code occurs).
The one pixel-scale pair: :func:`pixels_to_model` (preprocessed uint8 or [0, 1] pixels -> [-1, 1])
and :func:`model_to_pixels` ([-1, 1] -> uint8), used by training, `galray encode` and `generate`.

Pure torch (see ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from galray.config import check
from galray.models.quantizer import QuantizerConfig, VectorQuantizer


@dataclass(frozen=True)
class VQVAEConfig:
    """VQ-VAE settings. Defaults: the reference blog's architecture."""

    in_channels: int = 3
    """Image channels."""
    image_size: int = 128
    """Input height and width in pixels (square inputs, scaled to [-1, 1])."""
    channels: tuple[int, ...] = (32, 64, 128)
    """Encoder conv widths, one 3x3 conv + BatchNorm + ReLU each; the first
    log2(image_size / latent_size) of them have stride 2. The decoder mirrors them."""
    latent_size: int = 16
    """Height and width of the code grid."""
    code_dim: int = 256
    """Dimension D of the encoder output and of the codes."""
    codebook_size: int = 1024
    """Number of codes."""
    factorized_dim: int | None = None
    """If set, codes are looked up l2-normalised in this lower dimension (ViT-VQGAN)."""
    beta: float = 0.25
    """Commitment weight."""
    ema_decay: float = 0.99
    """EMA decay of the codebook statistics."""
    kmeans_init: bool = True
    """Initialise the codebook by k-means on the first training batch."""
    kmeans_iters: int = 10
    """Lloyd iterations for the k-means init."""
    dead_code_fraction: float = 0.5
    """Restart codes whose EMA usage share is below this fraction of the uniform share; 0 = never."""
    restart_every: int = 1
    """Check for dead codes every this many training steps."""
    restart_sampling: Literal["uniform", "error"] = "uniform"
    """Draw restart candidates uniformly or by quantization error."""
    seed: int = 0
    """Seed of the quantizer's random choices (k-means init, restarts)."""

    def __post_init__(self) -> None:
        check(self.in_channels > 0, "in_channels", "must be positive")
        check(len(self.channels) > 0 and all(c > 0 for c in self.channels), "channels", "must be positive widths")
        check(self.latent_size > 0, "latent_size", "must be positive")
        ratio = self.image_size // self.latent_size if self.latent_size else 0
        check(
            self.image_size > 0 and self.image_size % self.latent_size == 0 and ratio & (ratio - 1) == 0,
            "image_size", f"must be latent_size ({self.latent_size}) times a power of two",
        )
        check(
            int(math.log2(ratio)) <= len(self.channels), "channels",
            f"needs at least log2(image_size / latent_size) = {int(math.log2(ratio))} entries",
        )
        check(self.code_dim > 0, "code_dim", "must be positive")
        # The remaining fields are validated by QuantizerConfig, here with their own names.
        self.quantizer_config()

    @property
    def n_down(self) -> int:
        """Number of stride-2 stages."""
        return int(math.log2(self.image_size // self.latent_size))

    def quantizer_config(self) -> QuantizerConfig:
        return QuantizerConfig(
            dim=self.code_dim, codebook_size=self.codebook_size, factorized_dim=self.factorized_dim,
            beta=self.beta, decay=self.ema_decay, kmeans_init=self.kmeans_init, kmeans_iters=self.kmeans_iters,
            dead_code_fraction=self.dead_code_fraction, restart_every=self.restart_every,
            restart_sampling=self.restart_sampling, seed=self.seed,
        )


class VQVAEOutput(NamedTuple):
    x_hat: torch.Tensor
    """Reconstruction (B, C, H, W) in [-1, 1]."""
    indices: torch.Tensor
    """Code grid (B, h, w), long."""
    loss: torch.Tensor
    """recon_loss + vq_loss."""
    recon_loss: torch.Tensor
    """Mean squared error of the reconstruction."""
    vq_loss: torch.Tensor
    """The quantizer's loss (beta * commitment)."""
    perplexity: torch.Tensor
    """This batch's code perplexity."""
    utilisation: torch.Tensor
    """This batch's share of codes used."""


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """(B, C, H, W) -> (B, D, h, w): 3x3 conv + BN + ReLU stages, then a 3x3 conv to D."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_prev = cfg.in_channels
        for i, c in enumerate(cfg.channels):
            layers.append(_conv_bn_relu(c_prev, c, stride=2 if i < cfg.n_down else 1))
            c_prev = c
        layers.append(nn.Conv2d(c_prev, cfg.code_dim, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(x_BCHW)


class Decoder(nn.Module):
    """(B, D, h, w) -> (B, C, H, W): the encoder mirrored, nearest upsampling, Tanh output."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        rev = list(reversed(cfg.channels))  # e.g. 128, 64, 32
        n = len(rev)
        layers: list[nn.Module] = [_conv_bn_relu(cfg.code_dim, rev[0], stride=1)]
        # Stage i maps rev[i] -> rev[i+1] (the last to the image); the encoder's stride-2 stages
        # were its first n_down, so the decoder's last n_down stages upsample first.
        for i in range(n):
            if i >= n - cfg.n_down:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            if i < n - 1:
                layers.append(_conv_bn_relu(rev[i], rev[i + 1], stride=1))
            else:
                layers.append(nn.Conv2d(rev[i], cfg.in_channels, 3, padding=1))
        layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    def forward(self, z_BDhw: torch.Tensor) -> torch.Tensor:
        return self.net(z_BDhw)


class VQVAE(nn.Module):
    config_class = VQVAEConfig

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.quantizer_config())
        self.decoder = Decoder(cfg)

    def forward(self, x_BCHW: torch.Tensor) -> VQVAEOutput:
        z = self.encoder(x_BCHW)
        q = self.quantizer(z)
        x_hat = self.decoder(q.quantized)
        recon = F.mse_loss(x_hat.float(), x_BCHW.float())
        return VQVAEOutput(x_hat, q.indices, recon + q.loss, recon, q.loss, q.perplexity, q.utilisation)

    # ---- tokens --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_indices(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Code grid (B, h, w) long of images in [-1, 1]. Never updates the codebook
        (BatchNorm follows the module's mode: call ``.eval()`` first for inference)."""
        return self.quantizer(self.encoder(x_BCHW), update=False).indices

    @torch.no_grad()
    def decode_indices(self, indices_Bhw: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from code grids (B, h, w) (or (B, h*w) sequences)."""
        if indices_Bhw.ndim == 2:
            indices_Bhw = rearrange(indices_Bhw, "b (h w) -> b h w", h=self.cfg.latent_size)
        q = rearrange(self.quantizer.lookup(indices_Bhw.long()), "b h w d -> b d h w")
        return self.decoder(q)

    @torch.no_grad()
    def codebook_image(self, code: int) -> torch.Tensor:
        """The image (C, H, W) decoded from a grid filled with the single ``code``."""
        s = self.cfg.latent_size
        grid = torch.full((1, s, s), int(code), dtype=torch.long, device=self.quantizer.embed.device)
        return self.decode_indices(grid)[0]

    @torch.no_grad()
    def embed(self, x_BCHW: torch.Tensor, quantized: bool = True) -> torch.Tensor:
        """Pooled latent (B, D): mean over the grid of the quantized (or pre-quantization) vectors."""
        z = self.encoder(x_BCHW)
        if quantized:
            z = self.quantizer(z, update=False).quantized
        return reduce(z, "b d h w -> b d", "mean")


def code_heatmap(indices_Bhw: torch.Tensor | np.ndarray, code: int) -> torch.Tensor:
    """Counts (h, w) of how often ``code`` occurs at each grid position over a set of code grids."""
    idx = torch.as_tensor(indices_Bhw)
    return (idx == int(code)).sum(0)


def pixels_to_model(pixels_BCHW: torch.Tensor) -> torch.Tensor:
    """Preprocessed pixels (B, C, H, W), uint8 0..255 or float in [0, 1] -> float in [-1, 1], the model's scale."""
    if pixels_BCHW.dtype == torch.uint8:
        return pixels_BCHW.float() / 127.5 - 1.0
    return pixels_BCHW.float() * 2.0 - 1.0


def model_to_pixels(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Model-scale images (B, C, H, W) in [-1, 1] -> uint8 (B, C, H, W) 0..255, for PNGs and figures."""
    return ((x_BCHW.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
