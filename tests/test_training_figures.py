"""Training figures (galray.analysis.figures) show the numbers they are given; test_layering checks they
are built without pyplot. Known answers: plotted data, titles that count codes and latents, a drawn image."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from galray.analysis import figures as f


def _pixels(fig) -> np.ndarray:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return np.asarray(Image.open(buf).convert("L"), dtype=float)


def test_loss_curves_plot_each_series_on_its_own_panel():
    fig = f.loss_curves({"loss": ([1, 2, 3], [30.0, 3.0, 0.3]), "fvu": ([1, 2, 3], [0.9, 0.5, 0.4])}, title="run")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["loss", "fvu"]
    x, y = shown[0].lines[0].get_data()
    assert list(x) == [1, 2, 3] and list(y) == [30.0, 3.0, 0.3]
    assert shown[0].get_yscale() == "log" and shown[1].get_yscale() == "linear"  # two decades vs less than one
    assert _pixels(fig).std() > 5  # something was drawn


def test_codebook_usage_counts_codes_and_perplexity():
    fig = f.codebook_usage(np.array([5, 0, 3, 0, 0, 2]))
    hist_ax, cdf_ax = fig.axes
    assert hist_ax.get_title() == "3 of 6 codes used (3 unused)"
    p = np.array([0.5, 0.3, 0.2])
    assert cdf_ax.get_title() == f"CDF (perplexity {np.exp(-(p * np.log(p)).sum()):.1f})"
    _, cdf = cdf_ax.lines[0].get_data()
    np.testing.assert_allclose(cdf, [0.5, 0.8, 1.0, 1.0, 1.0, 1.0])
    assert _pixels(fig).std() > 5


def test_feature_density_draws_the_histogram_and_counts_dead_latents():
    fig = f.feature_density([1, 2], [-2.0, -1.0, 0.0], n_latents=8, n_samples=10)
    (ax,) = fig.axes
    assert ax.get_title().endswith("3 live latents, 5 dead, 10 samples")
    (stairs,) = ax.patches
    np.testing.assert_array_equal(stairs.get_data().values, [1, 2])
    np.testing.assert_array_equal(stairs.get_data().edges, [-2.0, -1.0, 0.0])
    assert _pixels(fig).std() > 5
