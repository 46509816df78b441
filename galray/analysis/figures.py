"""Training figures: loss curves, codebook usage (histogram + CDF), SAE feature density.

Arrays in, ``matplotlib.figure.Figure`` out. Figures are built without pyplot, so no global
figure state and no GUI backend is involved (safe in Ray workers and threads). No ray, no mlflow.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def loss_curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "") -> Figure:
    """One panel per metric: ``{"loss": (steps, values), ...}``. Positive series spanning more than
    a decade get a log y axis."""
    names = list(series)
    n = max(1, len(names))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        steps, values = (np.asarray(a, dtype=float) for a in series[name])
        ax.plot(steps, values, lw=1.2)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 10:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def codebook_usage(counts_K: np.ndarray, title: str = "codebook usage") -> Figure:
    """Left: histogram of tokens per code (log bins; unused codes counted in the legend).
    Right: CDF of tokens over codes sorted by usage (how many codes hold most of the tokens)."""
    counts = np.asarray(counts_K, dtype=float)
    K, total = len(counts), counts.sum()
    used = counts[counts > 0]
    fig = Figure(figsize=(9.5, 3.4), layout="constrained")
    ax_h, ax_c = fig.subplots(1, 2)
    if used.size:
        hi = max(used.max(), 1.0)
        bins = np.logspace(0, math.log10(hi) + 1e-9, 30) if hi > 1 else np.array([0.5, 1.5])
        ax_h.hist(used, bins=bins, color="C0")
        ax_h.set_xscale("log")
    ax_h.set_xlabel("tokens per code")
    ax_h.set_ylabel("codes")
    ax_h.set_title(f"{int((counts > 0).sum())} of {K} codes used ({K - used.size} unused)")
    share = np.sort(counts)[::-1] / max(total, 1.0)
    ax_c.plot(np.arange(1, K + 1), np.cumsum(share), color="C1")
    ax_c.set_xscale("log")
    ax_c.set_ylim(0, 1.02)
    ax_c.set_xlabel("codes, most used first")
    ax_c.set_ylabel("share of tokens")
    ax_c.grid(alpha=0.3)
    p = share[share > 0]
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0
    ax_c.set_title(f"CDF (perplexity {perplexity:.1f})")
    fig.suptitle(title)
    return fig


def feature_density(hist: Sequence[int], edges: Sequence[float], n_latents: int | None = None,
                    n_samples: int | None = None, title: str = "SAE feature density") -> Figure:
    """Histogram of log10 firing density of the latents that fired (from ``evaluate_sae``)."""
    hist_a, edges_a = np.asarray(hist, dtype=float), np.asarray(edges, dtype=float)
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.subplots()
    ax.stairs(hist_a, edges_a, fill=True, color="C2")
    ax.set_xlabel("log10 firing density")
    ax.set_ylabel("latents")
    live = int(hist_a.sum())
    parts = [f"{live} live latents"]
    if n_latents is not None:
        parts.append(f"{n_latents - live} dead")
    if n_samples is not None:
        parts.append(f"{n_samples} samples")
    ax.set_title(f"{title}\n" + ", ".join(parts), fontsize=10)
    return fig
