"""The science of `galray analyze` on arrays with known answers: Spearman alignment and its shuffle null,
ground-truth recovery, held-out R^2 of the labels, feature families (pure numpy, no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from galray.analysis import alignment as al
from galray.analysis.families import match_families


def _catalog(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 3, n)
    bar = np.where(label == 2, rng.uniform(0.1, 0.6, n), 0.0)
    pitch = np.where(label >= 1, rng.uniform(10, 30, n), np.nan)  # defined for disks only
    return pd.DataFrame({"object_id": [f"o{i}" for i in range(n)], "ra": rng.uniform(0, 360, n),
                         "axis_ratio": rng.uniform(0.1, 1.0, n), "size": rng.lognormal(0, 0.5, n),
                         "pitch": pitch, "bar": bar, "constant": np.ones(n), "label": label,
                         "class_name": np.array(["round", "spiral", "barred"])[label]})


def test_label_frame_keeps_labels_one_hot_classes_and_drops_ids_and_constants():
    cat = _catalog()
    labels = al.label_frame(cat)
    assert list(labels.columns) == ["axis_ratio", "size", "pitch", "bar", "class:round", "class:spiral",
                                    "class:barred"]
    assert np.array_equal(labels["class:spiral"].to_numpy(), (cat["label"] == 1).astype(float).to_numpy())
    assert labels["pitch"].isna().sum() == (cat["label"] == 0).sum()  # undefined stays undefined
    assert al.class_names(cat) == {0: "round", 1: "spiral", 2: "barred"}
    with pytest.raises(KeyError, match="nope"):
        al.label_frame(cat, columns=["axis_ratio", "nope"])


def test_planted_feature_equal_to_a_label_gives_rho_one_and_a_shuffled_label_gives_rho_zero():
    cat = _catalog()
    labels = al.label_frame(cat)
    rng = np.random.default_rng(1)
    n = len(cat)
    planted = cat["axis_ratio"].to_numpy()
    features = np.stack([
        planted,                                   # 0: the label itself
        np.exp(3 * planted),                       # 1: a monotone function of it (Spearman sees ranks)
        rng.permutation(planted),                  # 2: the label, shuffled
        np.where(cat["pitch"].notna(), cat["pitch"], 0.0),  # 3: the partial label where defined
        np.where(rng.random(n) < 0.9, 0.0, rng.random(n)),  # 4: sparse noise (an SAE latent firing at random)
    ], 1)
    a = al.align("sae", features, labels, np.arange(5), n_shuffles=30, seed=0)
    ax = labels.columns.get_loc("axis_ratio")
    assert a.rho_FL[0, ax] == pytest.approx(1.0, abs=1e-9)
    assert a.rho_FL[1, ax] == pytest.approx(1.0, abs=1e-9)
    assert abs(a.rho_FL[2, ax]) < 0.08  # N = 2000: the standard error is 1/sqrt(N-1) = 0.022
    assert a.rho_FL[3, labels.columns.get_loc("pitch")] == pytest.approx(1.0, abs=1e-9)  # over defined rows only
    # The same numbers as scipy's spearmanr, ties and all
    assert a.rho_FL[4, ax] == pytest.approx(spearmanr(features[:, 4], planted).statistic, abs=1e-9)
    # Under label shuffles even the planted feature aligns with nothing
    assert a.null_max_SF.shape == (30, 5)
    assert a.null_max_SF[:, 0].max() < 0.12
    assert a.null_quantile(0.99) < 0.12
    frame = al.alignment_frame(a)
    assert set(frame.loc[frame["above_null"], "feature"]) == {0, 1, 3}
    assert frame.set_index("feature").loc[0, "best_label"] == "axis_ratio"


def test_recovery_names_the_best_feature_of_each_method_with_a_per_label_null():
    cat = _catalog(1500)
    labels = al.label_frame(cat, columns=["axis_ratio", "size", "bar"])
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((len(cat), 6))
    sae = noise.copy()
    sae[:, 4] = cat["size"].to_numpy() + 0.1 * noise[:, 0]
    pca = noise[:, :3].copy()
    pca[:, 1] = -cat["axis_ratio"].to_numpy()
    rec = al.recovery_frame([al.align("sae", sae, labels, np.arange(10, 16), 10),
                             al.align("pca", pca, labels, np.arange(3), 10, seed=1)]).set_index("label")
    assert rec.loc["size", "sae_feature"] == 14 and rec.loc["size", "sae_abs_rho"] > 0.95
    assert rec.loc["axis_ratio", "pca_feature"] == 1 and rec.loc["axis_ratio", "pca_rho"] == pytest.approx(-1.0)
    # The chance level of "the best of 6 features" is above that of "the best of 3"
    assert (rec["sae_null_q"] > 0).all() and rec["sae_null_q"].mean() > rec["pca_null_q"].mean()
    assert (rec["sae_null_q"] < 0.15).all()


def test_held_out_r2_of_the_labels_separates_explained_from_novel_features():
    cat = _catalog(1200)
    labels = al.label_frame(cat)
    rng = np.random.default_rng(3)
    explained = 2.0 * cat["axis_ratio"].to_numpy() - cat["size"].to_numpy() + 0.5 * (cat["label"] == 2)
    novel = rng.standard_normal(len(cat))
    r2 = al.label_r2(np.stack([explained, novel], 1), labels)
    assert r2[0] > 0.95
    assert r2[1] < 0.05
    a = al.align("sae", np.stack([explained, np.abs(novel)], 1), labels, np.array([7, 8]), n_shuffles=5)
    frame = al.novel_frame(a, r2, min_frequency=0.5, max_r2=0.3)
    assert list(frame["feature"]) == [8]


def test_pca_is_fitted_on_the_training_rows_only():
    rng = np.random.default_rng(4)
    train = rng.standard_normal((500, 4)) * np.array([5.0, 1.0, 0.5, 0.1])
    other = rng.standard_normal((50, 4)) * np.array([0.1, 0.1, 0.1, 50.0])  # would dominate a PCA of all rows
    scores, ratio = al.pca_scores(train, np.vstack([train, other]), 2)
    assert scores.shape == (550, 2) and ratio[0] > 0.9
    assert abs(np.corrcoef(scores[:500, 0], train[:, 0])[0, 1]) > 0.99


def test_families_link_children_to_their_parent_by_cosine_and_by_cooccurrence():
    rng = np.random.default_rng(5)
    d, n = 16, 4000
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    parents = basis[:3]
    # child 0, 1: split parent 0 (small rotations of it); child 2: fires only with parent 2, other direction;
    # child 3: unrelated direction and firing
    children = np.stack([parents[0] + 0.3 * basis[5], parents[0] - 0.3 * basis[6], basis[7], basis[8]])
    p_active = rng.random((n, 3)) < 0.2
    c_active = np.stack([p_active[:, 0] & (rng.random(n) < 0.5), p_active[:, 0] & (rng.random(n) < 0.5),
                         p_active[:, 2] & (rng.random(n) < 0.3), rng.random(n) < 0.1], 1)
    fam = match_families(parents, children, p_active, c_active, parent_ids=np.array([10, 11, 12]),
                         child_ids=np.array([20, 21, 22, 23]), min_cosine=0.8, min_cooccurrence=0.9)
    links = {(r.parent, r.child): r.by for r in fam.itertuples()}
    assert links == {(10, 20): "both", (10, 21): "both", (12, 22): "cooccurrence"}
    assert fam.iloc[0]["family_size"] == 2
