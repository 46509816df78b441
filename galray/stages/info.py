"""`galray info`: what a store holds, from its Parquet footers and label columns only.

Rows, shards, bytes, the image column's shape, dtype and layout, every column with its type,
counts for label-like columns and the rows in the errors output (:func:`galray.data.store.store_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from galray.config import check
from galray.storage import StorageConfig

if TYPE_CHECKING:
    from galray.data.store import StoreSummary


@dataclass(frozen=True)
class InfoJob:
    """`galray info`: which store."""

    input: str = ""
    """Store URI: a local folder, file:// or s3://bucket/prefix."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "a store URI is required")


def info(job: InfoJob) -> "StoreSummary":
    """The summary of the store at ``job.input``."""
    from galray.data.store import store_summary

    return store_summary(job.input, job.storage)
