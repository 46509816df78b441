"""`galray sample xdf`: write a store of real galaxies cut from the Hubble XDF (no download).

One image in, a few hundred cutouts out: this runs in one process with no Ray, and writes the
same store layout (shards + ``_config.yaml``) as every other stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from galray.config import check, dumps
from galray.data.shards import CONFIG_NAME, ImageSpec, make_table, shard_name, write_table
from galray.data.xdf import XDFConfig, xdf_sample
from galray.storage import StorageConfig, check_access, join, write_text


@dataclass(frozen=True)
class SampleJob:
    """Settings of `galray sample`."""

    source: Literal["xdf"] = "xdf"
    """Which bundled real image to cut: xdf (Hubble eXtreme Deep Field, from scikit-image)."""
    out: str = "galray-data/xdf"
    """Output store URI."""
    shard_rows: int = 1000
    """Rows per Parquet shard."""
    xdf: XDFConfig = field(default_factory=XDFConfig)
    """Detection and cutout settings."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(self.shard_rows >= 1, "shard_rows", "must be at least 1")


def write_sample(job: SampleJob) -> dict[str, Any]:
    """Detect, cut out and write the sample; returns a summary."""
    t0 = time.perf_counter()
    fs, root = check_access(job.out, job.storage)
    columns = xdf_sample(job.xdf)
    n = len(columns["object_id"])
    spec = ImageSpec(shape=(job.xdf.size, job.xdf.size, 3), layout="HWC", dtype="uint8", bands=("R", "G", "B"))
    nbytes = 0
    for shard, start in enumerate(range(0, n, job.shard_rows)):
        part = {k: v[start:start + job.shard_rows] for k, v in columns.items()}
        table = make_table(part, spec, extra_metadata={"producer": "galray sample xdf",
                                                        "source": "skimage.data.hubble_deep_field"})
        nbytes += write_table(table, fs, f"{root}/{shard_name(shard)}")
    write_text(join(job.out, CONFIG_NAME), dumps(job), job.storage)
    return {"out": job.out, "rows": n, "bytes": nbytes, "seconds": round(time.perf_counter() - t0, 2)}
