"""Linear probes of frozen embeddings: how much of a label a linear read-out recovers, out of fold.

Every feature set is scored the same way (scikit-learn, fixed seeds, no figure tuned on its own test fold):

- a binary label: standardise, then logistic regression with C chosen by an inner 3-fold CV on the
  training folds; the score is the ROC AUC of the out-of-fold probabilities of a stratified k-fold CV;
- a continuous label: standardise, then ridge regression with alpha chosen by efficient
  leave-one-out on the training folds (RidgeCV); the score is the out-of-fold R^2 of a k-fold CV.

Arrays in, floats out (ARCHITECTURE.md: analysis/ imports no Ray or MLflow).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import r2_score, roc_auc_score
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

CS = (1e-3, 1e-2, 1e-1, 1.0)
"""Inverse regularisation strengths the inner CV chooses from."""
ALPHAS = tuple(np.logspace(-2, 4, 13))
"""Ridge strengths RidgeCV chooses from."""


def probe_auc(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, cs: tuple[float, ...] = CS) -> float:
    """Out-of-fold ROC AUC of a linear (logistic) read-out of ``y`` (two classes) from ``X`` (N, D)."""
    y = np.asarray(y)
    classes = np.unique(y)
    if len(classes) != 2:
        raise ValueError(f"probe_auc needs two classes, got {len(classes)}")
    folds = int(min(folds, np.bincount(np.searchsorted(classes, y)).min()))
    if folds < 2:
        raise ValueError("probe_auc needs at least 2 members of each class")
    X = np.asarray(X, np.float64)
    oof = np.zeros(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, tol=1e-3))
        search = GridSearchCV(pipe, {"logisticregression__C": list(cs)}, cv=3, scoring="roc_auc")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            search.fit(X[train], y[train])
        oof[test] = search.predict_proba(X[test])[:, 1]
    return float(roc_auc_score(y == classes[1], oof))


def probe_r2(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Out-of-fold R^2 of a linear (ridge) read-out of the continuous ``y`` from ``X`` (N, D)."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    oof = np.zeros(len(y))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(X[train], y[train])
        oof[test] = model.predict(X[test])
    return float(r2_score(y, oof))
