"""Parquet shards of the cutout store and of errors outputs: the data contract, in pure pyarrow.

**Cutout store contract.** A store is a folder (local or ``s3://``) of Parquet shards named
``shard-00000.parquet``, ``shard-00001.parquet``, ... (deterministic: shard ``i`` always holds the
same rows for the same inputs). Each shard has one row per object:

- ``object_id``: string, unique across the store;
- ``image``: Arrow's canonical fixed-shape tensor (``arrow.fixed_shape_tensor``), one tensor a row,
  readable by any Arrow reader and by Ray Data as an ndarray column;
- catalog columns: ra, dec, labels, simulated ground truth, ...

The image layout is declared in the Parquet schema metadata under the key ``galray`` as JSON::

    {"store_version": 1, "image": {"column": "image", "shape": [64, 64, 3], "layout": "HWC",
                                   "dtype": "uint8", "bands": ["g", "r", "z"], "encoding": "tensor"}}

``layout`` is ``HWC`` (colour renderings, uint8 in [0, 255]) or ``CHW`` (float flux, one plane
per band). Readers use the declared shape, so they never guess.

**Errors output contract.** Rows a stage could not handle go to ``<output>/_errors/`` as Parquet
with columns ``object_id``, ``stage``, ``reason``, ``source_file``. Valid plus errored rows always
equal the input rows.

No Ray here: shards are written from inside Ray tasks, and by plain scripts alike.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from galray.config import check

STORE_VERSION = 1
META_KEY = b"galray"
IMAGE_COLUMN = "image"
ID_COLUMN = "object_id"
ERRORS_DIR = "_errors"
CONFIG_NAME = "_config.yaml"
ERROR_COLUMNS = ("object_id", "stage", "reason", "source_file")


def shard_name(index: int, prefix: str = "shard") -> str:
    """Deterministic shard file name: ``shard-00042.parquet``."""
    return f"{prefix}-{index:05d}.parquet"


@dataclass(frozen=True)
class ImageSpec:
    """How the image column of a store is laid out (written to the Parquet metadata)."""

    shape: tuple[int, ...]
    """Per-row tensor shape, e.g. (64, 64, 3) for HWC or (3, 64, 64) for CHW."""
    layout: Literal["HWC", "CHW"] = "HWC"
    """Axis order: HWC for colour renderings, CHW for multi-band flux."""
    dtype: str = "uint8"
    """numpy dtype name: uint8 (display scaled 0..255), float16 or float32 (flux)."""
    bands: tuple[str, ...] = ()
    """Band or channel names in channel order, e.g. ("g", "r", "z")."""
    column: str = IMAGE_COLUMN
    """Name of the image column."""

    def __post_init__(self) -> None:
        check(len(self.shape) == 3, "shape", f"expected 3 axes (H, W, C or C, H, W), got {self.shape}")
        check(self.dtype in ("uint8", "float16", "float32"), "dtype", f"unsupported image dtype {self.dtype!r}")
        n_channels = self.shape[2] if self.layout == "HWC" else self.shape[0]
        check(not self.bands or len(self.bands) == n_channels, "bands",
              f"{len(self.bands)} band names for {n_channels} channels")

    @property
    def height(self) -> int:
        return self.shape[0] if self.layout == "HWC" else self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[1] if self.layout == "HWC" else self.shape[2]

    @property
    def channels(self) -> int:
        return self.shape[2] if self.layout == "HWC" else self.shape[0]

    def to_json(self) -> dict[str, Any]:
        return {"column": self.column, "shape": list(self.shape), "layout": self.layout, "dtype": self.dtype,
                "bands": list(self.bands), "encoding": "tensor"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ImageSpec":
        return cls(shape=tuple(data["shape"]), layout=data.get("layout", "HWC"), dtype=data.get("dtype", "uint8"),
                   bands=tuple(data.get("bands", ())), column=data.get("column", IMAGE_COLUMN))


def store_metadata(spec: ImageSpec, extra: Mapping[str, Any] | None = None) -> dict[bytes, bytes]:
    payload = {"store_version": STORE_VERSION, "image": spec.to_json(), **(extra or {})}
    return {META_KEY: json.dumps(payload, sort_keys=True).encode()}


def read_metadata(schema: pa.Schema) -> dict[str, Any]:
    """The ``galray`` metadata of a shard schema ({} if absent)."""
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def spec_from_schema(schema: pa.Schema) -> ImageSpec:
    meta = read_metadata(schema)
    if "image" in meta:
        return ImageSpec.from_json(meta["image"])
    # Not written by galray: infer from a fixed-shape tensor column named "image".
    field = schema.field(IMAGE_COLUMN)
    if isinstance(field.type, pa.FixedShapeTensorType):
        shape = tuple(field.type.shape)
        layout = "HWC" if shape[-1] <= 4 else "CHW"
        return ImageSpec(shape=shape, layout=layout, dtype=field.type.value_type.to_pandas_dtype().__name__)
    raise ValueError("no galray image metadata and no fixed-shape tensor 'image' column in this store")


def tensor_array(images: np.ndarray) -> pa.ExtensionArray:
    """(N, *shape) ndarray -> Arrow fixed-shape tensor array (zero-copy where possible)."""
    images = np.ascontiguousarray(images)
    if len(images) == 0:  # pyarrow refuses an empty ndarray; build the empty column from the storage type
        typ = pa.fixed_shape_tensor(pa.from_numpy_dtype(images.dtype), list(images.shape[1:]))
        return pa.ExtensionArray.from_storage(typ, pa.array([], typ.storage_type))
    return pa.FixedShapeTensorArray.from_numpy_ndarray(images)


def make_table(columns: Mapping[str, Any], spec: ImageSpec, extra_metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """Build a store table: ``columns`` holds object_id, the image batch (N, *spec.shape) and catalog columns."""
    images = np.asarray(columns[spec.column])
    if images.shape[1:] != tuple(spec.shape) or images.dtype != np.dtype(spec.dtype):
        raise ValueError(f"image batch is {images.dtype}{images.shape[1:]}, spec says {spec.dtype}{spec.shape}")
    arrays, names = [], []
    for name, values in columns.items():
        names.append(name)
        if name == spec.column:
            arrays.append(tensor_array(images))
        else:
            arrays.append(pa.array(values.tolist() if isinstance(values, np.ndarray) and values.dtype == object
                                   else values))
    table = pa.Table.from_arrays(arrays, names=names)
    return table.replace_schema_metadata(store_metadata(spec, extra_metadata))


def images_from_table(table: pa.Table, spec: ImageSpec | None = None) -> np.ndarray:
    """The image column as an (N, *shape) ndarray."""
    spec = spec or spec_from_schema(table.schema)
    col = table.column(spec.column).combine_chunks()
    if isinstance(col.type, pa.FixedShapeTensorType):
        return col.to_numpy_ndarray()
    # Ray's own tensor extension, or a flat fixed-size list: reshape with the declared shape.
    storage = col.storage if isinstance(col, pa.ExtensionArray) else col
    flat = storage.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape((len(col), *spec.shape)).astype(spec.dtype, copy=False)


def write_table(table: pa.Table, fs: pafs.FileSystem, path: str, compression: str = "zstd", **options: Any) -> int:
    """Write one Parquet file and return its size in bytes (``options``: more ``pq.write_table`` settings).

    Local files are written under a temporary name and renamed, so a crash never leaves a
    half-written shard that a resumed run would mistake for a finished one. An S3 PUT is
    atomic already.
    """
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}"
        pq.write_table(table, tmp, filesystem=fs, compression=compression, **options)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs, compression=compression, **options)
    return fs.get_file_info(path).size


def list_parquet(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Parquet files directly under ``path`` (no ``_errors``, no hidden or temporary files), sorted by name."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith((".", "_"))), key=lambda i: i.base_name)


def errors_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Errors output rows -> table with the contract's columns (all strings)."""
    return pa.table({c: pa.array([None if r.get(c) is None else str(r.get(c)) for r in rows], pa.string())
                     for c in ERROR_COLUMNS})


def errors_of(ids: pa.Array | pa.ChunkedArray, reasons: pa.Array | pa.ChunkedArray, stage: str,
              source: str) -> pa.Table:
    """The errors output of one shard from Arrow columns (the failing rows' ids and reasons), with no
    Python per row: the same table as :func:`errors_table`."""
    n = len(ids)
    return pa.table({"object_id": pc.cast(ids, pa.string()), "stage": pa.array([stage] * n, pa.string()),
                     "reason": pc.cast(reasons, pa.string()), "source_file": pa.array([source] * n, pa.string())})

