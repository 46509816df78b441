"""The Ray Data batch functions of training: store rows of one split -> the batch dict a kind's loop takes.

They run in Ray Data tasks, in worker processes that import this module by name to unpickle them, so it
imports only numpy, pyarrow and galray's data modules: not torch, timm or the model modules
(:mod:`galray.train.datasets`, which builds the datasets on the driver, does). Importing
``galray.train.datasets`` took 5.8 s here (timm through the encoder's config), paid by every fresh
worker process of every training's data, against 0.4 s for this module.

Rows a model cannot take are left out and reported with their reason to the run's
:mod:`galray.train.skipped_rows` counter (``skipped``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from galray.data.cutouts import CutoutError
from galray.data.preprocess import ImagePlan, prepare_image
from galray.data.shards import ID_COLUMN
from galray.data.split import is_val
from galray.data.stores import CODES_COLUMN, EMBEDDING_COLUMN, LABEL_COLUMN, list_column_values
from galray.train.skipped_rows import report_skipped


def _keep(ids: Sequence[Any], split: str, fraction: float) -> np.ndarray:
    val = is_val(ids, fraction)
    return val if split == "val" else ~val


def _usable(ids: Sequence[Any], keep: np.ndarray, ok: np.ndarray, split: str, reason: str, skipped: Any
            ) -> np.ndarray:
    """``ok`` (a mask of the rows ``keep`` selects from ``ids``), after reporting the rows it leaves out to
    ``skipped`` with ``reason``."""
    if not ok.all():
        report_skipped(skipped, split, [ids[i] for i in np.flatnonzero(keep)[~ok]], reason)
    return ok


def sae_batch(table: pa.Table, split: str, val_fraction: float, skipped: Any = None) -> dict[str, np.ndarray]:
    """Embedding store rows of one split -> {"x": (N, D) float32}; rows with NaN or infinite values are
    left out (and reported to ``skipped``)."""
    ids = table.column(ID_COLUMN).to_pylist()
    keep = _keep(ids, split, val_fraction)
    x = np.asarray(list_column_values(table.column(EMBEDDING_COLUMN))[keep], dtype=np.float32)
    ok = _usable(ids, keep, np.isfinite(x).all(axis=1), split, "embedding has NaN or infinite values", skipped)
    return {"x": np.ascontiguousarray(x[ok])}


def prior_batch(table: pa.Table, split: str, val_fraction: float, num_classes: int, vocab_size: int | None = None,
                skipped: Any = None) -> dict[str, np.ndarray]:
    """Code store rows -> {"codes": (N, T) int64, "label": (N,) int64}; labels < 0 become the null class.
    Rows with a code outside ``[0, vocab_size)`` are left out (and reported to ``skipped``)."""
    ids = table.column(ID_COLUMN).to_pylist()
    keep = _keep(ids, split, val_fraction)
    codes = list_column_values(table.column(CODES_COLUMN))[keep].astype(np.int64)
    if LABEL_COLUMN in table.column_names:
        labels = np.asarray(table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False), dtype=np.int64)[keep]
    else:
        labels = np.full(len(codes), -1, np.int64)
    if vocab_size is not None:
        ok = _usable(ids, keep, ((codes >= 0) & (codes < vocab_size)).all(axis=1), split,
                     f"codes outside the prior's vocabulary [0, {vocab_size})", skipped)
        codes, labels = codes[ok], labels[ok]
    return {"codes": codes, "label": np.where(labels < 0, num_classes, labels)}


def _pixels(batch: dict[str, np.ndarray], split: str, val_fraction: float, plan: ImagePlan, skipped: Any = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (N, C, S, S), the rows they come from): the split's rows whose image can be used
    (a CutoutError leaves the row out, reported to ``skipped`` with its reason), with `galray embed`'s
    preprocessing."""
    ids = list(batch[ID_COLUMN])
    keep = np.flatnonzero(_keep(ids, split, val_fraction))
    images = batch[plan.column]
    out, rows = [], []
    left_out: dict[str, list[Any]] = {}
    for i in keep:
        try:
            out.append(prepare_image(images[i], plan))
            rows.append(i)
        except CutoutError as err:
            left_out.setdefault(str(err), []).append(ids[i])
    for reason, bad in left_out.items():
        report_skipped(skipped, split, bad, reason)
    shape = (0, plan.in_chans, plan.size, plan.size)
    return (np.stack(out) if out else np.zeros(shape, plan.pixel_dtype)), np.asarray(rows, dtype=np.int64)


def vqvae_batch(batch: dict[str, np.ndarray], split: str, val_fraction: float, plan: ImagePlan, skipped: Any = None
                ) -> dict[str, np.ndarray]:
    """Cutout rows -> {"pixels": (N, C, S, S)}: `galray embed`'s preprocessing at the VQ-VAE's size.
    Rows whose image cannot be used (CutoutError) are left out (and reported to ``skipped``)."""
    return {"pixels": _pixels(batch, split, val_fraction, plan, skipped)[0]}


def encoder_batch(batch: dict[str, np.ndarray], split: str, val_fraction: float, plan: ImagePlan,
                  label_column: str | None = None, vote_columns: Sequence[str] = (), skipped: Any = None
                  ) -> dict[str, np.ndarray]:
    """Cutout rows -> {"pixels"}, plus {"label": (N,) int64} (missing labels: -1) or
    {"votes": (N, A) float32} (missing counts: 0) for fine-tuning."""
    pixels, rows = _pixels(batch, split, val_fraction, plan, skipped)
    out = {"pixels": pixels}
    if label_column:
        label = np.asarray(batch[label_column], dtype=np.float64)[rows]
        out["label"] = np.where(np.isfinite(label), label, -1).astype(np.int64)
    if vote_columns:
        votes = np.stack([np.asarray(batch[c], dtype=np.float64)[rows] for c in vote_columns], 1) if len(rows) else \
            np.zeros((0, len(vote_columns)))
        out["votes"] = np.where(np.isfinite(votes), np.maximum(votes, 0), 0).astype(np.float32)
    return out
