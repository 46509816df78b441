"""What the driver of a `galray tune` campaign records about its trials, as Tune callbacks.

- :class:`TrialRecords`: one MLflow run per trial, nested under the campaign's run (tag
  ``mlflow.parentRunId``), with the trial's values as params and its reports as metrics by step;
  and a done record per finished trial (:mod:`galray.train.tune_trial`). Only the driver talks
  to MLflow, so trials need no tracking URI and a sqlite store has one writer.
- :class:`Progress`: one line per event on stderr: trial started, finished, stopped early,
  errored, with the counts and the best result so far (and a status line at most every 30 s).

Both find everything again after ``Tuner.restore``, which brings back these callbacks as they
were pickled (so they hold no credentials): a trial's MLflow run is found by its tag, not kept in
memory, so a restored trial continues its run instead of opening a second one (Ray's own
``MLflowLoggerCallback`` does open a second one), and the counts are read from Tune's trials.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import ray.tune

from galray.storage import StorageConfig, arrow_filesystem
from galray.tracking import Tracker, TrackingConfig, open_run
from galray.train.config import KINDS
from galray.train.tune_space import SearchSpace
from galray.train.tune_trial import DONE_DIR, REPLAYED

TRIAL_TAG = "galray.trial_id"
CAMPAIGN_TAG = "galray.campaign"
"""Tag of the campaign's run and of each trial's run: the campaign folder."""
STATUS_TAG = "galray.trial_status"
FINISHED, STOPPED, ERRORED = "finished", "stopped", "errored"


def outcome(result: dict[str, Any]) -> str:
    """finished (the trial ran all its steps) or stopped (a scheduler stopped it early), from its last result."""
    steps, total = result.get("step"), result.get("trial_steps")
    return STOPPED if steps is not None and total is not None and steps < total else FINISHED


def trial_run_key(campaign_key: str, trial_id: str) -> str:
    return f"{campaign_key}#{trial_id}"


def recorded_metrics(result: dict[str, Any], kind: str) -> dict[str, float]:
    """The galray figures of a Tune result: validation metrics, the kind's step metrics, lr, step counts."""
    keep = set(KINDS[kind].CURVES) | {"lr", "step", "trial_steps", "resumed_from_step"}
    return {k: float(v) for k, v in result.items()
            if (k.startswith("val_") or k in keep) and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TrialRecords(ray.tune.Callback):
    """MLflow child runs and done records (module docstring)."""

    def __init__(self, campaign: str, storage: StorageConfig, tracking: TrackingConfig, campaign_key: str,
                 parent_run_id: str | None, space: dict[str, Any], kind: str, metric: str, mode: str):
        self.campaign, self.storage, self.tracking = campaign, storage, tracking
        self.campaign_key, self.parent_run_id = campaign_key, parent_run_id
        self.space, self.kind, self.metric, self.mode = space, kind, metric, mode
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tuner.restore finds the runs again by their tags
        return {**self.__dict__, "_runs": {}}

    def _run(self, trial: Any) -> Tracker:
        if trial.trial_id in self._runs:
            return Tracker(self.tracking, run_id=self._runs[trial.trial_id])
        values = SearchSpace.parse(self.space).decode(trial.config)
        tags = {TRIAL_TAG: trial.trial_id, "galray.role": "trial", "galray.kind": self.kind, CAMPAIGN_TAG: self.campaign}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        name = f"{self.campaign.rstrip('/').rsplit('/', 1)[-1]} {trial.trial_id}"
        run = open_run(self.tracking, trial_run_key(self.campaign_key, trial.trial_id), name, tags,
                       {**{k: json.dumps(v) if not isinstance(v, (int, float, str)) else v for k, v in values.items()},
                        "trial_id": trial.trial_id})
        if run.run_id:
            self._runs[trial.trial_id] = run.run_id
        return run

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(REPLAYED):
            return
        metrics = recorded_metrics(result, self.kind)
        step = int(metrics.pop("step", result.get("training_iteration", 0)))
        self._run(trial).log_metrics(metrics, step=step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        status = outcome(result)
        if not result.get(REPLAYED):
            self._write_done(trial, result, status)
        run = self._run(trial)
        run.set_tags({STATUS_TAG: status})
        run.finish()
        self._log_best(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        run.set_tags({STATUS_TAG: ERRORED})
        run.finish("FAILED")

    def _write_done(self, trial: Any, result: dict[str, Any], status: str) -> None:
        """The trial's record, written before anything else about its end (an atomic move into place)."""
        fs, root = arrow_filesystem(self.campaign, self.storage)
        checkpoint = result.get("checkpoint_uri") or (trial.checkpoint.path if trial.checkpoint else "")
        for prefix in (self.campaign.rstrip("/") + "/", root.rstrip("/") + "/"):
            checkpoint = checkpoint.removeprefix(prefix)  # relative to the campaign when inside it
        record = {"trial_id": trial.trial_id, "status": status, "checkpoint": checkpoint,
                  "values": SearchSpace.parse(self.space).decode(trial.config),
                  "metrics": recorded_metrics(result, self.kind)}
        fs.create_dir(f"{root}/{DONE_DIR}", recursive=True)
        tmp = f"{root}/{DONE_DIR}/.{trial.trial_id}.json.tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, indent=1).encode())
        fs.move(tmp, f"{root}/{DONE_DIR}/{trial.trial_id}.json")

    def _log_best(self, trials: list) -> None:
        done = [t for t in trials if t.status == "TERMINATED" and self.metric in (t.last_result or {})]
        if not (self.parent_run_id and done):
            return
        pick = min if self.mode == "min" else max
        best = pick(float(t.last_result[self.metric]) for t in done)
        Tracker(self.tracking, run_id=self.parent_run_id).log_metrics(
            {f"best_{self.metric}": best, "trials_done": len(done)}, step=len(done))


def read_done_records(campaign: str, storage: StorageConfig) -> dict[str, dict[str, Any]]:
    """{trial_id: record} of the campaign's finished trials."""
    import pyarrow.fs as pafs

    fs, root = arrow_filesystem(campaign, storage)
    found = fs.get_file_info(pafs.FileSelector(f"{root}/{DONE_DIR}", allow_not_found=True))
    out = {}
    for info in found:
        if info.base_name.endswith(".json") and not info.base_name.startswith("."):
            with fs.open_input_stream(info.path) as f:
                record = json.loads(f.read().decode())
            out[record["trial_id"]] = record
    return out


class Progress(ray.tune.Callback):
    """Progress lines on stderr (module docstring)."""

    def __init__(self, space: dict[str, Any], metric: str, mode: str, total: int, every_s: float = 30.0):
        self.space, self.metric, self.mode, self.total, self.every_s = space, metric, mode, total, every_s
        self._t0 = self._last = time.monotonic()

    def __setstate__(self, state: dict[str, Any]) -> None:  # a restored campaign's clock starts again
        self.__dict__.update(state)
        self._t0 = self._last = time.monotonic()

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    def _print(self, text: str) -> None:
        self._last = time.monotonic()
        print(f"[tune {self._last - self._t0:7.1f} s] {text}", file=self.stream, flush=True)

    def status(self, trials: list, ending: Any = None, error: bool = False) -> str:
        """running / finished / stopped / errored counts and the best result so far; ``ending``: the trial
        whose end is being reported (Tune calls back before it changes the trial's status)."""
        def state(t: Any) -> str:
            return ("ERROR" if error else "TERMINATED") if t is ending else t.status

        ended = [t for t in trials if state(t) == "TERMINATED"]
        stopped = sum(outcome(t.last_result or {}) == STOPPED for t in ended)
        errored = sum(state(t) == "ERROR" for t in trials)
        running = sum(state(t) == "RUNNING" for t in trials)
        text = (f"running {running}, finished {len(ended) - stopped}, stopped early {stopped}, errored {errored} "
                f"of {self.total}")
        scored = [t for t in ended if self.metric in (t.last_result or {})]
        if scored:
            pick = min if self.mode == "min" else max
            best = pick(scored, key=lambda t: float(t.last_result[self.metric]))
            text += f"; best {self.metric} {float(best.last_result[self.metric]):.5g} ({best.trial_id})"
        return text

    def _values(self, trial: Any) -> str:
        values = SearchSpace.parse(self.space).decode(trial.config)
        return " ".join(f"{k}={json.dumps(v) if not isinstance(v, float) else f'{v:.4g}'}" for k, v in values.items())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"trial {trial.trial_id} started: {self._values(trial)} | {self.status(trials)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._print(self.status(trials))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        how = "stopped early by the scheduler" if outcome(result) == STOPPED else "finished"
        value = result.get(self.metric)
        shown = f"{self.metric} {float(value):.5g}" if value is not None else f"no {self.metric}"
        replay = " (recorded before the interruption)" if result.get(REPLAYED) else ""
        self._print(f"trial {trial.trial_id} {how} at step {result.get('step')}: {shown}{replay} | "
                    f"{self.status(trials, trial)}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = str(getattr(trial, "error_file", "") or "")
        self._print(f"trial {trial.trial_id} errored{f' (see {error})' if error else ''} | {self.status(trials, trial, error=True)}")
