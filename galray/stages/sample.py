"""`galray sample xdf`: write a store of real galaxies cut from the Hubble XDF (no download).

One image in, a few hundred cutouts out: this runs in one process with no Ray, and writes the
same store layout (shards + ``_config.yaml``) as every other stage. The detection and cutting are
:mod:`galray.data.xdf`; :func:`write_sample` is what the CLI calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from galray.config import check
from galray.data.provenance import claim_output
from galray.data.shards import ImageSpec, make_table, shard_name, write_table
from galray.data.xdf import XDFConfig, xdf_sample
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, check_access


@dataclass(frozen=True)
class SampleJob:
    """Settings of `galray sample`."""

    RENAMED: ClassVar[dict[str, str]] = {"out": "output"}  # keys of the previous release, still read

    source: Literal["xdf"] = "xdf"
    """Which bundled real image to cut: xdf (Hubble eXtreme Deep Field, from scikit-image)."""
    output: str = "galray-data/xdf"
    """Output store URI."""
    shard_rows: int = 1000
    """Rows per Parquet shard."""
    xdf: XDFConfig = field(default_factory=XDFConfig)
    """Detection and cutout settings."""
    overwrite: bool = False
    """Replace the store entirely (default: a store made with other settings is refused)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(self.shard_rows >= 1, "shard_rows", "must be at least 1")


@dataclass(frozen=True)
class SampleSummary(FieldsSummary):
    """What `galray sample` prints."""

    output: str
    rows: int
    bytes: int
    seconds: float

    def format(self) -> str:
        return (f"cut {self.rows:,} real galaxies from the Hubble XDF into {self.output} "
                f"({self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s)")


def write_sample(job: SampleJob) -> SampleSummary:
    """Detect, cut out and write the sample; returns the summary."""
    t0 = time.perf_counter()
    fs, root = check_access(job.output, job.storage)
    claim_output(job, "sample")  # other settings into the same store: refused (overwrite: replaced)
    columns = xdf_sample(job.xdf)
    n = len(columns["object_id"])
    spec = ImageSpec(shape=(job.xdf.size, job.xdf.size, 3), layout="HWC", dtype="uint8", bands=("R", "G", "B"))
    nbytes = 0
    for shard, start in enumerate(range(0, n, job.shard_rows)):
        part = {k: v[start:start + job.shard_rows] for k, v in columns.items()}
        table = make_table(part, spec, extra_metadata={"producer": "galray sample xdf",
                                                        "source": "skimage.data.hubble_deep_field"})
        nbytes += write_table(table, fs, f"{root}/{shard_name(shard)}")
    return SampleSummary(output=job.output, rows=n, bytes=nbytes, seconds=round(time.perf_counter() - t0, 2))
