"""`galray ingest`: survey cutouts as they ship (image folders, Galaxy10 HDF5, Galaxy Zoo Parquet, FITS)
into the cutout store, streamed through Ray Data, with an errors output.

How a run goes:

1. The driver lists the input and plans deterministic units (:mod:`galray.data.formats`): sorted
   files in groups of ``shard_rows``, HDF5 index ranges, or runs of Parquet row groups. It reads
   ids only (file stems, or the Parquet id column) to settle duplicate ids up front: the first
   occurrence in sorted order wins, later ones go to the errors output as "duplicate object_id".
2. It probes the first readable input for the native size (when ``--size`` is not given) and the
   FITS bands, and writes the resolved config to ``<out>/_config.yaml``.
3. One Ray Data task per unit reads, decodes, checks, crops/resizes and writes
   ``shard-NNNNN.parquet`` plus, if any row failed, ``_errors/shard-NNNNN.parquet``
   (``object_id, stage, reason, source_file``). A task holds one unit, so memory stays flat.
4. A rerun into a store made from another input or with other settings is refused, naming the
   field (:mod:`galray.data.provenance`; ``overwrite`` replaces the store entirely). A rerun with
   the same settings skips the units that are finished (shard rows plus error rows equal the
   unit's rows, :func:`galray.data.resume.finished`: a short or unreadable shard is redone), so an
   interrupted ingest resumes and a finished one is a no-op. Valid plus errored rows always equal
   the input rows: each task checks it before writing, and :meth:`StageSummary.check` at the end.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray

from galray.config import ConfigError, check
from galray.data.arrow_safety import read_table
from galray.data.formats import (DEFAULT_CATALOG_ID_COLUMN, DEFAULT_GZ_ID_COLUMN, FORMATS, GALAXY10_CLASSES,
                                 CutoutPolicy, FitsConfig, Format, Plan, ReadContext, Unit, convert_unit,
                                 image_spec, plan_units, probe)
from galray.data.limits import DecodeLimits
from galray.data.provenance import claim_output
from galray.data.resume import finished
from galray.data.shards import ERRORS_DIR, ID_COLUMN, IMAGE_COLUMN, list_parquet, shard_name
from galray.data.stores import footer_rows, write_shard
from galray.session import MAX_RETRIES, ensure_ray, gave_up
from galray.stages.summary import DEFAULT_MAX_ERROR_FRACTION, StageSummary
from galray.storage import StorageConfig, arrow_filesystem, check_access


@dataclass(frozen=True)
class IngestJob:
    """`galray ingest`: which survey format to read, from where, and how cutouts are checked and sized."""

    RENAMED: ClassVar[dict[str, str]] = {"src": "input", "out": "output"}  # keys of the previous release, still read

    format: Format
    """Input format: images (PNG/JPEG folder), galaxy10-h5, gz-parquet (Galaxy Zoo HF layout) or fits."""
    input: str
    """Input URI: a folder/prefix of files, or one file (local, file:// or s3://)."""
    output: str = "galray-data/ingest"
    """Output store URI: a local folder, file:// or s3://bucket/prefix."""
    catalog: str | None = None
    """Optional CSV/TSV/Parquet catalog joined on the object id; its columns are carried into the store."""
    id_column: str | None = None
    """Id column of the catalog and of gz-parquet input (default: object_id for catalogs, id_str for gz-parquet)."""
    shard_rows: int = 1000
    """Input rows per unit (one Ray task, one shard): files, HDF5 rows, or Parquet rows (whole row groups)."""
    overwrite: bool = False
    """Replace the store entirely (default: resume it, skipping finished shards, if it was made with the same
    settings; with other settings, refuse)."""
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    """What one input file, image or FITS HDU may cost, checked before decoding; over a limit, the row is an
    error naming the limit."""
    max_error_fraction: float = DEFAULT_MAX_ERROR_FRACTION
    """Exit non-zero (after writing everything) when more than this fraction of the rows errored."""
    cutout: CutoutPolicy = field(default_factory=CutoutPolicy)
    """Validity checks and the crop/resize policy (cutout.size is --size)."""
    fits: FitsConfig = field(default_factory=FitsConfig)
    """FITS only: keep float32 flux (CHW) or render uint8 RGB; which bands."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(self.format in FORMATS, "format", f"must be one of {list(FORMATS)}, got {self.format!r}")
        check(bool(self.input), "input", "is required")
        check(bool(self.output), "output", "is required")
        check(self.shard_rows >= 1, "shard_rows", "must be at least 1")
        check(self.id_column is None or bool(self.id_column), "id_column", "must not be empty")
        check(0 <= self.max_error_fraction <= 1, "max_error_fraction", "must be in [0, 1]")


def read_catalog(uri: str, id_column: str, storage: StorageConfig) -> pa.Table:
    """A catalog as an Arrow table keyed by ``object_id`` (string, unique, non-null)."""
    import pyarrow.csv as pacsv

    fs, path = check_access(uri, storage, must_exist=True)
    low = path.lower()
    if low.endswith((".parquet", ".pq")):
        table = read_table(fs, path, uri)  # a catalog is untrusted too: the allow-list first
    elif low.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
        with fs.open_input_stream(path) as f:  # decompresses .gz by extension
            table = pacsv.read_csv(
                f, parse_options=pacsv.ParseOptions(delimiter="\t" if ".tsv" in low else ","),
                convert_options=pacsv.ConvertOptions(column_types={id_column: pa.string()}))
    else:
        raise ConfigError("catalog", f"{uri}: expected a .csv, .tsv or .parquet file")
    if id_column not in table.column_names:
        raise ConfigError("id_column", f"catalog {uri} has no column {id_column!r} "
                                       f"(columns: {', '.join(table.column_names[:12])})")
    if id_column != ID_COLUMN and ID_COLUMN in table.column_names:
        raise ConfigError("id_column", f"catalog {uri} has both {id_column!r} and {ID_COLUMN!r}: which is the id?")
    if IMAGE_COLUMN in table.column_names:
        raise ConfigError("catalog", f"catalog {uri} has an {IMAGE_COLUMN!r} column, which the store reserves")
    ids = pc.cast(table.column(id_column), pa.string())
    if ids.null_count:
        raise ConfigError("catalog", f"catalog {uri} has {ids.null_count} row(s) without an {id_column}")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise ConfigError("catalog", f"catalog {uri} has duplicate ids in {id_column!r}, e.g. {dup!r}")
    table = table.set_column(table.column_names.index(id_column), ID_COLUMN, ids)
    return table.combine_chunks()


def _check_units(job: IngestJob, fs: pafs.FileSystem, root: str, plan: Plan) -> None:
    """Refuse to resume into a store holding shards this input does not plan (the same input before
    files went away, say): they would mix."""
    existing = {f.base_name for f in list_parquet(fs, root)}
    planned = {shard_name(u.index) for u in plan.units}
    if existing - planned:
        raise ConfigError("output", f"{job.output} holds shard(s) this input does not plan "
                                    f"({sorted(existing - planned)[0]}, ...): use --overwrite or another --output")


def run_unit(unit: Unit, job: IngestJob, ctx: ReadContext) -> dict[str, Any]:
    """Convert one unit and write its shard (errors first, so a crash in between redoes the unit). A unit
    that cannot be read at all (corrupt Parquet pages or HDF5 chunks...) becomes errors rows with the reason."""
    try:
        table, errors = convert_unit(unit, ctx)
    except (OSError, ValueError, pa.ArrowException) as err:  # not RuntimeError: convert_unit's own checks
        if unit.refused:
            raise
        first = str(err).splitlines()[0][:300] if str(err) else ""
        table, errors = convert_unit(dataclasses.replace(
            unit, refused=f"cannot read this unit: {type(err).__name__}: {first}"), ctx)
    fs, root = arrow_filesystem(job.output, job.storage)
    write_shard(table, errors, fs, root, shard_name(unit.index))
    return {"unit": unit.index, "rows_in": unit.rows, "rows_out": table.num_rows, "rows_errored": len(errors),
            "failed": ""}


def unit_task(unit: Unit, job: IngestJob, ctx: ReadContext) -> dict[str, Any]:
    """:func:`run_unit` in a Ray task. An exception it did not expect (a check of convert_unit, a bug)
    comes back as ``failed`` (its type and first line) so that the driver writes the unit's rows as errors
    rows with that reason: Ray does not retry a task that raised, and Ray Data would drop the unit
    without saying why, as if its worker had died."""
    try:
        return run_unit(unit, job, ctx)
    except Exception as err:  # noqa: BLE001 - reported as the unit's errors rows, never lost
        first = str(err).splitlines()[0][:300] if str(err) else ""
        return {"unit": unit.index, "rows_in": unit.rows, "rows_out": 0, "rows_errored": 0,
                "failed": f"ingest failed on this unit: {type(err).__name__}: {first}"}


def give_up_unit(unit: Unit, job: IngestJob, ctx: ReadContext, reason: str | None = None) -> dict[str, Any]:
    """Write a unit whose task failed as errors rows only (run on the driver; reads nothing): ``reason``,
    or by default that its worker died on every attempt."""
    return run_unit(dataclasses.replace(unit, refused=reason or gave_up("worker reading this unit")), job, ctx)


def ingest(job: IngestJob) -> StageSummary:
    """Ingest ``job.input`` into the store at ``job.output``; returns the stage summary (already checked)."""
    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved())  # Ray workers do not see the driver's env
    check_access(job.input, job.storage, must_exist=True)
    fs, root = check_access(job.output, job.storage)

    gz = job.format == "gz-parquet"
    id_column = job.id_column or (DEFAULT_GZ_ID_COLUMN if gz else DEFAULT_CATALOG_ID_COLUMN)
    plan = plan_units(job.format, job.input, job.storage, job.shard_rows, id_column if gz else None, job.limits)
    side, bands = probe(job.format, job.input, job.storage, plan, job.cutout, job.fits, job.limits)
    if job.cutout.size is None and side is None:
        raise ConfigError("cutout.size", f"none of the first inputs of {job.input} could be read to learn the "
                                         "native size: pass --size")
    if job.format == "fits" and not (job.fits.bands or bands):
        raise ConfigError("fits.bands", f"none of the first FITS files of {job.input} could be read to learn the "
                                        "bands: set fits.bands")
    size = job.cutout.output_size(side) if side is not None else job.cutout.size
    job = dataclasses.replace(job, cutout=dataclasses.replace(job.cutout, size=size),
                              fits=dataclasses.replace(job.fits, bands=job.fits.bands or bands))
    spec = image_spec(job.format, size, job.fits.bands, job.fits)

    catalog = read_catalog(job.catalog, id_column, job.storage) if job.catalog else None
    if catalog is not None:
        clash = sorted(set(catalog.column_names) & set(plan.label_columns))
        if clash:
            raise ConfigError("catalog", f"catalog columns {clash} clash with columns of the {job.format} input")

    # Another input or other settings into this store: refused, naming the field (overwrite: replaced).
    claim_output(job, "ingest")
    if not job.overwrite:
        _check_units(job, fs, root, plan)
    done = finished(fs, root, {shard_name(u.index): u.rows for u in plan.units})
    todo = [u for u in plan.units if shard_name(u.index) not in done]
    metadata: dict[str, Any] = {"producer": "galray ingest", "format": job.format, "source": job.input,
                                "crop_fraction": job.cutout.crop_fraction}
    if job.format == "galaxy10-h5":
        metadata["class_names"] = list(GALAXY10_CLASSES)
    if job.format == "fits":
        metadata.update(fits_mode=job.fits.mode, source_bands=list(job.fits.bands))
    stats: list[dict[str, Any]] = []
    if todo:
        ensure_ray()
        # The catalog goes to the object store once and is shared by every task (zero-copy Arrow).
        catalog_ref = ray.put(catalog) if catalog is not None else None
        base_ctx = ReadContext(format=job.format, src=job.input, storage=job.storage, spec=spec, policy=job.cutout,
                               fits=job.fits, id_column=id_column, limits=job.limits, metadata=metadata)

        def task(row: dict[str, Any]) -> dict[str, Any]:
            ctx = base_ctx if catalog_ref is None else dataclasses.replace(base_ctx, catalog=ray.get(catalog_ref))
            return unit_task(Unit.from_json(row["unit"]), job, ctx)

        items = [{"unit": u.to_json()} for u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # A unit whose task fails MAX_RETRIES + 1 times (its worker killed, e.g. for memory) is skipped,
        # not retried without end (Ray Data's default) nor fatal: its rows become errors rows below.
        ds.context.max_errored_blocks = -1
        with warnings.catch_warnings():  # Ray 2.60 names no parameter for it; ray_remote_args is the way
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            stats = ds.map(task, max_retries=MAX_RETRIES).take_all()
        failed = {s["unit"]: s["failed"] for s in stats if s["failed"]}
        died = [u for u in todo if u.index not in {s["unit"] for s in stats}]
        stats = [s for s in stats if not s["failed"]]
        stats += [give_up_unit(u, job, base_ctx, failed.get(u.index)) for u in todo if u.index in failed]
        stats += [give_up_unit(u, job, base_ctx) for u in died]
    # Finished units of an earlier run count from their Parquet footers.
    earlier = [u for u in plan.units if shard_name(u.index) in done]
    names = [shard_name(u.index) for u in earlier]
    rows_out = footer_rows(fs, [f"{root}/{n}" for n in names])
    rows_errored = footer_rows(fs, [f"{root}/{ERRORS_DIR}/{n}" for n in names], missing_ok=True)
    stats += [{"unit": u.index, "rows_in": u.rows, "rows_errored": e, "rows_out": o}
              for u, o, e in zip(earlier, rows_out, rows_errored)]
    summary = StageSummary(stage="ingest", rows_in=plan.rows, rows_out=sum(s["rows_out"] for s in stats),
                           rows_errored=sum(s["rows_errored"] for s in stats), seconds=time.perf_counter() - t0,
                           output=job.output, skipped_shards=len(plan.units) - len(todo),
                           max_error_fraction=job.max_error_fraction)
    summary.check()
    return summary
