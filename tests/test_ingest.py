"""`galray ingest`: every survey format, from local disk and from S3 (moto), into the cutout store.

Each test builds its own tiny inputs (32 px), ingests them through Ray Data and reads the store back
with plain pyarrow: pixels and labels must round-trip, and every bad file must land in the errors
output with a reason, with valid + errored == input.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from astropy.io import fits

from galray.config import ConfigError
from galray.data.cutouts import CropResizeConfig, StretchConfig, crop_resize, decode_image, encode_png, flux_to_rgb
from galray.data.formats import GALAXY10_CLASSES, CutoutPolicy, FitsConfig
from galray.data.shards import CONFIG_NAME, ERRORS_DIR, images_from_table, list_parquet, spec_from_schema
from galray.data.store import store_summary
from galray.stages.ingest import IngestJob, ingest
from galray.storage import StorageConfig, arrow_filesystem, join, read_text

SIDE = 32
GZ_LABEL = "smooth-or-featured-euclid_smooth_fraction"


# --- building inputs ------------------------------------------------------------------------------

def _galaxy(rng: np.random.Generator, h: int = SIDE, w: int = SIDE) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_image_folder(root: Path, n: int = 5) -> dict:
    """PNG cutouts in two sub-folders and a CSV catalog keyed by an `id` column."""
    rng = np.random.default_rng(1)
    expected = {}
    lines = ["id,ra,morph,p_smooth"]
    for i in range(n):
        oid = f"J{i:04d}"
        img = _galaxy(rng)
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{oid}.png").write_bytes(encode_png(img))
        morph = "smooth" if i % 3 else "featured"
        expected[oid] = {"image": img, "ra": 10.0 + i, "morph": morph, "p_smooth": i / 10}
        lines.append(f"{oid},{10.0 + i},{morph},{i / 10}")
    lines.append("J9999,1.0,smooth,0.5")  # a catalog row without a cutout is simply not used
    (root.parent / "catalog.csv").write_text("\n".join(lines) + "\n")
    return expected


def make_galaxy10(path: Path, n: int = 10) -> dict:
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)
    ans = np.arange(n, dtype=np.uint8) % 10
    cols = {"ra": rng.uniform(0, 360, n), "dec": rng.uniform(-30, 30, n), "redshift": rng.uniform(0, 0.2, n),
            "pxscale": np.full(n, 0.262)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(4, SIDE, SIDE, 3))
        f.create_dataset("ans", data=ans)
        for k, v in cols.items():
            f.create_dataset(k, data=v)
    return {str(i): {"image": images[i], "label": int(ans[i]), "class_name": GALAXY10_CLASSES[ans[i]],
                     **{k: v[i] for k, v in cols.items()}} for i in range(n)}


def make_gz_parquet(root: Path) -> dict:
    """Two files in the Hugging Face layout; the first with two row groups."""
    rng = np.random.default_rng(3)
    expected = {}
    root.mkdir(parents=True, exist_ok=True)
    for f, n in ((0, 6), (1, 3)):
        ids = [f"dr8_{f}_{i}" for i in range(n)]
        images = [_galaxy(rng) for _ in range(n)]
        fractions = rng.uniform(0, 1, n)
        counts = rng.integers(0, 40, n)
        table = pa.table({
            "image": pa.array([{"bytes": encode_png(im), "path": f"{oid}.png"} for oid, im in zip(ids, images)],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "id_str": ids,
            GZ_LABEL: fractions,
            "smooth-or-featured-euclid_smooth": counts,
        })
        pq.write_table(table, root / f"train-{f:05d}-of-00002.parquet", row_group_size=4)
        for oid, im, fr, c in zip(ids, images, fractions, counts):
            expected[oid] = {"image": im, GZ_LABEL: fr, "smooth-or-featured-euclid_smooth": int(c)}
    return expected


def _fits_bytes(flux_CHW: np.ndarray, bands=("g", "r", "z"), cube: bool = False) -> bytes:
    buf = io.BytesIO()
    if cube:
        hdu = fits.PrimaryHDU(flux_CHW)
        for k, b in enumerate(bands):
            hdu.header[f"BAND{k}"] = b
        fits.HDUList([hdu]).writeto(buf)
    else:
        hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(plane, name=b.upper()) for b, plane in zip(bands, flux_CHW)]
        for h, b in zip(hdus[1:], bands):
            h.header["BAND"] = b
        fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()


def make_fits_folder(root: Path, n: int = 4) -> dict:
    """Multi-band FITS: one image extension per band, and one file holding a (C, H, W) cube."""
    rng = np.random.default_rng(4)
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(n):
        flux = rng.normal(0, 1, (3, SIDE, SIDE)).astype(np.float32)
        flux[:, 12:20, 12:20] += 20
        (root / f"obj{i}.fits").write_bytes(_fits_bytes(flux, cube=(i == n - 1)))
        expected[f"obj{i}"] = {"image": flux}
    return expected


BUILDERS = {
    "images": lambda d: (make_image_folder(d / "in"), d / "in"),
    "galaxy10-h5": lambda d: (make_galaxy10(d / "in" / "Galaxy10_DECals.h5"), d / "in" / "Galaxy10_DECals.h5"),
    "gz-parquet": lambda d: (make_gz_parquet(d / "in"), d / "in"),
    "fits": lambda d: (make_fits_folder(d / "in"), d / "in"),
}


def upload(local: Path, server, bucket: str, prefix: str) -> str:
    """Copy a file or folder to s3://bucket/prefix, keeping relative paths; returns the URI."""
    client = server.client()
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        key = f"{prefix}/{p.name}" if local.is_file() else f"{prefix}/{p.relative_to(local).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}" + (f"/{local.name}" if local.is_file() else "")


def read_back(uri: str, storage: StorageConfig | None = None) -> tuple[dict, list[dict], pa.Schema]:
    """({object_id: row with its image}, errors rows, schema) of a store, read with plain pyarrow."""
    fs, root = arrow_filesystem(uri, storage)
    rows, schema = {}, None
    for f in list_parquet(fs, root):
        table = pq.read_table(f.path, filesystem=fs)
        schema = table.schema
        images = images_from_table(table)
        for r, img in zip(table.drop_columns(["image"]).to_pylist(), images):
            assert r["object_id"] not in rows, "object_id must be unique across the store"
            rows[r["object_id"]] = {**r, "image": img}
    errors = [r for f in list_parquet(fs, f"{root}/{ERRORS_DIR}")
              for r in pq.read_table(f.path, filesystem=fs).to_pylist()]
    return rows, errors, schema


def _s3_storage(server) -> StorageConfig:
    return StorageConfig(endpoint_url=server.endpoint, access_key_id=server.access_key,
                         secret_access_key=server.secret_key)


# --- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("fmt", ["images", "galaxy10-h5", "gz-parquet", "fits"])
def test_ingest_roundtrip(fmt, where, tmp_path, ray_session, request):
    expected, src = BUILDERS[fmt](tmp_path)
    catalog = str(tmp_path / "catalog.csv") if fmt == "images" else None
    out = str(tmp_path / "store")
    if where == "s3":
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_env")  # the job reads the AWS variables; Ray workers get them resolved
        src = upload(src, server, bucket, "in")
        catalog = upload(Path(catalog), server, bucket, "meta") if catalog else None
        out = f"s3://{bucket}/store"
    job = IngestJob(format=fmt, input=str(src), output=out, catalog=catalog, id_column="id" if catalog else None,
                    shard_rows=3)
    summary = ingest(job)
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (len(expected), len(expected), 0)
    storage = _s3_storage(request.getfixturevalue("s3_server")) if where == "s3" else None
    rows, errors, schema = read_back(out, storage)
    assert errors == [] and set(rows) == set(expected)
    spec = spec_from_schema(schema)
    if fmt == "fits":  # default mode: float32 flux, CHW, bands from the files
        assert spec.layout == "CHW" and spec.dtype == "float32" and spec.bands == ("g", "r", "z")
    else:
        assert spec.layout == "HWC" and spec.dtype == "uint8" and spec.shape == (SIDE, SIDE, 3)
    for oid, want in expected.items():
        got = rows[oid]
        assert np.array_equal(got["image"], want["image"]), oid  # native size kept: lossless
        for key, value in want.items():
            if key != "image":
                assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value, (oid, key)
    text = read_text(join(out, CONFIG_NAME), storage)  # the resolved config: no secret travels into it
    config = yaml.safe_load(text)
    assert config["format"] == fmt and config["cutout"]["size"] == SIDE
    assert config["storage"].get("secret_access_key") in (None, "***")
    assert where == "local" or storage.secret_access_key not in text


def test_images_crop_resize_policy_matches_direct_call(tmp_path, ray_session):
    expected = make_image_folder(tmp_path / "in")
    job = IngestJob(format="images", input=str(tmp_path / "in"), output=str(tmp_path / "store"),
                    cutout=CutoutPolicy(size=16, crop_fraction=0.75))
    ingest(job)
    rows, _, schema = read_back(str(tmp_path / "store"))
    assert spec_from_schema(schema).shape == (16, 16, 3)
    crop = CropResizeConfig(size=16, crop_fraction=0.75)
    for oid, want in expected.items():
        assert np.array_equal(rows[oid]["image"], crop_resize(want["image"], crop))


def test_fits_rgb_mode_matches_flux_to_rgb(tmp_path, ray_session):
    expected = make_fits_folder(tmp_path / "in")
    stretch = StretchConfig(lower_percentile=1.0, upper_percentile=99.0, nonlinearity=5.0)
    ingest(IngestJob(format="fits", input=str(tmp_path / "in"), output=str(tmp_path / "store"),
                     fits=FitsConfig(mode="rgb", stretch=stretch)))
    rows, _, schema = read_back(str(tmp_path / "store"))
    spec = spec_from_schema(schema)
    assert spec.layout == "HWC" and spec.dtype == "uint8" and spec.bands == ("z", "r", "g")
    for oid, want in expected.items():
        assert np.array_equal(rows[oid]["image"], flux_to_rgb(want["image"], stretch))


# --- corruption -------------------------------------------------------------------------------------

def test_corrupt_images_go_to_errors_with_reasons(tmp_path, ray_session):
    rng = np.random.default_rng(5)
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    good = {f"good{i}": _galaxy(rng) for i in range(3)}
    for oid, img in good.items():
        (src / f"{oid}.png").write_bytes(encode_png(img))
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_galaxy(rng)).save(buf, format="JPEG", quality=95)
    (src / "good3.jpg").write_bytes(buf.getvalue())
    good["good3"] = decode_image(buf.getvalue())
    png = encode_png(_galaxy(rng))
    bad = {
        "truncated": ("truncated.png", png[: len(png) // 2], "truncated|cannot decode"),
        "noise": ("noise.jpg", rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "cannot decode"),
        "strip": ("strip.png", encode_png(_galaxy(rng, SIDE, 8)), "wrong shape"),
        "empty": ("empty.png", b"", "empty"),
        "blank": ("blank.png", encode_png(np.zeros((SIDE, SIDE, 3), np.uint8)), "blank"),
    }
    for name, data, _ in bad.values():
        (src / name).write_bytes(data)
    (src / "sub" / "good0.png").write_bytes(encode_png(_galaxy(rng)))  # same id as good0: the later path loses
    out = str(tmp_path / "store")
    summary = ingest(IngestJob(format="images", input=str(src), output=out, shard_rows=3))
    n_in = len(good) + len(bad) + 1
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (n_in, len(good), len(bad) + 1)
    line = summary.format()
    assert f"{n_in} rows in, {len(good)} out, {len(bad) + 1} errored" in line
    rows, errors, _ = read_back(out)
    assert set(rows) == set(good)
    for oid, img in good.items():
        assert np.array_equal(rows[oid]["image"], img)  # the first good0 (sorted order) won
    by_id = {}
    for e in errors:
        assert e["stage"] == "ingest" and e["reason"] and e["source_file"]
        by_id.setdefault(e["object_id"], []).append(e)
    assert set(by_id) == set(bad) | {"good0"}
    for oid, (name, _, pattern) in bad.items():
        (e,) = by_id[oid]
        assert e["source_file"] == str(src / name)
        assert re.search(pattern, e["reason"]), (oid, e["reason"])
    (dup,) = by_id["good0"]
    assert "duplicate object_id" in dup["reason"] and dup["source_file"] == str(src / "sub" / "good0.png")


def test_corrupt_fits_go_to_errors_with_reasons(tmp_path, ray_session):
    rng = np.random.default_rng(6)
    src = tmp_path / "in"
    (src / "z").mkdir(parents=True)
    good = {}
    for i in range(3):
        flux = rng.normal(0, 1, (3, SIDE, SIDE)).astype(np.float32)
        (src / f"ok{i}.fits").write_bytes(_fits_bytes(flux))
        good[f"ok{i}"] = flux
    good_bytes = (src / "ok0.fits").read_bytes()
    bad = {
        "nan": _fits_bytes(np.full((3, SIDE, SIDE), np.nan, np.float32)),
        "empty": b"",
        "junk": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "cut": good_bytes[: len(good_bytes) // 2],
        "twoband": _fits_bytes(rng.normal(0, 1, (2, SIDE, SIDE)).astype(np.float32), bands=("g", "r")),
    }
    for oid, data in bad.items():
        (src / f"{oid}.fits").write_bytes(data)
    (src / "z" / "ok1.fits").write_bytes(good_bytes)  # duplicate id
    summary = ingest(IngestJob(format="fits", input=str(src), output=str(tmp_path / "store"), shard_rows=2))
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (9, 3, 6)
    rows, errors, _ = read_back(str(tmp_path / "store"))
    assert set(rows) == set(good)
    for oid, flux in good.items():
        assert np.array_equal(rows[oid]["image"], flux)
    reasons = {(e["object_id"], e["source_file"].rsplit("/", 1)[-1]): e["reason"] for e in errors}
    assert len(reasons) == 6
    assert "NaN" in reasons[("nan", "nan.fits")]
    assert "empty" in reasons[("empty", "empty.fits")]
    assert "cannot read FITS" in reasons[("junk", "junk.fits")]
    assert "cannot read FITS" in reasons[("cut", "cut.fits")] or "wrong shape" in reasons[("cut", "cut.fits")]
    assert "missing band(s) z" in reasons[("twoband", "twoband.fits")]
    assert "duplicate object_id" in reasons[("ok1", "ok1.fits")]


def test_gz_parquet_duplicate_and_bad_rows(tmp_path, ray_session):
    rng = np.random.default_rng(7)
    src = tmp_path / "in"
    src.mkdir()
    cells = [{"bytes": encode_png(_galaxy(rng)), "path": "a"}, {"bytes": b"\x89PNG broken", "path": "b"},
             None, {"bytes": encode_png(_galaxy(rng)), "path": "d"}]
    table = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "id_str": ["x0", "x1", "x2", None], GZ_LABEL: [0.1, 0.2, 0.3, 0.4]})
    pq.write_table(table, src / "a.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 1), src / "b.parquet")  # x0 again, in a later file
    summary = ingest(IngestJob(format="gz-parquet", input=str(src), output=str(tmp_path / "store"), shard_rows=2))
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (5, 1, 4)
    rows, errors, _ = read_back(str(tmp_path / "store"))
    assert set(rows) == {"x0"} and rows["x0"][GZ_LABEL] == 0.1
    reasons = sorted((e["object_id"] or "", e["reason"].split(":")[0]) for e in errors)
    assert reasons == [("", "missing object_id (row 1 of row groups 1-1)"), ("x0", "duplicate object_id (kept "
                       + str(src / "a.parquet") + ")"), ("x1", "cannot decode image"), ("x2", "missing image bytes")]


# --- reruns, info ---------------------------------------------------------------------------------

def test_rerun_skips_finished_shards_and_overwrite_is_deterministic(tmp_path, ray_session):
    make_galaxy10(tmp_path / "g10.h5", n=7)
    out = tmp_path / "store"
    job = IngestJob(format="galaxy10-h5", input=str(tmp_path / "g10.h5"), output=str(out), shard_rows=3)
    first = ingest(job)
    shards = sorted(p.name for p in out.glob("shard-*.parquet"))
    assert shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    before = {p: (out / p).read_bytes() for p in shards}
    (out / shards[1]).unlink()  # as if the run had been interrupted
    written = yaml.safe_load((out / CONFIG_NAME).read_text())  # as the previous release wrote it: src, out
    written["src"], written["out"] = written.pop("input"), written.pop("output")
    (out / CONFIG_NAME).write_text(yaml.safe_dump(written))
    again = ingest(job)
    assert again.skipped_shards == 2 and (again.rows_in, again.rows_out) == (first.rows_in, first.rows_out)
    assert {p: (out / p).read_bytes() for p in shards} == before  # the redone shard is byte-identical
    with pytest.raises(ConfigError, match=r"cutout.size: .* was made with cutout.size=32, this run has 16"):
        ingest(IngestJob(format="galaxy10-h5", input=str(tmp_path / "g10.h5"), output=str(out), shard_rows=3,
                         cutout=CutoutPolicy(size=16)))
    redo = ingest(IngestJob(format="galaxy10-h5", input=str(tmp_path / "g10.h5"), output=str(out), shard_rows=3,
                            cutout=CutoutPolicy(size=16), overwrite=True))
    assert redo.skipped_shards == 0 and redo.rows_out == 7
    assert spec_from_schema(pq.read_schema(out / shards[0])).shape == (16, 16, 3)


def test_info_shows_label_counts(tmp_path, ray_session):
    expected = make_galaxy10(tmp_path / "g10.h5", n=12)
    ingest(IngestJob(format="galaxy10-h5", input=str(tmp_path / "g10.h5"), output=str(tmp_path / "g10")))
    s = store_summary(str(tmp_path / "g10"))
    want = {}
    for row in expected.values():
        want[row["class_name"]] = want.get(row["class_name"], 0) + 1
    assert s.label_counts["class_name"] == want and sum(s.label_counts["label"].values()) == 12
    assert s.metadata["class_names"] == list(GALAXY10_CLASSES)
    make_image_folder(tmp_path / "img" / "in")
    ingest(IngestJob(format="images", input=str(tmp_path / "img" / "in"), output=str(tmp_path / "imgstore"),
                     catalog=str(tmp_path / "img" / "catalog.csv"), id_column="id"))
    s = store_summary(str(tmp_path / "imgstore"))
    assert s.label_counts["morph"] == {"featured": 2, "smooth": 3} and "p_smooth" in s.columns
    assert "morph" in s.format()


def test_bad_catalog_is_a_config_error(tmp_path, ray_session):
    make_image_folder(tmp_path / "in")
    (tmp_path / "dup.csv").write_text("id,x\nJ0000,1\nJ0000,2\n")
    with pytest.raises(ConfigError, match="duplicate ids"):
        ingest(IngestJob(format="images", input=str(tmp_path / "in"), output=str(tmp_path / "s"),
                         catalog=str(tmp_path / "dup.csv"), id_column="id"))
    with pytest.raises(ConfigError, match="no column 'nope'"):
        ingest(IngestJob(format="images", input=str(tmp_path / "in"), output=str(tmp_path / "s"),
                         catalog=str(tmp_path / "catalog.csv"), id_column="nope"))


def test_a_unit_whose_task_raises_comes_back_with_the_reason(tmp_path):
    """An exception convert_unit does not expect (here its own check that rows add up, tripped by a unit
    planned with more rows than files) is returned with its type and message, for the driver to write
    the unit's rows as errors rows with that reason, not reported as a worker that died."""
    from galray.data.formats import ReadContext, Unit
    from galray.data.shards import ImageSpec
    from galray.stages.ingest import unit_task

    rng = np.random.default_rng(1)
    for i in range(2):
        (tmp_path / f"g{i}.png").write_bytes(encode_png(_galaxy(rng)))
    job = IngestJob(format="images", input=str(tmp_path), output=str(tmp_path / "store"))
    ctx = ReadContext(format="images", src=str(tmp_path), storage=StorageConfig(),
                      spec=ImageSpec(shape=(SIDE, SIDE, 3), bands=("g", "r", "z")), policy=CutoutPolicy(),
                      fits=FitsConfig())
    paths = tuple(str(tmp_path / f"g{i}.png") for i in range(2))
    ok = unit_task(Unit(index=0, rows=2, paths=paths), job, ctx)
    assert ok["failed"] == "" and ok["rows_out"] == 2
    bad = unit_task(Unit(index=1, rows=3, paths=paths), job, ctx)
    assert bad["failed"].startswith("ingest failed on this unit: RuntimeError: unit 1: 3 rows in"), bad
    assert (bad["rows_out"], bad["rows_errored"]) == (0, 0)
