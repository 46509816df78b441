"""`galray embed`: stream a cutout store through a pool of model replicas into an embedding store.

The pipeline (Ray Data, streaming; nothing is held in memory whole)::

    from_items(unfinished shard paths)
      -> map_batches(ShardPreprocessor)        CPU actors (autoscaling pool), one call per shard, streaming
                                               it record batch by record batch (object_id + image only):
                                               decode, stretch, crop + resize, HWC -> CHW
      -> map_batches(Embedder, actor pool)     fixed pool, each actor loads the model once;
                                               inference_mode, bf16 autocast + channels_last on GPU
      -> driver: regroup rows by source shard, write each finished shard once

**Embedding store contract.** A folder (local or ``s3://``) of Parquet files, one per input shard
and named like it (``shard-00042.parquet`` for the input's ``shard-00042.parquet``), with columns

- ``object_id``: string, the input row's id, sorted within a file;
- ``embedding``: ``fixed_size_list<float32>[D]``;

and provenance in the Parquet schema metadata under ``galray`` (JSON): model name, weights hash
(``sha256:...`` of the weights file, ``timm-pretrained:<source>`` or ``random-init:seed0``),
preprocessing, galray version, embedding dim, source shard. Rows that could not be embedded go to
``_errors/<shard stem>.parquet`` (``object_id, stage, reason, source_file``); valid plus errored
rows equal the input rows of every shard.

**Exactly once, resumable.** The unit of work is one input shard -> one output file:

1. Before starting, the output's record must match this run's settings, model and weights
   (:func:`galray.data.provenance.claim_output`: otherwise refused, naming the field;
   ``overwrite`` replaces the output entirely), and shards whose output rows plus error rows equal
   their input rows are skipped (:func:`galray.data.resume.finished`: a missing, short or
   unreadable output is recomputed). Output files are only ever written whole: atomically (temp
   file + rename locally; an S3 PUT is atomic), and only once every row of their shard has come
   back, so an interrupted run resumes exactly where it stopped.
2. A killed inference actor loses no rows and duplicates none: the pool runs with
   ``max_restarts=-1, max_task_retries=-1``, so Ray restarts the actor and re-runs the batches it
   held; a batch's output is only handed downstream once its task has finished. The driver also
   drops any object_id it has already seen for a shard, so even a replayed batch cannot duplicate.
3. The driver knows how many rows each shard has from its Parquet footer, so it knows when a shard
   is complete; a shard that never completes fails the job instead of writing a partial file.

Writes run on the driver in a small thread pool. Embeddings are small (D floats a row) and a shard
leaves memory when it is written, so the driver's memory is bounded by the shards in flight.

This module imports Ray and torch only inside functions: :func:`preprocess_batch` runs in plain
CPU workers, :class:`Embedder` in the actors, and neither needs the other's imports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from galray import __version__
from galray.config import check, from_dict, upgrade_keys
from galray.data.arrow_safety import open_parquet, read_schema
from galray.data.cutouts import CutoutError
from galray.data.preprocess import ImagePlan, PreprocessConfig, plan_for, plan_images, prepare_image
from galray.data.resume import plan_shard_work
from galray.data.provenance import claim_output
from galray.data.shards import ID_COLUMN
from galray.data.stores import (EMBED_STORE_VERSION, EMBEDDING_COLUMN, embedding_table, footer_rows, shard_stem,
                                write_shard)
from galray.models.backbone_config import BackboneConfig
from galray.stages.pool import ActorPoolConfig, pool_size
from galray.stages.summary import DEFAULT_MAX_ERROR_FRACTION, StageSummary, SteadyRate
from galray.storage import StorageConfig, join
from galray.tracking import StageRun, TrackingConfig

if TYPE_CHECKING:
    import ray.data

    from galray.models.backbones import Backbone

log = logging.getLogger(__name__)

STAGE = "embed"
PATH_COLUMN = "path"  # the source shard of each row, carried to the driver, which regroups rows by it
PIXELS_COLUMN = "pixels"
ERROR_COLUMN = "error"
MIN_INFLIGHT_BYTES = 32 << 20  # floor of the in-flight cap: tiny batches still flow in bundles


@dataclass(frozen=True)
class EmbedJob:
    """`galray embed`: which store to embed, with which backbone, on what resources."""

    # Keys of the previous release (flat backbone, pool and preprocessing fields), still read.
    RENAMED: ClassVar[dict[str, str]] = {
        "model": "backbone.name", "weights": "backbone.weights", "pretrained": "backbone.pretrained",
        "input_size": "backbone.input_size", "normalization": "backbone.normalization",
        "actors": "pool.actors", "num_gpus": "pool.num_gpus", "cpus_per_actor": "pool.cpus_per_actor",
        "crop_fraction": "preprocess.crop_fraction", "stretch": "preprocess.stretch"}
    # Settings that change how fast, not what: a rerun may change them (galray.data.provenance).
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("pool", "batch_size", "torch_threads", "compile", "inflight_batches",
                                           "preprocess_cpus", "preprocess_actors")

    input: str = ""
    """Cutout store URI: a local folder, file:// or s3://bucket/prefix."""
    output: str = ""
    """Embedding store URI (same forms); one Parquet file per input shard."""
    backbone: BackboneConfig | None = None
    """The model: name (timm, hf_hub:owner/repo, local-dir:/path, mwalmsley/<zoobot repo>, vqvae:/checkpoint_dir),
    weights file, pretrained, input size, normalisation. Required."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Crop fraction and flux stretch, shared with `galray encode` and training."""
    batch_size: int = 64
    """Images per forward pass (and per preprocessed batch)."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The fixed pool of model replicas: how many, GPUs and CPUs each."""
    torch_threads: int | None = None
    """torch intra-op threads in each actor on CPU; default: Ray's OMP_NUM_THREADS (the actor's CPUs)."""
    compile: bool = False
    """torch.compile the backbone in each actor: faster forward passes (convnext_nano on CPU: ~1.3x) for a one-off
    compile of 15-35 s per actor; worth it for large stores. Needs a C++ compiler on CPU."""
    inflight_batches: int = 8
    """Preprocessed batches allowed in flight per replica: memory stays flat (at most actors x inflight_batches
    batches of pixels in the object store) whatever the size of the store."""
    preprocess_cpus: float = 1.0
    """CPUs per preprocessing actor (a different resource shape from the model's, so Ray never fuses the two)."""
    preprocess_actors: int = 0
    """Most preprocessing actors (the pool starts at one and grows while the replicas wait for pixels);
    0: as many as the CPUs left over by the replicas allow, and no more than the shards to read."""
    max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION
    """Exit non-zero (after writing everything) when more than this fraction of the rows errored."""
    overwrite: bool = False
    """Replace the output entirely (default: resume it, skipping finished shards, if it was made with the same
    settings, model and weights; with others, refuse naming the field)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for input and output (default: the standard AWS variables)."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow run of this job: its settings as params, rows done and rows/s as it goes, the final summary."""

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "an input store URI is required")
        check(bool(self.output), "output", "an output store URI is required")
        check(self.backbone is not None, "backbone.name", "a backbone name is required, e.g. convnext_nano")
        check(self.input.rstrip("/") != self.output.rstrip("/"), "output", "must differ from the input store")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.torch_threads is None or self.torch_threads >= 1, "torch_threads", "must be at least 1")
        check(self.preprocess_cpus > 0, "preprocess_cpus", "must be positive")
        check(self.preprocess_actors >= 0, "preprocess_actors", "must be >= 0 (0 = use the CPUs the replicas leave)")
        check(self.inflight_batches >= 2, "inflight_batches", "must be at least 2 (one running, one waiting)")
        check(0 <= self.max_error_fraction <= 1, "max_error_fraction", "must be in [0, 1]")


# --- preprocessing (CPU actors) -------------------------------------------------------------------

def preprocess_batch(batch: dict[str, np.ndarray], plan: ImagePlan) -> dict[str, np.ndarray]:
    """Ray Data batch (object_id, image, path) -> (object_id, path, pixels (N, C, S, S), error).

    A row that fails keeps its place with blank pixels and its reason in ``error`` (empty when
    fine), so every input row reaches the writer and the shard's row count adds up.
    """
    images = batch[plan.column]
    n = len(batch[ID_COLUMN])
    pixels = np.zeros((n, plan.in_chans, plan.size, plan.size), plan.pixel_dtype)
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            pixels[i] = prepare_image(images[i], plan)
        except CutoutError as err:
            errors[i] = f"preprocess: {err}"
    return {ID_COLUMN: batch[ID_COLUMN], PATH_COLUMN: batch[PATH_COLUMN], PIXELS_COLUMN: pixels, ERROR_COLUMN: errors}


def exact_batches(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Re-cut a stream of record batches into tables of exactly ``size`` rows (the last may be shorter).

    Parquet readers end a batch at every row-group boundary; re-cutting keeps every forward pass
    full, so a compiled replica never runs a padded batch except at the end of a shard.
    """
    pending: list[pa.RecordBatch] = []
    rows = 0
    for rb in batches:
        pending.append(rb)
        rows += rb.num_rows
        if rows < size:
            continue
        table = pa.Table.from_batches(pending)
        start = 0
        while rows - start >= size:
            yield table.slice(start, size)
            start += size
        rest = table.slice(start)
        pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)


class ShardPreprocessor:
    """Callable class for ``map_batches``: shard paths in, their rows preprocessed (:func:`preprocess_batch`) out.

    Streams each shard one Parquet record batch at a time, reading only the id and image columns,
    so it holds one batch in memory whatever the shard's size. Yields batches of exactly
    ``batch_size`` rows (the shard's last may be shorter), each of which becomes one block.

    It runs in a small actor pool rather than as tasks: the in-flight cap pauses preprocessing
    between shards, and Ray kills a task worker left idle for a second when a node has more
    workers than CPUs (always, on a small machine), so every shard paid a fresh worker's start
    (Ray, pyarrow, PIL, galray imports: 1.5-3 s of CPU). Measured on 2 cores with 500-row shards:
    0.13 of a core went to preprocessing, against 0.07 with a long-lived actor, and the replicas
    got 0.84 of a core each instead of 0.89.
    """

    def __init__(self, plan: ImagePlan, fs: pafs.FileSystem, batch_size: int):
        self.plan, self.fs, self.batch_size = plan, fs, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        plan = self.plan
        for path in batch[PATH_COLUMN]:
            with open_parquet(self.fs, path) as pf:  # the allow-list again: the file may have changed since listing
                metadata = pf.schema_arrow.metadata
                batches = pf.iter_batches(batch_size=self.batch_size, columns=[ID_COLUMN, plan.column])
                for table in exact_batches(batches, self.batch_size):
                    table = table.replace_schema_metadata(metadata)
                    images = plan_images(table, plan)
                    ids = table.column(ID_COLUMN).to_numpy(zero_copy_only=False)
                    yield preprocess_batch({ID_COLUMN: ids, plan.column: images,
                                            PATH_COLUMN: np.full(len(ids), path, dtype=object)}, plan)


# --- inference (actors) ---------------------------------------------------------------------------

class Embedder:
    """Callable class for ``map_batches``: loads the backbone once per actor, then embeds batches.

    Runs on CUDA when the actor sees a GPU (bf16 autocast, channels_last), else on CPU in float32;
    see :class:`galray.models.inference.InferenceModel`.
    Rows whose preprocessing failed pass through with NaN embeddings and their error.
    """

    def __init__(self, backbone: "BackboneConfig", dim: int, torch_threads: int | None = None, batch_size: int = 64,
                 compile: bool = False):
        import torch

        from galray.models.backbones import create_backbone
        from galray.models.inference import InferenceModel

        if torch_threads:
            torch.set_num_threads(torch_threads)
        built = create_backbone(backbone)
        self.dim = dim
        self.runner = InferenceModel(built.model, built.preprocessing, batch_size, compile=compile)

    def embed_pixels(self, pixels_BCHW: np.ndarray) -> np.ndarray:
        """(B, C, S, S) uint8 or float [0, 1] pixels -> (B, D) float32 embeddings."""
        import torch

        return self.runner(torch.from_numpy(np.ascontiguousarray(pixels_BCHW))).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch[ERROR_COLUMN]
        ok = errors == ""
        emb = np.full((len(errors), self.dim), np.nan, np.float32)
        if ok.any():
            emb[ok] = self.embed_pixels(batch[PIXELS_COLUMN][ok])
        return {ID_COLUMN: batch[ID_COLUMN], PATH_COLUMN: batch[PATH_COLUMN], EMBEDDING_COLUMN: emb,
                ERROR_COLUMN: errors}


# --- output ---------------------------------------------------------------------------------------

def write_shard_output(rows: dict[str, np.ndarray], stem: str, source: str, fs: pafs.FileSystem, root: str,
                       provenance: dict[str, Any]) -> tuple[int, int]:
    """Write one shard's embeddings (and errors, if any; :func:`galray.data.stores.write_shard`);
    returns (rows written, rows errored)."""
    ok = rows[ERROR_COLUMN] == ""
    errors = [{"object_id": i, "stage": STAGE, "reason": r, "source_file": source}
              for i, r in zip(rows[ID_COLUMN][~ok], rows[ERROR_COLUMN][~ok])]
    meta = {**provenance, "source_file": source, "rows": int(ok.sum())}
    write_shard(embedding_table(rows[ID_COLUMN][ok], rows[EMBEDDING_COLUMN][ok], meta), errors, fs, root,
                f"{stem}.parquet")
    return int(ok.sum()), int((~ok).sum())


class ShardCollector:
    """Regroups streamed rows by source shard and writes each shard once all its rows are in."""

    def __init__(self, expected: dict[str, int], sources: dict[str, str], fs: pafs.FileSystem, root: str,
                 provenance: dict[str, Any], write_threads: int = 4):
        self.expected = expected  # stem -> rows in the input shard (from its footer)
        self.sources = sources  # stem -> input shard URI
        self.fs, self.root, self.provenance = fs, root, provenance
        self.parts: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.duplicates = 0
        self.pool = ThreadPoolExecutor(max_workers=write_threads)
        self.futures: list[Future] = []
        self.done: set[str] = set()
        self.rows_received = 0

    def add(self, batch: dict[str, np.ndarray]) -> None:
        stems = np.array([shard_stem(p) for p in batch[PATH_COLUMN]])
        for stem in np.unique(stems):
            if stem in self.done or stem not in self.expected:
                raise RuntimeError(f"rows of {stem} arrived after it was written (or it was never scheduled)")
            sel = stems == stem
            ids = [str(i) for i in batch[ID_COLUMN][sel]]
            # A replayed batch must never duplicate a row: keep the first copy of each object_id.
            fresh = np.array([i not in self.seen[stem] for i in ids], dtype=bool)
            self.duplicates += int((~fresh).sum())
            self.rows_received += int(fresh.sum())
            self.seen[stem].update(ids)
            keep = np.flatnonzero(sel)[fresh]
            self.parts[stem].append({k: batch[k][keep] for k in (ID_COLUMN, EMBEDDING_COLUMN, ERROR_COLUMN)})
            if len(self.seen[stem]) == self.expected[stem]:
                self._flush(stem)
        self._raise_failed_writes()

    def _flush(self, stem: str) -> None:
        parts = self.parts.pop(stem)
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        del self.seen[stem]
        self.done.add(stem)
        self.futures.append(self.pool.submit(write_shard_output, rows, stem, self.sources[stem], self.fs,
                                             self.root, self.provenance))

    def flush_empty(self) -> None:
        """Shards with zero rows get an (empty) output file too, so reruns skip them."""
        for stem, n in self.expected.items():
            if n == 0 and stem not in self.done:
                self.parts[stem].append({ID_COLUMN: np.array([], object),
                                         EMBEDDING_COLUMN: np.zeros((0, self.provenance["embedding_dim"]), np.float32),
                                         ERROR_COLUMN: np.array([], object)})
                self._flush(stem)

    def _raise_failed_writes(self) -> None:
        for f in [f for f in self.futures if f.done()]:
            f.result()  # re-raises a write error in the driver

    def finish(self) -> tuple[int, int]:
        """Wait for the writes; returns (rows written, rows errored). Raises if any shard is incomplete."""
        self.flush_empty()
        results = [f.result() for f in self.futures]
        self.pool.shutdown()
        incomplete = {s: (len(self.seen.get(s, ())), n) for s, n in self.expected.items() if s not in self.done}
        if incomplete:
            detail = ", ".join(f"{s}: {got} of {n} rows" for s, (got, n) in list(incomplete.items())[:5])
            raise RuntimeError(f"{len(incomplete)} shard(s) incomplete, nothing written for them ({detail}); "
                               f"are object_ids unique within each input shard?")
        return sum(r[0] for r in results), sum(r[1] for r in results)


# --- the job --------------------------------------------------------------------------------------

def _preprocess_pool_max(job: EmbedJob, actors: int, shards: int) -> int:
    """Upper bound of the preprocessing pool: the CPUs the replicas leave (at least one actor), at most one per shard."""
    import ray

    if job.preprocess_actors:
        return max(1, min(job.preprocess_actors, shards))
    free = float(ray.cluster_resources().get("CPU", 0.0)) - actors * job.pool.cpus_per_actor
    return max(1, min(int(free / job.preprocess_cpus + 1e-9), shards))


def preprocess_memory(plan: ImagePlan, batch_size: int) -> int:
    """Bytes a preprocessing actor reserves: a batch of output pixels plus decode/resize working copies."""
    pixels = plan.batch_bytes(batch_size)
    return max(512 << 20, 4 * pixels + (256 << 20))  # a Ray worker with pyarrow, PIL, numpy and a batch: ~270 MiB


def provenance(job: EmbedJob, backbone: "Backbone", dim: int, plan: ImagePlan) -> dict[str, Any]:
    return {"embed_store_version": EMBED_STORE_VERSION, "producer": "galray embed", "galray_version": __version__,
            "model": job.backbone.name, "weights": backbone.weights_id, "embedding_dim": dim,
            "preprocessing": {**plan.to_json(), "model_input": backbone.preprocessing.to_json()},
            "input": job.input}


def embed_store(job: EmbedJob, embedder_cls: type[Embedder] = Embedder,
                preprocessor_cls: type[ShardPreprocessor] = ShardPreprocessor) -> StageSummary:
    """Embed every unfinished shard of ``job.input`` into ``job.output``; returns the stage summary.

    ``embedder_cls`` may be a subclass of :class:`Embedder` (test-time augmentation, instrumentation),
    ``preprocessor_cls`` one of :class:`ShardPreprocessor` (custom preprocessing, instrumentation).
    """
    from galray.models.backbones import create_backbone, embedding_dim
    from galray.session import ensure_ray

    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved())  # workers don't see the driver's env
    work = plan_shard_work(job.input, job.output, job.storage, job.overwrite)
    fs_in, fs_out, out_root, shards, todo = work.fs_in, work.fs_out, work.out_root, work.shards, work.todo
    rows = dict(zip((shard_stem(s.path) for s in todo), footer_rows(fs_in, [s.path for s in todo])))
    sources = {shard_stem(s.path): join(job.input, s.base_name) for s in todo}
    actors = 0
    if any(rows.values()):
        ensure_ray()
        actors = pool_size(job.pool, reserve_cpus=job.preprocess_cpus, field_prefix="pool.")  # no GPUs: fail now

    # Build the backbone here once: a bad name, an unsafe or mismatched weights file, or a missing
    # checkpoint fails now, before the actors start; it also gives D for the output schema.
    backbone = create_backbone(job.backbone)
    dim = embedding_dim(backbone)
    prep = backbone.preprocessing
    plan = plan_for(read_schema(fs_in, shards[0].path, join(job.input, shards[0].base_name)), prep.input_size, prep.in_chans,
                    job.preprocess)
    meta = provenance(job, backbone, dim, plan)
    # Another model, weights or settings into this output: refused, naming the field (overwrite: replaced).
    claim_output(job, STAGE, made_with={"weights": backbone.weights_id})
    del backbone
    run = StageRun(job.tracking, STAGE, job, job.output)
    collector = ShardCollector(rows, sources, fs_out, out_root, meta)
    rate = SteadyRate(t0, total=sum(rows.values()))
    try:
        if actors:
            ds = _pipeline(job, todo, rows, fs_in, plan, dim, actors, embedder_cls, preprocessor_cls)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                collector.add(batch)
                rate.update(collector.rows_received)
                run.progress(collector.rows_received, shards_done=len(collector.done))
        written, errored = collector.finish()
    except BaseException:
        run.finish(None)
        raise
    if collector.duplicates:
        log.warning("dropped %d replayed duplicate row(s)", collector.duplicates)
    summary = StageSummary(stage=STAGE, rows_in=sum(rows.values()), rows_out=written, rows_errored=errored,
                           seconds=time.perf_counter() - t0, output=job.output, skipped_shards=len(shards) - len(todo),
                           startup_s=rate.startup_s, steady_rows_per_s=rate.rows_per_s,
                           steady_window_s=rate.window_s, max_error_fraction=job.max_error_fraction)
    run.finish(summary, {"actors": actors, "duplicates_dropped": collector.duplicates, "embedding_dim": dim})
    summary.check()
    return summary


def _bound_inflight(ctx: "ray.data.DataContext", job: EmbedJob, plan: ImagePlan, actors: int) -> None:
    """Make each preprocessed batch its own block, and cap the pixels in flight (this pipeline's context only).

    - Block = one batch. Ray Data gathers a task's outputs into blocks of up to
      ``target_max_block_size`` (128 MiB by default): a whole shard's pixels would become one
      block, so a replica could not start on a shard until all of it was preprocessed, and the data
      in flight would grow with the shard size. A target just under one batch's bytes emits every
      yielded batch as it is (Ray slices a block only beyond 1.5x the target).
    - Cap. Ray Data's default object-store budget is a fraction of the whole object store (gigabytes),
      so while the replicas load and compile, preprocessing would run ahead and fill it: memory
      then grows with the store being read instead of staying flat. The cap,
      ``actors x inflight_batches`` batches, keeps every replica fed (measured: replicas busy 100%
      with 8 a replica on 2 CPU cores) and bounds the pixels in flight whatever the store's size.
    """
    batch_bytes = plan.batch_bytes(job.batch_size)
    ctx.target_max_block_size = max(1, int(0.8 * batch_bytes))
    cap = max(actors * job.inflight_batches * batch_bytes, MIN_INFLIGHT_BYTES)
    limits = ctx.execution_options.resource_limits
    if limits.object_store_memory is None or limits.object_store_memory > cap:  # a user's tighter limit stays
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=cap)


def _pipeline(job: EmbedJob, todo: list[pafs.FileInfo], rows: dict[str, int], fs_in: pafs.FileSystem,
              plan: ImagePlan, dim: int, actors: int, embedder_cls: type[Embedder],
              preprocessor_cls: type[ShardPreprocessor]) -> "ray.data.Dataset":
    """The lazy Ray Data plan: read the unfinished shards, preprocess in CPU actors, embed in the model's pool."""
    import ray

    # Each call of a preprocessing actor reads one shard record batch by record batch and
    # preprocesses each. Ray Data's own Parquet reader is not used: its file-listing tasks ask for a
    # whole CPU each, so a pool holding all but a fraction of the CPUs (the best layout on a CPU-only
    # machine) would leave the listing unschedulable and the job waiting for ever. Resources differ
    # from the replicas' (memory is declared here, not there), so Ray never fuses the two stages.
    paths = [s.path for s in todo if rows[shard_stem(s.path)] > 0]
    ds = ray.data.from_items([{PATH_COLUMN: p} for p in paths], override_num_blocks=len(paths))
    _bound_inflight(ds.context, job, plan, actors)
    ds = ds.map_batches(preprocessor_cls, fn_constructor_kwargs={"plan": plan, "fs": fs_in,
                                                                  "batch_size": job.batch_size},
                        compute=ray.data.ActorPoolStrategy(min_size=1,
                                                           max_size=_preprocess_pool_max(job, actors, len(paths))),
                        batch_size=1, batch_format="numpy", num_cpus=job.preprocess_cpus,
                        memory=preprocess_memory(plan, job.batch_size))
    # Both pools restart a killed actor and re-run the calls it held: Ray Data's actor pools default
    # to max_restarts=-1, max_task_retries=-1, which exactly-once output relies on (with the driver
    # dropping the rows a re-run shard yields again).
    return ds.map_batches(
        embedder_cls, fn_constructor_kwargs={"backbone": job.backbone, "dim": dim,
                                             "torch_threads": job.torch_threads, "batch_size": job.batch_size,
                                             "compile": job.compile},
        compute=ray.data.ActorPoolStrategy(size=actors), batch_size=job.batch_size, batch_format="numpy",
        num_gpus=job.pool.num_gpus or None, num_cpus=job.pool.cpus_per_actor)


def embed_dataset(input: str, output: str, model: str, *, weights: str | None = None, batch_size: int = 64,
                  actors: int = 0, num_gpus: float = 0.0, storage: StorageConfig | None = None,
                  **options: Any) -> StageSummary:
    """Library entry point: embed the cutout store ``input`` into ``output`` with backbone ``model``.

    ``options`` are any other :class:`EmbedJob` setting, flat: a field (``compile``, ``torch_threads``,
    ``overwrite``, ...) or a setting of its sections (``pretrained``, ``input_size``, ``crop_fraction``,
    ``cpus_per_actor``, ...).
    """
    flat = {"input": input, "output": output, "model": model, "weights": weights, "batch_size": batch_size,
            "actors": actors, "num_gpus": float(num_gpus), "storage": storage or StorageConfig(), **options}
    return embed_store(from_dict(EmbedJob, upgrade_keys(EmbedJob, flat, warn=False)))
