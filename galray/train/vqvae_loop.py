"""Pure-torch training for the VQ-VAE: one step, a validation pass, and a simple loop.

No Ray, no MLflow: the Ray Train worker wraps the model in DDP and calls these. The quantizer
synchronises its own codebook across ranks (see galray.models.quantizer), so the same step
works in one process and under data-parallel training.

Batches are image tensors: float (B, C, H, W) in [-1, 1], or uint8 (B, H, W, C) which are scaled.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from einops import rearrange
from torch import nn

from galray.config import check
from galray.models.codebook_metrics import CodebookMetrics, CodebookReport
from galray.models.vqvae import VQVAE, pixels_to_model


@dataclass(frozen=True)
class VQVAETrainConfig:
    """Optimisation settings of the VQ-VAE."""

    steps: int = 10_000
    """Optimizer steps."""
    lr: float = 2e-4
    """AdamW learning rate (the quantizer's codebook learns by EMA, not by this optimizer)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; null disables."""
    amp: bool = False
    """bf16 autocast for the encoder/decoder (the quantizer always computes in float32)."""
    log_every: int = 50
    """Call the log hook every this many steps."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be non-negative")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be non-negative")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null")
        check(self.log_every >= 1, "log_every", "must be >= 1")


def _unwrap(model: nn.Module) -> VQVAE:
    return getattr(model, "module", model)  # DDP keeps the model in .module


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Model input (B, C, H, W) float in [-1, 1] on ``device`` from a float or uint8 batch."""
    if x.dtype == torch.uint8:
        x = pixels_to_model(rearrange(x, "b h w c -> b c h w"))
    return x.to(device, non_blocking=True).float()


def make_optimizer(model: nn.Module, cfg: VQVAETrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer, cfg: VQVAETrainConfig) -> dict[str, float]:
    """One optimisation step on batch ``x``; ``model`` may be a VQVAE or a DDP wrapper of one."""
    model.train()
    device = _device(model)
    x = prepare_batch(x, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        out = model(x)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {
        "loss": out.loss.item(), "recon_loss": out.recon_loss.item(), "vq_loss": out.vq_loss.item(),
        "perplexity": out.perplexity.item(), "utilisation": out.utilisation.item(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[torch.Tensor], background_threshold: float = 0.05) -> CodebookReport:
    """Codebook metrics and reconstruction MSE over a full validation pass (eval mode, no updates)."""
    vq = _unwrap(model)
    was_training = vq.training
    vq.eval()
    device = _device(vq)
    metrics = CodebookMetrics(vq.cfg.codebook_size, background_threshold)
    for x in batches:
        x = prepare_batch(x, device)
        out = vq(x)
        metrics.update(out.indices, x=x, x_hat=out.x_hat)
    vq.train(was_training)
    return metrics.compute()


def fit(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    cfg: VQVAETrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train for ``cfg.steps`` steps, cycling over ``batches`` if it runs out. Returns the logged
    records (step, losses, batch perplexity/utilisation, images/s)."""
    optimizer = optimizer or make_optimizer(model, cfg)
    history: list[dict[str, float]] = []
    t0, seen = time.perf_counter(), 0
    stream = itertools.cycle(batches) if isinstance(batches, (list, tuple)) else _repeat(batches)
    for step in range(1, cfg.steps + 1):
        x = next(stream)
        rec = train_step(model, x, optimizer, cfg)
        seen += x.shape[0]
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **rec, "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            history.append(rec)
            if on_log is not None:
                on_log(step, rec)
    return history


def _repeat(batches: Iterable[torch.Tensor]):
    """Iterate ``batches`` again and again (a re-iterable such as a DataLoader)."""
    while True:
        empty = True
        for x in batches:
            empty = False
            yield x
        if empty:
            raise ValueError("no batches to train on")
