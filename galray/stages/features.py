"""`galray features`: apply a trained sparse autoencoder to an embedding store, into a sparse feature store.

This is what a survey keeps at a billion rows: for every galaxy the few dozen latents the SAE found
active (their indices and values) instead of the dense embedding, plus its catalog columns, so
questions like "which galaxies light up feature 12?" never touch the embeddings again.

**Feature store contract** (:mod:`galray.data.stores`): one Parquet file per embedding file, named
like it (which is named like its cutout shard), with ``object_id``, ``feature_indices``
(``list<int32>``, strongest first), ``feature_values`` (``list<float32>``) and the catalog columns
of the cutout store carried through (numbers, booleans and strings only). Provenance in the
metadata: SAE checkpoint and weights hash, width, k, the inference threshold, the embedding store,
the cutout shard the catalog came from. Rows whose embedding is not finite go to
``_errors/<file>.parquet``; valid plus errored rows equal the input rows.

**Batch independence.** Codes come from the SAE's threshold inference
(:meth:`~galray.models.sae.SparseAutoencoder.encode` in eval mode: a latent is active when its
pre-activation exceeds the threshold learned in training), so a galaxy's features never depend on
which other galaxies share its batch, shard or run.

**Exactly once, resumable.** The unit of work is one embedding file -> one feature file, planned by
:func:`galray.data.resume.plan_shard_work` and written by :func:`galray.data.stores.write_shard`
(errors first, features last, each atomically). Ray Data runs the files through a fixed pool of
actors that each load the SAE once; a re-run call rewrites the same file whole. A rerun skips every
file already written.

**Top-J query.** ``galray features --input FEATURE_STORE --top J --n 50`` lists the 50 objects where
latent J is strongest, in one streaming pass over the store's id and sparse columns
(:func:`galray.data.stores.top_activating`): no embedding is read.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galray import __version__
from galray.config import ConfigError, check
from galray.data.arrow_safety import open_parquet, read_schema, read_table
from galray.data.checkpoints import read_checkpoint, weights_hash
from galray.data.provenance import claim_output
from galray.data.resume import plan_shard_work
from galray.data.shards import ID_COLUMN, IMAGE_COLUMN, read_metadata
from galray.data.stores import (EMBEDDING_COLUMN, FEATURES_STORE_VERSION, feature_table, footer_rows,
                                is_catalog_type, list_column_values, sparse_codes, top_activating, write_shard)
from galray.stages.pool import ActorPoolConfig, pool_size
from galray.stages.summary import FieldsSummary, StageSummary
from galray.storage import StorageConfig, arrow_filesystem, join
from galray.tracking import StageRun, TrackingConfig

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from galray.models.checkpoint import CheckpointBytes
    from galray.models.sae import SparseAutoencoder

STAGE = "features"
FILE_COLUMN = "path"  # the embedding file a Ray Data row stands for


@dataclass(frozen=True)
class FeaturesJob:
    """`galray features`: which embeddings, which SAE, where the feature store goes; or a top-J query."""

    # Settings that change how fast, not what: a rerun may change them (galray.data.provenance).
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("pool", "batch_size", "torch_threads", "top", "n")

    input: str = ""
    """Embedding store URI (`galray embed`); with ``top``, the feature store to query."""
    sae: str = ""
    """SAE checkpoint folder (config.json + model.safetensors, as `galray train sae` writes it), local or s3://."""
    output: str = ""
    """Feature store URI; one Parquet file per embedding file."""
    catalog: str | None = None
    """Cutout store whose catalog columns are carried into the feature store, shard by shard (the files share
    names); default: the store the embeddings were made from (their provenance)."""
    catalog_columns: tuple[str, ...] | None = None
    """Catalog columns to carry; default every number, boolean and string column but the image; [] for none."""
    top: int | None = None
    """Query instead: list the objects where this latent is strongest (reads only ``input``, a feature store)."""
    n: int = 50
    """How many objects the query lists."""
    batch_size: int = 4096
    """Embeddings per forward pass."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The fixed pool of SAE actors: how many, GPUs and CPUs each."""
    torch_threads: int | None = None
    """torch intra-op threads per actor on CPU; default: Ray's (the actor's CPUs)."""
    overwrite: bool = False
    """Replace the output entirely (default: resume it, skipping finished files, if it was made with the same
    settings and SAE weights; with others, refuse naming the field)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for every URI."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow run of this job (settings, progress, summary)."""

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "an input store URI is required")
        check(self.n >= 1, "n", "must be at least 1")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be at least 1")
        if self.top is not None:
            check(self.top >= 0, "top", "must be a latent index >= 0")
            return
        check(bool(self.sae), "sae", "an SAE checkpoint folder is required (or --top J to query a feature store)")
        check(bool(self.output), "output", "an output store URI is required")
        check(self.input.rstrip("/") != self.output.rstrip("/"), "output", "must differ from the input store")


@dataclass(frozen=True)
class FeaturesSummary(StageSummary):
    """What `galray features` prints: the stage line, plus the mean number of active latents per row."""

    l0_mean: float = 0.0
    """Mean active latents per valid row of this run (threshold inference; the SAE was trained for k)."""
    k: int = 0
    n_latents: int = 0

    def format(self) -> str:
        return super().format() + f"; L0 {self.l0_mean:.1f} per row (k = {self.k}, {self.n_latents} latents)"


@dataclass(frozen=True)
class TopSummary(FieldsSummary):
    """What `galray features --top J` prints: the strongest objects of latent J."""

    latent: int
    input: str
    objects: list[dict[str, Any]]
    """rank, object_id, value, file."""

    def format(self) -> str:
        lines = [f"latent {self.latent}: the {len(self.objects)} most activating objects of {self.input}",
                 f"{'rank':>4}  {'value':>10}  object_id"]
        lines += [f"{o['rank']:>4}  {o['value']:>10.4g}  {o['object_id']}" for o in self.objects]
        return "\n".join(lines)


# --- the model ------------------------------------------------------------------------------------

def load_sae(checkpoint: "CheckpointBytes") -> "SparseAutoencoder":
    """The SAE of a checkpoint in eval mode (threshold inference); another model's checkpoint, or one whose
    threshold was never trained, fails naming the ``sae`` field."""
    from galray.models.checkpoint import load_model
    from galray.models.sae import SparseAutoencoder

    try:
        sae = load_model(SparseAutoencoder, checkpoint).eval()
    except ValueError as err:
        raise ConfigError("sae", str(err)) from None
    if int(sae.threshold_updates) == 0:
        raise ConfigError("sae", "the checkpoint has no trained inference threshold (threshold_updates = 0); "
                                 "train it with `galray train sae` or calibrate its threshold")
    return sae


# --- one file (actors) ----------------------------------------------------------------------------

def catalog_for(ids: list[str], fs: "pafs.FileSystem", path: str, columns: list[str]) -> pa.Table:
    """The catalog ``columns`` of the cutout shard ``path`` for ``ids``, in their order (nulls where an id
    is missing). Only the id and those columns are read; the image never is."""
    table = read_table(fs, path, columns=[ID_COLUMN, *columns])  # through the allow-list (arrow_safety)
    pos = pc.index_in(pa.array(ids, pa.string()), value_set=table.column(ID_COLUMN).cast(pa.string()))
    return table.select(columns).take(pos)


class ShardFeaturizer:
    """Callable class for ``map_batches``: loads the SAE once, then turns embedding files into feature files."""

    def __init__(self, config_json: bytes, weights: bytes, job: FeaturesJob, provenance: dict[str, Any],
                 catalog_columns: list[str]):
        import torch

        from galray.models.checkpoint import CheckpointBytes

        if job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        self.device = torch.device("cuda" if job.pool.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.sae = load_sae(CheckpointBytes(config_json, weights)).to(self.device)
        self.job, self.provenance, self.catalog_columns = job, provenance, catalog_columns
        self.fs_in, _ = arrow_filesystem(job.input, job.storage)
        self.fs_out, self.out_root = arrow_filesystem(job.output, job.storage)
        self.fs_cat = arrow_filesystem(job.catalog, job.storage)[0] if job.catalog else None

    def encode(self, emb_BD: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.sae.encode(torch.from_numpy(emb_BD).to(self.device)).float().cpu().numpy()

    def featurize(self, path: str) -> tuple[int, int, int]:
        """Write the feature file of one embedding file; returns (rows written, rows errored, active latents)."""
        job = self.job
        name = path.rsplit("/", 1)[-1]
        source = join(job.input, name)
        ids: list[str] = []
        offsets, indices, values = [np.zeros(1, np.int64)], [], []
        nnz = 0
        errors = []
        with open_parquet(self.fs_in, path) as pf:  # the allow-list again: the file may have changed
            for batch in pf.iter_batches(batch_size=job.batch_size, columns=[ID_COLUMN, EMBEDDING_COLUMN]):
                emb = list_column_values(batch.column(EMBEDDING_COLUMN)).astype(np.float32, copy=False)
                batch_ids = [str(i) for i in batch.column(ID_COLUMN).to_pylist()]
                ok = np.isfinite(emb).all(1)
                errors += [{"object_id": i, "stage": STAGE, "reason": "embedding has non-finite values",
                            "source_file": source} for i in np.asarray(batch_ids, dtype=object)[~ok]]
                if not ok.any():
                    continue
                off, idx, val = sparse_codes(self.encode(np.ascontiguousarray(emb[ok])))
                offsets.append(off[1:] + nnz)
                nnz += len(idx)
                indices.append(idx)
                values.append(val)
                ids += [i for i, keep in zip(batch_ids, ok) if keep]
        offsets_all = np.concatenate(offsets)
        catalog = None
        meta = {**self.provenance, "source_file": source, "rows": len(ids)}
        if self.fs_cat is not None and self.catalog_columns:
            cat_path = arrow_filesystem(join(job.catalog, name), job.storage)[1]
            catalog = catalog_for(ids, self.fs_cat, cat_path, self.catalog_columns)
            meta["catalog_file"] = join(job.catalog, name)
        flat_i = np.concatenate(indices) if indices else np.zeros(0, np.int32)
        flat_v = np.concatenate(values) if values else np.zeros(0, np.float32)
        write_shard(feature_table(ids, offsets_all, flat_i, flat_v, catalog, meta), errors, self.fs_out,
                    self.out_root, name)
        return len(ids), len(errors), int(len(flat_i))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.featurize(str(p)) for p in batch[FILE_COLUMN]]
        return {FILE_COLUMN: batch[FILE_COLUMN], "rows_out": np.array([r[0] for r in results], np.int64),
                "rows_errored": np.array([r[1] for r in results], np.int64),
                "active": np.array([r[2] for r in results], np.int64)}


# --- the job --------------------------------------------------------------------------------------

def _catalog_columns(job: FeaturesJob, embed_meta: dict[str, Any]) -> tuple[FeaturesJob, list[str]]:
    """Resolve the catalog store (default: the embeddings' source) and the columns to carry; checks the
    store exists and has those columns, so a wrong name fails before any actor starts."""
    if job.catalog_columns is not None and not job.catalog_columns:
        return dataclasses.replace(job, catalog=None), []
    catalog = job.catalog or embed_meta.get("input")
    if not catalog:
        if job.catalog_columns:
            raise ConfigError("catalog", "the embeddings do not name their cutout store: give --catalog")
        return job, []
    from galray.data.resume import input_shards

    fs, _, shards = input_shards(catalog, job.storage)
    schema = read_schema(fs, shards[0].path)
    image = read_metadata(schema).get("image", {}).get("column", IMAGE_COLUMN)
    usable = [f.name for f in schema if f.name not in (ID_COLUMN, image) and is_catalog_type(f.type)]
    if job.catalog_columns is None:
        return dataclasses.replace(job, catalog=catalog), usable
    bad = [c for c in job.catalog_columns if c not in usable]
    if bad:
        raise ConfigError("catalog_columns", f"{bad} are not scalar columns of {catalog} (usable: {usable})")
    return dataclasses.replace(job, catalog=catalog), list(job.catalog_columns)


def apply_sae(job: FeaturesJob) -> FeaturesSummary:
    """Write the feature file of every unfinished embedding file of ``job.input``; returns the summary."""
    import ray

    from galray.session import ensure_ray

    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved())  # actors don't see the driver's env
    work = plan_shard_work(job.input, job.output, job.storage, job.overwrite)
    first = read_schema(work.fs_in, work.shards[0].path)
    if EMBEDDING_COLUMN not in first.names or not pa.types.is_fixed_size_list(first.field(EMBEDDING_COLUMN).type):
        raise ConfigError("input", f"{job.input} is not an embedding store (no fixed-size list column "
                                   f"{EMBEDDING_COLUMN!r}; make one with `galray embed`)")
    embed_meta = read_metadata(first)
    checkpoint = read_checkpoint(job.sae, job.storage, "an SAE checkpoint")
    sae = load_sae(checkpoint)  # a wrong or untrained checkpoint fails here, before any actor starts
    cfg = sae.cfg
    dim = first.field(EMBEDDING_COLUMN).type.list_size
    if dim != cfg.d_in:
        raise ConfigError("sae", f"the SAE takes {cfg.d_in}-d embeddings, {job.input} holds {dim}-d ones")
    job, columns = _catalog_columns(job, embed_meta)
    provenance = {"features_store_version": FEATURES_STORE_VERSION, "producer": "galray features",
                  "galray_version": __version__, "sae": job.sae, "weights": weights_hash(checkpoint.weights),
                  "n_latents": cfg.n_latents, "k": cfg.k, "d_in": cfg.d_in, "group_sizes": list(cfg.group_sizes),
                  "threshold": float(sae.threshold), "inference": "threshold", "embeddings": job.input,
                  "embedding_model": embed_meta.get("model"), "catalog": job.catalog, "catalog_columns": columns}
    del sae
    todo = work.todo
    rows_in = sum(footer_rows(work.fs_in, [s.path for s in todo]))
    # Another SAE or settings into this output: refused, naming the field (overwrite: replaced entirely).
    claim_output(job, STAGE, made_with={"weights": provenance["weights"]})
    run = StageRun(job.tracking, STAGE, job, job.output)
    written = errored = active = 0
    try:
        if todo:
            ensure_ray()
            actors = min(pool_size(job.pool, field_prefix="pool."), len(todo))
            ds = ray.data.from_items([{FILE_COLUMN: s.path} for s in todo], override_num_blocks=len(todo))
            ds = ds.map_batches(ShardFeaturizer, fn_constructor_kwargs={
                "config_json": checkpoint.config_json, "weights": checkpoint.weights, "job": job,
                "provenance": provenance, "catalog_columns": columns},
                compute=ray.data.ActorPoolStrategy(size=actors), batch_size=1, batch_format="numpy",
                **job.pool.ray_options())
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                written += int(out["rows_out"].sum())
                errored += int(out["rows_errored"].sum())
                active += int(out["active"].sum())
                run.progress(written + errored)
    except BaseException:
        run.finish(None)
        raise
    summary = FeaturesSummary(stage=STAGE, rows_in=rows_in, rows_out=written, rows_errored=errored,
                              seconds=time.perf_counter() - t0, output=job.output, skipped_shards=work.skipped,
                              l0_mean=round(active / written, 3) if written else 0.0, k=cfg.k,
                              n_latents=cfg.n_latents)
    run.finish(summary)
    summary.check()
    return summary


def top_query(job: FeaturesJob) -> TopSummary:
    """The ``job.n`` most activating objects of latent ``job.top`` in the feature store ``job.input``."""
    found = top_activating(job.input, [job.top], job.n, job.storage)[job.top]
    return TopSummary(latent=job.top, input=job.input, objects=[
        {"rank": r, "object_id": oid, "value": v, "file": path.rsplit("/", 1)[-1]}
        for r, (v, oid, path) in enumerate(found, 1)])


def features(job: FeaturesJob) -> FeaturesSummary | TopSummary:
    """`galray features`: the top-J query when ``job.top`` is set, else apply the SAE (:func:`apply_sae`)."""
    return top_query(job) if job.top is not None else apply_sae(job)
