"""The figure of a hyperparameter campaign: each trial's learning curve, and the objective against each searched key.

Arrays in, ``matplotlib.figure.Figure`` out, without pyplot (as :mod:`galray.analysis.figures`). No ray, no mlflow.

- Left: the objective at every report of every trial. Trials a scheduler stopped early end in a
  cross, finished trials in a dot; the best trial is drawn thick.
- One panel per searched key: each trial's last objective against its value, on a log axis for
  log-uniform keys and as categories for choices and grids (stopped trials as crosses, the best
  as a star). A stopped trial's value is from its last report, so it sits above (for a
  minimised objective) where it would have ended.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def _positive_span(values: np.ndarray) -> bool:
    finite = values[np.isfinite(values)]
    return bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 10)


def campaign_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], stopped: Mapping[str, bool],
                    values: Mapping[str, Mapping[str, Any]], params: Sequence[tuple[str, str]], metric: str,
                    best: str | None = None, title: str = "") -> Figure:
    """``curves``: {trial: (steps, objective)}; ``stopped``: {trial: stopped early}; ``values``: {trial: {key: value}};
    ``params``: (key, distribution) of each searched key; ``best``: the best trial."""
    n = 1 + len(params)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.4 * cols, 3.3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    last = {t: float(np.asarray(v, dtype=float)[-1]) for t, (_, v) in curves.items() if len(v)}
    everything = np.array(list(last.values()) + [x for _, v in curves.values() for x in v], dtype=float)
    log_y = _positive_span(everything)

    ax = axes[0]
    for i, (trial, (steps, ys)) in enumerate(sorted(curves.items())):
        if not len(ys):
            continue
        color = f"C{i % 10}"
        thick = trial == best
        ax.plot(steps, ys, color=color, lw=2.4 if thick else 1.0, alpha=1.0 if thick else 0.75,
                label=f"{trial} (best)" if thick else None)
        ax.plot(steps[-1], ys[-1], marker="x" if stopped.get(trial) else "o", color=color, ms=7 if thick else 5,
                ls="none")
    ax.plot([], [], "kx", ls="none", label="stopped early")
    ax.plot([], [], "ko", ls="none", label="finished")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("learning curves")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if log_y:
        ax.set_yscale("log")

    for ax, (key, dist) in zip(axes[1:], params):
        trials = [t for t in last if key in values.get(t, {})]
        raw = [values[t][key] for t in trials]
        if dist in ("choice", "grid") or not all(isinstance(v, (int, float)) for v in raw):
            cats = sorted({json.dumps(v) for v in raw})
            index = [cats.index(json.dumps(v)) for v in raw]
            # Trials with the same value side by side around their category.
            xs = np.array([i + 0.25 * (index[:j].count(i) - (index.count(i) - 1) / 2) / max(1, index.count(i))
                           for j, i in enumerate(index)], dtype=float)
            ax.set_xticks(range(len(cats)), [c[:14] for c in cats], rotation=30 if len(cats) > 4 else 0, fontsize=8)
        else:
            xs = np.array(raw, dtype=float)
            if dist == "loguniform":
                ax.set_xscale("log")
        ys = np.array([last[t] for t in trials])
        done = np.array([not stopped.get(t) for t in trials], dtype=bool)
        ax.scatter(xs[done], ys[done], marker="o", color="C0", label="finished")
        ax.scatter(xs[~done], ys[~done], marker="x", color="C3", label="stopped early")
        if best in trials:
            j = trials.index(best)
            ax.scatter([xs[j]], [ys[j]], marker="*", s=180, color="gold", edgecolor="k", zorder=3, label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig
