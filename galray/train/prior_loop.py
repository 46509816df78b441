"""Pure-torch training of the prior on VQ code sequences (the loop face of :mod:`galray.train.loop`):
optimizer, schedule, one step, the validation pass, and a single-process loop.

No ray, no mlflow: Ray Train workers wrap these (the model may arrive wrapped in
DistributedDataParallel; ``train_step`` reads the config through ``.module``). Batches are dicts
``{"codes": (B, T), "label": (B,)}`` (labels already mapped to the null class where unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from galray.config import check
from galray.models.prior import Prior, PriorConfig
from galray.train.loop import Evaluation, limit_rows, set_lr, unwrap


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
    """Seed of batch order (single-process ``train``) and of class dropout."""

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
    for name, p in unwrap(model).named_parameters():
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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Tensor], cfg: PriorTrainConfig,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimizer step on ``batch`` with class dropout (rate ``model.cfg.class_dropout``, drawn from
    ``generator``).

    On CUDA the forward runs under bf16 autocast. Returns loss, token accuracy and the gradient
    norm before clipping (``cfg.grad_clip``; 0 turns clipping off).
    """
    model_cfg: PriorConfig = unwrap(model).cfg
    codes_BT, labels_B = batch["codes"].long(), batch["label"].long()
    model.train()
    labels_B = drop_labels(labels_B, model_cfg.class_dropout, model_cfg.null_class, generator)
    with torch.autocast(codes_BT.device.type, dtype=torch.bfloat16, enabled=codes_BT.device.type == "cuda"):
        out = model(codes_BT, labels_B)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    acc = (out.logits.detach().argmax(-1) == codes_BT).float().mean()
    return {"loss": float(out.loss.detach()), "acc": float(acc), "grad_norm": float(grad_norm)}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_rows: int = 0) -> Evaluation:
    """Mean next-code loss and token accuracy over the validation batches (eval mode, no class
    dropout; stops after ``max_rows``, 0: all)."""
    prior: Prior = unwrap(model)
    was_training = prior.training
    prior.eval()
    loss_sum = acc_sum = 0.0
    n = 0
    for b in limit_rows(batches, max_rows):
        codes, labels = b["codes"].long(), b["label"].long()
        out = prior(codes, labels)
        loss_sum += float(out.loss) * codes.shape[0]
        acc_sum += float((out.logits.argmax(-1) == codes).float().mean()) * codes.shape[0]
        n += codes.shape[0]
    prior.train(was_training)
    if n == 0:
        return Evaluation({}, {})
    return Evaluation({"val_loss": loss_sum / n, "val_acc": acc_sum / n}, {})


def train(model: Prior, codes_NT: Tensor, labels_N: Tensor, cfg: PriorTrainConfig,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Single-process training on in-memory codes (N, seq_len) and labels (N,), on the model's device;
    one history record (and ``on_log(steps done, record)`` call) per step."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    drop_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    optimizer = make_optimizer(model, cfg)
    history = []
    for step in range(cfg.steps):
        set_lr(optimizer, lr_at(step, cfg))
        idx = torch.randint(0, codes_NT.shape[0], (cfg.batch_size,), generator=gen)
        stats = train_step(model, optimizer, {"codes": codes_NT[idx].to(device), "label": labels_N[idx].to(device)},
                           cfg, generator=drop_gen)
        stats["lr"] = optimizer.param_groups[0]["lr"]
        history.append(stats)
        if on_log is not None:
            on_log(step + 1, stats)
    return history


TrainConfig = PriorTrainConfig
MODEL = Prior
CURVES = ("loss", "acc")
# Held-out next-code cross-entropy; token accuracy beside it.
OBJECTIVE = ("val_loss", "min")
