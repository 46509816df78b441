"""Similarity search over an embedding store: the galaxies nearest a query galaxy by cosine similarity.

What Stein et al. 2021 (arXiv:2110.13151) built on their self-supervised encoder of 42 million DESI
Legacy Survey galaxies: pick a galaxy, get the ones that look like it. Here the search is exact, in
two streaming passes over the store (the query's row, then every row scored against it), a record
batch at a time, so memory holds one batch and ``k`` candidates whatever the store's size, and it
reads local folders and S3 alike. An exact pass costs one read of the store per query (about 10 s
per million 256-d rows on a 2-core machine busy with other work): for many queries over hundreds
of millions of rows an approximate index (faiss, hnswlib) built once would answer faster; galray
does not build one yet.

Embeddings are compared as directions (cosine similarity, what a contrastive loss such as SimCLR's
NT-Xent compares): an embedding's length mostly carries brightness and signal-to-noise. Rows whose
embedding is zero or not finite cannot be compared and are counted, not returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galray.data.arrow_safety import open_parquet
from galray.data.shards import ID_COLUMN, list_parquet
from galray.data.stores import EMBEDDING_COLUMN, list_column_values
from galray.storage import StorageConfig, StorageError, arrow_filesystem, join

BATCH_ROWS = 65_536
"""Rows read at a time: 64 MB of 256-d float32 embeddings."""


class QueryError(ValueError):
    """The query galaxy is not in the store, or its embedding has no direction."""


@dataclass(frozen=True)
class Neighbour:
    object_id: str
    similarity: float
    """Cosine similarity to the query, in [-1, 1]."""


@dataclass(frozen=True)
class NeighbourSearch:
    """The result of :func:`nearest_neighbours`."""

    query: str
    neighbours: list[Neighbour]
    """Most similar first; ties by object_id."""
    rows_searched: int
    rows_unusable: int = 0
    """Rows left out: a zero or non-finite embedding has no direction."""


def _batches(uri: str, storage: StorageConfig | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    fs, root = arrow_filesystem(uri, storage)
    files = list_parquet(fs, root)
    if not files:
        raise StorageError(f"{uri} holds no embedding files (make them with `galray embed`)")
    for f in files:
        # The allow-list of arrow_safety: an embedding store may come from elsewhere.
        pf = open_parquet(fs, f.path, join(uri, f.base_name))
        names = set(pf.schema_arrow.names)
        if not {ID_COLUMN, EMBEDDING_COLUMN} <= names:
            raise StorageError(f"{join(uri, f.base_name)} is not an embedding store's file: it needs the columns "
                               f"{ID_COLUMN} and {EMBEDDING_COLUMN} (has {', '.join(sorted(names))})")
        yield from pf.iter_batches(batch_size=batch_rows, columns=[ID_COLUMN, EMBEDDING_COLUMN])


def _embeddings(batch: pa.RecordBatch) -> np.ndarray:
    """(N, D) float32 embeddings of a batch; null rows read as NaN."""
    col = batch.column(EMBEDDING_COLUMN)
    emb = list_column_values(col).astype(np.float32, copy=False)
    if col.null_count:
        emb = emb.copy()
        emb[np.asarray(col.is_null())] = np.nan
    return emb


def _cosines(emb_ND: np.ndarray, q_D: np.ndarray) -> np.ndarray:
    """Cosine similarity of every row to the unit vector ``q``; NaN where a row has no direction."""
    norm = np.sqrt(np.einsum("nd,nd->n", emb_ND, emb_ND, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = (emb_ND @ q_D.astype(np.float32)).astype(np.float64) / norm
    sim[~((norm > 0) & np.isfinite(norm))] = np.nan
    return sim


def _candidates(sim_N: np.ndarray, usable_N: np.ndarray, k: int) -> np.ndarray:
    """Indices of the usable rows that can be among the ``k`` most similar: the k best and any tied with the k-th."""
    idx = np.flatnonzero(usable_N)
    if len(idx) > k:
        s = sim_N[idx]
        idx = idx[s >= np.partition(s, len(s) - k)[len(s) - k]]
    return idx


def _ranked(sim_N: np.ndarray, ids_N: np.ndarray) -> np.ndarray:
    """Order of rows by similarity, most similar first, ties by object_id (lexsort's last key is the primary one)."""
    return np.lexsort((ids_N.astype(str), -sim_N))


def _direction(v_D: np.ndarray) -> np.ndarray | None:
    """``v`` scaled to unit length (float64); None when it is zero or not finite (it has no direction)."""
    v = np.asarray(v_D, np.float64)
    norm = float(np.linalg.norm(v))
    return v / norm if np.isfinite(norm) and norm > 0 else None


def nearest_rows(emb_ND: np.ndarray, ids_N: np.ndarray, query: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """In memory: (row indices, cosine similarities) of the ``k`` rows of ``emb_ND`` most similar to row
    ``query``, the query left out, in the order of :func:`nearest_neighbours` (for `galray analyze`'s sample)."""
    q = _direction(emb_ND[query])
    if q is None:
        return np.empty(0, int), np.empty(0)
    sim = _cosines(np.asarray(emb_ND, np.float32), q)
    usable = np.isfinite(sim)
    usable[query] = False
    idx = _candidates(sim, usable, k)
    order = _ranked(sim[idx], np.asarray(ids_N, dtype=object)[idx])[:k]
    return idx[order], np.clip(sim[idx[order]], -1.0, 1.0)


def query_embedding(uri: str, object_id: str, storage: StorageConfig | None = None,
                    batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """The unit-length embedding of ``object_id``: a clear error when the store has no such row or its
    embedding has no direction."""
    for batch in _batches(uri, storage, batch_rows):
        hit = pc.equal(batch.column(ID_COLUMN), pa.scalar(object_id, batch.schema.field(ID_COLUMN).type))
        if not pc.any(hit).as_py():
            continue
        q = _direction(_embeddings(batch.filter(hit))[0])
        if q is None:
            raise QueryError(f"{object_id}'s embedding is zero or not finite: it has no nearest neighbours")
        return q
    raise QueryError(f"{object_id!r} is not in the embedding store {uri}")


def nearest_neighbours(uri: str, object_id: str, k: int = 20, storage: StorageConfig | None = None,
                       batch_rows: int = BATCH_ROWS) -> NeighbourSearch:
    """The ``k`` rows of the embedding store at ``uri`` most similar (cosine) to ``object_id``'s, the
    query itself left out, most similar first (ties by object_id). Exact; two streaming passes."""
    if k < 1:
        raise ValueError("k must be at least 1")
    q = query_embedding(uri, object_id, storage, batch_rows)
    best_ids = np.empty(0, dtype=object)
    best_sim = np.empty(0)
    rows = unusable = 0
    for batch in _batches(uri, storage, batch_rows):
        sim = _cosines(_embeddings(batch), q)
        rows += len(sim)
        usable = np.isfinite(sim)
        unusable += int((~usable).sum())
        usable &= ~np.asarray(pc.equal(batch.column(ID_COLUMN), object_id).fill_null(False))
        idx = _candidates(sim, usable, k)
        # Only the candidates' ids become Python strings.
        cand_ids = np.concatenate([best_ids, np.asarray(batch.column(ID_COLUMN).take(idx).to_pylist(), dtype=object)])
        cand_sim = np.concatenate([best_sim, sim[idx]])
        order = _ranked(cand_sim, cand_ids)[:k]
        best_ids, best_sim = cand_ids[order], cand_sim[order]
    return NeighbourSearch(object_id, [Neighbour(str(i), float(np.clip(s, -1.0, 1.0)))
                                       for i, s in zip(best_ids, best_sim)], rows, unusable)
