"""`fit(job)`: train the SAE, the VQ-VAE or the prior data-parallel with Ray Train, record it in MLflow.

On the driver, ``fit``

1. resolves the storage and tracking settings (workers never see variables set here after Ray
   started, so everything they need travels in the config, except credentials: each worker finds its
   own, see galray.storage); on a multi-node cluster, refuses a tracking URI or storage path only this
   node can reach, and on an autoscaling one asks for the GPUs and waits for them (bounded);
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
   logs the model as an MLflow pyfunc model with a signature and an input example
   (:meth:`Tracker.log_model`), registers it and closes the run. The input store is recorded
   as the run's input dataset (URI and row count). The rows training left out, and why
   (:mod:`galray.train.skipped_rows`), go to the summary and the run: metric ``rows_skipped``
   and ``skipped_rows.json`` (rows and a few example ids per reason).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from galray.cluster_resources import await_resources, check_reachable_from_every_node
from galray.config import dumps, flatten, to_dict
from galray.data.stores import footer_rows
from galray.storage import StorageConfig, check_access, join
from galray.tracking import Tracker, TrackingConfig, metric_series, open_run, store_name
from galray.train.config import TrainJob
from galray.train.datasets import PreparedData, build_datasets
from galray.train.skipped_rows import skipped_rows_counter, skipped_totals

if TYPE_CHECKING:
    import ray.train

# --- MLflow ----------------------------------------------------------------------------------------

def _resolved_params(job: TrainJob, data: PreparedData) -> dict[str, Any]:
    """The configs the workers actually use (presets applied, steps/batch/lr as run)."""
    return {**flatten(data.model_config, "resolved.model"), **flatten(job.train_config(), "resolved.train"),
            "global_batch_size": job.global_batch_size}


def _log_outputs(job: TrainJob, tracker: Tracker, tracking: TrackingConfig, result: "ray.train.Result",
                 ret: dict[str, Any]) -> None:
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
            tracker.log_model(job.kind, d, (tracking.register_model or f"galray-{job.kind}") if job.register else None)
    series = metric_series(tracking, tracker.run_id, job.loop.CURVES)
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
    skipped_rows: dict[str, int] = field(default_factory=dict)
    """Rows of the input left out (an unusable image, a NaN embedding, codes outside the vocabulary), by reason."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        shown = {k: v for k, v in {**self.metrics, **self.eval}.items()
                 if k in ("loss", "fvu", "perplexity", "utilisation", "acc") or k.startswith("val_")}
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        resumed = f" (resumed from step {self.resumed_from_step})" if self.resumed_from_step else ""
        run = f", MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else ""
        skipped = "".join(f"\nskipped {n:,} row(s): {reason}" for reason, n in self.skipped_rows.items())
        return (f"train {self.kind} {self.name}: {self.step} steps{resumed}, global batch {self.global_batch_size}, "
                f"{self.seconds:.1f} s; {metrics}\ncheckpoint {self.checkpoint}{run}{skipped}")


def _run_config(job: TrainJob, storage: StorageConfig) -> "ray.train.RunConfig":
    import ray.train

    fs, path = check_access(job.storage_path, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)
    return ray.train.RunConfig(
        name=job.name, storage_path=path,
        storage_filesystem=None if isinstance(fs, pafs.LocalFileSystem) else fs,
        failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints))


def fit(job: TrainJob) -> TrainSummary:
    """Train ``job`` with Ray Train; returns the summary. Rerunning the same name and storage_path
    resumes from the latest checkpoint; raises (and marks the MLflow run FAILED) if training fails."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from galray.data.store import shard_paths
    from galray.session import ensure_ray
    from galray.train.workers import train_loop_per_worker

    t0 = time.perf_counter()
    storage, tracking = job.storage.resolved(), job.tracking.resolved()
    if not tracking.run_name:
        tracking = dataclasses.replace(tracking, run_name=job.name)
    ensure_ray()
    check_reachable_from_every_node(tracking.uri if tracking.enabled else None, job.storage_path)
    if job.scaling.use_gpu:  # on an autoscaling cluster: ask for the GPU nodes and wait (bounded)
        await_resources({"GPU": job.scaling.gpus_per_worker}, job.scaling.num_workers,
                        timeout_s=job.scaling.wait_s, field="scaling.use_gpu")
    skipped = skipped_rows_counter()
    data = build_datasets(job, storage, skipped)
    run_config = _run_config(job, storage)
    tracker = open_run(tracking, job.run_key, job.name, {"galray.kind": job.kind},
                       {**flatten(job), **_resolved_params(job, data)})
    if tracker.active:
        for uri in (job.input, *job.extra_inputs):
            fs, paths = shard_paths(uri, storage)
            tracker.log_input(uri, sum(footer_rows(fs, paths)), store_name(uri))
    worker_job = dataclasses.replace(job, storage=storage, tracking=tracking)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(worker_job), "run_id": tracker.run_id,
                           "model": to_dict(data.model_config), "init_state": data.init_state},
        scaling_config=ray.train.ScalingConfig(num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu,
                                               resources_per_worker=job.scaling.resources_per_worker(),
                                               placement_strategy=job.scaling.placement_strategy),
        run_config=run_config, datasets=data.datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]))
    try:
        result = trainer.fit()
        ret = result.return_value or {}
        skipped_report = ray.get(skipped.report.remote())
        tracker.log_metrics({"rows_skipped": sum(skipped_totals(skipped_report).values())})
        tracker.log_text(json.dumps(skipped_report, indent=1), "skipped_rows.json")
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
        eval={k: float(v) for k, v in (ret.get("eval") or {}).items()}, skipped_rows=skipped_totals(skipped_report))
