"""The one-line summary every row-reading stage (ingest, embed, encode) prints when it finishes.

Convention (ARCHITECTURE.md): rows in, rows out, rows errored, wall time, rows/s. The invariant
``rows_in == rows_out + rows_errored`` holds for every stage; :meth:`StageSummary.check` says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class StageSummary:
    stage: str
    rows_in: int
    rows_out: int
    rows_errored: int
    seconds: float
    output: str = ""
    skipped_shards: int = 0

    @property
    def rows_per_s(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    def check(self) -> None:
        """Raise if valid plus errored rows do not add up to the input rows."""
        if self.rows_in != self.rows_out + self.rows_errored:
            raise RuntimeError(f"{self.stage}: {self.rows_in} rows in but {self.rows_out} out + "
                               f"{self.rows_errored} errored")

    def format(self) -> str:
        skipped = f", {self.skipped_shards} finished shard(s) skipped" if self.skipped_shards else ""
        return (f"{self.stage}: {self.rows_in:,} rows in, {self.rows_out:,} out, {self.rows_errored:,} errored, "
                f"{self.seconds:.1f} s, {self.rows_per_s:,.1f} rows/s{skipped}"
                + (f" -> {self.output}" if self.output else ""))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 2)}
