"""Resumable shard-to-shard stages: which input shards still need an output.

Every row-reading stage (embed, encode) writes one output file per input shard, named like it,
plus the shard's errors under ``_errors/``. **A shard is finished when its output rows plus its
error rows equal its input rows**, all three counted from Parquet footers (:func:`finished`, also
used by ingest and simulate): an output that is missing, unreadable (cut short, not Parquet) or
short is recomputed, whatever wrote it. Which run wrote a folder is :mod:`galray.data.provenance`'s
business; this module only counts rows.

Input stores are untrusted: :func:`input_shards`, through which every reader of a store lists it
(embed, encode, training, ``info``), checks every shard's footer against the allow-list of
:mod:`galray.data.arrow_safety` on the driver before anything else happens. A store with a column
type galray does not read, or a shard that is not readable Parquet, is refused at once, naming
the file (and the column). Pure pyarrow, no Ray.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs

from galray.data.arrow_safety import Footer, UnreadableParquetError, checked_footer, read_footer
from galray.data.limits import DecodeLimits
from galray.data.shards import ERRORS_DIR, list_parquet
from galray.storage import StorageConfig, StorageError, check_access, join

FOOTER_THREADS = 16  # parallel footer reads (one or two small ranged reads each; S3 round trips dominate)


def checked_footers(fs: pafs.FileSystem, uri: str, shards: list[pafs.FileInfo],
                    limits: DecodeLimits = DecodeLimits()) -> list[Footer]:
    """The footers of a store's shards, each checked against the allow-list (FOOTER_THREADS at a time).
    Raises UnsafeParquetError or UnreadableParquetError naming the first bad shard by its URI."""
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return list(pool.map(lambda s: checked_footer(fs, s.path, join(uri, s.base_name), limits), shards))


def _checked_store(uri: str, storage: StorageConfig | None
                   ) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo], list[Footer]]:
    fs, root = check_access(uri, storage, must_exist=True)
    shards = list_parquet(fs, root)
    if not shards:
        raise StorageError(f"{uri} holds no Parquet shards")
    return fs, root, shards, checked_footers(fs, uri, shards)


def input_shards(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """``(filesystem, root, shards)`` of a store, sorted by name, every shard's footer checked against
    the allow-list; a clear error if there is none, or if one is unsafe or unreadable."""
    return _checked_store(uri, storage)[:3]


def output_rows(fs: pafs.FileSystem, paths: list[str], missing: int | None) -> list[int | None]:
    """Rows of output files from their raw footers: ``missing`` for a file that is not there, None for
    one that is not readable Parquet (FOOTER_THREADS at a time)."""
    def rows(path: str) -> int | None:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return missing
        try:
            return read_footer(fs, path).num_rows
        except UnreadableParquetError:
            return None

    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return list(pool.map(rows, paths))


def finished(fs_out: pafs.FileSystem, out_root: str, rows: dict[str, int]) -> set[str]:
    """The names (``shard-00042.parquet``) among ``rows`` ({name: input rows}) whose output rows plus
    error rows equal their input rows."""
    names = sorted(rows)
    out = output_rows(fs_out, [f"{out_root}/{n}" for n in names], missing=None)
    err = output_rows(fs_out, [f"{out_root}/{ERRORS_DIR}/{n}" for n in names], missing=0)
    return {n for n, o, e in zip(names, out, err) if o is not None and e is not None and o + e == rows[n]}


@dataclass(frozen=True)
class ShardWork:
    """Input shards of a stage, split into all of them and those whose output is missing."""

    fs_in: pafs.FileSystem
    in_root: str
    fs_out: pafs.FileSystem
    out_root: str
    shards: list[pafs.FileInfo]
    """Every input shard, sorted by name."""
    rows: dict[str, int]
    """Input rows of every shard, by file name, from the checked footers."""
    todo: list[pafs.FileInfo]
    """The input shards that are not :func:`finished` (all of them with overwrite)."""

    @property
    def skipped(self) -> int:
        return len(self.shards) - len(self.todo)


def plan_shard_work(input_uri: str, output_uri: str, storage: StorageConfig | None = None,
                    overwrite: bool = False) -> ShardWork:
    """Check both locations (clear errors for missing buckets or credentials; every input footer
    against the allow-list) and list the work left."""
    fs_in, in_root, shards, footers = _checked_store(input_uri, storage)
    fs_out, out_root = check_access(output_uri, storage)
    rows = {s.base_name: f.num_rows for s, f in zip(shards, footers)}
    done = set() if overwrite else finished(fs_out, out_root, rows)
    return ShardWork(fs_in, in_root, fs_out, out_root, shards, rows, [s for s in shards if s.base_name not in done])
