"""`galray analyze`: what the sparse features found, against PCA and the catalog, into an analysis folder.

From a feature store (`galray features`) and what it names in its provenance (the embedding store,
the SAE checkpoint, the cutout store), on a sample of up to ``max_rows`` objects:

1. **SAE vs PCA alignment** (:mod:`galray.analysis.alignment`): PCA with as many components as the
   SAE's k, fitted on the training split (``crc32(object_id)``, :mod:`galray.data.split`); the SAE's
   sparse threshold-inference activations as stored; for every feature and component the signed
   Spearman rho with every label column (simulated ground truth, vote fractions, one-hot classes),
   and the same under ``n_shuffles`` label shuffles. Summaries: best feature per label for each
   method (the ground-truth recovery figure), distributions of max |rho| (SAE features by
   frequency vs PCA components vs the null), the most aligned features, and "novel" features
   (frequent, but a linear regression on every label explains little of them on held-out folds).
2. **Galleries** (:mod:`galray.analysis.galleries`): the top-activating cutouts of the chosen
   features over the *whole* feature store (one streaming pass), and over ``gallery_inputs`` (more
   feature stores of the same SAE, e.g. real galaxies without ground truth, ranked with the
   analysed store's objects and marked with their store's name), PCA components at both extremes
   (in the sample), as thumbnails.
3. **Feature families** (:mod:`galray.analysis.families`): children of the wide SAE matched to
   parents of a narrow one (the Matryoshka SAE's first group, or ``narrow_sae``).
4. **Codebook** (``vqvae`` + ``codes``; :mod:`galray.analysis.codebook`) and **generations**
   (``prior`` + ``vqvae``; :mod:`galray.analysis.generations`), when given. ``vqvae`` defaults to
   the VQ-VAE whose encoder made the embeddings.

The folder (local or ``s3://``): ``analysis.json`` (headline figures, settings, provenance),
``figures/*.png``, ``recovery.parquet``, ``alignment.parquet``, ``novel.parquet``,
``families.parquet`` and ``galleries.parquet`` (thumbnails). `galray report` turns it into one HTML
page. The run is recorded in MLflow (settings, headline metrics, the folder as artifacts under
``analysis/``), so `galray report --run RUN_ID` finds it again.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from galray import __version__
from galray.config import ConfigError, check, to_dict
from galray.models.backbone_config import VQVAE_PREFIX
from galray.data.arrow_safety import read_schema, read_table
from galray.data.checkpoints import read_checkpoint
from galray.data.shards import ID_COLUMN
from galray.data.split import is_val
from galray.analysis.report import ANALYSIS_ARTIFACTS
from galray.data.stores import (EMBEDDING_COLUMN, FEATURE_INDICES_COLUMN, FEATURE_VALUES_COLUMN, list_column_values,
                                read_features, sparse_rows, top_activating)
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, arrow_filesystem, is_s3
from galray.tracking import Tracker, TrackingConfig

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from galray.analysis.alignment import Alignment

STAGE = "analyze"


@dataclass(frozen=True)
class AnalyzeJob:
    """`galray analyze`: which feature store, what to compare, where the analysis folder goes."""

    input: str = ""
    """Feature store URI (`galray features`)."""
    output: str = ""
    """Analysis folder (local or s3://); `galray report --run` reads it."""
    embeddings: str | None = None
    """Embedding store for PCA; default: the one the feature store was made from."""
    cutouts: str | None = None
    """Cutout store for the galleries; default: the feature store's catalog store."""
    gallery_inputs: dict[str, str] = field(default_factory=dict)
    """More feature stores of the same SAE, by the name their thumbnails carry (``{XDF: FEATURE_STORE}``),
    whose objects compete with ``input``'s for the SAE galleries, e.g. real galaxies without ground truth.
    Only ``input``'s rows are aligned and go into PCA; each store's cutouts come from its catalog store."""
    labels: tuple[str, ...] | None = None
    """Catalog columns to align with; default: every numeric column (ids and positions excepted)."""
    exclude_labels: tuple[str, ...] = ()
    """Catalog columns never used as labels."""
    class_column: str = "label"
    """Integer class column, one-hot encoded into class:<name> labels."""
    class_name_column: str = "class_name"
    """Names of the classes, where the catalog has them."""
    max_rows: int = 20_000
    """Objects analysed (the first ones of the store, in file order); galleries use the whole store."""
    val_fraction: float = 0.05
    """Held-out share by crc32(object_id), as `galray train`: PCA is fitted on the rest."""
    n_shuffles: int = 20
    """Label shuffles of the null."""
    null_quantile: float = 0.99
    """Quantile of the shuffle null a feature must beat to count as aligned."""
    compare_features: int = 0
    """SAE features (most frequent first) in the max |rho| distribution; 0: as many as PCA components."""
    gallery_features: int = 12
    """SAE features with a gallery: the best one per label first, then the most aligned."""
    gallery_size: int = 16
    """Cutouts per gallery."""
    pca_gallery: int = 4
    """PCA components shown at both extremes."""
    neighbour_queries: int = 4
    """Galaxies shown with their nearest neighbours in the sample (cosine similarity of the embeddings,
    as `galray neighbours`), chosen by crc32 of their object_id (a fixed, arbitrary pick)."""
    neighbours: int = 8
    """Neighbours shown for each of them."""
    probe_rows: int = 500
    """Objects (the first of the sample) in the linear-probe table: how much of each label a linear
    read-out of the embeddings recovers, 5-fold (0: no table; about 0.5-1 s a label at 500 rows of
    736-d embeddings on one core)."""
    thumb_px: int = 64
    """Side of a gallery thumbnail in pixels."""
    min_frequency: float = 0.01
    """A feature must fire on this share of objects to count as frequent (novel features, distributions)."""
    novel_max_r2: float = 0.3
    """A frequent feature is novel when the labels explain less than this R^2 of it on held-out folds."""
    novel_shown: int = 6
    """Novel features with a gallery."""
    narrow_sae: str | None = None
    """Narrow SAE checkpoint for feature families; default: the Matryoshka SAE's first group."""
    family_min_cosine: float = 0.5
    """Decoder cosine that links a child to a parent."""
    family_min_cooccurrence: float = 0.8
    """P(parent active | child active) that links a child to a parent."""
    families_shown: int = 4
    """Families with galleries."""
    vqvae: str | None = None
    """VQ-VAE checkpoint for the codebook and generations; default: the embeddings' encoder when it is one."""
    codes: str | None = None
    """Code store (`galray encode`) for codebook usage, heat maps and t-SNE."""
    prior: str | None = None
    """Prior checkpoint for the generation grids (needs vqvae)."""
    codebook_codes: int = 16
    """Most and least used codes decoded."""
    tsne_points: int = 2000
    """Images in the t-SNE."""
    generation_per_class: int = 6
    """Generated images per class and setting."""
    seed: int = 0
    """Seed of the shuffles, folds, t-SNE and sampling."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for every URI."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow run of the analysis: settings, headline metrics, the folder as artifacts."""

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "a feature store URI is required (`galray features` makes one)")
        check(bool(self.output), "output", "an output folder is required")
        check(self.max_rows >= 10, "max_rows", "must be at least 10")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.n_shuffles >= 0, "n_shuffles", "must be >= 0")
        check(0.5 <= self.null_quantile < 1.0, "null_quantile", "must be in [0.5, 1)")
        check(self.compare_features >= 0, "compare_features", "must be >= 0")
        for name in ("gallery_features", "gallery_size", "pca_gallery", "novel_shown", "families_shown",
                     "codebook_codes", "generation_per_class", "neighbour_queries", "neighbours", "probe_rows"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.thumb_px >= 16, "thumb_px", "must be at least 16")
        check(0.0 <= self.min_frequency < 1.0, "min_frequency", "must be in [0, 1)")
        check(self.tsne_points >= 10, "tsne_points", "must be at least 10")
        for name, uri in self.gallery_inputs.items():
            check(bool(name) and bool(uri), f"gallery_inputs.{name}", "needs a name and a feature store URI")
            check(uri.rstrip("/") != self.input.rstrip("/"), f"gallery_inputs.{name}", "must differ from input")


@dataclass(frozen=True)
class AnalyzeSummary(FieldsSummary):
    """What `galray analyze` prints."""

    output: str
    rows: int
    recovery: dict[str, dict[str, float]]
    """{label: {"sae": best |rho|, "pca": best |rho|, "null": the SAE's null quantile}}."""
    sections: list[str]
    mlflow_run_id: str | None
    seconds: float

    def format(self) -> str:
        lines = [f"analyze: {self.rows:,} objects, {self.seconds:.1f} s -> {self.output}",
                 f"{'label':<28} {'SAE |rho|':>9} {'PCA |rho|':>9} {'null':>6}"]
        lines += [f"{k:<28} {v['sae']:>9.3f} {v['pca']:>9.3f} {v['null']:>6.3f}" for k, v in self.recovery.items()]
        lines.append("sections: " + ", ".join(self.sections)
                     + (f"; MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else ""))
        lines.append(f"make the report: galray report --run {self.output}")
        return "\n".join(lines)


# --- reading the sample ----------------------------------------------------------------------------

@dataclass
class Sample:
    """The analysed objects: ids, sparse codes (dense over the live latents), catalog, embeddings."""

    ids: np.ndarray
    files: np.ndarray
    """(N,) the feature file of each object."""
    codes_NF: np.ndarray
    """(N, F_live) activations of the latents that fire at least once in the sample."""
    live: np.ndarray
    """(F_live,) latent index of each column of codes_NF."""
    catalog: pd.DataFrame
    embeddings_ND: np.ndarray
    meta: dict[str, Any]


def _live_dense(offsets: np.ndarray, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR rows -> ``(codes (N, F_live), live (F_live,))`` over only the latents that fire in these rows, so a
    sample of a wide SAE costs N x (latents used), not N x width."""
    live = np.unique(indices)
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    out = np.zeros((len(offsets) - 1, len(live)), np.float32)
    out[rows, np.searchsorted(live, indices)] = values
    return out, live


def read_sample(job: AnalyzeJob) -> Sample:
    """The first ``max_rows`` objects of the feature store, with their embeddings (same file names)."""
    table, meta = read_features(job.input, job.storage, job.max_rows)
    if meta.get("producer") != "galray features":
        raise ConfigError("input", f"{job.input} is not a feature store of `galray features`")
    if table.num_rows < 10:
        raise ConfigError("input", f"{job.input} holds {table.num_rows} rows; the analysis needs at least 10")
    ids = np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=object)
    files = np.asarray(table.column("_file").to_pylist(), dtype=object)
    codes, live = _live_dense(*sparse_rows(table))
    catalog = table.drop_columns([ID_COLUMN, FEATURE_INDICES_COLUMN, FEATURE_VALUES_COLUMN, "_file"]).to_pandas()
    emb_uri = job.embeddings or meta.get("embeddings")
    if not emb_uri:
        raise ConfigError("embeddings", "the feature store does not name its embedding store: give --embeddings")
    return Sample(ids=ids, files=files, codes_NF=codes, live=live, catalog=catalog,
                  embeddings_ND=_embeddings_for(emb_uri, ids, files, job.storage), meta=meta)


def _embeddings_for(uri: str, ids: np.ndarray, files: np.ndarray, storage: StorageConfig) -> np.ndarray:
    """(N, D) embeddings of ``ids``, read from the embedding files named like their feature files."""
    fs, root = arrow_filesystem(uri, storage)
    out: np.ndarray | None = None
    for name in pd.unique(files):
        sel = np.flatnonzero(files == name)
        table = read_table(fs, f"{root}/{str(name).rsplit('/', 1)[-1]}", columns=[ID_COLUMN, EMBEDDING_COLUMN])
        emb = list_column_values(table.column(EMBEDDING_COLUMN)).astype(np.float32, copy=False)
        pos = pd.Index(table.column(ID_COLUMN).to_pylist()).get_indexer(list(ids[sel]))
        if (pos < 0).any():
            raise ConfigError("embeddings", f"{uri} lacks {int((pos < 0).sum())} objects of the feature store "
                                            f"(file {name}): is it the store the features were made from?")
        if out is None:
            out = np.zeros((len(ids), emb.shape[1]), np.float32)
        out[sel] = emb[pos]
    assert out is not None
    return out


# --- steps -----------------------------------------------------------------------------------------

def _png(fig: "Figure") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


@dataclass
class Outputs:
    """What the analysis writes, gathered in memory (figures as PNG bytes), then written in one go."""

    summary: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    gallery_rows: list[dict[str, Any]] = field(default_factory=list)

    def figure(self, name: str, fig: "Figure") -> None:
        self.figures[name] = _png(fig)


def _top_labels(a: "Alignment", n: int = 3) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for i, name in enumerate(a.names):
        order = np.argsort(-np.abs(a.rho_FL[i]))[:n]
        out[name] = [(a.labels[j], round(float(a.rho_FL[i, j]), 3)) for j in order]
    return out


def alignment_step(job: AnalyzeJob, sample: Sample, labels: pd.DataFrame, out: Outputs
                   ) -> tuple["Alignment", "Alignment", np.ndarray, pd.DataFrame]:
    """SAE vs PCA: rho with every label, nulls, recovery per label, distributions, novel features."""
    from galray.analysis import alignment as al
    from galray.analysis import alignment_plots as plots

    k = int(sample.meta["k"])
    train = ~is_val(list(sample.ids), job.val_fraction)
    scores, explained = al.pca_scores(sample.embeddings_ND[train], sample.embeddings_ND, k, job.seed)
    sae = al.align("sae", sample.codes_NF, labels, sample.live, job.n_shuffles, job.seed)
    pca = al.align("pca", scores, labels, np.arange(scores.shape[1]), job.n_shuffles, job.seed + 1)
    recovery = al.recovery_frame([sae, pca], job.null_quantile)
    frame = pd.concat([al.alignment_frame(sae, job.null_quantile), al.alignment_frame(pca, job.null_quantile)])
    out.tables["recovery"] = recovery
    out.tables["alignment"] = frame.sort_values("max_abs_rho", ascending=False, kind="stable").reset_index(drop=True)

    classes = [c for c in recovery["label"] if c.startswith(al.CLASS_PREFIX)]
    params = [c for c in recovery["label"] if not c.startswith(al.CLASS_PREFIX)]
    if params:
        out.figure("recovery", plots.recovery_figure(recovery, params))
    if classes:
        out.figure("recovery_classes", plots.recovery_figure(
            recovery, classes, goal=None, title="Classes: best |Spearman rho| with a one-hot class"))
    n_compare = job.compare_features or scores.shape[1]
    by_freq = np.argsort(-sae.frequency_F, kind="stable")[:n_compare]
    out.figure("distributions", plots.distributions_figure(sae.max_abs_rho[by_freq], pca.max_abs_rho,
                                                           sae.null_max_SF[:, by_freq]))
    frequent = np.flatnonzero(sae.frequency_F >= job.min_frequency)
    r2 = np.full(len(sae.names), np.nan)
    if len(frequent) and len(labels.columns):
        r2[frequent] = al.label_r2(sample.codes_NF[:, frequent], labels, seed=job.seed)
    novel = al.novel_frame(sae, np.nan_to_num(r2, nan=1.0), job.min_frequency, job.novel_max_r2, job.null_quantile)
    out.tables["novel"] = novel[["feature", "name", "frequency", "r2_labels", "max_abs_rho", "best_label", "rho"]]
    out.summary["top_labels"] = {**_top_labels(sae), **_top_labels(pca)}
    out.summary["pca_explained"] = [float(v) for v in explained]
    sae_null, pca_null = sae.null_quantile(job.null_quantile), pca.null_quantile(job.null_quantile)
    out.summary["headline"] = {
        "objects analysed": f"{len(sample.ids):,}",
        "SAE latents live / width": f"{len(sample.live)} / {sample.meta['n_latents']}",
        "mean L0 (k)": f"{float((sample.codes_NF > 0).sum(1).mean()):.1f} ({k})",
        "SAE features above null": f"{100 * float((sae.max_abs_rho[by_freq] > sae_null).mean()):.0f}%",
        "PCA components above null": f"{100 * float((pca.max_abs_rho > pca_null).mean()):.0f}%",
        "median best |rho| per parameter, SAE / PCA": (
            f"{recovery.set_index('label').loc[params, 'sae_abs_rho'].median():.2f} / "
            f"{recovery.set_index('label').loc[params, 'pca_abs_rho'].median():.2f}" if params else "n/a"),
    }
    out.summary["metrics"] = {
        "sae_null_q": sae_null, "pca_null_q": pca_null,
        **{f"rho_sae_{r.label}": r.sae_abs_rho for r in recovery.itertuples()},
        **{f"rho_pca_{r.label}": r.pca_abs_rho for r in recovery.itertuples()},
        "sae_frac_above_null": float((sae.max_abs_rho[by_freq] > sae_null).mean()),
        "pca_frac_above_null": float((pca.max_abs_rho > pca_null).mean()), "novel_features": int(len(novel))}
    return sae, pca, scores, novel


def choose_gallery(job: AnalyzeJob, sae: "Alignment", recovery: pd.DataFrame, novel: pd.DataFrame
                   ) -> list[dict[str, Any]]:
    """The SAE features with galleries: the best feature of each label, then the most aligned, then novel."""
    freq = dict(zip(sae.feature_ids.tolist(), sae.frequency_F.tolist()))
    chosen: dict[int, str] = {}
    for r in recovery.sort_values("sae_abs_rho", ascending=False).itertuples():
        if len(chosen) >= job.gallery_features:
            break
        chosen.setdefault(int(r.sae_feature), f"best for {r.label} (rho {r.sae_rho:+.2f})")
    order = np.argsort(-sae.max_abs_rho, kind="stable")
    for i in order:
        if len(chosen) >= job.gallery_features:
            break
        chosen.setdefault(int(sae.feature_ids[i]), "strongly aligned")
    items = [{"feature": f, "why": why, "frequency": freq.get(f, 0.0)} for f, why in chosen.items()]
    return items


def gallery_sources(job: AnalyzeJob, meta: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """``{source: (feature store, cutout store)}`` of the galleries: ``input`` as source "" and each of
    ``gallery_inputs`` by its name. A store made with another SAE (its latents are other features) fails
    naming its field."""
    sources = {"": (job.input, job.cutouts or meta.get("catalog"))}
    for name, uri in job.gallery_inputs.items():
        other = read_features(uri, job.storage, max_rows=1)[1]
        if other.get("producer") != "galray features" or other.get("weights") != meta.get("weights"):
            raise ConfigError(f"gallery_inputs.{name}", f"{uri} is not a feature store of the SAE of {job.input} "
                                                        f"(weights {meta.get('weights')})")
        sources[name] = (uri, other.get("catalog"))
    return sources


def gallery_step(job: AnalyzeJob, sample: Sample, scores: np.ndarray, explained: list[float],
                 latents: list[int], out: Outputs) -> None:
    """Top-activating cutouts of ``latents`` over the whole of every gallery source (``input`` and
    ``gallery_inputs``, merged by activation), and PCA extremes in the sample, as thumbnails."""
    from galray.analysis.galleries import extremes, gallery_rows
    from galray.data.neighbours import nearest_rows

    sources = gallery_sources(job, sample.meta)
    wanted: dict[str, list[tuple[str, float, str, str]]] = {}  # gallery -> (object_id, value, file, source)
    if latents and job.gallery_size:
        for source, (uri, _) in sources.items():
            for j, found in top_activating(uri, latents, job.gallery_size, job.storage).items():
                wanted.setdefault(f"sae {j}", []).extend((oid, v, path, source) for v, oid, path in found)
        for name, items in wanted.items():  # each source's best, merged: strongest first, ties by id
            wanted[name] = sorted(items, key=lambda i: (-i[1], i[3], i[0]))[: job.gallery_size]
    out.summary["neighbour_galleries"] = []
    for q in neighbour_queries(sample.ids, job.neighbour_queries):
        rows, sims = nearest_rows(sample.embeddings_ND, sample.ids, q, job.neighbours)
        name = f"neighbours {sample.ids[q]}"
        wanted[name] = [(sample.ids[i], float(s), sample.files[i], "") for i, s in zip([q, *rows], [1.0, *sims])]
        out.summary["neighbour_galleries"].append({"query": str(sample.ids[q]), "gallery": name})
    comps = list(range(min(job.pca_gallery, scores.shape[1])))
    for c in comps:
        low, high = extremes(scores[:, c], job.gallery_size)
        wanted[f"pc {c} low"] = [(sample.ids[i], float(scores[i, c]), sample.files[i], "") for i in low]
        wanted[f"pc {c} high"] = [(sample.ids[i], float(scores[i, c]), sample.files[i], "") for i in high]
    pictures: dict[tuple[str, str], np.ndarray] = {}
    for source, (_, cutouts) in sources.items():
        shown = {(oid, f) for items in wanted.values() for oid, _, f, s in items if s == source}
        pictures.update({(source, oid): pic for oid, pic in _pictures(job, cutouts, shown).items()})
    for name, items in wanted.items():
        out.gallery_rows += gallery_rows(name, [(i[3], i[0]) for i in items], [i[1] for i in items], pictures,
                                         job.thumb_px)
    out.summary["pca_gallery"] = [{"component": c, "explained": explained[c]} for c in comps]
    out.summary["gallery_sources"] = {name: uri for name, (uri, _) in sources.items()}


def neighbour_queries(ids: np.ndarray, n: int) -> list[int]:
    """Rows of the ``n`` query galaxies: the smallest crc32 of their object_id (fixed, and spread over the sample)."""
    order = sorted(range(len(ids)), key=lambda i: (zlib.crc32(str(ids[i]).encode()), str(ids[i])))
    return order[:n]


def probe_step(job: AnalyzeJob, sample: Sample, labels: pd.DataFrame, out: Outputs) -> None:
    """The linear-probe table: for every label, out-of-fold ROC AUC (two-valued labels, e.g. one class
    against the rest) or R^2 (the rest) of a linear read-out of the embeddings
    (:mod:`galray.analysis.probes`, as `bench/encoder_probe.py` scores encoders), on the first
    ``probe_rows`` objects with that label."""
    from galray.analysis.probes import probe_auc, probe_r2

    n = min(job.probe_rows, len(sample.ids))
    if n < 10:
        return
    rows = []
    for name in labels.columns:
        y = labels[name].to_numpy(dtype=float)[:n]
        ok = np.isfinite(y)
        values = np.unique(y[ok])
        if ok.sum() < 10 or len(values) < 2:
            continue
        binary = len(values) == 2
        if binary and np.bincount(np.searchsorted(values, y[ok])).min() < 2:
            continue
        X = sample.embeddings_ND[:n][ok]
        rows.append({"label": name, "metric": "AUC" if binary else "R2", "objects": int(ok.sum()),
                     "embedding": probe_auc(X, y[ok], seed=job.seed) if binary else probe_r2(X, y[ok], seed=job.seed)})
    if rows:
        out.tables["probes"] = pd.DataFrame(rows)


def _pictures(job: AnalyzeJob, uri: str | None, objects: set[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Display pictures of ``(object_id, feature file)`` pairs, read from the shards of the cutout store
    ``uri`` named like the files (only those rows: a filter on object_id)."""
    from galray.analysis.galleries import pictures_from_table
    from galray.data.preprocess import plan_for
    from galray.data.shards import images_from_table

    if not uri or not objects:
        return {}
    fs, root = arrow_filesystem(uri, job.storage)
    by_file: dict[str, list[str]] = {}
    for oid, path in objects:
        by_file.setdefault(str(path).rsplit("/", 1)[-1], []).append(str(oid))
    pictures: dict[str, np.ndarray] = {}
    for name, ids in sorted(by_file.items()):
        path = f"{root}/{name}"
        schema = read_schema(fs, path)  # the allow-list of arrow_safety before any value is read
        plan = plan_for(schema, job.thumb_px, 3)
        table = pq.read_table(path, filesystem=fs, columns=[ID_COLUMN, plan.column],
                              filters=[(ID_COLUMN, "in", sorted(set(ids)))])
        table = table.replace_schema_metadata(schema.metadata)
        images = images_from_table(table) if plan.encoding == "tensor" else \
            table.column(plan.column).to_numpy(zero_copy_only=False)
        pictures.update(pictures_from_table(table.column(ID_COLUMN).to_pylist(), images, plan))
    return pictures


def family_step(job: AnalyzeJob, sample: Sample, out: Outputs) -> list[int]:
    """Families between the narrow SAE (its own checkpoint, or the wide SAE's first Matryoshka group) and the
    wide one; returns the latents of the wide SAE whose galleries the shown families need."""
    import torch

    from galray.analysis.families import match_families
    from galray.models.checkpoint import load_model
    from galray.models.sae import SparseAutoencoder

    def sae_at(uri: str) -> SparseAutoencoder:
        return load_model(SparseAutoencoder, read_checkpoint(uri, job.storage, "an SAE checkpoint")).eval()

    wide = sae_at(sample.meta["sae"])
    dec_wide = wide.decoder_directions_raw().numpy()  # (F, D), raw embedding space
    active = sample.codes_NF > 0  # (N, F_live)
    if job.narrow_sae:
        narrow = sae_at(job.narrow_sae)
        with torch.no_grad():
            parents_active = (narrow.encode(torch.from_numpy(sample.embeddings_ND)) > 0).numpy()
        dec_parents, parent_ids = narrow.decoder_directions_raw().numpy(), None
        child_cols = np.arange(len(sample.live))
        desc = f"Narrow SAE {job.narrow_sae} ({narrow.cfg.n_latents} latents) and the wide SAE"
    else:
        if len(wide.cfg.group_sizes) < 2:
            return []
        m = wide.cfg.group_sizes[0]
        parent_cols, child_cols = np.flatnonzero(sample.live < m), np.flatnonzero(sample.live >= m)
        parents_active, parent_ids = active[:, parent_cols], sample.live[parent_cols]
        dec_parents = dec_wide[parent_ids]
        desc = f"The Matryoshka SAE's first group ({m} latents, trained to reconstruct alone) and its later groups"
    child_ids = sample.live[child_cols]
    fam = match_families(dec_parents, dec_wide[child_ids], parents_active, active[:, child_cols],
                         parent_ids=parent_ids, child_ids=child_ids, min_cosine=job.family_min_cosine,
                         min_cooccurrence=job.family_min_cooccurrence, min_child_frequency=job.min_frequency / 5)
    out.tables["families"] = fam
    out.summary["families"] = {"narrow": desc, "min_cosine": job.family_min_cosine,
                               "min_cooccurrence": job.family_min_cooccurrence, "shown": job.families_shown,
                               "parents_in_store": not job.narrow_sae,
                               "count": int(fam["parent"].nunique()) if len(fam) else 0}
    if fam.empty:
        return []
    shown = list(dict.fromkeys(fam["parent"]))[: job.families_shown]
    kids = [int(c) for c in fam[fam["parent"].isin(shown)].groupby("parent", sort=False).head(3)["child"]]
    return kids if job.narrow_sae else [int(p) for p in shown] + kids


def codebook_step(job: AnalyzeJob, vqvae_uri: str, class_names: dict[int, str], out: Outputs) -> None:
    """Usage, decodes of the most and least used codes, heat maps and t-SNE from a code store sample."""
    from galray.analysis import codebook as cb
    from galray.analysis.figures import codebook_usage
    from galray.data.stores import CODES_COLUMN, LABEL_COLUMN
    from galray.models.checkpoint import load_model
    from galray.models.codebook_metrics import perplexity, utilisation
    from galray.models.vqvae import VQVAE

    import torch

    vqvae = load_model(VQVAE, read_checkpoint(vqvae_uri, job.storage, "a VQ-VAE checkpoint")).eval()
    fs, root = arrow_filesystem(job.codes, job.storage)
    from galray.data.shards import list_parquet

    parts, n = [], 0
    for f in list_parquet(fs, root):
        t = read_table(fs, f.path, columns=[CODES_COLUMN, LABEL_COLUMN])
        parts.append(t)
        n += t.num_rows
        if n >= job.max_rows:
            break
    if not parts:
        raise ConfigError("codes", f"{job.codes} holds no code files")
    table = pa.concat_tables(parts).slice(0, job.max_rows)
    codes = list_column_values(table.column(CODES_COLUMN)).astype(np.int64)
    labels = np.asarray(table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False), np.int64)
    K, grid = vqvae.cfg.codebook_size, vqvae.cfg.latent_size
    if codes.shape[1] != grid * grid or codes.max(initial=0) >= K:
        raise ConfigError("codes", f"{job.codes} does not match the VQ-VAE (grid {grid}x{grid}, {K} codes)")
    counts = np.bincount(codes.ravel(), minlength=K).astype(np.float64)
    out.figure("codebook_usage", codebook_usage(counts))
    top, bottom = cb.used_codes(counts, job.codebook_codes)
    share = counts / counts.sum()
    for name, chosen, what in (("codebook_top", top, "most"), ("codebook_bottom", bottom, "least")):
        if len(chosen):
            out.figure(name, cb.tiles_figure(cb.code_decodes(vqvae, chosen),
                                             [f"{c}: {100 * share[c]:.2g}%" for c in chosen],
                                             f"The {len(chosen)} {what} used codes, decoded (code: share of tokens)"))
    if len(top):
        out.figure("codebook_heatmaps", cb.tiles_figure(cb.heatmaps(codes, grid, top), [str(c) for c in top],
                                                        "Where the most used codes sit", cmap="magma"))
    rng = np.random.default_rng(job.seed)
    pick = rng.choice(len(codes), size=min(job.tsne_points, len(codes)), replace=False)
    if len(pick) >= 10:
        out.figure("codebook_tsne", cb.tsne_figure(cb.pooled_latents(vqvae, codes[pick]), labels[pick], class_names,
                                                   job.seed))
    t = torch.as_tensor(counts)
    out.summary["codebook"] = {"codebook size": K, "codes used": f"{100 * utilisation(t):.0f}%",
                               "perplexity": f"{perplexity(t):.1f}", "tokens counted": f"{int(counts.sum()):,}"}
    out.summary["metrics"].update({"codebook_utilisation": utilisation(t), "codebook_perplexity": perplexity(t)})


def generation_step(job: AnalyzeJob, vqvae_uri: str, class_names: dict[int, str], out: Outputs) -> None:
    from galray.analysis.generations import generation_figures
    from galray.models.checkpoint import load_model
    from galray.models.prior import Prior
    from galray.models.vqvae import VQVAE

    prior = load_model(Prior, read_checkpoint(job.prior, job.storage, "a prior checkpoint")).eval()
    vqvae = load_model(VQVAE, read_checkpoint(vqvae_uri, job.storage, "a VQ-VAE checkpoint")).eval()
    labels = {}
    for i, (label, fig) in enumerate(generation_figures(prior, vqvae, class_names, per_class=job.generation_per_class,
                                                         seed=job.seed)):
        out.figure(f"generated_{i}", fig)
        labels[f"generated_{i}"] = label
    out.summary["generations"] = labels


def _sae_info(uri: str, storage: StorageConfig, tracking: TrackingConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The SAE checkpoint's config.json, and the final metrics of the training run that wrote it (when the
    checkpoint names an MLflow run the tracking store holds)."""
    ckpt = read_checkpoint(uri, storage, "an SAE checkpoint")
    config = json.loads(ckpt.config_json)
    training: dict[str, Any] = {}
    try:
        import torch

        from galray.train.checkpoint import STATE_NAME

        fs, root = arrow_filesystem(uri, storage)
        with fs.open_input_stream(f"{root}/{STATE_NAME}") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        run_id = state.get("mlflow_run_id")
        if run_id and tracking.enabled:
            import mlflow

            run = mlflow.MlflowClient(tracking_uri=tracking.resolved_uri()).get_run(run_id)
            training = {"run_id": run_id, **run.data.metrics}
    except Exception:  # no train_state.pt, or a run this tracking store does not hold: nothing to add
        pass
    return config, training


def _write(folder: Path, out: Outputs) -> None:
    from galray.analysis.report import FIGURES_DIR, GALLERIES_NAME, SUMMARY_NAME

    (folder / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    for name, png in out.figures.items():
        (folder / FIGURES_DIR / f"{name}.png").write_bytes(png)
    for name, frame in out.tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    from galray.analysis.galleries import GALLERY_COLUMNS

    gal = pd.DataFrame(out.gallery_rows, columns=list(GALLERY_COLUMNS))
    pq.write_table(pa.Table.from_pandas(gal, preserve_index=False), folder / GALLERIES_NAME)
    (folder / SUMMARY_NAME).write_text(json.dumps(out.summary, indent=2, default=str) + "\n")


def _publish(folder: Path, job: AnalyzeJob) -> None:
    """Copy the finished local folder to ``job.output`` (already there when the output is local)."""
    import pyarrow.fs as pafs

    if not is_s3(job.output):
        return
    fs, root = arrow_filesystem(job.output, job.storage)
    pafs.copy_files(str(folder), root, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def analyze(job: AnalyzeJob) -> AnalyzeSummary:
    """Run every analysis the inputs allow and write the analysis folder; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    from galray.analysis.alignment import class_names as names_of, label_frame

    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved(), tracking=job.tracking.resolved())
    sample = read_sample(job)
    labels = label_frame(sample.catalog, job.labels, job.class_column, job.class_name_column, job.exclude_labels)
    if labels.empty:
        raise ConfigError("labels", f"the feature store carries no usable label columns "
                                    f"(catalog columns: {list(sample.catalog.columns)})")
    classes = names_of(sample.catalog, job.class_column, job.class_name_column)
    out = Outputs()
    sae, pca, scores, novel = alignment_step(job, sample, labels, out)
    chosen = choose_gallery(job, sae, out.tables["recovery"], novel)
    novel_ids = [int(f) for f in novel["feature"].head(job.novel_shown)]
    family_ids = family_step(job, sample, out)
    latents = list(dict.fromkeys([c["feature"] for c in chosen] + novel_ids + family_ids))
    out.summary["gallery_features"] = chosen
    gallery_step(job, sample, scores, out.summary["pca_explained"], latents, out)
    if job.probe_rows:
        probe_step(job, sample, labels, out)
    top = [c["feature"] for c in chosen]
    by_name = {n: i for i, n in enumerate(sae.names)}
    rows = [by_name[f"sae {f}"] for f in top if f"sae {f}" in by_name]
    if rows:
        from galray.analysis.alignment_plots import rho_heatmap

        out.figure("rho_heatmap", rho_heatmap(sae.rho_FL[rows], [sae.names[i] for i in rows], sae.labels))
    vqvae_uri = job.vqvae
    model = str(sample.meta.get("embedding_model") or "")
    if vqvae_uri is None and model.startswith(VQVAE_PREFIX):
        vqvae_uri = model[len(VQVAE_PREFIX):]
    sections = ["alignment", "galleries"] + (["families"] if "families" in out.tables else [])
    if out.summary["neighbour_galleries"] or "probes" in out.tables:
        sections.append("neighbours")
    if vqvae_uri and job.codes:
        codebook_step(job, vqvae_uri, classes, out)
        sections.append("codebook")
    if vqvae_uri and job.prior:
        generation_step(job, vqvae_uri, classes, out)
        sections.append("generations")
    sae_config, sae_training = _sae_info(sample.meta["sae"], job.storage, job.tracking)
    name = job.output.rstrip("/").rsplit("/", 1)[-1]
    out.summary.update({
        "title": f"galray analysis: {name}",
        "subtitle": (f"{len(sample.ids):,} objects of {job.input} · SAE {sample.meta['n_latents']} latents, k "
                     f"{sample.meta['k']} · embeddings {sample.meta.get('embedding_model') or ''}"),
        "config": to_dict(job), "provenance": {k: v for k, v in sample.meta.items() if k != "rows"},
        "sae_config": sae_config, "sae_training": sae_training, "galray_version": __version__,
        "sections": sections, "labels": list(labels.columns)})
    if "metrics" in out.summary:
        out.summary["metrics"] = {k: float(v) for k, v in out.summary["metrics"].items()}

    tracker = Tracker(job.tracking, run_name=f"{STAGE}: {name}", tags={"galray.stage": STAGE,
                                                                       "galray.output": job.output})
    out.summary["mlflow_run_id"] = tracker.run_id
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(job.output) if not is_s3(job.output) else Path(tmp) / "analysis"
            folder.mkdir(parents=True, exist_ok=True)
            _write(folder, out)
            _publish(folder, job)
            tracker.log_params(job)
            tracker.log_metrics(out.summary["metrics"])
            tracker.log_artifact(folder, ANALYSIS_ARTIFACTS)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    recovery = out.tables["recovery"]
    return AnalyzeSummary(
        output=job.output, rows=len(sample.ids), sections=sections, mlflow_run_id=tracker.run_id,
        seconds=round(time.perf_counter() - t0, 2),
        recovery={r.label: {"sae": round(r.sae_abs_rho, 4), "pca": round(r.pca_abs_rho, 4),
                            "null": round(r.sae_null_q, 4)} for r in recovery.itertuples()})
