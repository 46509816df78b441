"""Feature families: which features of a wide SAE refine a feature of a narrow one.

O'Neill et al. 2024 (*Disentangling dense embeddings with sparse autoencoders*, arXiv:2408.00657,
on embeddings of astronomy papers) found that features of SAEs of different widths form families:
a broad parent feature of the narrow SAE, and children in the wide SAE that split it into finer
ones. They match features across widths by the cosine of their decoder directions, and group
them by co-occurrence: a child's parent fires whenever the child fires.

:func:`match_families` does both for a narrow dictionary (parents) and a wide one (children):

- ``cosine``: cosine of the decoder directions (the same embedding space, so directly comparable);
- ``cooccurrence``: P(parent active | child active) on a sample of objects.

A child joins the family of its best parent when either measure passes its threshold. With a
Matryoshka SAE (Bussmann et al. 2025) the narrow SAE is its own first group: those latents are
trained to reconstruct alone, exactly as a narrow SAE would, and the later groups are the wide
SAE's extra latents. Pure numpy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def unit_rows(w_KD: np.ndarray) -> np.ndarray:
    w = np.asarray(w_KD, np.float64)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)


def cooccurrence(parents_active_NP: np.ndarray, children_active_NC: np.ndarray) -> np.ndarray:
    """(P, C): P(parent p active | child c active) over the N objects (0 for a child that never fires)."""
    a = np.asarray(parents_active_NP, np.float64)
    b = np.asarray(children_active_NC, np.float64)
    both = a.T @ b
    fired = b.sum(0)
    return np.divide(both, fired[None, :], out=np.zeros_like(both), where=fired[None, :] > 0)


def match_families(dec_parents_PD: np.ndarray, dec_children_CD: np.ndarray, parents_active_NP: np.ndarray,
                   children_active_NC: np.ndarray, parent_ids: np.ndarray | None = None,
                   child_ids: np.ndarray | None = None, min_cosine: float = 0.5, min_cooccurrence: float = 0.8,
                   min_child_frequency: float = 0.002) -> pd.DataFrame:
    """One row per (parent, child) link: each child that fires on at least ``min_child_frequency`` of the
    objects goes to the parent with the highest cosine (or, when no cosine passes, the highest
    co-occurrence), if ``cosine >= min_cosine`` or ``cooccurrence >= min_cooccurrence``.

    Columns: parent, child, cosine, cooccurrence, child_frequency, parent_frequency, and ``by``
    (which test linked them: "cosine", "cooccurrence" or "both"). Sorted by family size, then cosine.
    """
    parent_ids = np.arange(len(dec_parents_PD)) if parent_ids is None else np.asarray(parent_ids)
    child_ids = np.arange(len(dec_children_CD)) if child_ids is None else np.asarray(child_ids)
    cos = unit_rows(dec_parents_PD) @ unit_rows(dec_children_CD).T  # (P, C)
    co = cooccurrence(parents_active_NP, children_active_NC)
    freq_c = np.asarray(children_active_NC, bool).mean(0)
    freq_p = np.asarray(parents_active_NP, bool).mean(0)
    rows = []
    for c in np.flatnonzero(freq_c >= min_child_frequency):
        p = int(cos[:, c].argmax())
        if cos[p, c] < min_cosine:
            p = int(co[:, c].argmax())
        ok_cos, ok_co = cos[p, c] >= min_cosine, co[p, c] >= min_cooccurrence
        if ok_cos or ok_co:
            rows.append({"parent": int(parent_ids[p]), "child": int(child_ids[c]), "cosine": float(cos[p, c]),
                         "cooccurrence": float(co[p, c]), "child_frequency": float(freq_c[c]),
                         "parent_frequency": float(freq_p[p]),
                         "by": "both" if ok_cos and ok_co else ("cosine" if ok_cos else "cooccurrence")})
    frame = pd.DataFrame(rows, columns=["parent", "child", "cosine", "cooccurrence", "child_frequency",
                                        "parent_frequency", "by"])
    if frame.empty:
        return frame
    frame["family_size"] = frame.groupby("parent")["child"].transform("size")
    return frame.sort_values(["family_size", "parent", "cosine"], ascending=[False, True, False],
                             kind="stable").reset_index(drop=True)
