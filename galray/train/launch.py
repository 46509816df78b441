"""`fit(job)`: train the SAE, the VQ-VAE or the prior data-parallel with Ray Train, record it in MLflow.

On the driver, ``fit``

1. resolves the storage and tracking settings (workers never see variables set here after Ray
   started, so everything they need travels in the config);
2. builds the Ray datasets: the input store, split into train and validation by
   ``crc32(object_id)`` (the same object is always on the same side, whatever the shard layout),
   and turned into tensors: ``x`` (SAE), ``pixels`` (VQ-VAE, the same preprocessing as
   `galray encode`), ``codes`` + ``label`` (prior);
3. checks the data against the model config, and for the SAE fits the normalisation and the
   geometric-median b_pre once on the first training rows, so every rank starts identical;
4. opens the MLflow run, or finds it again by its ``galray.run_key`` tag when the same run name is
   rerun, and logs the flattened config (plus the resolved model and loop configs) as params;
5. runs Ray Train's ``TorchTrainer`` (V2 API) with ``RunConfig(name, storage_path)``: reusing
   that pair resumes from the latest checkpoint in storage (``ray.train.get_checkpoint()`` in the
   workers), and ``FailureConfig(max_failures)`` restarts a failed worker group from it;
6. logs the final checkpoint and ``config.json`` as artifacts, the figures (loss curves from
   the run's metric history, so they span restarts; codebook usage; SAE feature density),
   registers the model and closes the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galray.config import ConfigError, dumps, flatten, to_dict
from galray.data.cutouts import CutoutError
from galray.data.preprocess import ImagePlan, plan_for, prepare_image
from galray.data.shards import ID_COLUMN, read_metadata
from galray.data.stores import CODES_COLUMN, EMBEDDING_COLUMN, LABEL_COLUMN, list_column_values
from galray.storage import StorageConfig, check_access, join
from galray.tracking import Tracker, TrackingConfig
from galray.train.config import TrainJob

RUN_KEY_TAG = "galray.run_key"
TEST_ENV_PREFIX = "GALRAY_TEST_"
LOSS_KEYS = {"sae": ("loss", "fvu", "aux_loss", "l0"), "vqvae": ("loss", "recon_loss", "vq_loss", "perplexity",
                                                                  "utilisation"),
             "prior": ("loss", "acc")}


# --- the validation split --------------------------------------------------------------------------

def is_val(object_ids: Sequence[Any], fraction: float) -> np.ndarray:
    """(N,) bool: True for objects in the validation split, ``crc32(object_id) < fraction * 2**32``."""
    if fraction <= 0:
        return np.zeros(len(object_ids), dtype=bool)
    h = np.fromiter((zlib.crc32(str(i).encode()) for i in object_ids), dtype=np.uint64, count=len(object_ids))
    return h < np.uint64(int(fraction * 2**32))


def _keep(ids: Sequence[Any], split: str, fraction: float) -> np.ndarray:
    val = is_val(ids, fraction)
    return val if split == "val" else ~val


# --- Ray Data batch functions (run in Ray Data tasks) ----------------------------------------------

def sae_batch(table: pa.Table, split: str, val_fraction: float) -> dict[str, np.ndarray]:
    """Embedding store rows of one split -> {"x": (N, D) float32}."""
    keep = _keep(table.column(ID_COLUMN).to_pylist(), split, val_fraction)
    return {"x": np.ascontiguousarray(list_column_values(table.column(EMBEDDING_COLUMN))[keep], dtype=np.float32)}


def prior_batch(table: pa.Table, split: str, val_fraction: float, num_classes: int) -> dict[str, np.ndarray]:
    """Code store rows -> {"codes": (N, T) int64, "label": (N,) int64}; labels < 0 become the null class."""
    keep = _keep(table.column(ID_COLUMN).to_pylist(), split, val_fraction)
    codes = list_column_values(table.column(CODES_COLUMN))[keep].astype(np.int64)
    if LABEL_COLUMN in table.column_names:
        labels = np.asarray(table.column(LABEL_COLUMN).to_numpy(zero_copy_only=False), dtype=np.int64)[keep]
    else:
        labels = np.full(len(codes), -1, np.int64)
    return {"codes": codes, "label": np.where(labels < 0, num_classes, labels)}


def vqvae_batch(batch: dict[str, np.ndarray], split: str, val_fraction: float, plan: ImagePlan
                ) -> dict[str, np.ndarray]:
    """Cutout rows -> {"pixels": (N, C, S, S)}: `galray embed`'s preprocessing at the VQ-VAE's size.
    Rows whose image cannot be used (CutoutError) are left out."""

    keep = np.flatnonzero(_keep(list(batch[ID_COLUMN]), split, val_fraction))
    images = batch[plan.column]
    out = []
    for i in keep:
        try:
            out.append(prepare_image(images[i], plan))
        except CutoutError:
            pass
    shape = (0, plan.in_chans, plan.size, plan.size)
    return {"pixels": np.stack(out) if out else np.zeros(shape, plan.pixel_dtype)}


# --- driver-side preparation per kind --------------------------------------------------------------

def _shards(job: TrainJob, storage: StorageConfig) -> tuple[pafs.FileSystem, list[str]]:
    from galray.data.store import shard_paths

    return shard_paths(job.data, storage)


def _sae_init(job: TrainJob, storage: StorageConfig) -> dict[str, Any]:
    """d_in and the normalisation + b_pre fitted on the first ``sae.norm_samples`` training rows."""
    import torch

    from galray.models.sae import SparseAutoencoder

    fs, paths = _shards(job, storage)
    field_type = pq.read_schema(paths[0], filesystem=fs).field(EMBEDDING_COLUMN).type
    if not pa.types.is_fixed_size_list(field_type):
        raise ConfigError("data", f"{job.data}: column {EMBEDDING_COLUMN!r} is {field_type}, expected a fixed-size "
                                  f"list of float32 (an embedding store from `galray embed`)")
    d_in = field_type.list_size
    parts, n = [], 0
    for path in paths:
        table = pq.read_table(path, filesystem=fs, columns=[ID_COLUMN, EMBEDDING_COLUMN])
        x = sae_batch(table, "train", job.val_fraction)["x"]
        parts.append(x)
        n += len(x)
        if n >= job.sae.norm_samples:
            break
    if n < 2:
        raise ConfigError("data", f"{job.data} has fewer than 2 training rows")
    sample = torch.from_numpy(np.concatenate(parts)[: job.sae.norm_samples])
    model = SparseAutoencoder(job.sae.model_config(d_in))
    model.fit_normalization(sample)
    model.init_from_sample(sample)
    names = ("norm_mean_D", "norm_std_D", "norm_fitted", "b_pre_D")
    state = model.state_dict()
    return {"d_in": d_in, "sae_init": {k: state[k].numpy() for k in names}}


def _image_plan(job: TrainJob, storage: StorageConfig) -> ImagePlan:
    fs, paths = _shards(job, storage)
    m = job.vqvae.model
    return plan_for(pq.read_schema(paths[0], filesystem=fs), m.image_size, m.in_channels)


def _check_codes(job: TrainJob, storage: StorageConfig) -> None:
    """The code store must match the prior: grid length, codebook size, labels in range."""
    fs, paths = _shards(job, storage)
    schema = pq.read_schema(paths[0], filesystem=fs)
    if CODES_COLUMN not in schema.names:
        raise ConfigError("data", f"{job.data} has no {CODES_COLUMN!r} column: make a code store with `galray encode`")
    meta = read_metadata(schema)
    m = job.prior.model
    length = schema.field(CODES_COLUMN).type.list_size
    if length != m.seq_len:
        raise ConfigError("prior.model.seq_len", f"is {m.seq_len} but the code store has {length} codes per object "
                                                 f"(grid {meta.get('grid')})")
    if "codebook_size" in meta and int(meta["codebook_size"]) != m.vocab_size:
        raise ConfigError("prior.model.vocab_size", f"is {m.vocab_size} but the codes come from a codebook of "
                                                    f"{meta['codebook_size']}")
    if LABEL_COLUMN in schema.names:
        top = max((pq.read_table(p, filesystem=fs, columns=[LABEL_COLUMN]).column(LABEL_COLUMN).to_numpy().max(
            initial=-1) for p in paths), default=-1)
        if top >= m.num_classes:
            raise ConfigError("prior.model.num_classes", f"is {m.num_classes} but the store has label {top}")


@contextlib.contextmanager
def _quiet_data() -> Iterator[None]:
    """Datasets copy the current DataContext when created: these get no progress bars (their
    executions run inside the training workers, where bars would interleave with the logs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def build_datasets(job: TrainJob, storage: StorageConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """({"train": Dataset, "val": Dataset}, extras for the workers)."""
    with _quiet_data():
        return _build_datasets(job, storage)


def _build_datasets(job: TrainJob, storage: StorageConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    from galray.data.store import read_store

    extras: dict[str, Any] = {}
    common = dict(batch_format="pyarrow", zero_copy_batch=True)
    out = {}
    if job.kind == "sae":
        extras = _sae_init(job, storage)
        ds = read_store(job.data, storage, columns=[ID_COLUMN, EMBEDDING_COLUMN])
        for split in ("train", "val"):
            out[split] = ds.map_batches(sae_batch, fn_kwargs={"split": split, "val_fraction": job.val_fraction},
                                        **common)
    elif job.kind == "prior":
        _check_codes(job, storage)
        fs, paths = _shards(job, storage)
        cols = [ID_COLUMN, CODES_COLUMN] + ([LABEL_COLUMN] if LABEL_COLUMN in pq.read_schema(
            paths[0], filesystem=fs).names else [])
        ds = read_store(job.data, storage, columns=cols)
        for split in ("train", "val"):
            out[split] = ds.map_batches(prior_batch, fn_kwargs={
                "split": split, "val_fraction": job.val_fraction, "num_classes": job.prior.model.num_classes}, **common)
    else:
        plan = _image_plan(job, storage)
        ds = read_store(job.data, storage, columns=[ID_COLUMN, plan.column])
        for split in ("train", "val"):
            out[split] = ds.map_batches(vqvae_batch, fn_kwargs={
                "split": split, "val_fraction": job.val_fraction, "plan": plan}, batch_format="numpy")
    if job.materialize:
        out = {k: v.materialize() for k, v in out.items()}
    out["train"] = out["train"].randomize_block_order(seed=job.seed)
    return out, extras


# --- MLflow ----------------------------------------------------------------------------------------

def _resolved_params(job: TrainJob, extras: dict[str, Any]) -> dict[str, Any]:
    """The configs the workers actually use (presets applied, steps/batch/lr as run)."""
    if job.kind == "sae":
        model, train = job.sae.model_config(int(extras["d_in"])), job.sae_train_config()
    elif job.kind == "vqvae":
        model, train = job.vqvae.model, job.vqvae_train_config()
    else:
        model, train = job.prior.model, job.prior_train_config()
    return {**flatten(model, "resolved.model"), **flatten(train, "resolved.train"),
            "global_batch_size": job.global_batch_size}


def open_run(job: TrainJob, tracking: TrackingConfig, params: dict[str, Any]) -> Tracker:
    """The MLflow run of this training run: found again by its run key when resuming, else new."""
    if not tracking.enabled:
        return Tracker(tracking)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    found = None
    if exp is not None:
        key = job.run_key.replace("'", "\\'")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        found = runs[0] if runs else None
    tracker = Tracker(tracking, run_name=job.name, run_id=found.info.run_id if found else None,
                      tags={RUN_KEY_TAG: job.run_key, "galray.kind": job.kind})
    if found is None:
        tracker.log_params(params)
        return tracker
    client.update_run(found.info.run_id, status="RUNNING")
    # MLflow params are immutable: log only new keys, and name the ones that changed on resume.
    old = found.data.params
    new = {k: v for k, v in params.items() if k not in old}
    changed = sorted(k for k, v in params.items() if k in old and old[k] != str(v)[:6000])
    tracker.log_params(new)
    if changed:
        tracker.set_tags({"galray.changed_on_resume": ",".join(changed)[:5000]})
    return tracker


def _metric_series(tracking: TrackingConfig, run_id: str, keys: Sequence[str]) -> dict[str, tuple[list, list]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    out = {}
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in hist}  # a step replayed after a restart keeps its last value
        if by_step:
            out[key] = (list(by_step), list(by_step.values()))
    return out


def _log_outputs(job: TrainJob, tracker: Tracker, tracking: TrackingConfig, result: Any, ret: dict[str, Any]) -> None:
    from galray.analysis import figures

    if not tracker.active:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(dumps(job, "json"))
        tracker.log_artifact(cfg_path)
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            tracker.log_artifact(d, "checkpoint")
    series = _metric_series(tracking, tracker.run_id, LOSS_KEYS[job.kind])
    if series:
        tracker.log_figure(figures.loss_curves(series, title=f"{job.kind} {job.name}"), "loss_curves.png")
    data = ret.get("figure_data") or {}
    if "code_counts" in data:
        tracker.log_figure(figures.codebook_usage(np.asarray(data["code_counts"])), "codebook_usage.png")
    if "density_log10_hist" in data:
        tracker.log_figure(figures.feature_density(data["density_log10_hist"], data["density_log10_edges"],
                                                   n_latents=data.get("n_latents"),
                                                   n_samples=data.get("n_samples")),
                           "feature_density.png")
    if job.register and result.checkpoint is not None:
        tracker.register("checkpoint", tracking.register_model or f"galray-{job.kind}")


# --- fit -------------------------------------------------------------------------------------------

@dataclass
class TrainSummary:
    """What `galray train` prints and `fit` returns."""

    kind: str
    name: str
    run_path: str
    """Where the run's checkpoints are: <storage_path>/<name>."""
    checkpoint: str | None
    """URI of the final checkpoint folder."""
    step: int
    resumed_from_step: int
    """Step of the checkpoint the last attempt started from (0: from scratch)."""
    global_batch_size: int
    seconds: float
    mlflow_run_id: str | None
    replica_max_diff: float
    """Largest difference between ranks of the synchronised weights at the end (0 when identical)."""
    metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        shown = {k: v for k, v in {**self.metrics, **self.eval}.items()
                 if k in ("loss", "fvu", "perplexity", "utilisation", "acc") or k.startswith("val_")}
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        resumed = f" (resumed from step {self.resumed_from_step})" if self.resumed_from_step else ""
        run = f", MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else ""
        return (f"train {self.kind} {self.name}: {self.step} steps{resumed}, global batch {self.global_batch_size}, "
                f"{self.seconds:.1f} s; {metrics}\ncheckpoint {self.checkpoint}{run}")


def _run_config(job: TrainJob, storage: StorageConfig) -> Any:
    import ray.train

    fs, path = check_access(job.storage_path, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)
    test_env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
    return ray.train.RunConfig(
        name=job.name, storage_path=path,
        storage_filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs,
        failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
        worker_runtime_env={"env_vars": test_env} if test_env else None)


def fit(job: TrainJob) -> TrainSummary:
    """Train ``job`` with Ray Train; returns the summary. Rerunning the same name and storage_path
    resumes from the latest checkpoint; raises (and marks the MLflow run FAILED) if training fails."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from galray.session import ensure_ray
    from galray.train.workers import train_loop_per_worker

    t0 = time.perf_counter()
    storage, tracking = job.storage.resolved(), job.tracking.resolved()
    if not tracking.run_name:
        tracking = dataclasses.replace(tracking, run_name=job.name)
    ensure_ray()
    datasets, extras = build_datasets(job, storage)
    run_config = _run_config(job, storage)
    tracker = open_run(job, tracking, {**flatten(job), **_resolved_params(job, extras)})
    worker_job = dataclasses.replace(job, storage=storage, tracking=tracking)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(worker_job), "run_id": tracker.run_id, **extras},
        scaling_config=ray.train.ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
                                               resources_per_worker=job.scaling.resources_per_worker()),
        run_config=run_config, datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    try:
        result = trainer.fit()
        ret = result.return_value or {}
        _log_outputs(job, tracker, tracking, result, ret)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    ckpt = None
    if result.checkpoint is not None:
        ckpt = join(job.storage_path, job.name, Path(result.checkpoint.path).name)
    return TrainSummary(
        kind=job.kind, name=job.name, run_path=join(job.storage_path, job.name), checkpoint=ckpt,
        step=int(ret.get("step", (result.metrics or {}).get("step", 0))),
        resumed_from_step=int(ret.get("resumed_from_step", 0)), global_batch_size=job.global_batch_size,
        seconds=time.perf_counter() - t0, mlflow_run_id=tracker.run_id,
        replica_max_diff=float(ret.get("replica_max_diff", 0.0)),
        metrics={k: float(v) for k, v in (ret.get("last") or {}).items()},
        eval={k: float(v) for k, v in (ret.get("eval") or {}).items()})


def summary_json(summary: TrainSummary) -> str:
    return json.dumps(summary.to_json(), indent=2)
