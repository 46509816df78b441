"""Figures of the alignment analysis: ground-truth recovery, max |rho| distributions, rho heat map.

Frames and arrays in (:mod:`galray.analysis.alignment`), ``matplotlib.figure.Figure`` out, built
without pyplot (no global state). No torch, no Ray.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

SAE_COLOUR, PCA_COLOUR, NULL_COLOUR = "#d1495b", "#00798c", "#8d8d8d"


def recovery_figure(recovery: pd.DataFrame, labels: Sequence[str] | None = None, goal: float | None = 0.7,
                    title: str = "Ground-truth recovery: best |Spearman rho| per parameter") -> Figure:
    """Horizontal bars, one pair per label: the best SAE feature's |rho| and the best PCA component's,
    with each method's shuffle-null quantile (dotted) and the goal (dashed)."""
    frame = recovery if labels is None else recovery.set_index("label").loc[list(labels)].reset_index()
    n = len(frame)
    fig = Figure(figsize=(7.5, 0.42 * n + 1.4), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    h = 0.38
    ax.barh(y - h / 2, frame["sae_abs_rho"], h, color=SAE_COLOUR, label="SAE (best feature)")
    if "pca_abs_rho" in frame:
        ax.barh(y + h / 2, frame["pca_abs_rho"], h, color=PCA_COLOUR, label="PCA (best of as many components)")
    for i, row in enumerate(frame.itertuples()):
        ax.text(row.sae_abs_rho + 0.01, i - h / 2, f"{row.sae_abs_rho:.2f}", va="center", fontsize=7)
        if "pca_abs_rho" in frame:
            ax.text(row.pca_abs_rho + 0.01, i + h / 2, f"{row.pca_abs_rho:.2f}", va="center", fontsize=7)
    null = float(frame["sae_null_q"].max()) if "sae_null_q" in frame and n else 0.0
    if null > 0:
        ax.axvline(null, color=NULL_COLOUR, ls=":", lw=1.2, label=f"shuffle null (99%) {null:.2f}")
    if goal is not None:
        ax.axvline(goal, color="black", ls="--", lw=0.8, label=f"goal {goal:g}")
    ax.set_yticks(y, list(frame["label"]))
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("|Spearman rho|")
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def distributions_figure(sae_max: np.ndarray, pca_max: np.ndarray, null_max: np.ndarray,
                         title: str = "How well do features align with labels?") -> Figure:
    """Cumulative distributions of each feature's max |rho| over the labels: SAE features, PCA components,
    and the SAE features under label shuffles (what chance gives)."""
    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for values, colour, name in ((sae_max, SAE_COLOUR, "SAE features"), (pca_max, PCA_COLOUR, "PCA components"),
                                 (null_max, NULL_COLOUR, "SAE, labels shuffled")):
        v = np.sort(np.asarray(values, float).ravel())
        if v.size:
            ax.step(np.concatenate([[0], v]), np.concatenate([[1.0], 1 - np.arange(1, v.size + 1) / v.size]),
                    where="post", color=colour, lw=1.8, label=f"{name} (n={v.size}, median {np.median(v):.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("max |Spearman rho| over labels")
    ax.set_ylabel("share of features with at least x")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return fig


def rho_heatmap(rho_FL: np.ndarray, feature_names: Sequence[str], labels: Sequence[str],
                title: str = "Spearman rho of the most aligned features") -> Figure:
    """Signed rho of a few features (rows) against every label (columns), diverging colours."""
    rho = np.asarray(rho_FL, float)
    fig = Figure(figsize=(max(5.0, 0.32 * len(labels) + 2.0), max(2.5, 0.28 * len(feature_names) + 1.6)),
                 layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(rho, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(labels)), list(labels), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(feature_names)), list(feature_names), fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="rho")
    ax.set_title(title, fontsize=10)
    return fig
