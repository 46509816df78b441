"""The stores the stages derive from a cutout store, and how every stage writes a shard.

Each row-reading stage writes one output file per input shard, named like it
(``shard-00042.parquet`` for the input's ``shard-00042.parquet``), plus the rows it could not
handle under ``_errors/`` (the errors contract of :mod:`galray.data.shards`):

**Embedding store** (`galray embed`): ``object_id`` (string, sorted within a file) and
``embedding`` (``fixed_size_list<float32>[D]``); provenance in the Parquet schema metadata under
``galray`` (JSON): model name, weights hash, preprocessing, galray version, embedding dim, source
shard.

**Code store** (`galray encode`): ``object_id`` (string, in the input's order), ``codes``
(``fixed_size_list<int16>[h*w]``, int32 beyond 32768 codes; the code grid in raster order) and
``label`` (int64, -1 for "no label"); ``grid``, ``codebook_size``, ``image_size``, checkpoint and
weights hash, preprocessing and source shard in the metadata.

**Writing a shard** (:func:`write_shard`, used by ingest, embed and encode): the errors file is
written (or a stale one removed) first and the output file last, each atomically, so an existing
output file always means its input shard is completely done and a rerun can skip it.

The cutout store's own contract (``object_id``, ``image``, the declared layout) is in
:mod:`galray.data.shards`. Pure pyarrow + numpy: no Ray.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galray.data.shards import ERRORS_DIR, ID_COLUMN, META_KEY, errors_table, list_parquet, read_metadata, write_table
from galray.storage import StorageConfig, StorageError, arrow_filesystem

EMBEDDING_COLUMN = "embedding"
CODES_COLUMN = "codes"
LABEL_COLUMN = "label"
EMBED_STORE_VERSION = 1
CODES_STORE_VERSION = 1


def shard_stem(path: str) -> str:
    """``shard-00042`` of ``.../shard-00042.parquet``: output files and errors files are named from it."""
    name = path.rsplit("/", 1)[-1]
    return name[: -len(".parquet")] if name.endswith(".parquet") else name


def footer_rows(fs: pafs.FileSystem, paths: Sequence[str], missing_ok: bool = False) -> list[int]:
    """Row counts from the Parquet footers (one small ranged read per file, in parallel).
    With ``missing_ok`` a file that does not exist counts 0 rows (an errors file of a clean shard)."""
    def rows(path: str) -> int:
        if missing_ok and fs.get_file_info(path).type == pafs.FileType.NotFound:
            return 0
        return pq.ParquetFile(path, filesystem=fs).metadata.num_rows

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(rows, paths))


def write_shard(table: pa.Table, errors: Sequence[Mapping[str, Any]], fs: pafs.FileSystem, root: str,
                name: str) -> None:
    """Write one output shard ``root/name`` and its errors ``root/_errors/name``: errors first (or a
    stale errors file from an earlier run removed), the shard last."""
    err_path = f"{root}/{ERRORS_DIR}/{name}"
    if errors:
        write_table(errors_table(errors), fs, err_path)
    elif fs.get_file_info(err_path).type != pafs.FileType.NotFound:
        fs.delete_file(err_path)
    write_table(table, fs, f"{root}/{name}")


def list_column_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column -> (N, size) ndarray."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def _with_metadata(table: pa.Table, metadata: Mapping[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})


# --- embedding store ------------------------------------------------------------------------------

def embedding_table(ids: np.ndarray, emb_ND: np.ndarray, metadata: dict[str, Any]) -> pa.Table:
    """The embedding store's table: object_id (sorted) and embedding fixed_size_list<float32>[D]."""
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    dim = int(metadata["embedding_dim"])
    flat = pa.array(np.ascontiguousarray(emb_ND[order], dtype=np.float32).reshape(-1), pa.float32())
    table = pa.table({ID_COLUMN: pa.array([str(i) for i in np.asarray(ids)[order]], pa.string()),
                      EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(flat, dim)})
    return _with_metadata(table, metadata)


def read_embeddings(uri: str, storage: StorageConfig | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(object_ids, embeddings (N, D) float32, provenance of the first file)`` of a whole embedding store.

    For analysis and tests on stores that fit in memory; Ray-scale readers use ``ray.data.read_parquet``.
    """
    fs, root = arrow_filesystem(uri, storage)
    files = list_parquet(fs, root)
    if not files:
        raise StorageError(f"{uri} holds no embedding files")
    tables = [pq.read_table(f.path, filesystem=fs) for f in files]
    meta = read_metadata(tables[0].schema)
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    emb = list_column_values(table.column(EMBEDDING_COLUMN)).astype(np.float32, copy=False)
    return np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=object), emb, meta


# --- code store -----------------------------------------------------------------------------------

def codes_dtype(codebook_size: int) -> pa.DataType:
    return pa.int16() if codebook_size <= 2**15 else pa.int32()


def codes_table(ids: list[str], codes_NT: np.ndarray, labels_N: np.ndarray, codebook_size: int,
                metadata: dict[str, Any]) -> pa.Table:
    """The code store's table: object_id, codes fixed_size_list<int16|int32>[h*w], label int64."""
    typ = codes_dtype(codebook_size)
    flat = pa.array(np.ascontiguousarray(codes_NT).reshape(-1).astype(typ.to_pandas_dtype()), typ)
    table = pa.table({ID_COLUMN: pa.array(ids, pa.string()),
                      CODES_COLUMN: pa.FixedSizeListArray.from_arrays(flat, codes_NT.shape[1]),
                      LABEL_COLUMN: pa.array(np.asarray(labels_N, np.int64), pa.int64())})
    return _with_metadata(table, metadata)
