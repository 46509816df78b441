"""Do features line up with known morphology? Spearman alignment of SAE features and PCA components
with labels, against a label-shuffle null, and the features no linear model of the labels explains.

The central claim of Wu & Walmsley 2025 (arXiv:2510.23749, section 4) is that sparse autoencoder
features align with human morphology labels better than the same number of principal components
of the same embeddings. This module measures that, from arrays:

- :func:`label_frame`: the label columns of a catalog as floats (NaN where a label does not
  apply): numeric columns (Galaxy Zoo vote fractions, simulated ground truth, ...) and the class
  column one-hot (``class:spiral``, ...).
- :class:`RankCorrelator`: signed Spearman rho of every feature with every label, each label over
  the rows where it is defined, and the same under label shuffles (the null: a shuffle keeps every
  label's distribution and the features' joint structure, and breaks only their pairing).
- :func:`alignment_frame`, :func:`recovery_frame`: per feature its best label; per label the best
  feature of each method.
- :func:`label_r2`: held-out R^2 (k-fold) of a linear regression of each feature on all labels;
  frequent features with a low R^2 are the "novel" ones, poorly explained by what is catalogued.

Spearman rho is Pearson's r of the ranks (ties get their average rank), so a feature that is zero
for most objects (an SAE latent) ties there and is compared by its active values' order. Pure
numpy, pandas, scipy and scikit-learn: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

CLASS_PREFIX = "class:"
# Catalog columns that locate an object rather than describe it: never labels unless asked for.
NOT_LABELS = frozenset({"object_id", "ra", "dec", "x", "y", "pxscale", "box", "source_file"})


def label_frame(catalog: pd.DataFrame, columns: Sequence[str] | None = None, class_column: str = "label",
                class_name_column: str = "class_name", exclude: Sequence[str] = ()) -> pd.DataFrame:
    """Label columns of ``catalog`` as float64 (NaN where undefined).

    ``columns``: which catalog columns to use (default: every numeric one but ``NOT_LABELS`` and
    ``exclude``). An integer ``class_column`` becomes one-hot columns ``class:<name>`` (names from
    ``class_name_column`` where the catalog has it; negative labels mean "no class" and stay NaN).
    Columns that are constant where defined are dropped: no rank correlation exists for them.
    """
    names = list(columns) if columns is not None else [
        c for c in catalog.columns if c not in NOT_LABELS and c not in exclude and not str(c).startswith("_")
        and pd.api.types.is_numeric_dtype(catalog[c])]
    missing = [c for c in names if c not in catalog.columns]
    if missing:
        raise KeyError(f"label columns not in the catalog: {missing} (it has {list(catalog.columns)})")
    out: dict[str, np.ndarray] = {}
    for c in names:
        if c == class_column and pd.api.types.is_integer_dtype(catalog[c]):
            out.update(one_hot_classes(catalog, class_column, class_name_column))
        else:
            out[c] = pd.to_numeric(catalog[c], errors="coerce").to_numpy(np.float64)
    frame = pd.DataFrame(out, index=catalog.index)
    varying = [c for c in frame.columns if np.nanstd(frame[c].to_numpy()) > 0 and frame[c].notna().sum() > 2]
    return frame[varying]


def one_hot_classes(catalog: pd.DataFrame, class_column: str, class_name_column: str) -> dict[str, np.ndarray]:
    """``{"class:<name>": 0/1 float column}`` for every class present; NaN for rows without a class (< 0)."""
    labels = catalog[class_column].to_numpy()
    names = class_names(catalog, class_column, class_name_column)
    valid = labels >= 0
    return {f"{CLASS_PREFIX}{names.get(int(c), str(int(c)))}": np.where(valid, (labels == c).astype(np.float64), np.nan)
            for c in np.unique(labels[valid])}


def class_names(catalog: pd.DataFrame, class_column: str = "label", class_name_column: str = "class_name"
                ) -> dict[int, str]:
    """``{class index: name}`` from a catalog with both columns (indices as names otherwise)."""
    if class_column not in catalog.columns:
        return {}
    if class_name_column not in catalog.columns:
        return {int(c): str(int(c)) for c in np.unique(catalog[class_column]) if c >= 0}
    pairs = catalog[[class_column, class_name_column]].drop_duplicates()
    return {int(c): str(n) for c, n in zip(pairs[class_column], pairs[class_name_column]) if c >= 0}


def _standardized_ranks(x_NK: np.ndarray) -> np.ndarray:
    """Column ranks (ties averaged), centred and scaled to unit norm / sqrt(N): then Z1.T @ Z2 / N is rho.
    A constant column becomes zeros (rho 0: it cannot order anything)."""
    r = rankdata(x_NK, axis=0).astype(np.float64) if x_NK.size else np.zeros(x_NK.shape)
    r -= r.mean(0)
    sd = r.std(0)
    return np.divide(r, sd, out=np.zeros_like(r), where=sd > 0)


class RankCorrelator:
    """Spearman rho between the columns of ``features_NF`` and of ``labels_NL``, each label over the rows
    where it is finite, and under random label permutations.

    Labels that share a set of defined rows share one ranking of the features, so the work is one
    (N, F) ranking per distinct set (a handful for a simulated catalog), and each shuffle is one
    matrix product.
    """

    def __init__(self, features_NF: np.ndarray, labels_NL: np.ndarray):
        features_NF = np.asarray(features_NF, np.float64)
        labels_NL = np.asarray(labels_NL, np.float64)
        if features_NF.shape[0] != labels_NL.shape[0]:
            raise ValueError(f"{features_NF.shape[0]} feature rows for {labels_NL.shape[0]} label rows")
        self.n_features, self.n_labels = features_NF.shape[1], labels_NL.shape[1]
        finite = np.isfinite(labels_NL)
        self.groups: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        seen: dict[bytes, list[int]] = {}
        for j in range(self.n_labels):
            seen.setdefault(np.packbits(finite[:, j]).tobytes(), []).append(j)
        for cols in seen.values():
            rows = np.flatnonzero(finite[:, cols[0]])
            zf = _standardized_ranks(features_NF[rows])
            zl = _standardized_ranks(labels_NL[np.ix_(rows, cols)])
            self.groups.append((np.asarray(cols), rows, zf, zl))

    def rho(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """(F, L) signed Spearman rho; with ``rng``, of the labels permuted among their defined rows."""
        out = np.zeros((self.n_features, self.n_labels))
        for cols, rows, zf, zl in self.groups:
            if len(rows) < 3:
                continue
            z = zl[rng.permutation(len(rows))] if rng is not None else zl
            out[:, cols] = zf.T @ z / len(rows)
        return out

    def nulls(self, n_shuffles: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """What chance gives, from ``n_shuffles`` label shuffles (every label permuted independently within its
        defined rows): (S, F) each feature's max |rho| over the labels, and (S, L) each label's max |rho| over
        the features (the chance level of "the best feature for this label")."""
        rng = np.random.default_rng(seed)
        per_feature, per_label = [], []
        for _ in range(n_shuffles):
            r = np.abs(self.rho(rng))
            per_feature.append(r.max(1) if r.shape[1] else np.zeros(r.shape[0]))
            per_label.append(r.max(0) if r.shape[0] else np.zeros(r.shape[1]))
        if not n_shuffles:
            return np.zeros((0, self.n_features)), np.zeros((0, self.n_labels))
        return np.stack(per_feature), np.stack(per_label)


@dataclass(frozen=True)
class Alignment:
    """Alignment of one method's features with the labels."""

    method: str
    """"sae" or "pca"."""
    names: list[str]
    """Feature names (``sae 12``, ``pc 3``)."""
    feature_ids: np.ndarray
    """(F,) latent index or component number of each feature."""
    rho_FL: np.ndarray
    """(F, L) signed Spearman rho."""
    labels: list[str]
    null_max_SF: np.ndarray
    """(S, F) max |rho| over labels of every feature under S label shuffles."""
    null_label_SL: np.ndarray
    """(S, L) max |rho| over features for every label under S label shuffles."""
    frequency_F: np.ndarray
    """(F,) share of objects where the feature is active (1 for PCA components)."""

    @property
    def max_abs_rho(self) -> np.ndarray:
        return np.abs(self.rho_FL).max(1) if self.rho_FL.size else np.zeros(len(self.names))

    def null_quantile(self, q: float = 0.99) -> float:
        """The ``q`` quantile of a feature's best |rho| by chance, pooled over features and shuffles (0 when no
        shuffle ran): a feature above it is aligned with some label."""
        return float(np.quantile(self.null_max_SF, q)) if self.null_max_SF.size else 0.0

    def label_null_quantile(self, q: float = 0.99) -> np.ndarray:
        """(L,) the ``q`` quantile over shuffles of each label's best |rho| among all the features: the bar a
        label's best feature must clear (it grows with the number of features searched)."""
        if not self.null_label_SL.size:
            return np.zeros(len(self.labels))
        return np.quantile(self.null_label_SL, q, axis=0)


def align(method: str, features_NF: np.ndarray, labels: pd.DataFrame, feature_ids: Sequence[int],
          n_shuffles: int = 20, seed: int = 0) -> Alignment:
    """Spearman alignment of ``features_NF`` with every column of ``labels``, and its shuffle null."""
    features_NF = np.asarray(features_NF, np.float64)
    corr = RankCorrelator(features_NF, labels.to_numpy(np.float64))
    prefix = "sae" if method == "sae" else "pc"
    active = (features_NF != 0).mean(0) if method == "sae" else np.ones(features_NF.shape[1])
    null_f, null_l = corr.nulls(n_shuffles, seed)
    return Alignment(method=method, names=[f"{prefix} {int(i)}" for i in feature_ids],
                     feature_ids=np.asarray(feature_ids, np.int64), rho_FL=corr.rho(), labels=list(labels.columns),
                     null_max_SF=null_f, null_label_SL=null_l, frequency_F=active)


def alignment_frame(a: Alignment, q: float = 0.99) -> pd.DataFrame:
    """One row per feature: frequency, max |rho|, the label it belongs to, signed rho, and whether it beats
    the ``q`` quantile of the shuffle null; most aligned first."""
    best = np.abs(a.rho_FL).argmax(1) if a.rho_FL.size else np.zeros(len(a.names), int)
    null = a.null_quantile(q)
    frame = pd.DataFrame({
        "method": a.method, "feature": a.feature_ids, "name": a.names, "frequency": a.frequency_F,
        "max_abs_rho": a.max_abs_rho, "best_label": [a.labels[j] if a.labels else "" for j in best],
        "rho": a.rho_FL[np.arange(len(best)), best] if a.rho_FL.size else np.zeros(len(best)),
        "null_q": null})
    frame["above_null"] = frame["max_abs_rho"] > null
    return frame.sort_values("max_abs_rho", ascending=False, kind="stable").reset_index(drop=True)


def recovery_frame(alignments: Sequence[Alignment], q: float = 0.99) -> pd.DataFrame:
    """One row per label: for each method its best feature, that feature's |rho| and signed rho, and the
    ``q`` quantile of the best |rho| that method reaches for the label by chance (:meth:`Alignment.label_null_quantile`)."""
    labels = alignments[0].labels
    rows: dict[str, list] = {"label": list(labels)}
    for a in alignments:
        if list(a.labels) != list(labels):
            raise ValueError("alignments were computed against different labels")
        absr = np.abs(a.rho_FL)
        best = absr.argmax(0) if absr.size else np.zeros(len(labels), int)
        rows[f"{a.method}_feature"] = [int(a.feature_ids[i]) for i in best]
        rows[f"{a.method}_abs_rho"] = [float(absr[i, j]) for j, i in enumerate(best)]
        rows[f"{a.method}_rho"] = [float(a.rho_FL[i, j]) for j, i in enumerate(best)]
        rows[f"{a.method}_null_q"] = [float(v) for v in a.label_null_quantile(q)]
    return pd.DataFrame(rows)


def label_r2(features_NF: np.ndarray, labels: pd.DataFrame, folds: int = 5, seed: int = 0,
             ridge: float = 1e-3) -> np.ndarray:
    """(F,) held-out R^2 of a linear regression of each feature on all labels (``folds``-fold, shuffled).

    Labels are z-scored; a label's undefined rows (NaN) get 0 plus a 0/1 "undefined" indicator column,
    so "has no bar" can explain a feature too. Near-zero ridge keeps collinear one-hot classes solvable.
    """
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict

    x = labels.to_numpy(np.float64)
    undefined = ~np.isfinite(x)
    mu, sd = np.nanmean(x, 0), np.nanstd(x, 0)
    z = np.where(undefined, 0.0, (x - mu) / np.where(sd > 0, sd, 1.0))
    design = np.hstack([z, undefined[:, undefined.any(0)].astype(np.float64)])
    y = np.asarray(features_NF, np.float64)
    pred = cross_val_predict(Ridge(alpha=ridge), design, y, cv=KFold(folds, shuffle=True, random_state=seed))
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - np.divide(ss_res, ss_tot, out=np.ones_like(ss_res), where=ss_tot > 0)


def novel_frame(a: Alignment, r2_F: np.ndarray, min_frequency: float = 0.01, max_r2: float = 0.3,
                q: float = 0.99) -> pd.DataFrame:
    """Frequent features (active for at least ``min_frequency`` of objects) that the labels explain poorly
    (held-out R^2 below ``max_r2``), least explained first."""
    frame = alignment_frame(a, q).set_index("feature")
    frame["r2_labels"] = pd.Series(np.asarray(r2_F), index=a.feature_ids)
    novel = frame[(frame["frequency"] >= min_frequency) & (frame["r2_labels"] < max_r2)]
    return novel.sort_values(["r2_labels", "frequency"], ascending=[True, False]).reset_index()


def pca_scores(train_ND: np.ndarray, all_ND: np.ndarray, n_components: int, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(scores (N, K), explained variance ratio (K,))``: PCA fitted on ``train_ND`` (the training split),
    applied to ``all_ND``. K is at most the rank the training rows allow."""
    from sklearn.decomposition import PCA

    k = int(min(n_components, train_ND.shape[0], train_ND.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(np.asarray(train_ND, np.float64))
    return pca.transform(np.asarray(all_ND, np.float64)), pca.explained_variance_ratio_
