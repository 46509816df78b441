"""`galray encode`: turn a cutout store into VQ-VAE code sequences (the prior's training data).

A fixed pool of Ray actors, each holding the VQ-VAE once, takes whole input shards: it reads a
shard, preprocesses every image exactly as `galray embed` does (:mod:`galray.data.preprocess`
at the VQ-VAE's image size; the same preprocessing the VQ-VAE was trained with in
``galray.train``), encodes in batches and writes one output file for that shard. The unit of
work is one shard, written whole (errors first, codes last), so a rerun after a crash redoes only
the shards without an output file and nothing is ever duplicated.

(`galray embed` has the same shape: one actor call per shard. Both read a shard in blocks with
:func:`galray.data.stores.read_blocks`, prepare them with :func:`galray.data.preprocess.prepare_block`
and write with :func:`galray.data.stores.write_shard`.)

**Code store contract** (:mod:`galray.data.stores`): one Parquet file per input shard with
``object_id``, ``codes`` (the h*w code grid in raster order) and ``label`` (the input's
``label_column`` where it has one, else -1); grid, codebook size, checkpoint and weights hash in
the metadata. Rows that cannot be encoded go to ``_errors/<shard>.parquet``; valid plus errored
rows equal the input rows. A shard whose actor dies on each of its 1 + MAX_RETRIES attempts (a new
actor each time, :func:`galray.stages.pool.map_bounded`) is given up: its rows become errors rows
naming the retries, and the other shards finish. A rerun into an output made with other settings or another
checkpoint is refused, naming the field (:mod:`galray.data.provenance`; ``overwrite`` replaces it
entirely); with the same ones, finished shards (output plus error rows equal input rows) are
skipped, so a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from galray import __version__
from galray.config import ConfigError, check
from galray.data.arrow_safety import read_schema
from galray.data.checkpoints import read_checkpoint, weights_hash
from galray.data.preprocess import ImagePlan, PreprocessConfig, plan_for, prepare_block
from galray.data.resume import plan_shard_work
from galray.data.ids import check_ids
from galray.data.limits import DecodeLimits
from galray.data.provenance import claim_output
from galray.data.shards import ID_COLUMN, errors_of
from galray.data.stores import (CODES_STORE_VERSION, codes_table, footer_rows, read_blocks, shard_ids, shard_stem,
                                write_shard)
from galray.session import MAX_RETRIES, gave_up
from galray.stages.pool import ActorPoolConfig, map_bounded, pool_size
from galray.stages.summary import DEFAULT_MAX_ERROR_FRACTION, StageSummary
from galray.storage import StorageConfig, arrow_filesystem, join

if TYPE_CHECKING:
    from galray.models.checkpoint import CheckpointBytes
    from galray.models.vqvae import VQVAE

STAGE = "encode"
BLOCK_ROWS = 1024  # rows read and prepared at a time (a read-ahead thread prepares the next block meanwhile)


@dataclass(frozen=True)
class EncodeJob:
    """`galray encode`: which cutout store, which VQ-VAE, where the code store goes."""

    # Keys of the previous release (flat pool and preprocessing fields), still read.
    RENAMED: ClassVar[dict[str, str]] = {
        "actors": "pool.actors", "num_gpus": "pool.num_gpus", "cpus_per_actor": "pool.cpus_per_actor",
        "crop_fraction": "preprocess.crop_fraction", "stretch": "preprocess.stretch"}
    # Settings that change how fast, not what: a rerun may change them (galray.data.provenance).
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("pool", "batch_size")

    input: str = ""
    """Cutout store URI: local folder, file:// or s3://bucket/prefix."""
    vqvae: str = ""
    """VQ-VAE checkpoint folder (config.json + model.safetensors; a `galray train vqvae` checkpoint), local or s3://."""
    output: str = ""
    """Code store URI; one Parquet file per input shard."""
    batch_size: int = 64
    """Images per forward pass."""
    pool: ActorPoolConfig = field(default_factory=ActorPoolConfig)
    """The fixed pool of encoder actors: how many, GPUs and CPUs each."""
    label_column: str = "label"
    """Input column copied to ``label`` (integers; -1 where the input has none)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """Crop fraction and flux stretch, as in `galray embed` and training."""
    max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION
    """Exit non-zero (after writing everything) when more than this fraction of the rows errored."""
    overwrite: bool = False
    """Replace the output entirely (default: resume it, skipping finished shards, if it was made with the same
    settings, model and weights; with others, refuse naming the field)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for input, checkpoint and output."""

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "an input store URI is required")
        check(bool(self.vqvae), "vqvae", "a VQ-VAE checkpoint folder is required")
        check(bool(self.output), "output", "an output store URI is required")
        check(self.input.rstrip("/") != self.output.rstrip("/"), "output", "must differ from the input store")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(0 <= self.max_error_fraction <= 1, "max_error_fraction", "must be in [0, 1]")


def load_vqvae(checkpoint: "CheckpointBytes") -> "VQVAE":
    """The VQ-VAE of a checkpoint, in eval mode (safetensors: no pickle, no code runs); another
    model's checkpoint fails naming the ``vqvae`` field."""
    from galray.models.checkpoint import load_model
    from galray.models.vqvae import VQVAE

    try:
        return load_model(VQVAE, checkpoint).eval()
    except ValueError as err:
        raise ConfigError("vqvae", str(err)) from None


class ShardEncoder:
    """Actor: holds the VQ-VAE; ``encode_shard(path)`` writes one shard's codes (and errors)."""

    def __init__(self, config_json: bytes, weights: bytes, plan: ImagePlan, job: EncodeJob, provenance: dict[str, Any]):
        import torch

        from galray.models.checkpoint import CheckpointBytes

        self.device = torch.device("cuda" if job.pool.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.model = load_vqvae(CheckpointBytes(config_json, weights)).to(self.device)
        self.plan, self.job, self.provenance = plan, job, provenance
        self.fs_in, _ = arrow_filesystem(job.input, job.storage)
        self.fs_out, self.out_root = arrow_filesystem(job.output, job.storage)

    def encode_pixels(self, pixels: np.ndarray, layout: Literal["NCHW", "NHWC"] = "NCHW") -> np.ndarray:
        """(B, C, S, S) (or (B, S, S, C), layout NHWC) uint8 or float [0, 1] pixels -> (B, h*w) int64 codes."""
        import torch

        from galray.models.vqvae import pixels_to_model

        with warnings.catch_warnings():  # a zero-copy view of the Parquet read is read-only; nothing writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.from_numpy(pixels)
        if layout == "NHWC":
            x = x.permute(0, 3, 1, 2)
        x = pixels_to_model(x.contiguous().to(self.device))
        with torch.inference_mode():
            idx = self.model.encode_indices(x)  # (B, h, w)
        return idx.reshape(idx.shape[0], -1).cpu().numpy()

    def _labels(self, table: pa.Table) -> tuple[np.ndarray, list[str | None]]:
        """A block's labels (-1 for none) and a reason for each row whose label is not an integer."""
        labels = np.full(table.num_rows, -1, np.int64)
        reasons: list[str | None] = [None] * table.num_rows
        if self.job.label_column in table.column_names:
            for i, v in enumerate(table.column(self.job.label_column).to_pylist()):
                try:
                    labels[i] = -1 if v is None else int(v)
                except (TypeError, ValueError):
                    reasons[i] = f"label {v!r} is not an integer"
        return labels, reasons

    def encode_shard(self, path: str) -> tuple[int, int]:
        """Encode one shard, block by block (:func:`galray.data.stores.read_blocks`, the preparation
        `galray embed` uses), and write its codes and errors; returns (rows written, rows errored)."""
        job, plan = self.job, self.plan
        source = join(job.input, path.rsplit("/", 1)[-1])
        schema = read_schema(self.fs_in, path, source)  # the allow-list again: the file may have changed
        cols = [ID_COLUMN, plan.column] + ([job.label_column] if job.label_column in schema.names else [])
        n_codes = self.model.cfg.latent_size ** 2
        ids, codes, labels, reasons = [], [], [], []
        for block, prepared in read_blocks(self.fs_in, path, cols, BLOCK_ROWS,
                                           then=lambda t: (t, prepare_block(t, plan)), source=source):
            block_labels, label_errors = self._labels(block)
            errors = pc.coalesce(pa.array(label_errors, pa.string()), prepared.errors)
            ok = pc.is_null(errors).to_numpy(zero_copy_only=False)
            block_codes = np.zeros((block.num_rows, n_codes), np.int64)
            for start in range(0, block.num_rows, job.batch_size):  # forward passes of batch_size rows
                sel = np.flatnonzero(ok[start:start + job.batch_size]) + start
                if len(sel):
                    block_codes[sel] = self.encode_pixels(prepared.pixels[sel], prepared.layout)
            ids.append(block.column(ID_COLUMN))
            codes.append(block_codes)
            labels.append(block_labels)
            reasons.append(errors)
        # Missing, duplicate, invalid or overlong ids are errors rows as they are read, not a late failure.
        id_list, problems = check_ids(pa.chunked_array([c for col in ids for c in col.chunks], ids[0].type)
                                      if ids else pa.array([], pa.string()), DecodeLimits())
        id_reasons = np.full(len(id_list), None, dtype=object)
        id_reasons[list(problems)] = list(problems.values())
        id_col = pa.array(id_list, pa.string())
        errors = pc.coalesce(pa.array(id_reasons, pa.string()), pa.chunked_array(reasons, pa.string()).combine_chunks())
        bad = pc.is_valid(errors)
        keep = np.flatnonzero(~bad.to_numpy(zero_copy_only=False))
        all_codes = np.concatenate(codes) if codes else np.zeros((0, n_codes), np.int64)
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        meta = {**self.provenance, "source_file": source, "rows": len(keep)}
        write_shard(codes_table(id_col.take(keep), all_codes[keep], all_labels[keep], self.model.cfg.codebook_size,
                                meta),
                    errors_of(pc.filter(id_col, bad), pc.filter(errors, bad), STAGE, source), self.fs_out,
                    self.out_root, f"{shard_stem(path)}.parquet")
        return len(keep), len(errors) - len(keep)


def write_given_up_codes(path: str, job: EncodeJob, fs_in: pafs.FileSystem, fs_out: pafs.FileSystem, out_root: str,
                         codebook_size: int, n_codes: int, provenance: dict[str, Any]) -> int:
    """Write a shard whose actor died on every attempt as errors rows only (on the driver, which reads
    its ids alone); returns its rows."""
    source = join(job.input, path.rsplit("/", 1)[-1])
    ids = pa.array(shard_ids(fs_in, path, source), pa.string())
    reasons = pa.array([gave_up("actor encoding this shard")] * len(ids), pa.string())
    empty = codes_table(pa.array([], pa.string()), np.zeros((0, n_codes), np.int64), np.zeros(0, np.int64),
                        codebook_size, {**provenance, "source_file": source, "rows": 0})
    write_shard(empty, errors_of(ids, reasons, STAGE, source), fs_out, out_root, f"{shard_stem(path)}.parquet")
    return len(ids)


def encode_store(job: EncodeJob) -> StageSummary:
    """Encode every unfinished shard of ``job.input`` into ``job.output``; returns the stage summary."""
    import ray

    from galray.session import ensure_ray

    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved())  # actors don't see the driver's env
    work = plan_shard_work(job.input, job.output, job.storage, job.overwrite)
    fs_in, shards, todo = work.fs_in, work.shards, work.todo
    checkpoint = read_checkpoint(job.vqvae, job.storage, "a VQ-VAE checkpoint")
    cfg = load_vqvae(checkpoint).cfg  # a bad checkpoint fails here, before any actor starts
    plan = plan_for(read_schema(fs_in, shards[0].path, join(job.input, shards[0].base_name)), cfg.image_size,
                    cfg.in_channels, job.preprocess)
    provenance = {"codes_store_version": CODES_STORE_VERSION, "producer": "galray encode",
                  "galray_version": __version__, "vqvae": job.vqvae,
                  "weights": weights_hash(checkpoint.weights), "grid": [cfg.latent_size] * 2,
                  "codebook_size": cfg.codebook_size, "image_size": cfg.image_size,
                  "label_column": job.label_column, "preprocessing": plan.to_json(), "input": job.input}

    rows_in = sum(footer_rows(fs_in, [s.path for s in todo]))
    # Another checkpoint or settings into this output: refused, naming the field (overwrite: replaced).
    claim_output(job, STAGE, made_with={"weights": provenance["weights"]})
    written = errored = 0
    if todo:
        ensure_ray()
        n = min(pool_size(job.pool, field_prefix="pool."), len(todo))
        refs = ray.put(checkpoint.config_json), ray.put(checkpoint.weights)
        # The model travels as bytes through the object store, so a local checkpoint also works on a
        # cluster. A crashed actor is replaced by a new one (Ray cannot safely restart actors built from
        # object-store arguments, ray#53727) and its shard tried again, MAX_RETRIES times at most.
        cls = ray.remote(ShardEncoder).options(**job.pool.ray_options())
        results, given_up = map_bounded(lambda: cls.remote(refs[0], refs[1], plan, job, provenance), n,
                                        [s.path for s in todo], lambda a, path: a.encode_shard.remote(path),
                                        MAX_RETRIES)
        written, errored = sum(ok for ok, _ in results), sum(err for _, err in results)
        errored += sum(write_given_up_codes(path, job, fs_in, work.fs_out, work.out_root, cfg.codebook_size,
                                            cfg.latent_size ** 2, provenance) for path in given_up)
    summary = StageSummary(stage=STAGE, rows_in=rows_in, rows_out=written, rows_errored=errored,
                           seconds=time.perf_counter() - t0, output=job.output, skipped_shards=len(shards) - len(todo),
                           max_error_fraction=job.max_error_fraction)
    summary.check()
    return summary
