"""Resumable shard-to-shard stages: which input shards still need an output.

Every row-reading stage (embed, encode) writes one output file per input shard, named like it,
and only when the shard is complete. So "finished" is simply "an output file of that name
exists", and a rerun does exactly the missing shards.

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

from galray.data.arrow_safety import Footer, checked_footer
from galray.data.limits import DecodeLimits
from galray.data.shards import list_parquet
from galray.storage import StorageConfig, StorageError, check_access, join

FOOTER_THREADS = 16  # parallel footer reads (one or two small ranged reads each; S3 round trips dominate)


def checked_footers(fs: pafs.FileSystem, uri: str, shards: list[pafs.FileInfo],
                    limits: DecodeLimits = DecodeLimits()) -> list[Footer]:
    """The footers of a store's shards, each checked against the allow-list (FOOTER_THREADS at a time).
    Raises UnsafeParquetError or UnreadableParquetError naming the first bad shard by its URI."""
    with ThreadPoolExecutor(max_workers=FOOTER_THREADS) as pool:
        return list(pool.map(lambda s: checked_footer(fs, s.path, join(uri, s.base_name), limits), shards))


def input_shards(uri: str, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]]:
    """``(filesystem, root, shards)`` of a store, sorted by name, every shard's footer checked against
    the allow-list; a clear error if there is none, or if one is unsafe or unreadable."""
    fs, root = check_access(uri, storage, must_exist=True)
    shards = list_parquet(fs, root)
    if not shards:
        raise StorageError(f"{uri} holds no Parquet shards")
    checked_footers(fs, uri, shards)
    return fs, root, shards


@dataclass(frozen=True)
class ShardWork:
    """Input shards of a stage, split into all of them and those whose output is missing."""

    fs_in: pafs.FileSystem
    in_root: str
    fs_out: pafs.FileSystem
    out_root: str
    shards: list[pafs.FileInfo]
    """Every input shard, sorted by name."""
    todo: list[pafs.FileInfo]
    """The input shards without an output file of the same name (all of them with overwrite)."""

    @property
    def skipped(self) -> int:
        return len(self.shards) - len(self.todo)


def plan_shard_work(input_uri: str, output_uri: str, storage: StorageConfig | None = None,
                    overwrite: bool = False) -> ShardWork:
    """Check both locations (clear errors for missing buckets or credentials) and list the work left."""
    fs_in, in_root, shards = input_shards(input_uri, storage)
    fs_out, out_root = check_access(output_uri, storage)
    done = set() if overwrite else {f.base_name for f in list_parquet(fs_out, out_root)}
    return ShardWork(fs_in, in_root, fs_out, out_root, shards, [s for s in shards if s.base_name not in done])
