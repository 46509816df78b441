"""`galray neighbours`: the galaxies most like one galaxy, by cosine similarity of their embeddings.

An exact, streaming search of an embedding store (:mod:`galray.data.neighbours`), local or on S3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from galray.config import ConfigError, check
from galray.storage import StorageConfig

if TYPE_CHECKING:
    from galray.data.neighbours import NeighbourSearch


@dataclass(frozen=True)
class NeighboursJob:
    """`galray neighbours`: which store, which galaxy, how many."""

    embeddings: str = ""
    """Embedding store URI (written by `galray embed`): a local folder, file:// or s3://bucket/prefix."""
    id: str = ""
    """object_id of the query galaxy."""
    k: int = 20
    """Neighbours returned, most similar first (the query itself left out)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(bool(self.embeddings), "embeddings", "an embedding store URI is required")
        check(bool(self.id), "id", "the object_id of the query galaxy is required")
        check(self.k >= 1, "k", "must be at least 1")


@dataclass(frozen=True)
class NeighboursSummary:
    """What `galray neighbours` prints."""

    embeddings: str
    search: "NeighbourSearch"

    def to_json(self) -> dict[str, Any]:
        s = self.search
        return {"embeddings": self.embeddings, "query": s.query, "rows_searched": s.rows_searched,
                "rows_unusable": s.rows_unusable,
                "neighbours": [{"object_id": n.object_id, "similarity": round(n.similarity, 6)} for n in s.neighbours]}

    def format(self) -> str:
        s = self.search
        lines = [f"nearest {len(s.neighbours)} of {s.rows_searched:,} rows to {s.query} (cosine similarity)"
                 + (f"; {s.rows_unusable:,} row(s) with a zero or non-finite embedding left out"
                    if s.rows_unusable else "")]
        width = max([len(n.object_id) for n in s.neighbours] + [9])
        lines.append(f"{'rank':>4}  {'object_id':<{width}}  similarity")
        lines += [f"{i:>4}  {n.object_id:<{width}}  {n.similarity:.4f}" for i, n in enumerate(s.neighbours, 1)]
        return "\n".join(lines)


def neighbours(job: NeighboursJob) -> NeighboursSummary:
    """The ``job.k`` galaxies of ``job.embeddings`` nearest ``job.id``."""
    from galray.data.neighbours import QueryError, nearest_neighbours

    try:
        return NeighboursSummary(job.embeddings, nearest_neighbours(job.embeddings, job.id, job.k, job.storage))
    except QueryError as err:
        raise ConfigError("id", str(err)) from None
