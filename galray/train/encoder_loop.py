"""Pure-torch training of galray's encoder (the loop face of :mod:`galray.train.loop`): self-supervised
SimCLR on unlabelled cutouts, or supervised fine-tuning on classes or Galaxy Zoo votes.

See :mod:`galray.models.encoder` for the method and its sources. Batches are dicts of preprocessed
pixels ``{"pixels": (B, C, S, S)}`` (uint8 0..255 or float in [0, 1], :mod:`galray.data.preprocess`),
plus ``"label"`` (B,) int64 (classes; -1: unlabelled, ignored) or ``"votes"`` (B, A) float32 (vote
counts per answer) when fine-tuning. Every step draws fresh random views
(:mod:`galray.models.augment`) from the step's ``generator``.

**Modes.** ``selfsup``: two views per cutout through backbone and projector, NT-Xent loss; the model
must have a projector and no head. ``finetune``: one view per cutout through backbone and head,
cross-entropy (``num_classes``) or Dirichlet-multinomial (``vote_groups``); the model must have a
head and no projector (``proj_dim: 0``), so that every trained parameter gets a gradient (DDP
requires it).

**Schedule.** AdamW (no weight decay on biases and norms), linear warm-up then cosine decay to 0,
as SimCLR and Zoobot train.

No Ray, no MLflow: the Ray Train worker wraps the model in DDP and calls these.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from galray.config import check
from galray.models.augment import AugmentConfig, random_view
from galray.models.encoder import SurveyEncoder
from galray.models.encoder_losses import dirichlet_multinomial_nll, nt_xent
from galray.train.loop import Evaluation, batch_rows, limit_rows, repeat, set_lr, unwrap

Mode = Literal["selfsup", "finetune"]
EVAL_SEED = 0


@dataclass(frozen=True)
class EncoderTrainConfig:
    """Optimisation settings of the encoder."""

    mode: Mode = "selfsup"
    """selfsup: SimCLR on unlabelled cutouts; finetune: a head on labels (classes or votes)."""
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 2e-3
    """Peak AdamW learning rate (after warm-up)."""
    weight_decay: float = 0.05
    """AdamW weight decay of the weight matrices (none on biases and norms)."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    temperature: float = 0.2
    """NT-Xent temperature (SimCLR: 0.1-0.5; 0.2 measured best here)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; null disables."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """The random views (rotation, flip, zoom, shift, blur, colour, noise)."""
    log_every: int = 50
    """Call the log hook every this many steps (in-process loop)."""
    seed: int = 0
    """Seed of the random views."""

    def __post_init__(self) -> None:
        check(self.steps >= 0, "steps", "must be non-negative")
        check(self.lr > 0, "lr", "must be positive")
        check(self.weight_decay >= 0, "weight_decay", "must be non-negative")
        check(self.warmup_steps >= 0, "warmup_steps", "must be non-negative")
        check(self.temperature > 0, "temperature", "must be positive")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive or null")
        check(self.log_every >= 1, "log_every", "must be >= 1")


def to_unit(pixels_BCHW: Tensor) -> Tensor:
    """Preprocessed pixels (uint8 0..255, or float in [0, 1]) -> float on the [0, 1] scale."""
    if pixels_BCHW.dtype == torch.uint8:
        return pixels_BCHW.float() / 255.0
    return pixels_BCHW.float()


def make_optimizer(model: nn.Module, cfg: EncoderTrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    rest = [p for p in params if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def lr_at(step: int, cfg: EncoderTrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _contrastive(model: nn.Module, x: Tensor, cfg: EncoderTrainConfig, temperature: float,
                 generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    v1 = random_view(x, cfg.augment, generator)
    v2 = random_view(x, cfg.augment, generator)
    z1, z2 = model(torch.cat([v1, v2])).projection_BP.chunk(2)
    loss = nt_xent(z1, z2, temperature)
    with torch.no_grad():  # contrastive accuracy: is the other view the nearest of the 2B - 1?
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        sim = (z @ z.T).fill_diagonal_(-2.0)
        n = z1.shape[0]
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        top1 = (sim.argmax(1) == target).float().mean().item()
    return loss, {"top1": top1}


def _supervised(model: nn.Module, x: Tensor, batch: Mapping[str, Tensor], cfg: EncoderTrainConfig,
                generator: torch.Generator | None, augment: bool) -> tuple[Tensor, dict[str, float]]:
    enc: SurveyEncoder = unwrap(model)
    head = model(random_view(x, cfg.augment, generator) if augment else x).head_BK
    if enc.cfg.vote_groups:
        return dirichlet_multinomial_nll(head, batch["votes"].to(head.device), enc.cfg.vote_groups), {}
    label = batch["label"].to(head.device).long()
    known = label >= 0
    if not bool(known.any()):  # no labelled row: a zero loss that still touches every parameter (DDP)
        return head.sum() * 0.0, {"acc": float("nan")}
    loss = F.cross_entropy(head[known].float(), label[known])
    acc = (head[known].argmax(1) == label[known]).float().mean().item()
    return loss, {"acc": acc}


def _loss(model: nn.Module, batch: Mapping[str, Tensor], cfg: EncoderTrainConfig,
          generator: torch.Generator | None, training: bool = True) -> tuple[Tensor, dict[str, float]]:
    """The mode's loss; a supervised evaluation (``training`` false) sees the cutouts as they are."""
    device = next(unwrap(model).parameters()).device
    x = to_unit(batch["pixels"].to(device, non_blocking=True))
    if cfg.mode == "selfsup":
        return _contrastive(model, x, cfg, cfg.temperature, generator)
    return _supervised(model, x, batch, cfg, generator, augment=training)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Tensor],
               cfg: EncoderTrainConfig, generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimisation step; ``model`` may be a SurveyEncoder or a DDP wrapper of one."""
    model.train()
    loss, stats = _loss(model, batch, cfg, generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss": loss.item(), **stats}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], max_rows: int = 0) -> Evaluation:
    """Validation loss and contrastive top-1 accuracy (self-supervised: eval mode, views drawn from a
    fixed seed, the default temperature, so runs with other settings compare) or class accuracy
    (fine-tuned on classes: the cutouts unaugmented); stops after ``max_rows`` (0: all)."""
    enc: SurveyEncoder = unwrap(model)
    was_training = enc.training
    enc.eval()
    device = next(enc.parameters()).device
    cfg = EncoderTrainConfig(mode="finetune" if enc.head is not None else "selfsup")
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    totals: dict[str, float] = {}
    n = 0
    for b in limit_rows(batches, max_rows):
        rows = batch_rows(b)
        if cfg.mode == "selfsup" and rows < 2:
            continue
        loss, stats = _loss(enc, b, cfg, generator, training=False)
        for k, v in {"loss": loss.item(), **stats}.items():
            if not math.isnan(v):
                totals[k] = totals.get(k, 0.0) + v * rows
        n += rows
    enc.train(was_training)
    if n == 0:
        return Evaluation({}, {})
    return Evaluation({f"val_{k}": v / n for k, v in totals.items()}, {})


def train(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], cfg: EncoderTrainConfig,
          on_log: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train in this process for ``cfg.steps`` steps, cycling over ``batches`` (a list or another
    re-iterable). Returns the logged records (step, loss, accuracy, lr, images/s)."""
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    t0, seen = time.perf_counter(), 0
    stream = repeat(batches)
    for step in range(1, cfg.steps + 1):
        batch = next(stream)
        lr = lr_at(step - 1, cfg)
        set_lr(optimizer, lr)
        rec = train_step(model, optimizer, batch, cfg, generator)
        seen += batch_rows(batch)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **rec, "lr": lr, "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            history.append(rec)
            if on_log is not None:
                on_log(step, rec)
    return history


TrainConfig = EncoderTrainConfig
MODEL = SurveyEncoder
CURVES = ("loss", "top1", "acc")
# Held-out loss: NT-Xent on fixed-seed views (self-supervised) or the head's loss (fine-tuned).
OBJECTIVE = ("val_loss", "min")
