"""`galray simulate`: render a simulated survey into a cutout store, in parallel through Ray Data.

The rendering itself is :mod:`galray.data.galsim_survey` (pure numpy + GalSim). This module plans
shards, runs one Ray Data task per shard that renders and writes ``shard-NNNNN.parquet``, and
skips shards that already exist, so an interrupted run resumes and a rerun duplicates nothing.
Galaxy ``i`` depends only on (seed, i), so the output is byte-identical for a given seed,
whatever the parallelism. :func:`simulate_survey` is what the CLI calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq

from galray.config import check
from galray.data.galsim_survey import CLASS_NAMES, SimConfig, render_batch
from galray.data.provenance import claim_output
from galray.data.resume import finished
from galray.data.shards import list_parquet, make_table, shard_name, write_table
from galray.session import ensure_ray
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, arrow_filesystem, check_access


@dataclass(frozen=True)
class SimulateJob:
    """`galray simulate`: how many galaxies, where to write them, and how to render them."""

    RENAMED: ClassVar[dict[str, str]] = {"out": "output"}  # keys of the previous release, still read
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("preview",)  # a rerun may change it (galray.data.provenance)

    output: str = "galray-data/sim"
    """Output store URI: a local folder, file:// or s3://bucket/prefix."""
    n: int = 2000
    """Number of galaxies."""
    shard_rows: int = 1000
    """Rows per Parquet shard (and per Ray task)."""
    preview: str | None = None
    """Optional PNG path for a montage with one row per class."""
    overwrite: bool = False
    """Replace the store entirely (default: resume it, skipping finished shards, if it was rendered with the
    same settings; with others, such as another seed, refuse)."""
    sim: SimConfig = field(default_factory=SimConfig)
    """Rendering settings: size, seed, PSF, noise, families."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(self.n >= 1, "n", "must be at least 1")
        check(self.shard_rows >= 1, "shard_rows", "must be at least 1")


@dataclass(frozen=True)
class SimulateSummary(FieldsSummary):
    """What `galray simulate` prints."""

    output: str
    rows: int
    """Galaxies in the store."""
    shards: int
    rendered: int
    """Galaxies rendered by this run (the others were in shards that already existed)."""
    skipped_shards: int
    bytes: int
    """Bytes of the shards this run wrote."""
    seconds: float
    galaxies_per_s: float
    preview: str | None = None

    def format(self) -> str:
        text = (f"simulated {self.rows:,} galaxies into {self.output} ({self.shards} shards; "
                f"rendered {self.rendered:,}, skipped {self.skipped_shards} existing shard(s)) "
                f"in {self.seconds:.1f} s, {self.galaxies_per_s:.0f} galaxies/s")
        if self.preview:
            text += f"\npreview montage: {self.preview}"
        return text


def render_shard(shard: int, start: int, stop: int, job: SimulateJob) -> dict[str, Any]:
    """Render galaxies [start, stop) and write them as shard ``shard``; returns a small stats row."""
    t0 = time.perf_counter()
    columns = render_batch(range(start, stop), job.sim)
    columns.pop("flux_image", None)  # the store keeps the colour rendering; flux cubes are opt-in elsewhere
    table = make_table(columns, job.sim.image_spec(), extra_metadata={
        "producer": "galray simulate", "seed": job.sim.seed, "class_names": list(CLASS_NAMES)})
    fs, root = arrow_filesystem(job.output, job.storage)
    nbytes = write_table(table, fs, f"{root}/{shard_name(shard)}")
    return {"shard": shard, "rows": stop - start, "bytes": nbytes, "seconds": time.perf_counter() - t0}


def plan_shards(n: int, shard_rows: int) -> list[tuple[int, int, int]]:
    return [(i, s, min(s + shard_rows, n)) for i, s in enumerate(range(0, n, shard_rows))]


def simulate_survey(job: SimulateJob) -> SimulateSummary:
    """Render ``job.n`` galaxies into the store at ``job.output``; returns the summary."""
    import ray

    job = SimulateJob(**{**job.__dict__, "storage": job.storage.resolved()})
    fs, root = check_access(job.output, job.storage)
    plan = plan_shards(job.n, job.shard_rows)
    claim_output(job, "simulate")  # another seed, size, ... into the same store: refused (overwrite: replaced)
    done = finished(fs, root, {shard_name(s): b - a for s, a, b in plan})
    todo = [p for p in plan if shard_name(p[0]) not in done]
    stats: list[dict[str, Any]] = []
    if todo:
        ensure_ray()  # before the clock starts: the rate is the renderer's, not Ray's start-up
    t0 = time.perf_counter()
    if todo:
        items = [{"shard": s, "start": a, "stop": b} for s, a, b in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        stats = ds.map(lambda r: render_shard(r["shard"], r["start"], r["stop"], job)).take_all()
    seconds = time.perf_counter() - t0
    rendered = sum(s["rows"] for s in stats)
    return SimulateSummary(
        output=job.output, rows=job.n, shards=len(plan), rendered=rendered, skipped_shards=len(plan) - len(todo),
        bytes=sum(s["bytes"] for s in stats), seconds=round(seconds, 3),
        galaxies_per_s=round(rendered / seconds, 1) if rendered else 0.0,
        preview=str(write_preview(job)) if job.preview else None)


def write_preview(job: SimulateJob, per_class: int = 8) -> str:
    """Montage of the store's first ``per_class`` galaxies of each class (reads shards in order, stops early)."""
    from galray.analysis.montage import class_montage
    from galray.data.shards import images_from_table

    fs, root = arrow_filesystem(job.output, job.storage)
    picked: dict[int, list[np.ndarray]] = {}
    wanted = {CLASS_NAMES.index(c) for c in job.sim.classes}
    for info in list_parquet(fs, root):
        table = pq.read_table(info.path, filesystem=fs, columns=["image", "label"])
        images, labels = images_from_table(table, job.sim.image_spec()), table.column("label").to_numpy()
        for img, lab in zip(images, labels):
            if len(picked.setdefault(int(lab), [])) < per_class:
                picked[int(lab)].append(img)
        if all(len(picked.get(c, [])) >= per_class for c in wanted):
            break
    labels = np.array([lab for lab, imgs in sorted(picked.items()) for _ in imgs])
    images = np.stack([img for _, imgs in sorted(picked.items()) for img in imgs])
    return str(class_montage(images, labels, CLASS_NAMES, job.preview, per_class=per_class))
