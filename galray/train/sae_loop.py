"""Pure-torch SAE training (the loop face of :mod:`galray.train.loop`): optimizer, LR schedule, one
reusable step, the validation pass, and a single-process loop.

No ray or mlflow here. The Ray Train worker wraps the model in DDP, builds the optimizer with
``make_optimizer``, sets ``lr_at(step)`` and calls ``train_step`` per batch (``{"x": (B, D)}``);
the SAE all-reduces its own threshold and dead-latent statistics when torch.distributed is
initialised.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from galray.config import check
from galray.models.sae import SparseAutoencoder, evaluate_sae
from galray.train.loop import Evaluation, RecentBatches, repeat, set_lr, unwrap


@dataclass(frozen=True)
class SAETrainConfig:
    """Optimisation of a SparseAutoencoder. Field defaults are the ``galray`` preset."""

    lr: float = 4e-4
    """Peak learning rate."""
    batch_size: int = 256
    """Samples per step (BatchTopK keeps k * batch_size activations per step)."""
    epochs: float = 20.0
    """Passes over a tensor dataset; ignored when ``steps`` is set."""
    steps: int | None = None
    """Total optimizer steps; overrides ``epochs``. Required for an unsized iterable of batches."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """adam (no weight decay: it would shrink the encoder against the unit-norm decoder) or adamw."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    fused: bool = True
    """Use the fused Adam/AdamW kernel (CPU and CUDA): one pass over the parameters instead of ~10."""
    grad_clip: float | None = 1.0
    """Max global gradient norm; null disables clipping."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """wsd: linear warmup, constant, linear decay to min_lr_frac over the last decay_frac;
    cosine: warmup then cosine to min_lr_frac; constant: warmup then constant."""
    warmup_frac: float = 0.02
    """Fraction of steps of linear warmup from 0."""
    decay_frac: float = 0.3
    """Fraction of steps of final linear decay (wsd only)."""
    min_lr_frac: float = 0.0
    """Final learning rate as a fraction of ``lr``."""
    seed: int = 0
    """Seed of the shuffling (single-process ``train``) and of the step's randomness (none for the SAE)."""
    log_every: int = 100
    """Steps between history entries (and log_fn calls); the last step is always logged."""
    preset: str = "galray"
    """Name of the preset this config started from (a label)."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.epochs > 0, "epochs", "must be positive")
        check(self.steps is None or self.steps > 0, "steps", "must be positive or null")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.optimizer == "adamw" or self.weight_decay == 0, "weight_decay",
              "is only applied by optimizer adamw")
        check(all(0 <= b < 1 for b in self.betas), "betas", "must be in [0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null")
        check(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
        check(0 <= self.decay_frac <= 1, "decay_frac", "must be in [0, 1]")
        check(0 <= self.min_lr_frac <= 1, "min_lr_frac", "must be in [0, 1]")
        check(self.log_every > 0, "log_every", "must be positive")


def sae_train_preset(name: str, **overrides: Any) -> SAETrainConfig:
    """``galray`` or ``wu2025`` (AdamW lr 1e-4, wd 0.01, batch 256, 200 epochs, cosine to lr/10, no clip)."""
    if name == "galray":
        base = SAETrainConfig(preset="galray")
    elif name == "wu2025":
        base = SAETrainConfig(lr=1e-4, batch_size=256, epochs=200.0, optimizer="adamw", weight_decay=0.01,
                              betas=(0.9, 0.999), fused=False, grad_clip=None, schedule="cosine", warmup_frac=0.0,
                              min_lr_frac=0.1, preset="wu2025")
    else:
        raise ValueError(f"unknown SAE train preset {name!r}; choose galray or wu2025")
    return replace(base, **overrides) if overrides else base


def lr_factor(step: int, total: int, cfg: SAETrainConfig) -> float:
    """Multiplier of cfg.lr at ``step`` (0-based) of ``total`` steps."""
    warm = int(cfg.warmup_frac * total)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    decay = int(cfg.decay_frac * total)
    start = total - decay
    if step < start or decay == 0:
        return 1.0
    t = (step - start + 1) / decay
    return 1.0 - (1.0 - cfg.min_lr_frac) * min(t, 1.0)


def make_optimizer(model: nn.Module, cfg: SAETrainConfig) -> torch.optim.Optimizer:
    params = list(model.parameters())
    # The fused kernels exist for float params on CPU and CUDA; anything else falls back to the default.
    fused = cfg.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw)
    return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, **kw)


def lr_at(step: int, cfg: SAETrainConfig) -> float:
    """Learning rate of ``step`` (0-based) of ``cfg.steps``: ``cfg.lr`` times the schedule's factor."""
    if cfg.steps is None:
        raise ValueError("lr_at needs SAETrainConfig.steps (train() resolves it from epochs)")
    return cfg.lr * lr_factor(step, cfg.steps, cfg)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Tensor], cfg: SAETrainConfig,
               generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """One step on ``batch["x"]`` (B, D): forward, backward, remove decoder-parallel gradient, clip,
    step, renormalise decoder.

    ``model`` may be the SAE or a DDP wrapper of it. Returns detached scalar tensors (no host sync).
    The SAE step draws no random numbers: ``generator`` is unused.
    """
    sae: SparseAutoencoder = unwrap(model)
    optimizer.zero_grad(set_to_none=True)
    out = model(batch["x"].float())
    out.loss.backward()
    sae.remove_parallel_grad()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    sae.normalize_decoder()
    return {"loss": out.loss.detach(), "fvu": out.fvu, "recon_loss": out.recon_loss, "l1": out.l1,
            "aux_loss": out.aux_loss, "l0": out.l0, "dead_frac": out.dead_frac}


def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_rows: int = 0) -> Evaluation:
    """FVU, mean L0 and dead fraction on the first ``max_rows`` (0: all) validation rows, and the
    feature-density histogram (:func:`galray.models.sae.evaluate_sae`)."""
    sae: SparseAutoencoder = unwrap(model)
    xs = [b["x"].float() for b in batches]
    if not xs:
        return Evaluation({}, {})
    rep = evaluate_sae(sae, torch.cat(xs)[: max_rows or None])
    metrics = {f"val_{k}": float(rep[k]) for k in ("fvu", "l0_mean", "dead_frac")}
    return Evaluation(metrics, {"density_log10_hist": rep["density_log10_hist"],
                                "density_log10_edges": rep["density_log10_edges"], "n_samples": rep["n_samples"],
                                "n_latents": sae.cfg.n_latents, "fvu_prefix": rep["fvu_prefix"],
                                "prefix_sizes": rep["prefix_sizes"]})


CALIBRATION_ROWS = 8192
"""Rows (per rank) the inference threshold is calibrated on: ``k * 8192`` kept activations
set its quantile to within about 1% of L0 (binomial error 1/sqrt(k * 8192) at k = 8)."""


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> None:
    """Set the inference threshold so threshold-mode L0 on these batches is k (all ranks together):
    recent training batches, or held-out ones at the end of a Ray Train run (galray.train.workers)."""
    sae: SparseAutoencoder = unwrap(model)
    sae.calibrate_threshold(torch.cat([b["x"].float() for b in batches]))


def _as_batch(item: Any) -> Tensor:
    # A DataLoader over a TensorDataset yields [tensor]; take the embeddings.
    return item[0] if isinstance(item, (list, tuple)) else item


def train(model: nn.Module, x_train: Tensor | Iterable[Tensor], cfg: SAETrainConfig,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train ``model`` in this process and return its history (one dict per ``log_every`` steps, plus the last).

    ``x_train`` is either an (N, D) tensor of raw embeddings (shuffled each epoch, last partial batch
    dropped so BatchTopK always sees ``batch_size`` rows) or an iterable of (B, D) batches. With a
    tensor, an unfitted model first fits its normalisation and b_pre on it; with an iterable the
    model must already be fitted (``fit_normalization`` + ``init_from_sample`` on a training sample).
    The threshold is calibrated at the end on the last ``CALIBRATION_ROWS`` training rows (:func:`calibrate`), and
    the model is left in eval mode, so ``encode`` then uses it.
    """
    sae: SparseAutoencoder = unwrap(model)
    dev = sae.W_dec_FD.device
    gen = torch.Generator().manual_seed(cfg.seed)
    if isinstance(x_train, Tensor):
        n = x_train.shape[0]
        check(n > 0, "x_train", "is empty")
        if not bool(sae.norm_fitted):
            sae.fit_normalization(x_train)
            sae.init_from_sample(x_train[torch.randperm(n, generator=gen)[:8192]])
        bs = min(cfg.batch_size, n)
        per_epoch = n // bs
        total = cfg.steps or max(1, int(round(cfg.epochs * per_epoch)))

        def batches() -> Iterator[Tensor]:
            while True:
                perm = torch.randperm(n, generator=gen)
                for i in range(per_epoch):
                    yield x_train[perm[i * bs:(i + 1) * bs]]
    else:
        if not bool(sae.norm_fitted):
            raise ValueError("train with an iterable of batches needs a fitted model: call "
                             "model.fit_normalization(x_sample) and model.init_from_sample(x_sample) first")
        if cfg.steps is not None:
            total = cfg.steps
        elif isinstance(x_train, Sized):
            total = max(1, int(round(cfg.epochs * len(x_train))))
        else:
            raise ValueError("an unsized iterable of batches needs SAETrainConfig.steps")
        source = x_train

        def batches() -> Iterator[Tensor]:
            return (_as_batch(item) for item in repeat(source))

    cfg = replace(cfg, steps=total)
    optimizer = make_optimizer(model, cfg)
    model.train()
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seen = 0
    it = iter(batches())
    recent = RecentBatches(CALIBRATION_ROWS)
    for step in range(total):
        batch = next(it).to(dev, non_blocking=True)
        recent.add({"x": batch})
        lr = lr_at(step, cfg)
        set_lr(optimizer, lr)
        stats = train_step(model, optimizer, {"x": batch}, cfg)
        seen += batch.shape[0]
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            elapsed = time.perf_counter() - t0
            row = {"step": float(step + 1), "lr": float(lr), "samples": float(seen),
                   "samples_per_s": seen / max(elapsed, 1e-9), "threshold": float(sae.threshold),
                   **{k: float(v) for k, v in stats.items()}}
            history.append(row)
            if on_log is not None:
                on_log(step + 1, row)
    calibrate(model, recent.batches)
    model.eval()
    return history


TrainConfig = SAETrainConfig
MODEL = SparseAutoencoder
CURVES = ("loss", "fvu", "aux_loss", "l0")
# Held-out fraction of variance unexplained; val_l0_mean and val_dead_frac beside it.
OBJECTIVE = ("val_fvu", "min")
