"""MLflow tracking: one run per job, logged from rank 0 only, a no-op when disabled.

The tracking URI comes from config, else ``MLFLOW_TRACKING_URI``, else a sqlite store in the
working directory (``sqlite:///mlflow.db``). Ray workers get the URI passed explicitly, because
a worker that falls back to its own default writes an ``mlflow.db`` into its own directory.

- :class:`Tracker`: a run handle (params, metrics, artifacts, figures, model registry) through
  MLflow's client API, which keeps no global state;
- :func:`open_run`: the run of a resumable job (training), found again by its run key tag;
- :func:`metric_series`: a metric's history by step, a replayed step keeping its last value
  (loss curves that span restarts);
- :class:`StageRun`: a row-reading stage's run (params, throttled progress, the summary).

MLflow is imported inside functions: importing this module costs nothing.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from galray.config import check, flatten

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from galray.stages.summary import StageSummary

DEFAULT_URI = "sqlite:///mlflow.db"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
RUN_KEY_TAG = "galray.run_key"


@dataclass(frozen=True)
class TrackingConfig:
    """Where and whether runs are recorded."""

    enabled: bool = True
    """Log to MLflow at all."""
    uri: str | None = None
    """Tracking URI (sqlite:///path.db, http://host:5000, a folder); default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment: str = "galray"
    """Experiment name."""
    run_name: str | None = None
    """Run name shown in the UI (default: the job's name)."""
    register_model: str | None = None
    """Register the final checkpoint under this model name."""
    artifact_location: str | None = None
    """Where a new experiment keeps its artifacts (default: MLflow's, ./mlruns of the working directory for a sqlite store)."""

    def __post_init__(self) -> None:
        check(bool(self.experiment), "experiment", "must not be empty")

    def resolved_uri(self) -> str:
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # make relative sqlite paths absolute now, so every process writes the same file
            uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
        return uri

    def resolved(self) -> "TrackingConfig":
        from dataclasses import replace

        return replace(self, uri=self.resolved_uri())


def context_tags() -> dict[str, str]:
    """MLflow's usual run tags (``mlflow.user``, ``mlflow.source.name``/``type``, and git when the program
    lies in a checkout), with git's commit, branch and repo URL taken from galray's own source folder.

    MLflow's fluent ``start_run`` adds these, but runs made through the client get none, and MLflow finds
    git only when ``sys.argv[0]`` is in a checkout (``mlflow/tracking/context/git_context.py``), which the
    ``galray`` script, pytest and Ray workers never are.
    """
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    tags = dict(resolve_tags())
    here = str(Path(__file__).resolve().parent)
    for key, get in ((MLFLOW_GIT_COMMIT, git_utils.get_git_commit), (MLFLOW_GIT_BRANCH, git_utils.get_git_branch),
                     (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url)):
        if key not in tags and (value := get(here)):
            tags[key] = value
    return tags


def store_name(uri: str) -> str:
    """A store's name in MLflow's dataset list: the last part of its URI."""
    return uri.rstrip("/").rsplit("/", 1)[-1] or uri


def store_dataset(uri: str, num_rows: int, name: str) -> Any:
    """An MLflow dataset entity naming a store by its URI (MLflow's ``MetaDataset``: the data is not loaded),
    with the row count as its profile. A bare local path becomes file://, which MLflow resolves to a local
    artifact source."""
    import json

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    source_uri = uri if "://" in uri else Path(uri).resolve().as_uri()
    meta = MetaDataset(resolve_dataset_source(source_uri), name=name).to_dict()
    return Dataset(**meta, profile=json.dumps({"num_rows": int(num_rows)}))


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # torch is always there in galray, but tracking must not depend on it
        pass
    return int(os.environ.get("RANK", "0")) == 0


class Tracker:
    """A thin MLflow run handle. On ranks other than 0, or when disabled, every method does nothing."""

    def __init__(self, cfg: TrackingConfig, run_name: str | None = None, run_id: str | None = None,
                 tags: Mapping[str, str] | None = None):
        self.cfg = cfg
        self.active = cfg.enabled and _is_rank_zero()
        self.run_id: str | None = None
        if not self.active:
            return
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=cfg.resolved_uri())
        if run_id is None:
            exp = self._client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else self._client.create_experiment(
                cfg.experiment, artifact_location=cfg.artifact_location)
            run = self._client.create_run(exp_id, run_name=cfg.run_name or run_name,
                                          tags={**context_tags(), **dict(tags or {})})
            run_id = run.info.run_id
        self.run_id = run_id

    # The client API (not the fluent one) keeps no global state, so several trackers and Ray
    # workers in one process never step on each other.
    def log_params(self, cfg: Any) -> None:
        if not self.active:
            return
        params = flatten(cfg) if not isinstance(cfg, Mapping) else dict(cfg)
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig: "Figure", name: str) -> None:
        """Save a matplotlib figure as PNG into the run's ``figures/`` artifacts."""
        if not self.active:
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / name
            fig.savefig(out, dpi=110, bbox_inches="tight")
            self._client.log_artifact(self.run_id, str(out), "figures")

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._client.log_text(self.run_id, text, name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.active:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, str(v))

    def log_input(self, uri: str, num_rows: int, name: str, context: str = "training") -> None:
        """Record a store the run read (``mlflow.log_input``'s lineage): its URI, name and row count.
        The store is not loaded (:func:`store_dataset`)."""
        if not self.active:
            return
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(store_dataset(uri, num_rows, name), [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        self._client.log_inputs(self.run_id, inputs)

    def log_model(self, kind: str, checkpoint: str | Path, name: str | None = None) -> None:
        """Log a local checkpoint folder as the run's MLflow model, registered under ``name`` when given.

        sae, vqvae and prior become pyfunc models with a signature and an input example
        (:mod:`galray.export.mlflow_model`); another kind is registered as its ``checkpoint`` artifact.
        """
        if not self.active:
            return
        from galray.export.mlflow_model import log_galray_model
        from galray.export.pyfunc import PYFUNC_KINDS

        if kind in PYFUNC_KINDS:
            log_galray_model(kind, checkpoint, self.cfg.resolved_uri(), str(self.run_id), registered_name=name)
        elif name:
            self.register("checkpoint", name)

    def register(self, artifact_path: str, name: str | None = None) -> None:
        """Register ``runs:/<run>/<artifact_path>`` under ``name`` (default: cfg.register_model)."""
        name = name or self.cfg.register_model
        if not (self.active and name):
            return
        # MLflow 3's register_model wants a "logged model"; our checkpoints are plain artifacts
        # (config.json + safetensors), so we create the version from the artifact location.
        from mlflow.exceptions import MlflowException

        try:
            self._client.create_registered_model(name)
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        source = f"{self._client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        self._client.create_model_version(name, source=source, run_id=self.run_id)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id:
            self._client.set_terminated(self.run_id, status=status)


def open_run(tracking: TrackingConfig, run_key: str, run_name: str, tags: Mapping[str, str],
             params: Mapping[str, Any]) -> Tracker:
    """The MLflow run of a resumable job: found again by its ``run_key`` tag when resuming, else new.

    MLflow params are immutable: on resume only new keys are logged, and the keys whose values
    changed are named in the ``galray.changed_on_resume`` tag.
    """
    if not tracking.enabled:
        return Tracker(tracking)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_experiment_by_name(tracking.experiment)
    found = None
    if exp is not None:
        key = run_key.replace("'", "\\'")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                  max_results=1, order_by=["attributes.start_time DESC"])
        found = runs[0] if runs else None
    tracker = Tracker(tracking, run_name=run_name, run_id=found.info.run_id if found else None,
                      tags={RUN_KEY_TAG: run_key, **tags})
    if found is None:
        tracker.log_params(params)
        return tracker
    client.update_run(found.info.run_id, status="RUNNING")
    old = found.data.params
    new = {k: v for k, v in params.items() if k not in old}
    changed = sorted(k for k, v in params.items() if k in old and old[k] != str(v)[:MAX_PARAM_CHARS])
    tracker.log_params(new)
    if changed:
        tracker.set_tags({"galray.changed_on_resume": ",".join(changed)[:5000]})
    return tracker


def metric_series(tracking: TrackingConfig, run_id: str, keys: Sequence[str]) -> dict[str, tuple[list, list]]:
    """``{key: (steps, values)}`` of a run's metrics, by step; a step replayed after a restart keeps its last value."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    out = {}
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in hist}
        if by_step:
            out[key] = (list(by_step), list(by_step.values()))
    return out


class StageRun:
    """MLflow run of a row-reading stage (embed, encode): params, throttled progress, the final summary.

    Progress is logged at most every ``every_s`` seconds, so a billion-row job writes a few thousand
    points, not one per batch; the step is the number of rows done.
    """

    def __init__(self, cfg: TrackingConfig, stage: str, job: Any, output: str, every_s: float = 10.0):
        import time

        self.tracker = Tracker(cfg.resolved(), run_name=f"{stage}: {output.rstrip('/').rsplit('/', 1)[-1]}",
                               tags={"galray.stage": stage, "galray.output": output})
        self.tracker.log_params(job)
        self.input: str | None = getattr(job, "input", None)
        self.every_s = every_s
        self._t0 = self._last = time.perf_counter()
        self._clock = time.perf_counter

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id

    def progress(self, rows_done: int, force: bool = False, **extra: float) -> None:
        now = self._clock()
        if not self.tracker.active or (not force and now - self._last < self.every_s):
            return
        self._last = now
        elapsed = now - self._t0
        self.tracker.log_metrics({"rows_done": rows_done, "rows_per_s": rows_done / elapsed if elapsed > 0 else 0.0,
                                  **extra}, step=rows_done)

    def finish(self, summary: "StageSummary | None", extra: Mapping[str, float] | None = None) -> None:
        """Log the summary's figures (``rows_in``, ``rows_out``, ``rows_errored``, ``seconds``, ...) and close the run.

        ``summary=None`` marks the run FAILED (the stage raised).
        """
        if summary is None:
            self.tracker.finish("FAILED")
            return
        figures = {k: v for k, v in summary.to_json().items() if isinstance(v, (int, float))}
        self.tracker.log_metrics({**figures, **(extra or {})}, step=summary.rows_in)
        if self.input:
            self.tracker.log_input(self.input, summary.rows_in, store_name(self.input), context="inference")
        self.tracker.finish()


def run_record(tracking: TrackingConfig, run_id: str) -> dict[str, Any] | None:
    """A run's params, last metrics and input stores (``[{name, source, num_rows}]``), for a model card;
    None when the tracking store does not hold the run (a sqlite file that does not exist is not created)."""
    import json

    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking.resolved_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    try:
        run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:
        return None
    inputs = []
    for d in run.inputs.dataset_inputs if run.inputs else []:
        source = json.loads(d.dataset.source or "{}")
        profile = json.loads(d.dataset.profile or "{}")
        inputs.append({"name": d.dataset.name, "source": source.get("uri", d.dataset.source),
                       "num_rows": profile.get("num_rows")})
    return {"run_id": run_id, "params": dict(run.data.params), "metrics": dict(run.data.metrics), "inputs": inputs}
