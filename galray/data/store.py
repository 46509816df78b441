"""The cutout store seen from Ray: URIs to ``ray.data.Dataset``, shard listing, and ``galray info``.

The on-disk contract lives in :mod:`galray.data.shards`. This is the only data module that imports
Ray; the readers and writers it wires are plain pyarrow, so they also run in a script.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from galray.data.arrow_safety import open_parquet, read_schema
from galray.data.shards import ERRORS_DIR, ID_COLUMN, ImageSpec, list_parquet, read_metadata, spec_from_schema
from galray.data.resume import input_shards
from galray.data.stores import footer_rows
from galray.session import ensure_ray
from galray.storage import StorageConfig, check_access, join

# Columns worth counting in `galray info`: strings and integers with few distinct values.
MAX_CATEGORIES = 50


def shard_paths(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """``(filesystem, [shard paths])`` of a store, sorted; a clear error if there is none."""
    fs, _, files = input_shards(uri, storage)
    return fs, [f.path for f in files]


def read_store(uri: str | Sequence[str], storage: StorageConfig | None = None, columns: list[str] | None = None,
               **read_kwargs: Any) -> ray.data.Dataset:
    """Stream a cutout store as a Ray Dataset (one read task per shard; nothing is held in memory).

    ``uri`` may list several stores on one filesystem, read as one dataset: the caller checks that
    ``columns`` have the same types in each (other columns are not read).
    In numpy batches the image column arrives as an (N, *shape) ndarray.
    """
    ensure_ray()
    uris = [uri] if isinstance(uri, str) else list(uri)
    fs, paths = shard_paths(uris[0], storage)
    for more in uris[1:]:
        paths += shard_paths(more, storage)[1]
    ds = ray.data.read_parquet(paths, filesystem=fs, **read_kwargs)
    # select_columns is pushed down into the Parquet read (read_parquet's columns= is deprecated)
    return ds.select_columns(columns) if columns else ds


def read_spec(uri: str, storage: StorageConfig | None = None) -> ImageSpec:
    fs, paths = shard_paths(uri, storage)
    return spec_from_schema(read_schema(fs, paths[0], uri))


@dataclass
class StoreSummary:
    """What `galray info` prints."""

    uri: str
    shards: int
    rows: int
    bytes: int
    image: ImageSpec | None
    columns: dict[str, str]
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["image"] = self.image.to_json() if self.image else None
        return out

    def format(self) -> str:
        lines = [f"store    {self.uri}",
                 f"rows     {self.rows:,} in {self.shards} shard(s), {self.bytes / 1e6:,.1f} MB"]
        if self.image:
            bands = f" bands {','.join(self.image.bands)}" if self.image.bands else ""
            lines.append(f"image    {self.image.column}: {self.image.dtype} {tuple(self.image.shape)} "
                         f"{self.image.layout}{bands}")
        if self.errors:
            lines.append(f"errors   {self.errors:,} row(s) in {ERRORS_DIR}/")
        lines.append("columns  " + ", ".join(f"{k} ({v})" for k, v in self.columns.items()))
        for name, counts in self.label_counts.items():
            top = ", ".join(f"{k}: {v:,}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            lines.append(f"labels   {name}: {top}")
        return "\n".join(lines)


def _is_categorical(name: str, typ: pa.DataType) -> bool:
    if name == ID_COLUMN:
        return False
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_dictionary(typ) or (
        pa.types.is_integer(typ) and ("label" in name or "class" in name))


def _type_label(typ: pa.DataType) -> str:
    if isinstance(typ, pa.FixedShapeTensorType):
        return f"tensor {typ.value_type}{list(typ.shape)}"
    return "tensor" if isinstance(typ, pa.ExtensionType) else str(typ)


def store_summary(uri: str, storage: StorageConfig | None = None) -> StoreSummary:
    """Rows, shards, bytes, image layout, columns and label counts, reading footers and label columns only."""
    fs, paths = shard_paths(uri, storage)  # every footer checked against the allow-list
    rows = nbytes = 0
    schema = None
    counters: dict[str, Counter] = {}
    for path in paths:
        info = fs.get_file_info(path)
        nbytes += info.size or 0
        pf = open_parquet(fs, path, join(uri, info.base_name))
        rows += pf.metadata.num_rows
        if schema is None:
            schema = pf.schema_arrow
            counters = {f.name: Counter() for f in schema if _is_categorical(f.name, f.type)}
        if counters:
            table = pf.read(columns=list(counters))
            for name in list(counters):
                counts = pc.value_counts(table.column(name)).to_pylist()
                counters[name].update({str(c["values"]): c["counts"] for c in counts})
                if len(counters[name]) > MAX_CATEGORIES:  # an identifier-like column, not a label
                    del counters[name]
    assert schema is not None
    try:
        spec = spec_from_schema(schema)
    except (ValueError, KeyError):
        spec = None
    _, root = check_access(uri, storage)
    errors = sum(footer_rows(fs, [f.path for f in list_parquet(fs, f"{root}/{ERRORS_DIR}")]))
    columns = {f.name: _type_label(f.type) for f in schema}
    meta = {k: v for k, v in read_metadata(schema).items() if k not in ("image", "store_version")}
    return StoreSummary(uri=uri, shards=len(paths), rows=rows, bytes=nbytes, image=spec, columns=columns,
                        label_counts={k: dict(v) for k, v in counters.items()}, errors=errors, metadata=meta)


def errors_uri(uri: str) -> str:
    return join(uri, ERRORS_DIR)
