"""Start or join Ray, once per process, with settings that suit both a laptop and a cluster.

On a cluster (``RAY_ADDRESS`` set, or a job submitted with ``ray job submit``) this joins it;
on a laptop it starts a local Ray sized to the machine. Every Ray-layer entrypoint calls
:func:`ensure_ray` so library functions also work outside the CLI.
"""

from __future__ import annotations

import logging
import os
import sys

import ray

# Attempts beyond the first that a task gets on the same input. Ray's defaults retry without end
# (Ray Data's tasks, its actor pools' restarts and calls, and tasks its memory monitor kills): an
# input that kills its worker every time would hang the job. Stages (ingest's units, embed's and
# encode's shards) give up after these and put the input's rows in their errors output.
MAX_RETRIES = 3


def gave_up(worker: str) -> str:
    """The errors-row reason of an input whose ``worker`` died on each of its 1 + MAX_RETRIES attempts."""
    return f"gave up after {MAX_RETRIES} retries: the {worker} died on every attempt (killed, e.g. for memory)"


def ensure_ray(num_cpus: int | None = None, quiet: bool | None = None) -> None:
    """Initialise Ray if it is not running in this process yet.

    ``quiet`` defaults to on unless ``GALRAY_VERBOSE=1`` is set.
    """
    if quiet is None:
        quiet = os.environ.get("GALRAY_VERBOSE", "0") in ("", "0")
    if ray.is_initialized():
        return
    # quiet: worker processes' own log lines (Ray Train's per-report lines, placement-group
    # chatter) stay in Ray's log files; errors still reach the driver as exceptions.
    kwargs: dict = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=not quiet,
                        logging_level=logging.WARNING if quiet else logging.INFO)
    # Authentication stays as Ray sets it (token auth for a local Ray, Ray >= 2.52): galray never turns it off.
    # A local Ray retries a task killed for memory MAX_RETRIES times, not without end (on a cluster,
    # set RAY_task_oom_retries in the nodes' environment).
    os.environ.setdefault("RAY_task_oom_retries", str(MAX_RETRIES))
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    # Progress bars on a terminal; in logs (CI, jobs) Ray prints periodic progress lines instead.
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = not quiet
    if quiet and not sys.stderr.isatty():
        # Without a terminal Ray Data logs a multi-line progress block every few seconds;
        # in CI logs and job output that drowns everything else. Warnings still show.
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> float:
    """GPUs the Ray cluster has in total (0 on a laptop or CI)."""
    ensure_ray()
    return float(ray.cluster_resources().get("GPU", 0.0))
