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

**Feature store** (`galray features`): ``object_id`` (string, in the embedding file's order),
``feature_indices`` (``list<int32>``) and ``feature_values`` (``list<float32>``): the latents a
sparse autoencoder found active for that object, strongest first (a CSR row: a few dozen numbers
instead of the dense embedding), then the catalog columns carried through from the cutout store
(scalars only: numbers, booleans, strings). SAE checkpoint and weights hash, width, k, threshold,
the embedding store and the cutout shard the catalog came from are in the metadata.

**Reading a shard** (:func:`read_blocks`, used by embed and encode): a shard streams as Arrow
tables of exactly ``rows`` rows (the last may be shorter), read one block ahead in a thread
(pyarrow releases the GIL), so a stage holds two blocks whatever the shard's size.
:func:`tensor_view` gives a fixed-shape tensor column as a zero-copy numpy view.

**Writing a shard** (:func:`write_shard`, used by ingest, embed and encode): the errors file is
written (or a stale one removed) first and the output file last, each atomically, so an existing
output file always means its input shard is completely done and a rerun can skip it.

The cutout store's own contract (``object_id``, ``image``, the declared layout) is in
:mod:`galray.data.shards`. Pure pyarrow + numpy: no Ray.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from galray.data.arrow_safety import open_parquet, read_footer, read_table
from galray.data.ids import check_ids
from galray.data.limits import DecodeLimits
from galray.data.shards import ERRORS_DIR, ID_COLUMN, META_KEY, errors_table, list_parquet, read_metadata, write_table
from galray.storage import StorageConfig, StorageError, arrow_filesystem, join

EMBEDDING_COLUMN = "embedding"
CODES_COLUMN = "codes"
LABEL_COLUMN = "label"
FEATURE_INDICES_COLUMN = "feature_indices"
FEATURE_VALUES_COLUMN = "feature_values"
EMBED_STORE_VERSION = 1
CODES_STORE_VERSION = 1
FEATURES_STORE_VERSION = 1
Prepared = TypeVar("Prepared")  # what read_blocks yields for each block
# Embedding files: a dictionary and min/max statistics only for object_id. Parquet's defaults try a
# dictionary on the D floats of every row and keep their min/max, for nothing (measured at D=640:
# 15.2 -> 9.5 us of CPU a row to write; notes/ceiling.md, cut 5).
EMBED_WRITE_OPTIONS: dict[str, Any] = {"use_dictionary": [ID_COLUMN], "write_statistics": [ID_COLUMN]}


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
        return read_footer(fs, path).num_rows  # the raw footer: no Arrow type is built

    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(rows, paths))


def write_shard(table: pa.Table, errors: Sequence[Mapping[str, Any]] | pa.Table, fs: pafs.FileSystem, root: str,
                name: str, **options: Any) -> None:
    """Write one output shard ``root/name`` and its errors ``root/_errors/name`` (rows as mappings, or
    already a table of the errors contract): errors first (or a stale errors file from an earlier run
    removed), the shard last. ``options``: Parquet settings of the shard's file."""
    err_path = f"{root}/{ERRORS_DIR}/{name}"
    if len(errors):
        write_table(errors if isinstance(errors, pa.Table) else errors_table(errors), fs, err_path)
    elif fs.get_file_info(err_path).type != pafs.FileType.NotFound:
        fs.delete_file(err_path)
    write_table(table, fs, f"{root}/{name}", **options)


def exact_batches(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Re-cut a stream of record batches into tables of exactly ``size`` rows (the last may be shorter).

    Parquet readers end a batch at every row-group boundary; re-cutting keeps every block full.
    """
    pending: list[pa.RecordBatch] = []
    rows = 0
    for rb in batches:
        pending.append(rb)
        rows += rb.num_rows
        if rows < size:
            continue
        table = pa.Table.from_batches(pending)
        start = 0
        while rows - start >= size:
            yield table.slice(start, size)
            start += size
        rest = table.slice(start)
        pending, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(pending)


def read_blocks(fs: pafs.FileSystem, path: str, columns: Sequence[str], rows: int,
                then: Callable[[pa.Table], Prepared] = lambda table: table, source: str | None = None
                ) -> Iterator[Prepared]:
    """``then`` of each block of one shard: its ``columns`` as tables of exactly ``rows`` rows (the
    last may be shorter), in order, each carrying the file's schema metadata (the declared image layout).

    The next block is read, and ``then`` applied to it, in a thread while the caller works on this
    one: pyarrow's Parquet decoding (on a fixed-shape tensor column the largest cost of a row, ~0.1 ms
    at 64 px) and PIL's image decoding release the GIL, so on a GPU node reading and preprocessing
    overlap the forward pass. The caller holds two blocks whatever the shard's size.
    """
    # The allow-list first (arrow_safety; errors name ``source``, default the path): the file may have
    # changed since the driver listed it. pyarrow's record batches carry the file's schema metadata,
    # and the re-cut tables keep it.
    with open_parquet(fs, path, source) as pf, ThreadPoolExecutor(max_workers=1) as ahead:
        blocks = exact_batches(pf.iter_batches(batch_size=rows, columns=list(columns)), rows)

        def step() -> tuple[Prepared] | None:
            table = next(blocks, None)
            return None if table is None else (then(table),)

        pending = ahead.submit(step)
        while (got := pending.result()) is not None:
            pending = ahead.submit(step)
            yield got[0]


def shard_ids(fs: pafs.FileSystem, path: str, source: str | None = None) -> list[str | None]:
    """The ids of one shard as errors rows show them (:func:`galray.data.ids.check_ids`), its id column
    alone read through the allow-list: for a shard that a stage gives up on whole (on the driver)."""
    return check_ids(read_table(fs, path, source, columns=[ID_COLUMN]).column(ID_COLUMN), DecodeLimits())[0]


def tensor_view(column: pa.Array | pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """``(N, *shape)`` numpy view of a fixed-shape tensor (or fixed-size list) column, without a copy
    when it is one chunk (as one Parquet read gives it). Null rows read as whatever their slots hold:
    callers check ``column.null_count``."""
    arr = column.chunk(0) if isinstance(column, pa.ChunkedArray) and column.num_chunks == 1 else column
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    size = int(np.prod(shape))
    values = storage.values.slice(storage.offset * size, len(storage) * size)  # null rows keep their slots
    return values.to_numpy(zero_copy_only=values.null_count == 0).reshape(len(storage), *shape)


def list_column_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column -> (N, size) ndarray."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr, pa.ExtensionArray):
        arr = arr.storage
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def _with_metadata(table: pa.Table, metadata: Mapping[str, Any]) -> pa.Table:
    return table.replace_schema_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})


# --- embedding store ------------------------------------------------------------------------------

def embedding_table(ids: pa.Array | pa.ChunkedArray | Sequence[str], emb_ND: np.ndarray,
                    metadata: dict[str, Any]) -> pa.Table:
    """The embedding store's table: object_id (sorted) and embedding fixed_size_list<float32>[D].

    Arrow-native (no Python per row): the ids are sorted by ``pc.sort_indices`` (UTF-8 byte order,
    which is code-point order) and the embeddings taken in that order."""
    ids = pc.cast(ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string()),
                  pa.string())
    order = pc.sort_indices(ids)
    dim = int(metadata["embedding_dim"])
    flat = pa.array(np.ascontiguousarray(emb_ND[order.to_numpy()], dtype=np.float32).reshape(-1), pa.float32())
    table = pa.table({ID_COLUMN: ids.take(order), EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(flat, dim)})
    return _with_metadata(table, metadata)


def read_embeddings(uri: str, storage: StorageConfig | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(object_ids, embeddings (N, D) float32, provenance of the first file)`` of a whole embedding store.

    For analysis and tests on stores that fit in memory; Ray-scale readers use ``ray.data.read_parquet``.
    """
    fs, root = arrow_filesystem(uri, storage)
    files = list_parquet(fs, root)
    if not files:
        raise StorageError(f"{uri} holds no embedding files")
    tables = [read_table(fs, f.path, join(uri, f.base_name)) for f in files]
    meta = read_metadata(tables[0].schema)
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    emb = list_column_values(table.column(EMBEDDING_COLUMN)).astype(np.float32, copy=False)
    return np.asarray(table.column(ID_COLUMN).to_pylist(), dtype=object), emb, meta


# --- code store -----------------------------------------------------------------------------------

def codes_dtype(codebook_size: int) -> pa.DataType:
    return pa.int16() if codebook_size <= 2**15 else pa.int32()


def codes_table(ids: pa.Array | pa.ChunkedArray | Sequence[str], codes_NT: np.ndarray, labels_N: np.ndarray,
                codebook_size: int, metadata: dict[str, Any]) -> pa.Table:
    """The code store's table: object_id, codes fixed_size_list<int16|int32>[h*w], label int64."""
    typ = codes_dtype(codebook_size)
    flat = pa.array(np.ascontiguousarray(codes_NT).reshape(-1).astype(typ.to_pandas_dtype()), typ)
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    table = pa.table({ID_COLUMN: pc.cast(ids, pa.string()),
                      CODES_COLUMN: pa.FixedSizeListArray.from_arrays(flat, codes_NT.shape[1]),
                      LABEL_COLUMN: pa.array(np.asarray(labels_N, np.int64), pa.int64())})
    return _with_metadata(table, metadata)


# --- feature store --------------------------------------------------------------------------------

def is_catalog_type(typ: pa.DataType) -> bool:
    """Columns a derived store may carry through from a cutout store: plain numbers, booleans and strings.

    Anything else (tensors, lists, structs, extension types: some unpickle when read) stays behind."""
    return (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
            or pa.types.is_string(typ) or pa.types.is_large_string(typ))


def feature_table(ids: Sequence[str], offsets_N1: np.ndarray, indices: np.ndarray, values: np.ndarray,
                  catalog: pa.Table | None, metadata: Mapping[str, Any]) -> pa.Table:
    """The feature store's table: object_id, the sparse rows as two list columns sharing ``offsets_N1``
    (row i holds ``indices[offsets[i]:offsets[i+1]]``), then ``catalog``'s columns (same row order)."""
    offsets = pa.array(np.asarray(offsets_N1, np.int32), pa.int32())
    columns = {ID_COLUMN: pa.array(list(ids), pa.string()),
               FEATURE_INDICES_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(np.asarray(indices, np.int32))),
               FEATURE_VALUES_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(np.asarray(values, np.float32)))}
    if catalog is not None:
        if catalog.num_rows != len(ids):
            raise ValueError(f"catalog has {catalog.num_rows} rows for {len(ids)} objects")
        for name in catalog.column_names:
            if name not in columns:
                columns[name] = catalog.column(name)
    return _with_metadata(pa.table(columns), metadata)


def sparse_codes(codes_BF: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, F) codes -> CSR ``(offsets (B+1,), indices, values)``, each row's latents strongest first."""
    rows, cols = np.nonzero(codes_BF > 0)
    vals = codes_BF[rows, cols].astype(np.float32)
    order = np.lexsort((cols, -vals, rows))  # by row, then value descending (ties by latent index)
    counts = np.bincount(rows, minlength=codes_BF.shape[0])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, cols[order].astype(np.int32), vals[order]


def sparse_rows(table: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(offsets (N+1,), indices (nnz,) int32, values (nnz,) float32)`` of a feature table's sparse columns."""
    idx, val = table.column(FEATURE_INDICES_COLUMN), table.column(FEATURE_VALUES_COLUMN)
    if isinstance(idx, pa.ChunkedArray):
        idx, val = idx.combine_chunks(), val.combine_chunks()
    offsets = np.asarray(idx.offsets.to_numpy(), np.int64)
    start = offsets[0]
    flat_i = idx.values.to_numpy()[start:offsets[-1]] if len(idx) else np.zeros(0, np.int32)
    flat_v = val.values.to_numpy()[start:offsets[-1]] if len(val) else np.zeros(0, np.float32)
    return offsets - start, flat_i.astype(np.int32, copy=False), flat_v.astype(np.float32, copy=False)


def feature_files(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, [file paths])`` of a feature store; a clear error when it holds none."""
    fs, root = arrow_filesystem(uri, storage)
    files = [f.path for f in list_parquet(fs, root)]
    if not files:
        raise StorageError(f"{uri} holds no feature files (make them with `galray features`)")
    return fs, files


def top_activating(uri: str, latents: Sequence[int], n: int, storage: StorageConfig | None = None,
                   batch_rows: int = 65_536) -> dict[int, list[tuple[float, str, str]]]:
    """The ``n`` most activating objects of each latent in ``latents``: ``{latent: [(value, object_id,
    file), ...]}``, strongest first (ties by object_id).

    One streaming pass over the store that reads only the id and the two sparse columns, a record
    batch at a time, so memory holds one batch plus ``n`` candidates per latent whatever the size.
    """
    import heapq

    fs, files = feature_files(uri, storage)
    wanted = np.asarray(sorted({int(j) for j in latents}), np.int64)
    heaps: dict[int, list[tuple[float, str, str]]] = {int(j): [] for j in wanted}
    for path in files:
        pf = open_parquet(fs, path)  # the allow-list of arrow_safety: a feature store may come from elsewhere
        for batch in pf.iter_batches(batch_size=batch_rows,
                                     columns=[ID_COLUMN, FEATURE_INDICES_COLUMN, FEATURE_VALUES_COLUMN]):
            offsets, idx, val = sparse_rows(batch)
            hit = np.flatnonzero(np.isin(idx, wanted))
            if not hit.size:
                continue
            rows = np.searchsorted(offsets, hit, side="right") - 1
            ids = batch.column(ID_COLUMN).to_numpy(zero_copy_only=False)
            hit_j, hit_v = idx[hit], val[hit]
            for j in np.unique(hit_j):
                sel = np.flatnonzero(hit_j == j)
                if sel.size > n:  # only this batch's n strongest can enter the heap
                    sel = sel[np.argpartition(-hit_v[sel], n - 1)[:n]]
                heap = heaps[int(j)]
                for i in sel:
                    # min-heap of the n largest (value, id); _Desc makes ties keep the smaller object_id
                    item = (float(hit_v[i]), _Desc(str(ids[rows[i]])), path)
                    if len(heap) < n:
                        heapq.heappush(heap, item)
                    elif item > heap[0]:
                        heapq.heapreplace(heap, item)
    return {j: [(v, d.text, p) for v, d, p in sorted(h, reverse=True)] for j, h in heaps.items()}


class _Desc:
    """A string that orders backwards, so a min-heap of (value, _Desc(id)) prefers smaller ids on ties."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __lt__(self, other: "_Desc") -> bool:
        return self.text > other.text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.text == other.text


def read_features(uri: str, storage: StorageConfig | None = None, max_rows: int = 0,
                  columns: Sequence[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """The first ``max_rows`` rows (0: all) of a feature store, files in name order, with a ``_file``
    column naming each row's file, and the first file's metadata. For analysis samples that fit in memory."""
    fs, files = feature_files(uri, storage)
    tables, n, meta = [], 0, {}
    for path in files:
        pf = open_parquet(fs, path)  # the allow-list of arrow_safety: a feature store may come from elsewhere
        if not meta:
            meta = read_metadata(pf.schema_arrow)
        names = [c for c in pf.schema_arrow.names if columns is None or c in columns
                 or c in (ID_COLUMN, FEATURE_INDICES_COLUMN, FEATURE_VALUES_COLUMN)]
        for batch in pf.iter_batches(batch_size=65_536, columns=names):
            if max_rows and n + batch.num_rows > max_rows:
                batch = batch.slice(0, max_rows - n)
            table = pa.Table.from_batches([batch])
            tables.append(table.append_column("_file", pa.array([path] * table.num_rows, pa.string())))
            n += table.num_rows
            if max_rows and n >= max_rows:
                break
        if max_rows and n >= max_rows:
            break
    return pa.concat_tables(tables, promote_options="default"), meta
