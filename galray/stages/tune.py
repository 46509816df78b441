"""`galray tune`: a hyperparameter campaign over a `galray train` config with Ray Tune, every trial in MLflow.

:func:`tune` takes a :class:`TuneJob`: a training job (the same keys as `galray train`, so the
same config file works) plus a ``tune`` section: the search space (:mod:`galray.train.tune_space`),
the number of trials, the scheduler and the search algorithm. It

1. checks everything before Ray starts: the space against the training config (keys, types,
   ranges, grids), the scheduler against the trials' workers, the objective, and the campaign
   folder (a new campaign never overwrites one; ``--resume`` needs one, with the same settings);
2. reads the data once: the kind's datasets, materialised in Ray's object store by default, and
   shared by every trial (``tune.with_parameters``);
3. runs the trials (:mod:`galray.train.tune_trial`) with ``Tuner`` (or ``Tuner.restore`` for
   ``--resume``): single-worker trials as function trainables with ``tune.with_resources`` (one
   worker's resources: one GPU per trial on a GPU cluster), as many at once as the cluster's
   resources allow; multi-worker trials through Ray Train, without early stopping
   (ray-project/ray#54305, see galray.train.tune_trial);
4. records each trial as an MLflow run under the campaign's run, and prints progress lines
   (:mod:`galray.train.tune_records`);
5. at the end writes, under the campaign folder and into the campaign's MLflow run: the results
   table sorted by the objective (``results.csv``, also printed), the best trial's config as a
   YAML that `galray train` takes unchanged (``best_config.yaml``), the figure
   (``tune_campaign.png``: learning curves with early-stopped trials marked, the objective against
   each searched key); the best trial's checkpoint is logged to its run and registered.

**Objectives** (``tune.metric``/``tune.mode``, default the kind's ``OBJECTIVE``, galray.train.loop):
SAE: held-out FVU (min), with L0 and dead fraction reported beside it; VQ-VAE: held-out
reconstruction MSE (min), with codebook utilisation and perplexity; prior: held-out loss (min).
Every trial evaluates on the same held-out rows (``tune.eval_rows``), every ``report_every`` steps.

**Campaign folder** ``<storage_path>/<name>`` (local or s3://): Tune's experiment state and one
folder per trial (its results), ``checkpoints/<trial_id>/`` (each single-worker trial's latest
checkpoint, galray.train.tune_trial), ``campaign.yaml`` (the job), ``done/`` (one record per
finished trial), ``train/`` (multi-worker trials' Ray Train runs), and the results above.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from galray.config import ConfigError, check, dumps, flatten, redacted, to_dict
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, arrow_filesystem, check_access, is_s3, join, split_uri, write_text
from galray.tracking import TrackingConfig
from galray.train.config import ScalingSection, TrainJob
from galray.train.tune_space import SearchSpace, apply_values

if TYPE_CHECKING:
    import ray.tune

    from galray.train.launch import TrainSummary

CAMPAIGN_FILE = "campaign.yaml"
TRAIN_DIR = "train"
RESOURCE_WAIT_S = 120.0
"""How long the campaign waits for Tune to release its trials' resources (asynchronous) before it counts what is left."""


@dataclass(frozen=True)
class TuneSection:
    """The campaign: what to search, how many trials, how to schedule them."""

    space: str | dict[str, Any] | None = None
    """Search space: a YAML file, or the mapping itself, of dotted training keys to distributions
    (choice, grid, uniform, loguniform, randint), e.g. {sae.model.k: {choice: [8, 16, 32]}}."""
    trials: int | None = None
    """Trials in total (default: the grid's size). With grid keys, a multiple of the grid's size:
    each grid point runs trials / grid-size times (with fresh draws of the other keys)."""
    scheduler: Literal["asha", "none"] = "asha"
    """asha: asynchronous successive halving (Li et al. 2020) stops the worse trials at each rung;
    none: every trial runs all its steps (the only choice for multi-worker trials)."""
    search: Literal["random", "optuna"] = "random"
    """random: grid points in a seeded random order, other keys drawn at random; optuna: Optuna's
    TPE sampler through Ray's OptunaSearch (pip install 'galray[tune]'; no grid keys)."""
    metric: str | None = None
    """Objective: a validation metric (val_*) or a step metric of the kind (default: the kind's
    OBJECTIVE, e.g. val_fvu for the SAE, val_mse for the VQ-VAE)."""
    mode: Literal["min", "max"] | None = None
    """min or max (default: the kind's, for its objective)."""
    report_every: int | None = None
    """Steps between a trial's reports: each evaluates the objective and writes a checkpoint, and
    is where the scheduler may stop the trial (default: a tenth of steps)."""
    grace_period: int | None = None
    """ASHA: steps every trial runs before it can be stopped (default: report_every)."""
    reduction_factor: float = 3.0
    """ASHA: a trial continues past a rung if it is in the best 1/reduction_factor there (the
    Hyperband papers' eta = 3)."""
    max_concurrent: int | None = None
    """Trials at once (default: as many as the cluster's CPUs and GPUs hold, one trial's being
    scaling's resources of all its workers)."""
    eval_rows: int = 8192
    """Held-out rows each report evaluates on (the same rows each time, kept in the trial's memory)."""
    seed: int = 0
    """Seed of the search: the grid's order and the random draws."""
    resume: str | None = None
    """Continue the interrupted campaign in this folder (<storage_path>/<name>): finished trials are
    not run again, unfinished ones continue from their last checkpoint. Run the same command with it.
    The folder must be one galray wrote: Tune's saved state is unpickled."""

    def __post_init__(self) -> None:
        check(self.trials is None or self.trials >= 1, "trials", "must be at least 1")
        check(self.report_every is None or self.report_every >= 1, "report_every", "must be at least 1")
        check(self.grace_period is None or self.grace_period >= 1, "grace_period", "must be at least 1")
        check(self.reduction_factor > 1, "reduction_factor", "must be above 1")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", "must be at least 1")
        check(self.eval_rows >= 1, "eval_rows", "must be at least 1")


@dataclass(frozen=True)
class TrialScaling(ScalingSection):
    """A trial's workers: one by default (a trial is one process, which any scheduler may stop)."""

    num_workers: int = 1
    """Data-parallel workers per trial; more than one runs Ray Train in the trial (--scheduler none only)."""


@dataclass(frozen=True)
class TuneJob(TrainJob):
    """A training job (the keys of `galray train`) and the campaign over it (``tune``)."""

    materialize: bool = True
    """Read and preprocess the data once, into Ray's object store, for every trial (it spills to
    disk beyond memory). Off: each trial streams the data, and one CPU stays free for Ray Data."""
    scaling: TrialScaling = field(default_factory=TrialScaling)
    """Each trial's workers and their resources."""
    tune: TuneSection = field(default_factory=TuneSection)
    """The campaign."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.tune.space is not None, "tune.space", "a search space is required (--space SPACE.yaml)")
        if self.scaling.num_workers > 1 and self.tune.scheduler != "none":
            # A TorchTrainer run inside a trial and stopped early leaks its placement group on Ray 2.60
            # (ray-project/ray#54305; see galray.train.tune_trial): later trials would wait forever.
            raise ConfigError("tune.scheduler", f"{self.tune.scheduler} stops trials early, which leaks the placement "
                                                f"group of a {self.scaling.num_workers}-worker Ray Train run "
                                                "(ray-project/ray#54305): use --workers 1 (one process per trial, "
                                                "what campaigns are for) or --scheduler none")

    def train_job(self) -> TrainJob:
        """The training job the campaign searches around (without the tune section)."""
        return TrainJob(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainJob)})

    @property
    def campaign(self) -> str:
        """The campaign folder: <storage_path>/<name>, local paths made absolute."""
        return _absolute(join(self.storage_path, self.name))


@dataclass(frozen=True)
class TuneSummary(FieldsSummary):
    """What `galray tune` prints and :func:`tune` returns."""

    kind: str
    name: str
    campaign: str
    """The campaign folder (Tune's state, trial checkpoints, results)."""
    trials: int
    finished: int
    stopped: int
    """Stopped early by the scheduler."""
    errored: int
    metric: str
    mode: str
    best_trial: str | None
    best_value: float | None
    best_values: dict[str, Any]
    """The best trial's searched values."""
    best_config: str | None
    """URI of the best trial's config, a YAML that `galray train --config` takes."""
    best_checkpoint: str | None
    results_csv: str
    mlflow_run_id: str | None
    trial_steps: int
    """Optimizer steps of all trials together (each trial's last reported step)."""
    seconds: float
    cpu_available: float
    cpu_total: float
    """Ray's available and total CPUs after the campaign (equal when nothing was left reserved)."""
    leaked_placement_groups: int
    """Placement groups created during the campaign and still not removed RESOURCE_WAIT_S after it."""
    rows: list[dict[str, Any]] = field(default_factory=list)
    """The results table, best first."""

    def format(self) -> str:
        head = (f"tune {self.kind} {self.name}: {self.trials} trials ({self.finished} finished, {self.stopped} stopped "
                f"early, {self.errored} errored), {self.trial_steps} trial steps, {self.seconds:.1f} s")
        lines = [head, format_table(self.rows)]
        if self.best_trial is not None:
            values = ", ".join(f"{k}={json.dumps(v)}" for k, v in self.best_values.items())
            lines.append(f"best {self.metric} {self.best_value:.5g} ({self.mode}) in trial {self.best_trial}: {values}")
            lines.append(f"best config: {self.best_config} (galray train --config {self.best_config})")
            if self.best_checkpoint:
                lines.append(f"best checkpoint: {self.best_checkpoint}")
        lines.append(f"results: {self.results_csv}; campaign: {self.campaign}"
                     + (f"; MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else ""))
        return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned text columns (numbers to 5 significant digits)."""
    if not rows:
        return "(no trials)"
    cols = [c for c in rows[0] if c not in ("checkpoint",)]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.5g}"
        return "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else str(v))

    table = [cols] + [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in table)


# --- before Ray: the plan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CampaignPlan:
    """Everything the campaign decided before Ray starts."""

    job: TuneJob
    base: TrainJob
    """The training job trials start from: local paths absolute (trials run in their own folders)."""
    space: SearchSpace
    trials: int
    metric: str
    mode: str
    report_every: int
    max_steps: int
    """The most steps a trial can have (ASHA's max_t)."""
    campaign: str
    resume: bool
    storage: StorageConfig
    tracking: TrackingConfig


def _absolute(uri: str) -> str:
    return uri if is_s3(uri) else split_uri(uri)[1]


def _without_credentials(storage: StorageConfig) -> StorageConfig:
    """Trials and Tune's saved state never hold keys: each process resolves them from its environment."""
    return dataclasses.replace(storage, access_key_id=None, secret_access_key=None, session_token=None)


def _campaign_record(job: TuneJob, space: SearchSpace) -> dict[str, Any]:
    """The job as campaign.yaml holds it: the space inline, credentials out."""
    data = redacted(to_dict(job))
    data["tune"] = {**data["tune"], "space": space.to_dict(), "resume": None}
    return data


def _objective(job: TuneJob) -> tuple[str, str]:
    loop = job.loop
    metric = job.tune.metric or loop.OBJECTIVE[0]
    check(metric.startswith("val_") or metric in loop.CURVES, "tune.metric",
          f"{metric!r} is not reported by {job.kind} trials: use a validation metric (val_*, e.g. "
          f"{loop.OBJECTIVE[0]}) or one of {', '.join(loop.CURVES)}")
    if job.tune.mode is not None:
        return metric, job.tune.mode
    check(metric == loop.OBJECTIVE[0], "tune.mode", f"give min or max for the objective {metric}")
    return metric, loop.OBJECTIVE[1]


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
            if diff:
                return diff
        return None
    return None if a == b else prefix


def plan(job: TuneJob) -> CampaignPlan:
    """Check the campaign and decide its settings; raises ConfigError naming the field. No Ray."""
    import ray.tune

    space = SearchSpace.load(job.tune.space) if isinstance(job.tune.space, str) else SearchSpace.parse(job.tune.space)
    base = job.train_job()
    space.validate(base, job.tune.search)
    if job.tune.search == "optuna":
        import importlib.util

        check(importlib.util.find_spec("optuna") is not None, "tune.search",
              "optuna is not installed: pip install 'galray[tune]' (optuna>=4.9,<5.1)")
    grid = space.grid_size if space.grid else 0
    trials = job.tune.trials or grid
    check(trials >= 1, "tune.trials", "is required when the space has no grid keys (--trials N)")
    check(not grid or trials % grid == 0, "tune.trials",
          f"{trials} is not a multiple of the grid's {grid} points (each point runs the same number of trials)")
    metric, mode = _objective(job)
    report_every = job.tune.report_every or max(1, job.steps // 10)
    max_steps = int(space.max_value("steps", job.steps))
    check(job.tune.grace_period is None or job.tune.grace_period <= max_steps, "tune.grace_period",
          f"must be at most the trials' steps ({max_steps})")

    storage, tracking = job.storage.resolved(), job.tracking.resolved()
    campaign = job.campaign
    if job.tune.resume is not None:
        check(_absolute(job.tune.resume.rstrip("/")) == campaign, "tune.resume",
              f"is {job.tune.resume}, but this job's campaign folder is {campaign} (<storage_path>/<name>): resume "
              "with the same --name and --storage-path the campaign started with")
    fs, path = check_access(campaign, storage)
    started = fs.get_file_info(f"{path}/{CAMPAIGN_FILE}").type.name != "NotFound"
    restorable = ray.tune.Tuner.can_restore(path, storage_filesystem=fs)
    if job.tune.resume is None:  # (a campaign.yaml without Tune's state: a start that failed before any trial)
        check(not restorable, "name", f"a campaign already exists in {campaign}: continue it with "
                                      f"--resume {campaign}, or choose another --name")
    else:
        check(started and restorable, "tune.resume", f"{campaign} holds no campaign to resume")
        with fs.open_input_stream(f"{path}/{CAMPAIGN_FILE}") as f:
            saved = yaml.safe_load(f.read().decode())
        given = _campaign_record(job, space)
        for d in (saved, given):  # credentials and the storage endpoint may change between runs
            d.pop("storage", None)
        diff = _first_difference(saved, given)
        check(diff is None, diff or "", f"differs from the campaign being resumed ({campaign}/{CAMPAIGN_FILE}): "
                                        "run the command the campaign started with, plus --resume")
    base = dataclasses.replace(base, input=_absolute(base.input),
                               extra_inputs=tuple(_absolute(u) for u in base.extra_inputs), storage_path=_absolute(base.storage_path),
                               storage=_without_credentials(base.storage), tracking=tracking)
    return CampaignPlan(job, base, space, trials, metric, mode, report_every, max_steps, campaign, job.tune.resume is not None,
                storage, tracking)


# --- resources ---------------------------------------------------------------------------------------

def trial_resources(job: TrainJob) -> dict[str, float]:
    """What Tune reserves per trial: one worker's resources, or a sliver for the driver of a multi-worker
    trial (its Ray Train workers reserve their own; Tune cannot reserve 0)."""
    return job.scaling.resources_per_worker() if job.scaling.num_workers == 1 else {"CPU": 0.01}


def max_concurrent(job: TuneJob, cluster: dict[str, float]) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) hold, one trial's demand being all its
    workers' resources; one CPU stays free for Ray Data when trials stream their data (multi-worker
    trials always do)."""
    if job.tune.max_concurrent is not None:
        return job.tune.max_concurrent
    per_trial = {k: v * job.scaling.num_workers for k, v in job.scaling.resources_per_worker().items()}
    reserve = {"CPU": 1.0} if (job.scaling.num_workers > 1 or not job.materialize) else {}
    fits = [math.floor((cluster.get(k, 0.0) - reserve.get(k, 0.0)) / v) for k, v in per_trial.items()]
    return max(1, min(fits))


def _placement_groups() -> dict[str, str]:
    import ray

    return {k: v["state"] for k, v in ray.util.placement_group_table().items()}


def _released(before: dict[str, str], own_ray: bool) -> tuple[float, float, int]:
    """(available CPUs, total CPUs, leaked placement groups) once the campaign's groups are removed, waiting
    a bounded time (Tune removes the last trial's group asynchronously)."""
    import ray

    deadline = time.monotonic() + RESOURCE_WAIT_S
    while True:
        leaked = [k for k, state in _placement_groups().items() if k not in before and state != "REMOVED"]
        total = float(ray.cluster_resources().get("CPU", 0.0))
        available = float(ray.available_resources().get("CPU", 0.0))
        if (not leaked and (available == total or not own_ray)) or time.monotonic() > deadline:
            return available, total, len(leaked)
        time.sleep(0.5)


# --- the Tuner ---------------------------------------------------------------------------------------

def _domains(space: SearchSpace) -> dict[str, Any]:
    """Ray Tune's search space (categorical values encoded, SearchSpace.decode inverts it)."""
    from ray import tune as rt

    out = {}
    for p in space.params:
        if p.categorical:
            out[p.key] = rt.choice([p.encode(v) for v in p.args])
        elif p.kind == "randint":
            out[p.key] = rt.randint(p.args[0], p.args[1] + 1)  # Ray's upper bound is exclusive; ours is included
        elif p.kind == "loguniform":
            out[p.key] = rt.loguniform(*p.args)
        else:
            out[p.key] = rt.uniform(*p.args)
    return out


def trial_name(trial: Any) -> str:
    """A trial's name and folder: trial_<id> (Tune's default folder names repeat every value)."""
    return f"trial_{trial.trial_id}"


def _tuner(p: CampaignPlan, trainable: Any, callbacks: list[Any], concurrency: int) -> "ray.tune.Tuner":
    import pyarrow.fs as pafs
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    fs, path = arrow_filesystem(p.campaign, p.storage)
    storage_fs = None if isinstance(fs, pafs.LocalFileSystem) else fs
    if p.resume:
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                      restart_errored=False, storage_filesystem=storage_fs)
    t = p.job.tune
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(seed=t.seed), concurrency  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:  # a SearchGenerator: it takes the limit itself (Tune ignores max_concurrent_trials for it)
        search, limit = BasicVariantGenerator(points_to_evaluate=p.space.grid_points(p.trials, t.seed),
                                              random_state=t.seed, max_concurrent=concurrency), None
    scheduler = ASHAScheduler(time_attr="step", max_t=p.max_steps, grace_period=t.grace_period or p.report_every,
                              reduction_factor=t.reduction_factor) if t.scheduler == "asha" else FIFOScheduler()
    return ray.tune.Tuner(
        trainable, param_space=_domains(p.space),
        tune_config=ray.tune.TuneConfig(metric=p.metric, mode=p.mode, scheduler=scheduler, search_alg=search,
                                        num_samples=p.trials, max_concurrent_trials=limit, reuse_actors=True,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=ray.tune.RunConfig(
            name=path.rsplit("/", 1)[-1], storage_path=path.rsplit("/", 1)[0], storage_filesystem=storage_fs,
            callbacks=callbacks, verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=max(p.job.max_failures, 0))))


def _trainable(p: CampaignPlan) -> Any:
    """The trial function with the campaign's data and its resources."""
    import ray.tune

    from galray.train.datasets import build_datasets
    from galray.train.tune_trial import TrialSetup, multi_worker_trial, single_worker_trial

    setup = TrialSetup(base=to_dict(p.base), space=p.space.to_dict(), report_every=p.report_every,
                       eval_rows=p.job.tune.eval_rows, train_storage_path=join(p.campaign, TRAIN_DIR),
                       campaign=p.campaign)
    if p.base.scaling.num_workers > 1:
        fn = ray.tune.with_parameters(multi_worker_trial, setup=setup)
    else:
        data = build_datasets(p.base, p.storage)
        setup = dataclasses.replace(setup, model_config=data.model_config, init_state=data.init_state)
        fn = ray.tune.with_parameters(single_worker_trial, setup=setup, train=data.datasets["train"],
                                      val=data.datasets["val"])
    return ray.tune.with_resources(fn, trial_resources(p.base))


# --- after the trials -----------------------------------------------------------------------------

def _curve(result: Any, metric: str) -> tuple[list[float], list[float]]:
    """A trial's (steps, objective) from its progress, a step reported again after a restart keeping its last value."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "step" not in df:
        return [], []
    df = df[["step", metric]].dropna()
    by_step = dict(zip(df["step"].astype(int).tolist(), df[metric].astype(float).tolist()))
    steps = sorted(by_step)
    return [float(s) for s in steps], [by_step[s] for s in steps]


def _result_rows(p: CampaignPlan, results: Any, done: dict[str, dict[str, Any]], runs: dict[str, str]) -> list[dict[str, Any]]:
    """The results table: one row per trial, best first, errored trials last."""
    from galray.train.tune_records import ERRORED, outcome, recorded_metrics

    rows = []
    for r in results:
        metrics = r.metrics or {}
        tid = metrics.get("trial_id") or Path(r.path).name
        record = done.get(tid)
        values = record["values"] if record else p.space.decode(r.config)
        reported = record["metrics"] if record else recorded_metrics(metrics, p.base.kind)
        status = ERRORED if r.error is not None else (record["status"] if record else outcome(reported))
        shown = {k: v for k, v in reported.items() if k.startswith("val_") and k != p.metric}
        rows.append({"trial": tid, "status": status, "step": int(reported.get("step", 0)),
                     p.metric: reported.get(p.metric), **shown, **values,
                     "checkpoint": record["checkpoint"] if record else "", "mlflow_run_id": runs.get(tid, "")})
    sign = 1.0 if p.mode == "min" else -1.0
    rows.sort(key=lambda r: (r["status"] == ERRORED, r[p.metric] is None,
                             sign * r[p.metric] if r[p.metric] is not None else 0.0))
    return rows


def _children(tracking: TrackingConfig, parent: str | None) -> dict[str, str]:
    """{trial_id: MLflow run id} of the campaign run's children."""
    if not (tracking.enabled and parent):
        return {}
    import mlflow

    from galray.train.tune_records import TRIAL_TAG

    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10_000)
    return {r.data.tags.get(TRIAL_TAG, ""): r.info.run_id for r in runs}


def best_job(job: TuneJob, values: dict[str, Any]) -> TrainJob:
    """The training job of the campaign ``job`` at the searched ``values`` (the user's paths, no credentials,
    named <campaign name>-best): what best_config.yaml holds."""
    best = apply_values(job.train_job(), values)
    return dataclasses.replace(best, name=f"{best.name}-best", storage=_without_credentials(best.storage))


def best_config_text(p: CampaignPlan, values: dict[str, Any]) -> str:
    """The best trial's training config as YAML for `galray train` (:func:`best_job`)."""
    job = best_job(p.job, values)
    header = f"# Best trial of the campaign {p.campaign} ({p.metric}, {p.mode}).\n"
    return header + dumps(job)


def _record_outputs(p: CampaignPlan, rows: list[dict[str, Any]], curves: dict[str, tuple[list, list]], parent: Any,
                    runs: dict[str, str]) -> tuple[str, str | None, str | None]:
    """results.csv, best_config.yaml and the figure in the campaign folder and the campaign's run; the best
    checkpoint logged to the best trial's run and registered. Returns (results, best config, best checkpoint) URIs."""
    import pyarrow.fs as pafs

    from galray.analysis.tune_figures import campaign_figure
    from galray.tracking import Tracker
    from galray.train.tune_records import STOPPED

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows])
    results_uri = join(p.campaign, "results.csv")
    write_text(results_uri, buf.getvalue(), p.storage)
    best = rows[0] if rows and rows[0][p.metric] is not None and rows[0]["status"] != "errored" else None
    fig = campaign_figure(curves, {r["trial"]: r["status"] == STOPPED for r in rows},
                          {r["trial"]: {k: r.get(k) for k in p.space.keys} for r in rows},
                          [(q.key, q.kind) for q in p.space.params], p.metric, best and best["trial"],
                          title=f"{p.base.kind} campaign {p.job.name}")
    config_uri = ckpt_uri = None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp)
        (local / "results.csv").write_text(buf.getvalue())
        fig.savefig(local / "tune_campaign.png", dpi=110, bbox_inches="tight")
        fs, root = arrow_filesystem(p.campaign, p.storage)
        with fs.open_output_stream(f"{root}/tune_campaign.png") as f:
            f.write((local / "tune_campaign.png").read_bytes())
        parent.log_artifact(local / "results.csv")
        parent.log_figure(fig, "tune_campaign.png")
        if best is not None:
            config_uri = join(p.campaign, "best_config.yaml")
            text = best_config_text(p, {k: best[k] for k in p.space.keys})
            write_text(config_uri, text, p.storage)
            (local / "best_config.yaml").write_text(text)
            parent.log_artifact(local / "best_config.yaml")
            parent.set_tags({"galray.best_trial": best["trial"], "galray.best_run_id": runs.get(best["trial"], "")})
            if best["checkpoint"]:
                ckpt_uri = best["checkpoint"] if "://" in best["checkpoint"] or best["checkpoint"].startswith("/") \
                    else join(p.campaign, best["checkpoint"])
                src_fs, src = arrow_filesystem(ckpt_uri, p.storage)
                (local / "checkpoint").mkdir()
                pafs.copy_files(src, str(local / "checkpoint"), source_filesystem=src_fs,
                                destination_filesystem=pafs.LocalFileSystem())
                child = Tracker(p.tracking, run_id=runs.get(best["trial"])) if runs.get(best["trial"]) else None
                if child is not None:
                    child.log_artifact(local / "checkpoint", "checkpoint")
                    child.log_model(p.base.kind, local / "checkpoint",
                                    (p.tracking.register_model or f"galray-{p.base.kind}") if p.job.register else None)
    return results_uri, config_uri, ckpt_uri


# --- the campaign ----------------------------------------------------------------------------------

def tune(job: TuneJob) -> TuneSummary:
    """Run (or with ``tune.resume`` continue) the campaign ``job``; returns its summary (module docstring).
    Raises ConfigError before Ray starts on a bad space or setting, RuntimeError if no trial produced a result."""
    import ray

    from galray.session import ensure_ray
    from galray.tracking import open_run
    from galray.train.tune_records import CAMPAIGN_TAG, ERRORED, STOPPED, Progress, TrialRecords, read_done_records

    t0 = time.perf_counter()
    p = plan(job)
    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    ensure_ray()
    before = _placement_groups()
    # Tune saves its state at most every TUNE_GLOBAL_CHECKPOINT_S (default: adaptive, >= 10 s); a shorter
    # interval means less work redone after an interruption (finished trials are covered by done records).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's older console output is silent at verbose=0
    campaign_key = f"tune:{p.campaign}"
    parent = open_run(p.tracking, campaign_key, p.tracking.run_name or job.name,
                      {"galray.role": "campaign", "galray.kind": job.kind, CAMPAIGN_TAG: p.campaign},
                      {**flatten(p.job.train_job()), **flatten(dataclasses.replace(job.tune, space=None), "tune"),
                       "tune.space": json.dumps(p.space.to_dict()), "tune.trials": p.trials})
    try:
        if not p.resume:
            write_text(join(p.campaign, CAMPAIGN_FILE), yaml.safe_dump(_campaign_record(job, p.space), sort_keys=False),
                       p.storage)
        trainable = _trainable(p)
        concurrency = max_concurrent(job, ray.cluster_resources())
        space = p.space.to_dict()
        callbacks = [TrialRecords(p.campaign, _without_credentials(job.storage), p.tracking, campaign_key,
                                  parent.run_id, space, job.kind, p.metric, p.mode),
                     Progress(space, p.metric, p.mode, p.trials)]
        tuner = _tuner(p, trainable, callbacks, concurrency)
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the summary's (--json); Tune's words go to stderr
            results = tuner.fit()
        cpu_available, cpu_total, leaked = _released(before, own_ray)
        runs = _children(p.tracking, parent.run_id)
        rows = _result_rows(p, results, read_done_records(p.campaign, p.storage), runs)
        curves = {}
        for r in results:
            tid = (r.metrics or {}).get("trial_id") or Path(r.path).name
            curves[tid] = _curve(r, p.metric)
        results_uri, config_uri, ckpt_uri = _record_outputs(p, rows, curves, parent, runs)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    best = rows[0] if rows and rows[0]["status"] != ERRORED and rows[0][p.metric] is not None else None
    if best is None:
        raise RuntimeError(f"no trial of the campaign {p.campaign} reported {p.metric}: "
                           + "; ".join(str(r.error).splitlines()[0] for r in results if r.error is not None)[:2000])
    return TuneSummary(
        kind=job.kind, name=job.name, campaign=p.campaign, trials=len(rows),
        finished=sum(r["status"] not in (STOPPED, ERRORED) for r in rows), stopped=sum(r["status"] == STOPPED for r in rows),
        errored=sum(r["status"] == ERRORED for r in rows), metric=p.metric, mode=p.mode, best_trial=best["trial"],
        best_value=float(best[p.metric]), best_values={k: best[k] for k in p.space.keys}, best_config=config_uri,
        best_checkpoint=ckpt_uri, results_csv=results_uri, mlflow_run_id=parent.run_id,
        trial_steps=sum(r["step"] for r in rows), seconds=time.perf_counter() - t0, cpu_available=cpu_available,
        cpu_total=cpu_total, leaked_placement_groups=leaked, rows=rows)


def tune_then_train(job: TuneJob) -> tuple[TuneSummary, "TrainSummary"]:
    """Run the campaign ``job``, then train its best setting with `galray train` (:func:`best_job`: the
    config in best_config.yaml, under <storage_path>/<name>-best, tracked and registered as `galray train`
    does). For example, four ASHA trials over an SAE's k and width, then the SAE at the best of them::

        job = from_dict(TuneJob, {"kind": "sae", "input": "embeddings", "name": "sae-tune", "steps": 400,
                                  "scaling": {"num_workers": 1},
                                  "tune": {"space": {"sae.model.k": {"choice": [8, 16]},
                                                     "sae.model.group_sizes": {"choice": [[32, 96], [64, 192]]}},
                                           "trials": 4}})
        campaign, trained = tune_then_train(job)
    """
    from galray.train.launch import fit

    summary = tune(job)
    return summary, fit(best_job(job, summary.best_values))
