"""Pure-torch training of the prior on VQ code sequences: one step, optimizer, schedule, a loop.

No ray, no mlflow: Ray Train workers wrap these (the model may arrive wrapped in
DistributedDataParallel; ``prior_train_step`` reads the config through ``.module``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from galray.config import check
from galray.models.prior import Prior, PriorConfig


@dataclass(frozen=True)
class PriorTrainConfig:
    """Optimisation of the prior."""

    steps: int = 2000
    """Optimizer steps in total."""
    batch_size: int = 64
    """Code sequences per step (per worker under DDP)."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.1
    """AdamW decay on matrices only (not on biases, norms, embeddings of positions/SOS)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    warmup_steps: int = 100
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine schedule as a fraction of lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    seed: int = 0
    """Seed of batch order and class dropout."""

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")


def _unwrap(model: nn.Module) -> Prior:
    return getattr(model, "module", model)  # DDP / torch.compile wrappers keep the model in .module


def drop_labels(labels_B: Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_class`` with probability p (class dropout for CFG)."""
    if p <= 0.0:
        return labels_B
    u_B = torch.rand(labels_B.shape, generator=generator, device=labels_B.device)
    return torch.where(u_B < p, torch.full_like(labels_B, null_class), labels_B)


def make_optimizer(model: nn.Module, cfg: PriorTrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on >= 2-D weights except embeddings (nanoGPT's grouping, minus positions)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in _unwrap(model).named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and "pos_emb" not in name and "class_emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: PriorTrainConfig) -> float:
    """Linear warmup, then cosine decay from lr to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def prior_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, codes_BT: Tensor, labels_B: Tensor,
                     *, grad_clip: float = 1.0, generator: torch.Generator | None = None,
                     autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One optimizer step with class dropout (rate ``model.cfg.class_dropout``).

    ``autocast_dtype`` (e.g. torch.bfloat16 on a GPU) runs the forward under autocast on
    the codes' device type. Returns loss, token accuracy and the gradient norm before clipping.
    """
    cfg: PriorConfig = _unwrap(model).cfg
    model.train()
    labels_B = drop_labels(labels_B, cfg.class_dropout, cfg.null_class, generator)
    with torch.autocast(codes_BT.device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = model(codes_BT, labels_B)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    acc = (out.logits.detach().argmax(-1) == codes_BT).float().mean()
    return {"loss": float(out.loss.detach()), "acc": float(acc), "grad_norm": float(grad_norm)}


def train_prior(model: Prior, codes_NT: Tensor, labels_N: Tensor, cfg: PriorTrainConfig,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Single-process training on in-memory codes (N, seq_len) and labels (N,), on the model's device."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    drop_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    optimizer = make_optimizer(model, cfg)
    history = []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, codes_NT.shape[0], (cfg.batch_size,), generator=gen)
        stats = prior_train_step(model, optimizer, codes_NT[idx].to(device), labels_N[idx].to(device),
                                 grad_clip=cfg.grad_clip, generator=drop_gen)
        stats["lr"] = optimizer.param_groups[0]["lr"]
        history.append(stats)
        if on_step is not None:
            on_step(step, stats)
    return history
