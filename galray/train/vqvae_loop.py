"""Pure-torch training for the VQ-VAE (the loop face of :mod:`galray.train.loop`): optimizer, one
step, the validation pass, and a single-process loop.

No Ray, no MLflow: the Ray Train worker wraps the model in DDP and calls these. The quantizer
synchronises its own codebook across ranks (see galray.models.quantizer), so the same step
works in one process and under data-parallel training.

Batches are dicts ``{"pixels": (B, C, H, W)}`` of preprocessed pixels (:mod:`galray.data.preprocess`:
uint8 0..255 or float in [0, 1]), scaled to the model's [-1, 1] by :func:`galray.models.vqvae.pixels_to_model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from galray.config import check
from galray.models.codebook_metrics import CodebookMetrics
from galray.models.vqvae import VQVAE, pixels_to_model
from galray.train.loop import Evaluation, batch_rows, limit_rows, repeat, set_lr, unwrap


@dataclass(frozen=True)
class VQVAETrainConfig:
    """Optimisation settings of the VQ-VAE."""

    steps: int = 10_000
    """Optimizer steps."""
    lr: float = 2e-4
    """AdamW learning rate, constant (the quantizer's codebook learns by EMA, not by this optimizer)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; null disables."""
    amp: bool = False
    """bf16 autocast for the encoder/decoder (the quantizer always computes in float32)."""
    log_every: int = 50
    """Call the log hook every this many steps."""
    seed: int = 0
    """Seed of the step's randomness (the VQ-VAE step draws none; k-means and restarts use model.seed)."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be non-negative")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be non-negative")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null")
        check(self.log_every >= 1, "log_every", "must be >= 1")


def _model_input(batch: Mapping[str, Tensor], device: torch.device) -> Tensor:
    """(B, C, H, W) float in [-1, 1] on ``device`` from the batch's preprocessed pixels."""
    return pixels_to_model(batch["pixels"].to(device, non_blocking=True))


def make_optimizer(model: nn.Module, cfg: VQVAETrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, cfg: VQVAETrainConfig) -> float:
    """Constant: ``cfg.lr`` at every step."""
    return cfg.lr


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Tensor], cfg: VQVAETrainConfig,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimisation step on ``batch["pixels"]``; ``model`` may be a VQVAE or a DDP wrapper of one.
    The step draws no random numbers: ``generator`` is unused."""
    model.train()
    device = next(model.parameters()).device
    x = _model_input(batch, device)
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
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_rows: int = 0) -> Evaluation:
    """Codebook utilisation and perplexity (overall and of the foreground) and reconstruction MSE over
    the validation batches (eval mode, no codebook updates; stops after ``max_rows``, 0: all); the
    figure data is the count of every code."""
    vq: VQVAE = unwrap(model)
    was_training = vq.training
    vq.eval()
    device = next(vq.parameters()).device
    metrics = CodebookMetrics(vq.cfg.codebook_size)
    n = 0
    for b in limit_rows(batches, max_rows):
        x = _model_input(b, device)
        out = vq(x)
        metrics.update(out.indices, x=x, x_hat=out.x_hat)
        n += x.shape[0]
    vq.train(was_training)
    if n == 0:
        return Evaluation({}, {})
    rep = metrics.compute()
    return Evaluation({"val_utilisation": rep.utilisation, "val_perplexity": rep.perplexity,
                       "val_perplexity_foreground": rep.perplexity_foreground, "val_mse": rep.mse},
                      {"code_counts": metrics.counts.tolist()})


def train(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], cfg: VQVAETrainConfig,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train in this process for ``cfg.steps`` steps, cycling over ``batches`` (a list or another
    re-iterable). Returns the logged records (step, losses, batch perplexity/utilisation, images/s)."""
    optimizer = make_optimizer(model, cfg)
    history: list[dict[str, float]] = []
    t0, seen = time.perf_counter(), 0
    stream = repeat(batches)
    for step in range(1, cfg.steps + 1):
        batch = next(stream)
        set_lr(optimizer, lr_at(step - 1, cfg))
        rec = train_step(model, optimizer, batch, cfg)
        seen += batch_rows(batch)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **rec, "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            history.append(rec)
            if on_log is not None:
                on_log(step, rec)
    return history


TrainConfig = VQVAETrainConfig
MODEL = VQVAE
CURVES = ("loss", "recon_loss", "vq_loss", "perplexity", "utilisation")
# Held-out reconstruction MSE in the model's [-1, 1] pixels; codebook utilisation and perplexity beside it.
OBJECTIVE = ("val_mse", "min")
