"""Readers for the survey formats `galray ingest` takes, in plain Python (no Ray).

Formats (``--format``):

- ``images``: a folder or prefix of PNG/JPEG cutouts (Galaxy Zoo). The object id is the file stem;
  sub-folders are searched too.
- ``galaxy10-h5``: the Galaxy10 DECaLS HDF5 file: ``images`` (N, 256, 256, 3) uint8, ``ans`` (class
  index), ``ra``, ``dec``, ``redshift``, ``pxscale``. The object id is the row index; ``ans`` becomes
  ``label`` plus ``class_name`` (:data:`GALAXY10_CLASSES`), the other 1-D datasets are carried as is.
- ``gz-parquet``: Galaxy Zoo's Hugging Face layout: ``image`` (a struct with a ``bytes`` field, or
  plain binary), an id column (``id_str``) and label columns, carried through unchanged.
- ``fits``: one file per cutout; the bands are either one 2-D image extension each (named by the
  ``BAND`` or ``FILTER`` keyword, else ``EXTNAME``) or one 3-D (C, H, W) cube (named by ``BAND0``,
  ``BAND1``, ... or ``BANDS``). Stored as float32 flux (CHW) or rendered to uint8 RGB (HWC).

The work is split into deterministic *units* (:class:`Unit`): fixed-size groups of files in sorted
order, index ranges of the HDF5 file, or runs of Parquet row groups. :func:`convert_unit` turns one
unit into one store table plus its errors rows, so a unit is one Ray task and one shard. Every input
row ends in exactly one of the two; :func:`convert_unit` checks that before anything is written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from galray.config import ConfigError, check
from galray.data.arrow_safety import UnreadableParquetError, UnsafeParquetError, open_parquet, read_footer
from galray.data.cutouts import (CropResizeConfig, CutoutError, StretchConfig, check_finite, check_shape,
                                 crop_resize, decode_image, flux_to_rgb)
from galray.data.ids import id_problem, id_strings, printable, raw_ids
from galray.data.limits import GZIP_MAGIC, DecodeLimits, LimitError, gunzip
from galray.data.shards import ID_COLUMN, ImageSpec, make_table
from galray.storage import StorageConfig, arrow_filesystem, fsspec_filesystem, is_s3

FORMATS = ("images", "galaxy10-h5", "gz-parquet", "fits")
Format = Literal["images", "galaxy10-h5", "gz-parquet", "fits"]
STAGE = "ingest"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FITS_EXTENSIONS = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz")
H5_EXTENSIONS = (".h5", ".hdf5")
PARQUET_EXTENSIONS = (".parquet",)
EXTENSIONS = {"images": IMAGE_EXTENSIONS, "fits": FITS_EXTENSIONS, "galaxy10-h5": H5_EXTENSIONS,
              "gz-parquet": PARQUET_EXTENSIONS}

# Galaxy10 DECaLS class names, in the order of the `ans` index (Leung & Bovy, astroNN docs).
GALAXY10_CLASSES = ("disturbed", "merging", "round smooth", "in-between round smooth", "cigar shaped smooth",
                    "barred spiral", "unbarred tight spiral", "unbarred loose spiral", "edge-on without bulge",
                    "edge-on with bulge")
GZ_IMAGE_COLUMN = "image"
DEFAULT_GZ_ID_COLUMN = "id_str"
DEFAULT_CATALOG_ID_COLUMN = ID_COLUMN
# Rows decoded per HDF5 read or Parquet batch inside a unit: bounds a task's raw-input memory.
READ_ROWS = 256
# How many inputs the driver tries, in order, to learn the native size (and FITS bands) before giving up.
PROBE_TRIES = 32
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class CutoutPolicy:
    """What makes a cutout valid, and how it becomes a fixed-size one (applied in this order).

    1. shape checks: at least ``min_size`` pixels a side, no more than ``max_aspect`` between the
       sides, and (``reject_blank``) not one constant value: failures go to the errors output;
    2. centre-crop to a square, then keep the central ``crop_fraction`` of each side;
    3. resize to ``size`` (PIL bilinear, antialiased on downscale). With ``size`` left empty, the
       output keeps the native size of the first readable input in sorted order (after the crop),
       and every other input is resized to it: a folder of same-sized cutouts is stored unresampled.
    """

    size: int | None = None
    """Output side in pixels; empty keeps the native (cropped) side of the first readable input."""
    crop_fraction: float = 1.0
    """Central fraction of each side kept before resizing (Galaxy Zoo models often train on ~0.75)."""
    max_aspect: float = 1.5
    """Longest over shortest side allowed: a strip is not a centred object cutout ("wrong shape")."""
    min_size: int = 8
    """Smallest side, in pixels, that counts as a cutout."""
    reject_blank: bool = True
    """Send cutouts whose pixels all hold one value (no data, e.g. off the survey footprint) to errors."""

    def __post_init__(self) -> None:
        check(self.size is None or self.size >= 4, "size", "must be at least 4 pixels")
        check(0 < self.crop_fraction <= 1, "crop_fraction", "must be in (0, 1]")
        check(self.max_aspect >= 1, "max_aspect", "must be at least 1")
        check(self.min_size >= 1, "min_size", "must be at least 1")

    def output_size(self, native_side: int) -> int:
        """The stored side for inputs of ``native_side`` (same rounding as cutouts.center_crop)."""
        return self.size or max(1, int(round(native_side * self.crop_fraction)))


@dataclass(frozen=True)
class FitsConfig:
    """How multi-band FITS flux is stored.

    ``flux`` keeps float32 flux as CHW (lossless; stretch later). ``rgb`` renders uint8 HWC with
    :func:`galray.data.cutouts.flux_to_rgb`: per-band percentile clip, then arcsinh (defaults follow
    Galaxy Zoo DECaLS renderings, see StretchConfig), after the crop/resize.
    """

    mode: Literal["flux", "rgb"] = "flux"
    """flux: CHW float32 as measured; rgb: HWC uint8 arcsinh rendering, reddest band as R."""
    bands: tuple[str, ...] = ()
    """Bands to keep, in channel order (e.g. [g, r, z]); empty takes those of the first readable file."""
    stretch: StretchConfig = field(default_factory=StretchConfig)
    """Percentile clip and arcsinh softening for mode rgb."""


@dataclass(frozen=True)
class Unit:
    """One deterministic piece of input: one Ray task, one output shard ``shard-{index:05d}``."""

    index: int
    """Shard number."""
    rows: int
    """Input rows in this unit (files, HDF5 rows or Parquet rows)."""
    paths: tuple[str, ...] = ()
    """Filesystem paths: the files (images, fits), or the one file (galaxy10-h5, gz-parquet)."""
    start: int = 0
    """First HDF5 row, or first Parquet row group."""
    stop: int = 0
    """One past the last HDF5 row or Parquet row group."""
    known_errors: tuple[tuple[int, str], ...] = ()
    """(position in unit, reason) for rows known bad when planning: an object_id already taken earlier in
    sorted order, or a file over ``limits.max_file_bytes`` (never fetched)."""
    refused: str = ""
    """Why the unit is not read at all (a Parquet file outside the allow-list of
    :mod:`galray.data.arrow_safety`, not readable Parquet, or a unit whose task failed every retry):
    every row is an errors row with this reason."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Unit":
        d = json.loads(text)
        return cls(index=d["index"], rows=d["rows"], paths=tuple(d["paths"]), start=d["start"], stop=d["stop"],
                   known_errors=tuple((int(p), str(r)) for p, r in d["known_errors"]), refused=d.get("refused", ""))


@dataclass(frozen=True)
class Plan:
    """Every unit of an input, and what the driver learnt while listing it."""

    units: list[Unit]
    rows: int
    """Input rows over all units."""
    label_columns: tuple[str, ...] = ()
    """Columns the format itself carries into the store (besides object_id and image)."""
    native_side: int | None = None
    """Known without decoding (HDF5 dataset shape); else probed."""


@dataclass(frozen=True)
class ReadContext:
    """Everything :func:`convert_unit` needs; built once on the driver (storage already resolved)."""

    format: str
    src: str
    storage: StorageConfig
    spec: ImageSpec
    policy: CutoutPolicy
    fits: FitsConfig
    id_column: str = DEFAULT_GZ_ID_COLUMN
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    catalog: pa.Table | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def crop(self) -> CropResizeConfig:
        return CropResizeConfig(size=self.spec.height, crop_fraction=self.policy.crop_fraction)


# --- listing and planning ----------------------------------------------------------------------

def source_uri(src: str, path: str) -> str:
    """A filesystem path back to the URI a person would type (for the errors output)."""
    return f"s3://{path}" if is_s3(src) else path


def strip_extension(name: str, extensions: tuple[str, ...]) -> str:
    low = name.lower()
    for ext in sorted(extensions, key=len, reverse=True):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name.rsplit(".", 1)[0]


def object_id_of(path: str, extensions: tuple[str, ...]) -> str:
    """The file stem: ``a/b/J1234+5678.fits.gz`` -> ``J1234+5678``."""
    return strip_extension(path.rsplit("/", 1)[-1], extensions)


def list_files(fs: pafs.FileSystem, root: str, extensions: tuple[str, ...]) -> list[str]:
    """Files under ``root`` (recursively) with one of ``extensions``, sorted; ``root`` may be one file.

    Hidden (``.x``) and underscore (``_errors``) files and folders are skipped.
    """
    return [i.path for i in list_file_infos(fs, root, extensions)]


def list_file_infos(fs: pafs.FileSystem, root: str, extensions: tuple[str, ...]) -> list[pafs.FileInfo]:
    """:func:`list_files` with each file's size (``FileInfo.size``), from the listing itself."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{root} does not exist")
    out = []
    try:
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
            rel = i.path[len(root.rstrip("/")) + 1:]
            if i.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
                continue
            if i.base_name.lower().endswith(extensions):
                out.append(i)
    except UnicodeDecodeError as err:  # pyarrow cannot list, or name, such a file at all
        raise ConfigError("input", f"{root} holds a file or folder name that is not valid UTF-8 "
                                   f"({printable(err.object[max(0, err.start - 40):err.end + 40], 200)!r}): "
                                   "rename it (object ids are UTF-8 file stems)") from None
    return sorted(out, key=lambda i: i.path)


def plan_files(paths: list[str], shard_rows: int, extensions: tuple[str, ...], src: str,
               too_big: dict[str, str] | None = None, limits: DecodeLimits = DecodeLimits()) -> list[Unit]:
    """Fixed-size groups of sorted files; the first file with a given stem wins, later ones are duplicates.
    ``too_big``: {path: reason} of files over a size limit, errors rows without being fetched; so are
    files whose stem is not a valid id (:func:`galray.data.ids.id_problem`)."""
    seen: dict[str, str] = {}
    units = []
    for u, start in enumerate(range(0, len(paths), shard_rows)):
        group = paths[start:start + shard_rows]
        dups = []
        for j, path in enumerate(group):
            oid = object_id_of(path, extensions)
            problem = id_problem(oid, limits)
            if too_big and path in too_big:
                dups.append((j, too_big[path]))
            elif problem:
                dups.append((j, problem))
            elif oid in seen:
                dups.append((j, f"duplicate object_id (kept {seen[oid]})"))
            else:
                seen[oid] = source_uri(src, path)
        units.append(Unit(index=u, rows=len(group), paths=tuple(group), known_errors=tuple(dups)))
    return units


def _open_h5(src: str, path: str, storage: StorageConfig):
    import h5py

    fs, _ = fsspec_filesystem(src, storage)
    f = fs.open(path, "rb", block_size=8 << 20)  # HDF5 reads many small pieces: read ahead in big blocks
    return f, h5py.File(f, "r")


def h5_layout(src: str, path: str, storage: StorageConfig) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
    """(rows, image shape, 1-D label datasets) of a Galaxy10-style HDF5 file, from its metadata only."""
    f, h5 = _open_h5(src, path, storage)
    with f, h5:
        if "images" not in h5:
            raise ConfigError("format", f"{source_uri(src, path)} has no 'images' dataset "
                                        f"(datasets: {', '.join(sorted(h5))}); is it a Galaxy10 file?")
        images = h5["images"]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError("format", f"'images' is {images.shape}; Galaxy10 stores (N, H, W, 3)")
        n = images.shape[0]
        labels = tuple(sorted(k for k, d in h5.items()
                              if k != "images" and getattr(d, "ndim", 0) == 1 and d.shape[0] == n))
        return n, tuple(images.shape[1:]), labels


def _h5_label_names(datasets: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for d in datasets:
        out += ["label", "class_name"] if d == "ans" else [d]
    return tuple(out)


def plan_parquet(fs: pafs.FileSystem, paths: list[str], shard_rows: int, id_column: str, src: str,
                 limits: DecodeLimits = DecodeLimits()) -> list[Unit]:
    """Runs of consecutive row groups of each file, about ``shard_rows`` rows each.

    Reads the id column only, to settle duplicates up front: the first occurrence in (file, row) order wins.
    Every file's footer passes the allow-list of :mod:`galray.data.arrow_safety` before pyarrow opens it;
    a file that fails (an unsafe column type, or not readable Parquet) becomes one refused unit, whose
    rows (one, when even the footer is unreadable) all go to the errors output; so do row groups whose
    ids cannot be read.
    """
    seen: dict[str, str] = {}
    units: list[Unit] = []
    for path in paths:
        try:
            pf = open_parquet(fs, path, source_uri(src, path))
        except (UnsafeParquetError, UnreadableParquetError) as err:
            units.append(Unit(index=len(units), rows=_refused_rows(fs, path), paths=(path,), refused=str(err)))
            continue
        if id_column not in pf.schema_arrow.names:
            raise ConfigError("id_column", f"{source_uri(src, path)} has no column {id_column!r} "
                                           f"(columns: {', '.join(pf.schema_arrow.names[:12])}...)")
        groups = [(g, pf.metadata.row_group(g).num_rows) for g in range(pf.num_row_groups)]
        g = 0
        while g < len(groups):
            start, rows = g, 0
            while g < len(groups) and (rows == 0 or rows + groups[g][1] <= shard_rows):
                rows += groups[g][1]
                g += 1
            try:
                ids = raw_ids(pf.read_row_groups(list(range(start, g)), columns=[id_column]).column(id_column))
            except (OSError, pa.ArrowException) as err:  # corrupt pages: these row groups' rows are errors rows
                units.append(Unit(index=len(units), rows=rows, paths=(path,), start=start, stop=g,
                                  refused=f"{source_uri(src, path)}: cannot read its ids: {err}"))
                continue
            dups = []
            for j, raw in enumerate(ids):
                if raw is None:
                    continue
                problem = id_problem(raw, limits)
                oid = raw.decode("utf-8") if problem is None else ""
                if problem:
                    dups.append((j, problem))
                elif oid in seen:
                    dups.append((j, f"duplicate object_id (kept {seen[oid]})"))
                else:
                    seen[oid] = source_uri(src, path)
            units.append(Unit(index=len(units), rows=rows, paths=(path,), start=start, stop=g,
                              known_errors=tuple(dups)))
    return units


def _refused_rows(fs: pafs.FileSystem, path: str) -> int:
    """Rows of a refused Parquet file, from its raw footer (1 when even that cannot be read)."""
    try:
        return max(read_footer(fs, path).num_rows, 1)
    except UnreadableParquetError:
        return 1


def plan_units(fmt: str, src: str, storage: StorageConfig, shard_rows: int, id_column: str | None,
               limits: DecodeLimits = DecodeLimits()) -> Plan:
    """List the input and split it into units (the driver's only pass over it: names, ids and metadata)."""
    fs, root = arrow_filesystem(src, storage)
    infos = list_file_infos(fs, root, EXTENSIONS[fmt])
    paths = [i.path for i in infos]
    if not paths:
        raise FileNotFoundError(f"no {'/'.join(EXTENSIONS[fmt])} files under {src}")
    if fmt in ("images", "fits"):
        too_big = {i.path: f"file is {i.size:,} bytes, over limits.max_file_bytes ({limits.max_file_bytes:,})"
                   for i in infos if (i.size or 0) > limits.max_file_bytes}
        units = plan_files(paths, shard_rows, EXTENSIONS[fmt], src, too_big, limits)
        return Plan(units, len(paths))
    if fmt == "galaxy10-h5":
        if len(paths) > 1:
            raise ConfigError("input", f"{src} holds {len(paths)} HDF5 files: pass the Galaxy10 file itself")
        n, shape, labels = h5_layout(src, paths[0], storage)
        units = [Unit(index=u, rows=min(a + shard_rows, n) - a, paths=(paths[0],), start=a, stop=min(a + shard_rows, n))
                 for u, a in enumerate(range(0, n, shard_rows))]
        return Plan(units, n, _h5_label_names(labels), native_side=min(shape[0], shape[1]))
    id_column = id_column or DEFAULT_GZ_ID_COLUMN
    units = plan_parquet(fs, paths, shard_rows, id_column, src, limits)
    readable = [u for u in units if not u.refused]
    if not readable:  # nothing to ingest: one line, the first file's reason
        raise UnsafeParquetError(f"no input file of {src} can be read safely; {units[0].refused}")
    first = readable[0].paths[0]
    names = open_parquet(fs, first, source_uri(src, first)).schema_arrow.names
    if GZ_IMAGE_COLUMN not in names:
        raise ConfigError("format", f"{source_uri(src, first)} has no {GZ_IMAGE_COLUMN!r} column: "
                                    "not the Galaxy Zoo Parquet layout")
    labels = tuple(c for c in names if c not in (GZ_IMAGE_COLUMN, id_column))
    return Plan(units, sum(u.rows for u in units), labels)


# --- decoding one cutout -----------------------------------------------------------------------

def check_cutout(image: np.ndarray, layout: Literal["HWC", "CHW"], policy: CutoutPolicy,
                 channels: int | None = None) -> None:
    """The policy's shape and content checks; raises CutoutError with the reason."""
    check_shape(image, ndim=3, channels=channels, layout=layout, min_size=policy.min_size)
    h, w = (image.shape[0], image.shape[1]) if layout == "HWC" else (image.shape[1], image.shape[2])
    if max(h, w) > policy.max_aspect * min(h, w):
        raise CutoutError(f"wrong shape {image.shape}: aspect ratio {max(h, w) / min(h, w):.2f} exceeds "
                          f"max_aspect {policy.max_aspect}")
    if policy.reject_blank and image.min() == image.max():
        raise CutoutError(f"blank image: every pixel is {image.flat[0]}")


def native_side(image: np.ndarray, layout: Literal["HWC", "CHW"]) -> int:
    return int(min(image.shape[:2]) if layout == "HWC" else min(image.shape[1:]))


def colour_cutout(image: np.ndarray, policy: CutoutPolicy, crop: CropResizeConfig) -> np.ndarray:
    """(H, W, 3) uint8 -> checked, cropped and resized (size, size, 3) uint8."""
    check_cutout(image, "HWC", policy, channels=3)
    return crop_resize(image, crop, "HWC")


def check_fits_header(header: Any, index: int, compressed: int | None, limits: DecodeLimits) -> None:
    """Raise LimitError when an image HDU's header declares more than ``limits`` allow: more axes than
    ``max_fits_axes``, a plane over ``max_pixels``, data over ``max_decoded_bytes`` (8 bytes a value:
    scaled integers become floats), or, for a tile-compressed HDU (``compressed``: the file's bytes),
    more than ``max_compression_ratio`` times the file."""
    naxis = int(header.get("NAXIS", 0))
    if naxis > limits.max_fits_axes:
        raise LimitError(f"FITS HDU {index} declares NAXIS = {naxis}, over limits.max_fits_axes ({limits.max_fits_axes})")
    dims = [int(header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)]
    if any(d < 0 for d in dims):
        raise CutoutError(f"cannot read FITS: HDU {index} declares a negative axis {dims}")
    if naxis >= 2:
        limits.check_image(dims[0], dims[1], 0)
    values = int(np.prod(dims, dtype=object)) if dims else 0
    if values * 8 > limits.max_decoded_bytes:
        raise LimitError(f"FITS HDU {index} declares {' x '.join(map(str, dims))} values ({values * 8:,} bytes as "
                         f"float64), over limits.max_decoded_bytes ({limits.max_decoded_bytes:,})")
    raw = values * abs(int(header.get("BITPIX", 8))) // 8
    if compressed is not None and raw > limits.max_compression_ratio * max(compressed, 1):
        raise LimitError(f"FITS HDU {index} decompresses to {raw:,} bytes from a {compressed:,}-byte file, over "
                         f"limits.max_compression_ratio ({limits.max_compression_ratio:g}x)")


def read_fits(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[tuple[str, ...], list[np.ndarray]]:
    """FITS bytes -> (band names, 2-D float32 planes).

    Untrusted: the file's bytes, a gzip stream's output (stopped at ``limits``) and every image
    header (axes, sizes, compression ratio: :func:`check_fits_header`) are checked before any data
    is read; over a limit raises CutoutError naming it.

    The first 3-D HDU is a (C, H, W) cube whose bands are named by ``BAND0``, ``BAND1``, ... or
    ``BANDS`` ("g,r,z" or "grz"); without one, every 2-D image HDU is one band, named by its
    ``BAND``, ``FILTER`` or ``EXTNAME`` keyword. Unnamed bands are ``b0``, ``b1``, ...
    """
    from astropy.io import fits

    if not data:
        raise CutoutError("empty file (0 bytes)")
    try:
        limits.check_file_bytes(len(data))
        if data[:2] == GZIP_MAGIC:  # astropy would inflate it whole, however large: bounded here
            data = gunzip(data, limits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy warns about non-standard headers: the data decide
            with fits.open(io.BytesIO(data), memmap=False) as hdul:
                hdus = []
                for i, h in enumerate(hdul):  # headers are read as the loop goes; data only when asked for
                    if not getattr(h, "is_image", False):
                        continue
                    tiled = isinstance(h, fits.CompImageHDU)
                    check_fits_header(h.header, i, len(data) if tiled else None, limits)
                    if h.data is not None:
                        hdus.append((i, h.header, np.asarray(h.data, dtype=np.float32)))
    except LimitError as err:
        raise CutoutError(str(err)) from None
    except Exception as err:  # astropy raises OSError, ValueError, TypeError... on corrupt or truncated files
        raise CutoutError(f"cannot read FITS: {str(err).splitlines()[0] if str(err) else type(err).__name__}") \
            from None
    cubes = [(i, hdr, d) for i, hdr, d in hdus if d.ndim == 3]
    if cubes:
        _, hdr, cube = cubes[0]
        c = cube.shape[0]
        names = [str(hdr.get(f"BAND{k}", "")).strip() for k in range(c)]
        if not all(names):
            listed = str(hdr.get("BANDS", "")).strip()
            parts = [p.strip() for p in listed.split(",")] if "," in listed else list(listed)
            names = parts if len(parts) == c and all(parts) else [f"b{k}" for k in range(c)]
        return tuple(names), list(cube)
    names, planes = [], []
    for i, hdr, d in hdus:
        if d.ndim != 2:
            raise CutoutError(f"wrong shape {d.shape} in HDU {i}: expected 2-D bands or a 3-D cube")
        name = next((str(hdr[k]).strip() for k in ("BAND", "FILTER", "EXTNAME") if str(hdr.get(k, "")).strip()),
                    f"b{len(names)}")
        names.append(name)
        planes.append(d)
    if not planes:
        raise CutoutError("no image data in FITS file")
    return tuple(names), planes


def fits_flux(data: bytes, bands: tuple[str, ...], policy: CutoutPolicy,
              limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """FITS bytes -> checked (C, H, W) float32 flux in ``bands`` order (scattered NaN set to 0)."""
    names, planes = read_fits(data, limits)
    lookup = dict(zip(reversed(names), reversed(planes)))  # the first HDU of a name wins
    # EXTNAMEs are upper case by FITS convention ("G" for g): an exact name wins, then any case.
    folded = dict(zip(reversed([n.lower() for n in names]), reversed(planes)))
    lookup = {b: lookup[b] if b in lookup else folded[b.lower()] for b in bands
              if b in lookup or b.lower() in folded}
    missing = [b for b in bands if b not in lookup]
    if missing:
        raise CutoutError(f"wrong shape: missing band(s) {', '.join(missing)} (file has {', '.join(names)})")
    shapes = sorted({lookup[b].shape for b in bands})
    if len(shapes) > 1:
        raise CutoutError(f"wrong shape: band planes differ in shape {shapes}")
    flux = np.stack([lookup[b] for b in bands]).astype(np.float32, copy=False)
    for b, plane in zip(bands, flux):
        if plane.size and not np.isfinite(plane).any():
            raise CutoutError(f"all pixels of band {b} are NaN or inf")
    flux = check_finite(flux)
    check_cutout(flux, "CHW", policy, channels=len(bands))
    return flux


def fits_cutout(data: bytes, bands: tuple[str, ...], policy: CutoutPolicy, crop: CropResizeConfig,
                fits_cfg: FitsConfig, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """FITS bytes -> (C, size, size) float32 flux, or in mode rgb (size, size, 3) uint8 stretched after the crop."""
    flux = crop_resize(fits_flux(data, bands, policy, limits), crop, "CHW")
    return flux_to_rgb(flux, fits_cfg.stretch) if fits_cfg.mode == "rgb" else flux


def image_spec(fmt: str, size: int, bands: tuple[str, ...], fits_cfg: FitsConfig) -> ImageSpec:
    """The store layout: uint8 HWC RGB for colour formats and FITS rgb, float32 CHW for FITS flux."""
    if fmt != "fits":
        return ImageSpec(shape=(size, size, 3), layout="HWC", dtype="uint8")
    if fits_cfg.mode == "flux":
        return ImageSpec(shape=(len(bands), size, size), layout="CHW", dtype="float32", bands=bands)
    c = len(bands)
    rgb_bands = (bands[-1], bands[c // 2], bands[0]) if c >= 3 else ()  # flux_to_rgb puts the reddest in R
    return ImageSpec(shape=(size, size, 3), layout="HWC", dtype="uint8", bands=rgb_bands)


# --- probing: what the driver learns from the first readable input -------------------------------

def _gz_bytes(value: Any) -> bytes | None:
    """An ``image`` cell of the GZ layout: a struct {bytes, path} or plain binary."""
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def probe(fmt: str, src: str, storage: StorageConfig, plan: Plan, policy: CutoutPolicy,
          fits_cfg: FitsConfig, limits: DecodeLimits = DecodeLimits()) -> tuple[int | None, tuple[str, ...]]:
    """(native side, FITS bands) of the first readable inputs in sorted order (``None`` if none could be read)."""
    if plan.native_side is not None:
        return plan.native_side, ()
    tried = 0
    if fmt in ("images", "fits"):
        fs, _ = fsspec_filesystem(src, storage)
        for unit in plan.units:
            dups = dict(unit.known_errors)
            for j, path in enumerate(unit.paths):
                if j in dups:
                    continue
                if tried >= PROBE_TRIES:
                    return None, ()
                tried += 1
                try:
                    data = fs.cat_file(path)
                    if fmt == "images":
                        image = decode_image(data, limits)
                        check_cutout(image, "HWC", policy, channels=3)
                        return native_side(image, "HWC"), ()
                    bands = fits_cfg.bands or read_fits(data, limits)[0]
                    return native_side(fits_flux(data, bands, policy, limits), "CHW"), bands
                except (CutoutError, OSError):
                    continue
        return None, ()
    afs, _ = arrow_filesystem(src, storage)
    for unit in plan.units:
        if unit.refused:
            continue
        pf = open_parquet(afs, unit.paths[0], source_uri(src, unit.paths[0]))
        for batch in pf.iter_batches(batch_size=8, row_groups=list(range(unit.start, unit.stop)),
                                     columns=[GZ_IMAGE_COLUMN]):
            for value in batch.column(0).to_pylist():
                if tried >= PROBE_TRIES:
                    return None, ()
                tried += 1
                try:
                    image = decode_image(_gz_bytes(value), limits)
                    check_cutout(image, "HWC", policy, channels=3)
                    return native_side(image, "HWC"), ()
                except CutoutError:
                    continue
    return None, ()


# --- converting one unit -----------------------------------------------------------------------

class _Rows:
    """Collects one unit's valid rows and errors rows, so every input row lands in exactly one."""

    def __init__(self, ctx: ReadContext):
        self.ctx = ctx
        self.ids: list[str] = []
        self.images: list[np.ndarray] = []
        self.label_rows: list[int] = []
        self.errors: list[dict[str, Any]] = []

    def ok(self, oid: str, image: np.ndarray, label_row: int = -1) -> None:
        spec = self.ctx.spec
        if image.shape != tuple(spec.shape) or image.dtype != np.dtype(spec.dtype):  # a bug, not bad data
            raise RuntimeError(f"{oid}: converted to {image.dtype}{image.shape}, store is {spec.dtype}{spec.shape}")
        self.ids.append(oid)
        self.images.append(image)
        self.label_rows.append(label_row)

    def fail(self, oid: str | None, reason: str, source: str) -> None:
        # Drop object addresses ("<_io.BytesIO object at 0x7f...>") that PIL puts in its messages, so a
        # rerun writes byte-identical errors shards.
        reason = _ADDRESS.sub(">", reason)
        self.errors.append({"object_id": oid, "stage": STAGE, "reason": reason, "source_file": source})

    def table(self, labels: pa.Table | None) -> pa.Table:
        spec = self.ctx.spec
        images = np.stack(self.images) if self.images else np.empty((0, *spec.shape), spec.dtype)
        table = make_table({ID_COLUMN: pa.array(self.ids, pa.string()), spec.column: images}, spec,
                           extra_metadata=self.ctx.metadata)
        if labels is not None and labels.num_columns:
            idx = pa.array(self.label_rows, pa.int64())
            for name in labels.column_names:
                table = table.append_column(labels.schema.field(name), labels.column(name).take(idx))
        cat = self.ctx.catalog
        if cat is not None:
            # index_in gives null for ids missing from the catalog; take() turns those into null cells.
            idx = pc.index_in(table.column(ID_COLUMN), value_set=cat.column(ID_COLUMN))
            for name in cat.column_names:
                if name != ID_COLUMN:
                    table = table.append_column(cat.schema.field(name), cat.column(name).take(idx))
        return table


def _fetch(fs: Any, paths: list[str]) -> dict[str, bytes | Exception]:
    """Read whole files; s3fs fetches a list concurrently (one GET each), which a per-file loop would serialise."""
    if not paths:
        return {}
    got = fs.cat(paths, on_error="return")
    return {p: got.get(p, got.get(fs._strip_protocol(p), FileNotFoundError(p))) for p in paths}


def _read_files(unit: Unit, ctx: ReadContext, rows: _Rows) -> None:
    fs, _ = fsspec_filesystem(ctx.src, ctx.storage)
    exts = EXTENSIONS[ctx.format]
    dups = dict(unit.known_errors)
    crop = ctx.crop
    for a in range(0, len(unit.paths), READ_ROWS):
        chunk = list(enumerate(unit.paths[a:a + READ_ROWS], start=a))
        blobs = _fetch(fs, [p for j, p in chunk if j not in dups])
        for j, path in chunk:
            oid, source = printable(object_id_of(path, exts), ctx.limits.max_id_bytes), source_uri(ctx.src, path)
            if j in dups:
                rows.fail(oid, dups[j], source)
                continue
            data = blobs[path]
            if isinstance(data, Exception):  # vanished or unreadable after the storage layer's retries
                rows.fail(oid, f"cannot read file: {type(data).__name__}: {data}", source)
                continue
            try:
                if ctx.format == "images":
                    image = colour_cutout(decode_image(data, ctx.limits), ctx.policy, crop)
                else:
                    image = fits_cutout(data, ctx.fits.bands, ctx.policy, crop, ctx.fits, ctx.limits)
            except CutoutError as err:
                rows.fail(oid, str(err), source)
                continue
            rows.ok(oid, image)


def _read_h5(unit: Unit, ctx: ReadContext, rows: _Rows) -> pa.Table:
    path = unit.paths[0]
    source = source_uri(ctx.src, path)
    crop = ctx.crop
    f, h5 = _open_h5(ctx.src, path, ctx.storage)
    with f, h5:
        images = h5["images"]
        for a in range(unit.start, unit.stop, READ_ROWS):
            b = min(a + READ_ROWS, unit.stop)
            try:
                block = images[a:b]  # (n, H, W, 3) uint8: one chunked read
            except Exception as err:  # h5py raises OSError/KeyError/RuntimeError on damaged chunks
                for i in range(a, b):
                    rows.fail(str(i), f"cannot read HDF5 rows {a}-{b - 1}: {err}", source)
                continue
            for k, arr in enumerate(block):
                i = a + k
                try:
                    rows.ok(str(i), colour_cutout(np.asarray(arr, np.uint8), ctx.policy, crop), i - unit.start)
                except CutoutError as err:
                    rows.fail(str(i), str(err), source)
        cols: dict[str, pa.Array] = {}
        for name in sorted(k for k, d in h5.items() if k != "images" and getattr(d, "ndim", 0) == 1
                           and d.shape[0] == images.shape[0]):
            values = np.asarray(h5[name][unit.start:unit.stop])
            if name == "ans":
                ans = values.astype(np.int64)
                cols["label"] = pa.array(ans)
                cols["class_name"] = pa.array([GALAXY10_CLASSES[v] if 0 <= v < len(GALAXY10_CLASSES) else None
                                               for v in ans.tolist()], pa.string())
            else:
                cols[name] = pa.array(values.astype(str) if values.dtype.kind == "S" else values)
    return pa.table(cols) if cols else pa.table({})


def _read_parquet(unit: Unit, ctx: ReadContext, rows: _Rows) -> pa.Table:
    afs, _ = arrow_filesystem(ctx.src, ctx.storage)
    path = unit.paths[0]
    source = source_uri(ctx.src, path)
    crop = ctx.crop
    dups = dict(unit.known_errors)
    pf = open_parquet(afs, path, source)  # the allow-list again: the file may have changed since planning
    labels = [c for c in pf.schema_arrow.names if c not in (GZ_IMAGE_COLUMN, ctx.id_column)]
    parts: list[pa.RecordBatch] = []
    pos = 0
    for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=list(range(unit.start, unit.stop))):
        ids = id_strings(batch.column(ctx.id_column), ctx.limits)  # invalid ones printable; their rows are errors
        cells = batch.column(GZ_IMAGE_COLUMN).to_pylist()
        parts.append(batch.select(labels))
        for oid, cell in zip(ids, cells):
            j, pos = pos, pos + 1
            if oid is None:
                rows.fail(None, f"missing object_id (row {j} of row groups {unit.start}-{unit.stop - 1})", source)
            elif j in dups:
                rows.fail(oid, dups[j], source)
            else:
                data = _gz_bytes(cell)
                try:
                    if data is None:
                        raise CutoutError("missing image bytes")
                    rows.ok(oid, colour_cutout(decode_image(data, ctx.limits), ctx.policy, crop), j)
                except CutoutError as err:
                    rows.fail(oid, str(err), source)
    schema = pf.schema_arrow
    return pa.Table.from_batches(parts, schema=pa.schema([schema.field(c) for c in labels])) if labels \
        else pa.table({})


def convert_unit(unit: Unit, ctx: ReadContext) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Read, decode, check, crop and resize one unit: (store table, errors rows); their sizes add up to unit.rows."""
    rows = _Rows(ctx)
    labels: pa.Table | None = None
    if unit.refused and ctx.format in ("images", "fits"):
        for path in unit.paths:
            rows.fail(object_id_of(path, EXTENSIONS[ctx.format]), unit.refused, source_uri(ctx.src, path))
    elif unit.refused:
        for i in range(unit.rows):
            rows.fail(None, f"row {i} of a refused file: {unit.refused}", source_uri(ctx.src, unit.paths[0]))
    elif ctx.format in ("images", "fits"):
        _read_files(unit, ctx, rows)
    elif ctx.format == "galaxy10-h5":
        labels = _read_h5(unit, ctx, rows)
    else:
        labels = _read_parquet(unit, ctx, rows)
    table = rows.table(labels)
    if table.num_rows + len(rows.errors) != unit.rows:
        raise RuntimeError(f"unit {unit.index}: {unit.rows} rows in, {table.num_rows} valid + "
                           f"{len(rows.errors)} errored")
    return table, rows.errors

