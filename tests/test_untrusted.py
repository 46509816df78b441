"""Untrusted input, tried as an attacker would (issue 14): every input here is built by the test.

For every attack: the marker file a pickle would create never appears, the job finishes (or refuses
at once with one clear line naming the file), and valid plus errored rows equal the input rows.
Stage runs share the session's Ray (``ray_session``); the refusals happen on the driver, before Ray.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from galray.data.arrow_safety import UnreadableParquetError, UnsafeParquetError, checked_footer, read_footer
from galray.data.cutouts import encode_png
from galray.data.shards import ERRORS_DIR, ImageSpec, make_table, shard_name, write_table
from galray.storage import arrow_filesystem

SIZE = 16
PICKLED = "ray.data.arrow_pickled_object"  # Ray's extension type whose values unpickle when read


class _Marker:
    """A pickle that creates ``path`` when it is loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _pickled_column(marker: Path, n: int) -> pa.ExtensionArray:
    """``n`` values of Ray's pickled-object extension type, each creating ``marker`` when read."""
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectType

    blobs = pa.array([pickle.dumps(_Marker(marker))] * n, pa.large_binary())
    return pa.ExtensionArray.from_storage(ArrowPythonObjectType(), blobs)


def _galaxy(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    blob = 200 * np.exp(-((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) / 20)
    return np.clip(blob[..., None] + rng.integers(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def _gz_table(ids: list[str], rng: np.random.Generator) -> pa.Table:
    cells = [{"bytes": encode_png(_galaxy(rng)), "path": f"{i}.png"} for i in ids]
    return pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                     "id_str": ids})


def _cutout_store(root: Path, shards: int, rows: int, extra: dict | None = None) -> None:
    rng = np.random.default_rng(0)
    fs, path = arrow_filesystem(str(root))
    for s in range(shards):
        ids = [f"g{s}-{i}" for i in range(rows)]
        table = make_table({"object_id": ids, "image": np.stack([_galaxy(rng) for _ in ids])},
                           ImageSpec(shape=(SIZE, SIZE, 3)))
        for name, column in (extra or {}).items():
            table = table.append_column(name, column)
        write_table(table, fs, f"{path}/{shard_name(s)}")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    # The attack itself works in this process: reading the column runs the pickle.
    probe = pa.table({"x": _pickled_column(tmp_path / "probe", 1)})
    probe.column("x").to_pylist()
    assert (tmp_path / "probe").exists()
    yield path
    assert not path.exists(), "a pickle from a data file ran"


# The most a Ray worker's private memory (RssAnon) may grow while it handles an attack. Private memory is
# what decoding allocates; file-backed pages (shared libraries) and shared memory (Ray's object store,
# mapped into the workers that read from it) are left out. A fresh worker that imports Ray Data, pyarrow,
# galray, PIL and astropy for its first task grows ~70 MB; the PNG bomb below decoded is 192 MB of RGB
# pixels (64 MB more while PIL converts it), the gzip bomb 200 MB: a worker that decodes either crosses this.
MAX_WORKER_GROWTH = 128 << 20
# Lines Ray's raylet logs when its memory monitor kills a worker (src/ray/raylet/node_manager.cc).
_OOM_KILL = re.compile(r"killed due to the node running low on memory|Killing worker.*memory", re.IGNORECASE)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Ray's workers are children of its raylet)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # the process exited while we listed
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        found += kids
        todo += kids
    return found


def _private(pid: int) -> int | None:
    """Bytes of private resident memory (RssAnon) of ``pid``; None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


@dataclass
class MemoryWatch:
    """Private memory of this Ray's workers during a test: at its start (``start``; a worker started
    during the test counts from the median of the workers there at the start, or, with none, from its
    first sample) and at its highest (``peak``)."""

    start: dict[int, int] = field(default_factory=dict)
    first: dict[int, int] = field(default_factory=dict)
    peak: dict[int, int] = field(default_factory=dict)

    def growth(self) -> dict[int, tuple[int, int]]:
        """{pid: (baseline, growth)} in bytes."""
        idle = int(np.median(list(self.start.values()))) if self.start else None
        base = {pid: self.start.get(pid, idle if idle is not None else self.first[pid]) for pid in self.peak}
        return {pid: (base[pid], self.peak[pid] - base[pid]) for pid in self.peak}


@pytest.fixture
def memory_watch(ray_session):
    """Shows that no process is killed for memory and no worker decodes a bomb: Ray's memory monitor logs no
    kill in this Ray's raylet log while the test runs, and no worker's private memory grows by
    MAX_WORKER_GROWTH (sampled from /proc every 50 ms: a worker's own high-water mark is lost when it exits).
    Growth, not an absolute bound: in the suite's shared Ray, workers that earlier tests left with torch
    loaded sit near 900 MB before this test starts."""
    node = ray_session._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    log = Path(node.get_session_dir_path()) / "logs" / "raylet.out"
    start = log.stat().st_size if log.exists() else 0
    watch = MemoryWatch()
    watch.start = {pid: rss for pid in _children(raylet) if (rss := _private(pid)) is not None}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for pid in _children(raylet):
                rss = _private(pid)
                if rss is not None:
                    watch.first.setdefault(pid, rss)
                    watch.peak[pid] = max(watch.peak.get(pid, 0), rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield watch
    stop.set()
    thread.join()
    with open(log, "rb") as f:
        f.seek(start)
        kills = [line for line in f.read().decode(errors="replace").splitlines() if _OOM_KILL.search(line)]
    assert not kills, f"Ray killed workers for memory: {kills[:3]}"
    assert watch.peak, "no Ray worker was seen"
    growth = watch.growth()
    pid, (base, grew) = max(growth.items(), key=lambda item: item[1][1])
    print(f"memory_watch: {len(growth)} Ray processes; largest private-memory growth {grew / 2**20:.1f} MB "
          f"(pid {pid}, from {base / 2**20:.1f} MB)")
    assert grew < MAX_WORKER_GROWTH, (f"Ray worker {pid}'s private memory grew {grew / 2**20:.0f} MB during the "
                                      f"test (from {base / 2**20:.0f} MB), over {MAX_WORKER_GROWTH >> 20} MB: "
                                      "it decoded something it should have refused")


# --- the allow-list -----------------------------------------------------------------------------------

def test_allow_list_reads_the_footer_without_building_types(tmp_path, marker):
    fs, _ = arrow_filesystem(str(tmp_path))
    pq.write_table(pa.table({"id": ["a"], "obj": _pickled_column(marker, 1)}), tmp_path / "evil.parquet")
    footer = read_footer(fs, str(tmp_path / "evil.parquet"))
    assert footer.num_rows == 1 and [(f.path, f.extension) for f in footer.fields] == [("id", None), ("obj", PICKLED)]
    with pytest.raises(UnsafeParquetError, match=r"evil.parquet: column 'obj' has extension type "
                                                 r"'ray.data.arrow_pickled_object'"):
        checked_footer(fs, str(tmp_path / "evil.parquet"))
    # Nested inside a struct, and an extension no library registered: refused as well.
    inner = pa.field("v", pa.binary(), metadata={b"ARROW:extension:name": b"someone.else"})
    pq.write_table(pa.table({"s": pa.array([{"v": b"x"}], pa.struct([inner]))}), tmp_path / "nested.parquet")
    with pytest.raises(UnsafeParquetError, match=r"column 's.v' has extension type 'someone.else'"):
        checked_footer(fs, str(tmp_path / "nested.parquet"))
    # The cutout store's own tensor column and plain types pass.
    _cutout_store(tmp_path / "store", 1, 2, {"label": pa.array([1, 2]), "tags": pa.array([["a"], []])})
    assert checked_footer(fs, str(tmp_path / "store" / shard_name(0))).num_rows == 2
    data = (tmp_path / "store" / shard_name(0)).read_bytes()
    for cut, name in ((len(data) - 30, "truncated"), (4, "tiny")):
        (tmp_path / f"{name}.parquet").write_bytes(data[:cut])
        with pytest.raises(UnreadableParquetError, match=f"{name}.parquet: "):
            checked_footer(fs, str(tmp_path / f"{name}.parquet"))


def test_pickled_column_in_ingest_is_errors_rows_and_nothing_runs(tmp_path, marker, memory_watch):
    from galray.stages.ingest import IngestJob, ingest

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    pq.write_table(_gz_table([f"ok{i}" for i in range(3)], rng), src / "a.parquet")
    evil = _gz_table(["e0", "e1"], rng)
    evil = evil.set_column(0, "image", _pickled_column(marker, 2))
    pq.write_table(evil, src / "b.parquet")
    (src / "c.parquet").write_bytes((src / "a.parquet").read_bytes()[:-40])  # truncated: one errors row
    # Garbage over the image column's first page, footer intact: the unit's rows are errors rows.
    pq.write_table(_gz_table(["p0", "p1"], rng), src / "d.parquet", compression="none")
    data = bytearray((src / "d.parquet").read_bytes())
    data[4:64] = b"\xff" * 60
    (src / "d.parquet").write_bytes(bytes(data))
    summary = ingest(IngestJob(format="gz-parquet", input=str(src), output=str(tmp_path / "out"), shard_rows=10))
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (8, 3, 5)
    errors = pq.read_table(tmp_path / "out" / ERRORS_DIR).to_pylist()
    reasons = sorted(e["reason"] for e in errors)
    assert [r.split(": ", 1)[0] for r in reasons] == ["row 0 of a refused file"] * 3 + ["row 1 of a refused file"] * 2
    assert sum("cannot read this unit" in r for r in reasons) == 2
    assert sum("column 'image' has extension type 'ray.data.arrow_pickled_object'" in r for r in reasons) == 2
    assert sum("truncated" in r for r in reasons) == 1


def test_pickled_column_refused_by_embed_encode_training_and_info(tmp_path, marker):
    """Each reader of a store refuses it on the driver, naming the file and the column, before Ray starts."""
    from galray.data.store import store_summary
    from galray.models.backbone_config import BackboneConfig
    from galray.stages.embed import EmbedJob, embed_store
    from galray.stages.encode import EncodeJob, encode_store
    from galray.storage import StorageConfig
    from galray.train.config import TrainJob
    from galray.train.datasets import build_datasets

    store = tmp_path / "store"
    _cutout_store(store, 2, 3)
    _cutout_store(tmp_path / "evil_shard", 1, 3, {"label": _pickled_column(marker, 3)})
    os.replace(tmp_path / "evil_shard" / shard_name(0), store / "shard-00009.parquet")
    refused = r"shard-00009.parquet: column 'label' has extension type 'ray.data.arrow_pickled_object'"
    out = str(tmp_path / "out")
    runs = {
        "embed": lambda: embed_store(EmbedJob(input=str(store), output=out, backbone=BackboneConfig(
            "test_convnext", pretrained=False, input_size=SIZE))),
        "encode": lambda: encode_store(EncodeJob(input=str(store), output=out, vqvae=str(tmp_path / "no-vq"))),
        "train": lambda: build_datasets(TrainJob(name="t", kind="vqvae", input=str(store)), StorageConfig()),
        "info": lambda: store_summary(str(store)),
    }
    for name, run in runs.items():
        with pytest.raises(UnsafeParquetError, match=refused):
            run()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # From the command line: one clear line and a non-zero exit, no traceback.
    got = run_cli("info", str(store))
    assert got.returncode == 1 and "Traceback" not in got.stderr
    assert got.stderr.strip().count("\n") == 0 and "column 'label'" in got.stderr, got.stderr
    # A truncated shard: refused at once too, naming it.
    data = (store / "shard-00009.parquet").read_bytes()
    (store / "shard-00009.parquet").write_bytes(data[: len(data) // 2])
    for name, run in runs.items():
        with pytest.raises(UnreadableParquetError, match=r"shard-00009.parquet: not a Parquet file, or truncated"):
            run()


# --- poison files: limits before decoding ---------------------------------------------------------

def _png_bomb(side: int) -> bytes:
    """A small PNG declaring side x side pixels (a filled ellipse on black, as in the issue)."""
    from PIL import Image, ImageDraw

    im = Image.new("L", (side, side))
    ImageDraw.Draw(im).ellipse((side // 4, side // 3, 3 * side // 4, 2 * side // 3), fill=200)
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _fits_header(cards: dict) -> bytes:
    """A bare FITS primary header (no data follows, whatever it claims)."""
    text = "".join(f"{k:<8}= {v!r:>20}".replace("'", " ")[:80].ljust(80) if not isinstance(v, bool) else
                   f"{k:<8}= {'T' if v else 'F':>20}".ljust(80) for k, v in cards.items()) + "END".ljust(80)
    return text.encode().ljust(2880, b" ")


def _gzip_bomb(raw_bytes: int) -> bytes:
    """A gzipped FITS whose data are ``raw_bytes`` of zeros, compressed ~1000x, written in 1 MB steps."""
    import gzip
    import io

    side = int((raw_bytes // 4) ** 0.5)
    header = _fits_header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": side, "NAXIS2": side})
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(header)
        zeros = bytes(1 << 20)
        left = side * side * 4
        while left > 0:
            f.write(zeros[:min(left, len(zeros))])
            left -= len(zeros)
    return buf.getvalue()


def test_poison_files_are_errors_rows_naming_the_limit(tmp_path, memory_watch):
    """A PNG bomb, FITS headers claiming huge or many axes, a gzip bomb and bad names among normal
    files: each is one errors row naming its limit, the valid files are stored, nothing is retried."""
    from astropy.io import fits

    from galray.stages.ingest import IngestJob, ingest

    rng = np.random.default_rng(2)
    src = tmp_path / "png"
    src.mkdir()
    for i in range(4):
        (src / f"ok{i}.png").write_bytes(encode_png(_galaxy(rng)))
    bomb = _png_bomb(8000)  # 64 MP (192 MB as RGB) in a few kB
    assert len(bomb) < 200_000
    (src / "bomb.png").write_bytes(bomb)
    (src / "new\nline.png").write_bytes(encode_png(_galaxy(rng)))  # a control character in the id
    got = ingest(IngestJob(format="images", input=str(src), output=str(tmp_path / "png_out"), shard_rows=3))
    assert (got.rows_in, got.rows_out, got.rows_errored) == (6, 4, 2)
    reasons = {e["object_id"]: e["reason"] for e in pq.read_table(tmp_path / "png_out" / ERRORS_DIR).to_pylist()}
    assert reasons["bomb"].startswith("image declares 8000 x 8000 = 64,000,000 pixels, over limits.max_pixels")
    assert reasons["new\\x0aline"] == "object_id contains control characters (NUL, newline, ...)"

    src = tmp_path / "fits"
    src.mkdir()
    for i in range(2):
        fits.PrimaryHDU(rng.normal(size=(3, SIZE, SIZE)).astype(np.float32)).writeto(src / f"ok{i}.fits")
    (src / "huge.fits").write_bytes(_fits_header({"SIMPLE": True, "BITPIX": -64, "NAXIS": 2,
                                                  "NAXIS1": 1_000_000, "NAXIS2": 1_000_000}))
    (src / "axes.fits").write_bytes(_fits_header({"SIMPLE": True, "BITPIX": 8, "NAXIS": 9,
                                                  **{f"NAXIS{k}": 2 for k in range(1, 10)}}))
    (src / "gzbomb.fits.gz").write_bytes(_gzip_bomb(200 << 20))
    assert (src / "gzbomb.fits.gz").stat().st_size < 1 << 20
    # Tile-compressed (.fz): a normal cube passes; one whose single tile inflates 54 MB of zeros from 60 kB
    # (~900x) is refused from its header, before astropy inflates it.
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(rng.normal(size=(3, SIZE, SIZE)).astype(np.float32))]
                 ).writeto(src / "okfz.fits.fz")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((3, 3000, 3000), np.int16), compression_type="GZIP_1",
                                                       tile_shape=(1, 3000, 3000))]).writeto(src / "fzbomb.fits.fz")
    assert (src / "fzbomb.fits.fz").stat().st_size * 100 < 3 * 3000 * 3000 * 2
    got = ingest(IngestJob(format="fits", input=str(src), output=str(tmp_path / "fits_out"), shard_rows=10))
    assert (got.rows_in, got.rows_out, got.rows_errored) == (7, 3, 4)
    reasons = {e["object_id"]: e["reason"] for e in pq.read_table(tmp_path / "fits_out" / ERRORS_DIR).to_pylist()}
    assert "over limits.max_pixels" in reasons["huge"]
    assert "NAXIS = 9, over limits.max_fits_axes (3)" in reasons["axes"]
    assert "over limits.max_compression_ratio (100x the compressed size)" in reasons["gzbomb"]
    assert reasons["fzbomb"].startswith("FITS HDU 1 decompresses to 54,000,000 bytes from a ") \
        and reasons["fzbomb"].endswith("-byte file, over limits.max_compression_ratio (100x)")


def test_bad_ids_in_a_parquet_input_are_errors_rows(tmp_path, memory_watch):
    """Invalid UTF-8, ``../``, NUL and 10 kB ids in gz-parquet: errors rows with a printable id; ``../`` is
    a valid (opaque) id. A folder with a name that is not UTF-8 is refused at once with one line."""
    from galray.config import ConfigError
    from galray.stages.ingest import IngestJob, ingest

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(3)
    ids = [b"ok", b"bad\xff\xfe", b"../../etc/passwd", b"nul\x00id", b"x" * 10_000]
    table = _gz_table([f"r{i}" for i in range(len(ids))], rng).set_column(1, "id_str", pa.array(ids, pa.binary()))
    pq.write_table(table, src / "a.parquet")
    got = ingest(IngestJob(format="gz-parquet", input=str(src), output=str(tmp_path / "out"), shard_rows=10))
    assert (got.rows_in, got.rows_out, got.rows_errored) == (5, 2, 3)
    stored = pq.read_table(tmp_path / "out" / shard_name(0)).column("object_id").to_pylist()
    assert sorted(stored) == ["../../etc/passwd", "ok"]
    errors = sorted((e["object_id"][:12], e["reason"]) for e in pq.read_table(tmp_path / "out" / ERRORS_DIR).to_pylist())
    assert errors == [("bad\\xff\\xfe", "object_id is not valid UTF-8"),
                      ("nul\\x00id", "object_id contains control characters (NUL, newline, ...)"),
                      ("x" * 12, "object_id is 10,000 bytes, over limits.max_id_bytes (1,024)")]
    os.makedirs(os.fsencode(str(tmp_path / "names")) + b"/bad\xffdir")
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        ingest(IngestJob(format="images", input=str(tmp_path / "names"), output=str(tmp_path / "o2")))


# --- safe reruns ------------------------------------------------------------------------------------

def test_embed_rerun_refuses_another_model_overwrite_replaces_and_a_cut_shard_is_recomputed(tmp_path, ray_session):
    import yaml

    from galray.config import ConfigError
    from galray.models.backbone_config import BackboneConfig
    from galray.stages.embed import EmbedJob, embed_store
    from galray.tracking import TrackingConfig

    _cutout_store(tmp_path / "in", 3, 4)
    out = tmp_path / "out"

    def job(model: str, **kw) -> EmbedJob:
        return EmbedJob(input=str(tmp_path / "in"), output=str(out), backbone=BackboneConfig(
            model, pretrained=False, input_size=32), tracking=TrackingConfig(enabled=False), **{"batch_size": 4, **kw})

    first = embed_store(job("test_convnext"))
    assert (first.rows_out, first.skipped_shards) == (12, 0)
    names = [f"shard-{i:05d}.parquet" for i in range(3)]
    before = {n: (out / n).read_bytes() for n in names}
    # A shard cut short (a copy interrupted, a disk full): the rerun recomputes exactly that one.
    (out / names[1]).write_bytes(before[names[1]][: len(before[names[1]]) // 2])
    again = embed_store(job("test_convnext", batch_size=2))  # a run-only setting may change
    assert (again.rows_in, again.skipped_shards) == (4, 2)
    assert {n: (out / n).read_bytes() for n in names} == before
    # Another model into the same output: refused at once, naming the field, nothing touched.
    with pytest.raises(ConfigError, match=r"^backbone.name: .* was made with backbone.name='test_convnext', "
                                          r"this run has 'test_resnet'.*--overwrite"):
        embed_store(job("test_resnet"))
    assert {n: (out / n).read_bytes() for n in names} == before
    # --overwrite replaces it entirely: every shard from the new model, one record.
    redo = embed_store(job("test_resnet", overwrite=True))
    assert (redo.rows_out, redo.skipped_shards) == (12, 0)
    for n in names:
        assert pq.read_schema(out / n).field("embedding").type.list_size == 96
    record = yaml.safe_load((out / "_provenance.yaml").read_text())
    assert record["settings"]["backbone.name"] == "test_resnet" and record["made_with"]["weights"] == "random-init:seed0"
    assert "storage.access_key_id" not in record["settings"]  # no credentials, not even redacted ones


def test_simulate_with_another_seed_is_refused_and_too_many_errors_exit_3(tmp_path, ray_session):
    from galray.cli import main
    from galray.config import ConfigError
    from galray.data.galsim_survey import SimConfig
    from galray.stages.simulate import SimulateJob, simulate_survey

    sim = tmp_path / "sim"
    simulate_survey(SimulateJob(output=str(sim), n=4, shard_rows=2, sim=SimConfig(size=32, seed=1)))
    with pytest.raises(ConfigError, match=r"^sim.seed: .* was made with sim.seed=1, this run has 2"):
        simulate_survey(SimulateJob(output=str(sim), n=4, shard_rows=2, sim=SimConfig(size=32, seed=2)))
    # Exit status: everything is written, then a non-zero exit when too many rows errored.
    src = tmp_path / "png"
    src.mkdir()
    (src / "good.png").write_bytes(encode_png(_galaxy(np.random.default_rng(0))))
    for i in range(3):
        (src / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["ingest", "--format", "images", str(src), "--output", str(tmp_path / "o"), "--size", "16"]
    assert main(args) == 3  # 3 of 4 rows errored, over the default 0.1
    assert pq.read_table(tmp_path / "o" / shard_name(0)).num_rows == 1
    assert pq.read_table(tmp_path / "o" / ERRORS_DIR).num_rows == 3
    assert main(args + ["--max-error-fraction", "0.75"]) == 0  # a rerun (same settings) accepting them


def test_check_ids_keeps_the_first_and_names_each_problem():
    from galray.data.ids import check_ids
    from galray.data.limits import DecodeLimits

    ids, problems = check_ids(pa.array([b"a", None, b"a", b"b\xff", b"c\nd", b"ok"], pa.binary()), DecodeLimits())
    assert ids == ["a", None, "a", "b\\xff", "c\\x0ad", "ok"]
    assert problems == {1: "missing object_id", 2: "duplicate object_id (first at row 0)",
                        3: "object_id is not valid UTF-8", 4: "object_id contains control characters (NUL, newline, ...)"}
    assert check_ids(pa.array([7, 8, 7]), DecodeLimits()) == (["7", "8", "7"], {2: "duplicate object_id (first at row 0)"})


# --- bounded retries --------------------------------------------------------------------------------

def test_a_shard_that_kills_its_replica_every_time_is_given_up_as_errors_rows(tmp_path, ray_session, monkeypatch):
    """One shard kills the model replica that reads it (SIGKILL, as the kernel's OOM killer would), every
    time up to twice the bound, then no longer. embed and encode try it 1 + MAX_RETRIES times, not more,
    and write its rows as errors rows naming the retries; the other shards come out exactly once, and the
    job ends normally with too_many_errors for the CLI's exit status."""
    from galray.models.backbone_config import BackboneConfig
    from galray.models.checkpoint import save_model
    from galray.models.vqvae import VQVAE, VQVAEConfig
    from galray.session import MAX_RETRIES
    from galray.stages import encode as encode_stage
    from galray.stages.embed import EmbedJob, ShardEmbedder, embed_store
    from galray.stages.pool import ActorPoolConfig
    from galray.tracking import TrackingConfig

    _cutout_store(tmp_path / "in", 3, 4)
    poison, attempts = shard_name(1), tmp_path / "attempts"
    attempts.mkdir()

    def die_on_poison(stage: str, path: str) -> None:  # runs in the replica
        if path.endswith(poison):
            log = attempts / stage
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
            if len(log.read_text().split()) <= 2 * (MAX_RETRIES + 1):
                os.kill(os.getpid(), signal.SIGKILL)

    class DyingEmbedder(ShardEmbedder):  # defined here, so Ray ships it by value to the actors
        def embed_shard(self, path):
            die_on_poison("embed", path)
            return super().embed_shard(path)

    class DyingEncoder(encode_stage.ShardEncoder):
        def encode_shard(self, path):
            die_on_poison("encode", path)
            return super().encode_shard(path)

    def check(stage: str, summary, out: Path) -> None:
        assert len((attempts / stage).read_text().split()) == MAX_RETRIES + 1, stage
        assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (12, 8, 4), stage
        assert summary.too_many_errors  # 4 of 12 over the default 0.1: the CLI exits 3
        errors = pq.read_table(out / ERRORS_DIR / poison).to_pylist()
        assert sorted(e["object_id"] for e in errors) == [f"g1-{i}" for i in range(4)]
        worker = "model replica embedding" if stage == "embed" else "actor encoding"
        assert {(e["stage"], e["reason"]) for e in errors} == {(stage, f"gave up after {MAX_RETRIES} retries: the "
                                                                f"{worker} this shard died on every attempt (killed, "
                                                                "e.g. for memory)")}
        ids = [i for n in (0, 1, 2) for i in pq.read_table(out / shard_name(n)).column("object_id").to_pylist()]
        assert sorted(ids) == sorted(f"g{s}-{i}" for s in (0, 2) for i in range(4))  # exactly once

    out = tmp_path / "emb"
    check("embed", embed_store(EmbedJob(
        input=str(tmp_path / "in"), output=str(out), backbone=BackboneConfig("galray_pool_linear", pretrained=False,
                                                                             input_size=SIZE),
        pool=ActorPoolConfig(actors=1), tracking=TrackingConfig(enabled=False)), embedder_cls=DyingEmbedder), out)

    save_model(VQVAE(VQVAEConfig(image_size=SIZE, latent_size=4, channels=(8, 16), code_dim=8, codebook_size=16)),
               tmp_path / "vq")
    monkeypatch.setattr(encode_stage, "ShardEncoder", DyingEncoder)  # the fault, injected from the test
    out = tmp_path / "codes"
    check("encode", encode_stage.encode_store(encode_stage.EncodeJob(
        input=str(tmp_path / "in"), vqvae=str(tmp_path / "vq"), output=str(out), pool=ActorPoolConfig(actors=1))), out)
