"""Sampling code grids from a :class:`~galray.models.prior.Prior`: naive and KV-cached.

Per new token: model logits -> classifier-free guidance ``uncond + cfg_scale * (cond - uncond)``
(Ho & Salimans 2022) -> temperature -> top-k -> top-p (nucleus, Holtzman et al. 2020) ->
one draw from ``torch.multinomial``. With guidance on, the conditional and unconditional rows
run as one forward of 2B rows (cond rows first, then the same count of null-class rows).

``sample_naive`` recomputes the whole sequence for every new token, as the reference blog's
sampler does; ``sample_kv`` runs each new token as one single-position step against a KV cache.
Both go through :func:`choose_next` in the same order, so with the same ``torch.Generator``
they consume the same random numbers and, up to float rounding, pick the same tokens.

Pure torch: imports nothing from galray outside ``galray.models`` and ``galray.config``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from galray.config import check
from galray.models.prior import Prior


@dataclass(frozen=True)
class SamplingConfig:
    """How each new code is drawn."""

    cfg_scale: float = 1.0
    """Classifier-free guidance scale: 1 = plain conditional, 0 = unconditional, > 1 = guided."""
    temperature: float = 1.0
    """Divides the logits; 0 means greedy (argmax, no randomness)."""
    top_k: int = 0
    """Keep only the k most likely codes; 0 turns the filter off."""
    top_p: float = 1.0
    """Keep the smallest set of codes whose probability reaches top_p; 1 turns the filter off."""

    def __post_init__(self) -> None:
        check(self.temperature >= 0.0, "temperature", "must be >= 0")
        check(self.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
        check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")


def guide(logits_2BV: Tensor, cfg_scale: float) -> Tensor:
    """Combine stacked [cond; uncond] logits (2B, V) into guided logits (B, V)."""
    cond_BV, uncond_BV = logits_2BV.chunk(2, dim=0)
    return uncond_BV + cfg_scale * (cond_BV - uncond_BV)


def filter_logits(logits_BV: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then top-p; filtered-out codes get -inf. temperature must be > 0."""
    logits_BV = logits_BV / temperature
    V = logits_BV.shape[-1]
    if 0 < top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # A code stays in the nucleus while the mass strictly before it is below top_p,
        # so the most likely code always stays.
        drop_sorted_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= top_p
        drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def choose_next(logits_BV: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """Draw one code per row from (already guided) logits: (B,) long."""
    if cfg.temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    probs_BV = filter_logits(logits_BV, cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def is_guided(model: Prior, labels_B: Tensor, cfg: SamplingConfig) -> bool:
    """Guidance needs an unconditional pass unless cfg_scale == 1 or every row is already unconditional."""
    return cfg.cfg_scale != 1.0 and bool((labels_B != model.cfg.null_class).any())


def _rows(model: Prior, labels_B: Tensor, guided: bool) -> Tensor:
    """Labels of the rows the model runs: (B,) or (2B,) = [labels; null class]."""
    if not guided:
        return labels_B
    return torch.cat([labels_B, torch.full_like(labels_B, model.cfg.null_class)])


def _combine(logits_RV: Tensor, guided: bool, cfg_scale: float) -> Tensor:
    return guide(logits_RV, cfg_scale) if guided else logits_RV


@contextmanager
def _eval_mode(model: Prior) -> Iterator[None]:
    """Dropout off while sampling; the caller's training flag comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check(model: Prior, labels_B: Tensor, num_tokens: int | None) -> int:
    n = model.cfg.seq_len if num_tokens is None else num_tokens
    if not 1 <= n <= model.cfg.seq_len:
        raise ValueError(f"num_tokens must be in [1, {model.cfg.seq_len}], got {n}")
    if labels_B.ndim != 1:
        raise ValueError(f"labels must be (B,), got shape {tuple(labels_B.shape)}")
    if bool(((labels_B < 0) | (labels_B > model.cfg.null_class)).any()):
        raise ValueError(f"labels must be in [0, {model.cfg.null_class}] ({model.cfg.null_class} = unconditional)")
    return n


def _prepare(model: Prior, labels_B: Tensor, cfg: SamplingConfig,
             num_tokens: int | None) -> tuple[int, bool, Tensor, Tensor]:
    """Shared set-up of both samplers: token count, whether CFG runs, the model's label rows
    (cond then uncond when guided: (R,) with R = B or 2B) and the empty output (B, n)."""
    n = _check(model, labels_B, num_tokens)
    guided = is_guided(model, labels_B, cfg)
    rows_R = _rows(model, labels_B, guided)
    codes_BN = torch.zeros(labels_B.shape[0], n, dtype=torch.long, device=labels_B.device)
    return n, guided, rows_R, codes_BN


@torch.no_grad()
def sample_naive(model: Prior, labels_B: Tensor, cfg: SamplingConfig = SamplingConfig(),
                 generator: torch.Generator | None = None, num_tokens: int | None = None) -> Tensor:
    """Reference sampler: re-run the full prefix for every new code. Returns codes (B, num_tokens)."""
    n, guided, rows_R, codes_BN = _prepare(model, labels_B, cfg, num_tokens)
    with _eval_mode(model):
        for i in range(n):
            prefix_BT = codes_BN[:, :i]
            prefix_RT = torch.cat([prefix_BT, prefix_BT]) if guided else prefix_BT
            logits_BV = _combine(model.next_logits_naive(rows_R, prefix_RT), guided, cfg.cfg_scale)
            codes_BN[:, i] = choose_next(logits_BV, cfg, generator)
    return codes_BN


@torch.no_grad()
def sample_kv(model: Prior, labels_B: Tensor, cfg: SamplingConfig = SamplingConfig(),
              generator: torch.Generator | None = None, num_tokens: int | None = None) -> Tensor:
    """KV-cached sampler: one single-position forward per new code. Returns codes (B, num_tokens)."""
    n, guided, rows_R, codes_BN = _prepare(model, labels_B, cfg, num_tokens)
    with _eval_mode(model):
        cache = model.new_cache(rows_R.shape[0])
        logits_RV = model.prefill(rows_R, cache)
        for i in range(n):
            next_B = choose_next(_combine(logits_RV, guided, cfg.cfg_scale), cfg, generator)
            codes_BN[:, i] = next_B
            if i + 1 < n:
                logits_RV = model.decode_step(torch.cat([next_B, next_B]) if guided else next_B, cache)
    return codes_BN


def sample(model: Prior, labels_B: Tensor, cfg: SamplingConfig = SamplingConfig(),
           generator: torch.Generator | None = None, num_tokens: int | None = None,
           use_cache: bool = True) -> Tensor:
    """Sample code sequences (B, num_tokens or seq_len); labels == ``model.cfg.null_class`` = unconditional."""
    fn = sample_kv if use_cache else sample_naive
    return fn(model, labels_B, cfg, generator, num_tokens)
