"""`galray embed`: stream a cutout store through a pool of model replicas into an embedding store.

The pipeline (Ray Data; nothing is held in memory whole)::

    from_items(unfinished shard paths)
      -> map_batches(ShardEmbedder, actor pool)   a fixed pool; each actor loads the model once, and
                                                  each call takes one input shard and does all of it:
         read in blocks of block_rows rows (the next block read and prepared in a thread)
         -> prepare (data.preprocess.prepare_block: decode, stretch, crop + resize; stored uint8
            tensors already at the model's size pass through as a zero-copy view)
         -> forward passes of batch_size rows (inference_mode; bf16 autocast + channels_last on GPU)
         -> write the shard's output file (and its errors)
      -> driver: one summary row per shard (stem, rows out, rows errored)

Why one fused call per shard (notes/ceiling.md, measured with a backbone that costs nothing, the
GPU-node case): Ray Data costs 20-35 ms of CPU per block it moves between processes, and pixels
and embeddings crossing the object store cost more per row. The previous layout (preprocessing
actors -> 64-row blocks -> replicas -> every row to the driver, which wrote the shards) spent
~0.94 ms of CPU a row on a 64 px store; fused, no pixel leaves the replica and the driver sees one
row per shard: ~0.2 ms a row, half of it the Parquet decode. `galray encode` works the same way.

**Embedding store contract.** A folder (local or ``s3://``) of Parquet files, one per input shard
and named like it (``shard-00042.parquet`` for the input's ``shard-00042.parquet``), with columns

- ``object_id``: string, the input row's id, sorted within a file;
- ``embedding``: ``fixed_size_list<float32>[D]``;

and provenance in the Parquet schema metadata under ``galray`` (JSON): model name, weights hash
(``sha256:...`` of the weights file, ``timm-pretrained:<source>`` or ``random-init:seed0``),
preprocessing, galray version, embedding dim, source shard. Rows that could not be embedded go to
``_errors/<shard stem>.parquet`` (``object_id, stage, reason, source_file``): images that fail to
decode or preprocess, and ids that are missing, invalid or a repeat of an earlier row's. Valid plus
errored rows equal the input rows of every shard.

**Exactly once, resumable.** The unit of work is one input shard -> one output file, computed and
written by one actor call:

1. Before starting, the output's record must match this run's settings, model and weights
   (:func:`galray.data.provenance.claim_output`: otherwise refused, naming the field;
   ``overwrite`` replaces the output entirely), and shards whose output rows plus error rows equal
   their input rows are skipped (:func:`galray.data.resume.finished`: a missing, short or
   unreadable output is recomputed). Output files are only ever written whole: errors first, then
   the embeddings, each atomically (temp file + rename locally; an S3 PUT is atomic), at the end of
   the call that computed all of the shard's rows, so an interrupted run resumes exactly where it
   stopped. Input shards are opened through the Parquet allow-list (:mod:`galray.data.arrow_safety`),
   and ids are checked as they are read (:func:`galray.data.ids.check_ids`).
2. A killed replica loses no rows and duplicates none: Ray restarts the actor and re-runs the call
   it held, which recomputes the shard from its start and writes the same file whole. No row ever
   leaves an actor, so nothing can be replayed row by row; the driver counts each shard once.
   Retries are bounded where the work happens: a replica asks the job's attempt counter
   (:mod:`galray.stages.shard_attempts`) before it reads a shard, and a shard already started
   1 + :data:`galray.session.MAX_RETRIES` (4) times (it killed its replica each time, e.g. for
   memory) has its rows written as errors rows naming the retries (:func:`write_given_up_embeddings`,
   which reads its ids alone) instead of being read again; the other shards finish, and the job's exit
   follows ``max_error_fraction``. Ray itself retries a call without end (``max_task_retries=-1``):
   its own bound also counts the calls that never reached a replica, which a lost node's callers use
   up in about a second. An exception in a call is not retried: it fails the job at the end, naming
   the shard, after every other shard is written (a rerun redoes it).
3. The driver checks that every scheduled shard came back, and the summary that
   valid plus errored rows equal the input rows from the Parquet footers.

Memory stays flat: a replica holds two blocks of pixels (read-ahead) and one shard's embeddings
(1,000 rows x 640 floats = 2.5 MB), the driver one summary row per shard.

This module imports Ray and torch only inside functions (:class:`ShardEmbedder` runs in the actors).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from galray import __version__
from galray.config import check, from_dict, upgrade_keys
from galray.data.arrow_safety import read_schema
from galray.data.ids import check_ids
from galray.data.limits import DecodeLimits
from galray.data.preprocess import ImagePlan, PreprocessConfig, PreparedBlock, plan_for, prepare_block
from galray.data.provenance import claim_output
from galray.data.resume import plan_shard_work
from galray.data.shards import ID_COLUMN, errors_of
from galray.data.stores import (EMBED_STORE_VERSION, EMBED_WRITE_OPTIONS, embedding_table, footer_rows, read_blocks,
                                shard_ids, shard_stem, write_shard)
from galray.models.backbone_config import BackboneConfig
from galray.stages.pool import ActorPoolConfig, pool_size
from galray.stages.summary import DEFAULT_MAX_ERROR_FRACTION, StageSummary, SteadyRate
from galray.storage import StorageConfig, arrow_filesystem, join
from galray.tracking import StageRun, TrackingConfig

if TYPE_CHECKING:
    import ray.data

    from galray.models.backbones import Backbone

log = logging.getLogger(__name__)

STAGE = "embed"
PATH_COLUMN = "path"  # the input shard of each call
STEM, ROWS_OUT, ROWS_ERRORED, FAILED = "stem", "rows_out", "rows_errored", "failed"  # the summary row of each shard


@dataclass(frozen=True)
class EmbedJob:
    """`galray embed`: which store to embed, with which backbone, on what resources."""

    # Keys of the previous release (flat backbone, pool and preprocessing fields), still read.
    RENAMED: ClassVar[dict[str, str]] = {
        "model": "backbone.name", "weights": "backbone.weights", "pretrained": "backbone.pretrained",
        "input_size": "backbone.input_size", "normalization": "backbone.normalization",
        "actors": "pool.actors", "num_gpus": "pool.num_gpus", "cpus_per_actor": "pool.cpus_per_actor",
        "crop_fraction": "preprocess.crop_fraction", "stretch": "preprocess.stretch"}
    # Settings that change how fast, not what: a rerun may change them (galray.data.provenance). The
    # previous release's preprocessing-pool settings stay listed, so its outputs still resume.
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("pool", "batch_size", "block_rows", "torch_threads", "compile",
                                           "inflight_batches", "preprocess_cpus", "preprocess_actors")

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
    """Images per forward pass."""
    block_rows: int = 1024
    """Rows a replica reads, prepares and hands to the model at a time (cut into forward passes of
    batch_size): large enough that per-block costs vanish, small enough that memory stays flat."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The fixed pool of model replicas: how many, GPUs and CPUs each."""
    torch_threads: int | None = None
    """torch intra-op threads in each actor on CPU; default: Ray's OMP_NUM_THREADS (the actor's CPUs)."""
    compile: bool = False
    """torch.compile the backbone in each actor: faster forward passes (convnext_nano on CPU: ~1.3x) for a one-off
    compile of 15-35 s per actor; worth it for large stores. Needs a C++ compiler on CPU."""
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
        check(self.block_rows >= 1, "block_rows", "must be at least 1")
        check(0 <= self.max_error_fraction <= 1, "max_error_fraction", "must be in [0, 1]")


# --- the replicas (actors) ------------------------------------------------------------------------

class ShardEmbedder:
    """Callable class for ``map_batches``: loads the backbone once per actor; each call embeds whole
    input shards (one per call) and writes their outputs, returning one summary row per shard.

    Runs on CUDA when the actor sees a GPU (bf16 autocast, channels_last), else on CPU in float32;
    see :class:`galray.models.inference.InferenceModel`. :meth:`embed_pixels` is the one forward
    step (subclasses instrument or extend it: test-time augmentation, fault tests).
    """

    def __init__(self, job: EmbedJob, plan: ImagePlan, dim: int, provenance: dict[str, Any], attempts: Any):
        import torch

        from galray.models.backbones import create_backbone
        from galray.models.inference import InferenceModel

        if job.torch_threads:
            torch.set_num_threads(job.torch_threads)
        built = create_backbone(job.backbone)
        self.runner = InferenceModel(built.model, built.preprocessing, job.batch_size, compile=job.compile)
        self.job, self.plan, self.dim, self.provenance = job, plan, dim, provenance
        self.attempts = attempts  # the job's ShardAttempts actor (galray.stages.shard_attempts)
        self.fs_in, _ = arrow_filesystem(job.input, job.storage)
        self.fs_out, self.out_root = arrow_filesystem(job.output, job.storage)

    def embed_pixels(self, pixels: np.ndarray, layout: Literal["NCHW", "NHWC"]) -> np.ndarray:
        """``(B, C, S, S)`` (or ``(B, S, S, C)``, layout NHWC) uint8 or float [0, 1] pixels -> ``(B, D)`` float32."""
        import torch

        with warnings.catch_warnings():  # a zero-copy view of the Parquet read is read-only; nothing writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(pixels)
        return self.runner(x, layout).numpy()

    def _embed_block(self, prepared: PreparedBlock) -> np.ndarray:
        """(N, D) embeddings of a block; NaN for rows that failed to prepare (never written)."""
        ok = pc.is_null(prepared.errors).to_numpy(zero_copy_only=False)
        if ok.all():
            return self.embed_pixels(prepared.pixels, prepared.layout)
        emb = np.full((len(ok), self.dim), np.nan, np.float32)
        if ok.any():
            emb[ok] = self.embed_pixels(prepared.pixels[ok], prepared.layout)
        return emb

    def embed_shard(self, path: str) -> tuple[int, int]:
        """Embed one input shard and write its output (and errors); returns (rows written, rows errored)."""
        plan = self.plan
        ids, embs, reasons = [], [], []
        source = join(self.job.input, path.rsplit("/", 1)[-1])
        for block, prepared in read_blocks(self.fs_in, path, [ID_COLUMN, plan.column], self.job.block_rows,
                                           then=lambda t: (t, prepare_block(t, plan)), source=source):
            ids.append(block.column(ID_COLUMN))
            embs.append(self._embed_block(prepared))
            reasons.append(prepared.errors)
        # Missing, duplicate, invalid or overlong ids are errors rows (the first copy of an id is kept).
        id_list, problems = check_ids(pa.chunked_array([c for col in ids for c in col.chunks], ids[0].type)
                                      if ids else pa.array([], pa.string()), DecodeLimits())
        id_reasons = np.full(len(id_list), None, dtype=object)
        id_reasons[list(problems)] = list(problems.values())
        emb = np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32)
        errors = pc.coalesce(pa.array(id_reasons, pa.string()), pa.chunked_array(reasons, pa.string()).combine_chunks())
        return write_embeddings(pa.array(id_list, pa.string()), emb, errors, path, self.job.input, self.fs_out,
                                self.out_root, self.provenance)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from galray.session import MAX_RETRIES
        from galray.stages.shard_attempts import attempt_number

        stems, out, err, failed = [], [], [], []
        for path in map(str, batch[PATH_COLUMN]):
            # An exception goes to the driver in the summary row: the job fails at the end, naming it.
            try:
                if attempt_number(self.attempts, shard_stem(path)) > 1 + MAX_RETRIES:
                    written, errored, failure = 0, write_given_up_embeddings(
                        path, self.job, self.fs_in, self.fs_out, self.out_root, self.provenance, self.dim), ""
                else:
                    written, errored, failure = *self.embed_shard(path), ""
            except Exception as exc:
                log.exception("embedding %s failed", path)
                written, errored, failure = 0, 0, f"{type(exc).__name__}: {exc}"
            stems.append(shard_stem(path))
            out.append(written)
            err.append(errored)
            failed.append(failure)
        return {STEM: np.array(stems, dtype=object), ROWS_OUT: np.array(out, np.int64),
                ROWS_ERRORED: np.array(err, np.int64), FAILED: np.array(failed, dtype=object)}


def write_embeddings(ids: pa.Array | pa.ChunkedArray, emb_ND: np.ndarray, errors: pa.Array, path: str, input_uri: str,
                     fs: pafs.FileSystem, root: str, provenance: dict[str, Any]) -> tuple[int, int]:
    """Write one shard's embeddings (rows whose ``errors`` entry is null) and its errors (the others),
    Arrow-native (:func:`galray.data.stores.write_shard`); returns (rows written, rows errored)."""
    source = join(input_uri, path.rsplit("/", 1)[-1])
    bad = pc.is_valid(errors)
    n_bad = int(pc.sum(bad).as_py() or 0)
    if n_bad:
        good = pc.invert(bad)
        failed = errors_of(pc.filter(ids, bad), pc.filter(errors, bad), STAGE, source)
        ids, emb_ND = pc.filter(ids, good), emb_ND[good.to_numpy(zero_copy_only=False)]
    else:
        failed = pa.table({})
    meta = {**provenance, "source_file": source, "rows": len(ids)}
    write_shard(embedding_table(ids, emb_ND, meta), failed, fs, root, f"{shard_stem(path)}.parquet",
                **EMBED_WRITE_OPTIONS)
    return len(ids), n_bad


def write_given_up_embeddings(path: str, job: EmbedJob, fs_in: pafs.FileSystem, fs_out: pafs.FileSystem,
                              out_root: str, meta: dict[str, Any], dim: int) -> int:
    """Write a shard whose replica died on every attempt as errors rows only (reading its ids alone);
    returns its rows."""
    from galray.session import gave_up

    source = join(job.input, path.rsplit("/", 1)[-1])
    ids = pa.array(shard_ids(fs_in, path, source), pa.string())
    reasons = pa.array([gave_up("model replica embedding this shard")] * len(ids), pa.string())
    return write_embeddings(ids, np.zeros((len(ids), dim), np.float32), reasons, path, job.input, fs_out, out_root,
                            meta)[1]


# --- the job --------------------------------------------------------------------------------------

def provenance(job: EmbedJob, backbone: "Backbone", dim: int, plan: ImagePlan) -> dict[str, Any]:
    return {"embed_store_version": EMBED_STORE_VERSION, "producer": "galray embed", "galray_version": __version__,
            "model": job.backbone.name, "weights": backbone.weights_id, "embedding_dim": dim,
            "preprocessing": {**plan.to_json(), "model_input": backbone.preprocessing.to_json()},
            "input": job.input}


def embed_store(job: EmbedJob, embedder_cls: type[ShardEmbedder] = ShardEmbedder) -> StageSummary:
    """Embed every unfinished shard of ``job.input`` into ``job.output``; returns the stage summary.

    ``embedder_cls`` may be a subclass of :class:`ShardEmbedder` (test-time augmentation, instrumentation).
    """
    from galray.models.backbones import create_backbone, embedding_dim
    from galray.session import ensure_ray

    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved())  # workers don't see the driver's env
    work = plan_shard_work(job.input, job.output, job.storage, job.overwrite)
    fs_in, fs_out, out_root, shards, todo = work.fs_in, work.fs_out, work.out_root, work.shards, work.todo
    rows = dict(zip((s.path for s in todo), footer_rows(fs_in, [s.path for s in todo])))
    actors = 0
    if any(rows.values()):
        ensure_ray()
        actors = pool_size(job.pool, cpu_share=1.0, field_prefix="pool.")  # no GPUs: fail now

    # Build the backbone here once: a bad name, an unsafe or mismatched weights file, or a missing
    # checkpoint fails now, before the actors start; it also gives D for the output schema.
    backbone = create_backbone(job.backbone)
    dim = embedding_dim(backbone)
    prep = backbone.preprocessing
    plan = plan_for(read_schema(fs_in, shards[0].path, join(job.input, shards[0].base_name)), prep.input_size,
                    prep.in_chans, job.preprocess)
    meta = provenance(job, backbone, dim, plan)
    # Another model, weights or settings into this output: refused, naming the field (overwrite: replaced).
    claim_output(job, STAGE, made_with={"weights": backbone.weights_id})
    del backbone
    run = StageRun(job.tracking, STAGE, job, job.output)
    rate = SteadyRate(t0, total=sum(rows.values()))
    done: set[str] = set()
    failures: dict[str, str] = {}
    written = errored = replayed = 0
    try:
        for path in [p for p, n in rows.items() if n == 0]:  # empty shards get an (empty) output too, so reruns skip them
            write_embeddings(pa.array([], pa.string()), np.zeros((0, dim), np.float32), pa.array([], pa.string()),
                             path, job.input, fs_out, out_root, meta)
            done.add(shard_stem(path))
        if actors:
            ds = _pipeline(job, [p for p, n in rows.items() if n > 0], plan, dim, meta, actors, embedder_cls)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for stem, out, err, failure in zip(batch[STEM], batch[ROWS_OUT], batch[ROWS_ERRORED], batch[FAILED]):
                    if stem in done:  # a re-run call's row (Ray Data emits a call's output once; never count twice)
                        replayed += 1
                        continue
                    done.add(stem)
                    if failure:
                        failures[stem] = failure
                    written, errored = written + int(out), errored + int(err)
                rate.update(written + errored)
                run.progress(written + errored, shards_done=len(done))
        missing = [shard_stem(p) for p in rows if shard_stem(p) not in done]
        if missing:  # never expected (Ray retries every call); a rerun redoes them
            raise RuntimeError(f"{len(missing)} shard(s) did not come back, nothing counted for them (a rerun "
                               f"redoes them): {', '.join(missing[:5])}")
        if failures:
            stem, failure = next(iter(failures.items()))
            raise RuntimeError(f"{len(failures)} shard(s) failed, nothing written for them (a rerun redoes them); "
                               f"{stem}: {failure}")
    except BaseException:
        run.finish(None)
        raise
    summary = StageSummary(stage=STAGE, rows_in=sum(rows.values()), rows_out=written, rows_errored=errored,
                           seconds=time.perf_counter() - t0, output=job.output, skipped_shards=len(shards) - len(todo),
                           startup_s=rate.startup_s, steady_rows_per_s=rate.rows_per_s,
                           steady_window_s=rate.window_s, max_error_fraction=job.max_error_fraction)
    run.finish(summary, {"actors": actors, "replayed_shards": replayed, "embedding_dim": dim})
    summary.check()
    return summary


def _pipeline(job: EmbedJob, paths: list[str], plan: ImagePlan, dim: int, meta: dict[str, Any], actors: int,
              embedder_cls: type[ShardEmbedder]) -> "ray.data.Dataset":
    """The lazy Ray Data plan: the shard paths, one call of the replicas' pool per shard."""
    import ray

    from galray.stages.shard_attempts import shard_attempts_counter

    # Ray Data's own Parquet reader is not used: its read tasks ask for a whole CPU each, so a pool
    # holding every CPU (the best layout when the replicas read their own shards) would leave them
    # unschedulable and the job waiting for ever; and the unit of output is the input shard.
    ds = ray.data.from_items([{PATH_COLUMN: p} for p in paths], override_num_blocks=len(paths))
    # The pool restarts a killed actor (max_restarts=-1: it stays full) and Ray re-runs the call it held
    # (a re-run call rewrites its shard's file whole) without end; the replicas bound the attempts that
    # started (ShardAttempts), so a shard that kills its replica every time ends as errors rows.
    attempts = shard_attempts_counter()
    # Hand out the first shard only once every replica is up (Ray Data's default starts with the first
    # ready one): otherwise the replicas that load first take all of a small store, and on a cluster the
    # nodes whose replicas start slower get none. pool_size checked the cluster can hold them all.
    ds.context.wait_for_min_actors_s = max(int(job.pool.wait_s), 1)
    with warnings.catch_warnings():  # Ray 2.60 names no parameter for these; ray_remote_args is the way
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        return ds.map_batches(
            embedder_cls, fn_constructor_kwargs={"job": job, "plan": plan, "dim": dim, "provenance": meta,
                                                 "attempts": attempts},
            compute=ray.data.ActorPoolStrategy(size=actors), batch_size=1, batch_format="numpy",
            max_restarts=-1, max_task_retries=-1, **job.pool.ray_options())


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
