"""What stages print when they finish.

Every verb's function returns a :class:`Summary`: ``format()`` is the line the CLI prints,
``to_json()`` what ``--json`` prints. Row-reading stages (ingest, embed, encode) return a
:class:`StageSummary`: rows in, rows out, rows errored, wall time, rows/s (ARCHITECTURE.md). The
invariant ``rows_in == rows_out + rows_errored`` holds for every stage; :meth:`StageSummary.check`
says so.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

# Default of every row-reading stage's `max_error_fraction`. Real surveys have scattered bad cutouts
# (blank, truncated, off the footprint: typically well under a few percent); a tenth of the rows
# failing points at the job instead (wrong format, bands, id column or limits), which a person should
# look at before the output is used. 0 makes any errored row an error of the job; 1 never fails.
DEFAULT_MAX_ERROR_FRACTION = 0.1


class Summary(Protocol):
    """What a verb's function returns."""

    def format(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


class FieldsSummary:
    """Base of a summary dataclass whose JSON is its fields."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class StageSummary:
    stage: str
    rows_in: int
    rows_out: int
    rows_errored: int
    seconds: float
    output: str = ""
    skipped_shards: int = 0
    startup_s: float | None = None
    """Seconds until the first rows came back (workers, model load, compilation); None if not measured."""
    steady_rows_per_s: float | None = None
    """Rows/s once the job has ramped up (see :class:`SteadyRate`): the rate a long run settles at."""
    steady_window_s: tuple[float, float] | None = None
    """(from, to) seconds after the start over which ``steady_rows_per_s`` was measured."""
    max_error_fraction: float = 1.0
    """The job's limit on ``error_fraction``; above it the CLI exits non-zero (:attr:`too_many_errors`)."""

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_fraction(self) -> float:
        """Errored rows over the rows this run read (0 when it read none)."""
        return self.rows_errored / self.rows_in if self.rows_in else 0.0

    @property
    def too_many_errors(self) -> bool:
        return self.error_fraction > self.max_error_fraction

    def error_line(self) -> str:
        """The one line the CLI prints before exiting non-zero."""
        return (f"{self.rows_errored:,} of {self.rows_in:,} rows errored ({self.error_fraction:.1%}), more than "
                f"max_error_fraction {self.max_error_fraction:g}: everything else was written; see the reasons in "
                f"{self.output.rstrip('/')}/_errors/ (raise --max-error-fraction to accept them)")

    def check(self) -> None:
        """Raise if valid plus errored rows do not add up to the input rows."""
        if self.rows_in != self.rows_out + self.rows_errored:
            raise RuntimeError(f"{self.stage}: {self.rows_in} rows in but {self.rows_out} out + "
                               f"{self.rows_errored} errored")

    def format(self) -> str:
        skipped = f", {self.skipped_shards} finished shard(s) skipped" if self.skipped_shards else ""
        steady = (f" (start-up {self.startup_s:.1f} s, then {self.steady_rows_per_s:,.1f} rows/s)"
                  if self.startup_s is not None and self.steady_rows_per_s is not None else "")
        return (f"{self.stage}: {self.rows_in:,} rows in, {self.rows_out:,} out, {self.rows_errored:,} errored, "
                f"{self.seconds:.1f} s, {self.rows_per_s:,.1f} rows/s{steady}{skipped}"
                + (f" -> {self.output}" if self.output else ""))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 2), "error_fraction": round(self.error_fraction, 6)}


class SteadyRate:
    """Start-up and steady rate of a streaming job: when the first rows came back, and the rate later on.

    The steady window opens at the first arrival once ``ramp_fraction`` of the ``total`` rows are
    back, when every replica has long finished starting (replicas that start or compile at
    different speeds make the first stretch slower), and closes at the last arrival: the rate a
    run over millions of rows converges to. Without a total, it opens at the first arrival.
    """

    def __init__(self, t0: float, total: int = 0, ramp_fraction: float = 0.25,
                 clock: Callable[[], float] = time.perf_counter):
        self.t0, self.clock = t0, clock
        self.ramp_rows = int(total * ramp_fraction)
        self.first_s: float | None = None  # time of the first arrival
        self.window: tuple[float, int] | None = None  # (time, rows done) where the steady window opens
        self.last: tuple[float, int] | None = None

    def update(self, rows_done: int) -> None:
        now = self.clock()
        if self.first_s is None:
            self.first_s = now
        if self.window is None and rows_done >= self.ramp_rows:
            self.window = (now, rows_done)
        self.last = (now, rows_done)

    @property
    def startup_s(self) -> float | None:
        return None if self.first_s is None else round(self.first_s - self.t0, 2)

    @property
    def rows_per_s(self) -> float | None:
        if self.window is None or self.last is None or self.last[0] <= self.window[0]:
            return None
        return round((self.last[1] - self.window[1]) / (self.last[0] - self.window[0]), 2)

    @property
    def window_s(self) -> tuple[float, float] | None:
        """(from, to) seconds after ``t0`` of the window ``rows_per_s`` covers."""
        if self.rows_per_s is None:
            return None
        return round(self.window[0] - self.t0, 2), round(self.last[0] - self.t0, 2)
