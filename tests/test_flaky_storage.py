"""Flaky storage: `galray embed` through a proxy that answers S3 requests with 503 SlowDown or drops them.

The job must still write every row exactly once, and it must owe that to the retries galray
configures (``StorageConfig.max_attempts``), not to luck and not to Ray Data's own I/O retries:
the test turns those off, and a control run with ``max_attempts=1`` must fail.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from flaky_proxy import FAULT_KINDS, FaultPlan, FlakyProxy

from galray.data.shards import ERRORS_DIR, ImageSpec, list_parquet, make_table, shard_name, write_table
from galray.models.backbone_config import BackboneConfig
from galray.stages.embed import EmbedJob, embed_store
from galray.stages.pool import ActorPoolConfig
from galray.storage import StorageConfig, StorageError, arrow_filesystem

SIZE = 32
MODEL = "test_convnext"


@pytest.fixture
def proxy(s3_server):
    with FlakyProxy(s3_server.endpoint) as p:
        yield p


def _storage(endpoint: str, max_attempts: int) -> StorageConfig:
    return StorageConfig(endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing",
                         max_attempts=max_attempts)


def _write_store(uri: str, storage: StorageConfig, shards: int, rows: int) -> dict[str, list[str]]:
    """A uint8 HWC store at the model's size; returns {shard stem: object_ids}."""
    spec = ImageSpec(shape=(SIZE, SIZE, 3), bands=("g", "r", "z"))
    rng = np.random.default_rng(0)
    fs, root = arrow_filesystem(uri, storage)
    out = {}
    for s in range(shards):
        ids = np.array([f"obj-{s * rows + i:05d}" for i in range(rows)], dtype=object)
        images = rng.integers(0, 256, (rows, *spec.shape), dtype=np.uint8)
        write_table(make_table({"object_id": ids, "image": images}, spec), fs, f"{root}/{shard_name(s)}")
        out[shard_name(s).removesuffix(".parquet")] = list(ids)
    return out


def test_arrow_filesystem_keeps_its_retries_through_pickling_and_the_proxy_is_faithful(s3_server, proxy):
    """Ray ships filesystems to its tasks pickled: the copy must make exactly max_attempts attempts
    too (pyarrow's own pickling drops the retry strategy and falls back to its default of 3)."""
    bucket = s3_server.new_bucket()
    fs, root = arrow_filesystem(f"s3://{bucket}/x", _storage(proxy.url, max_attempts=2))
    table = pa.table({"a": np.arange(1000), "b": [f"row {i}" for i in range(1000)]})
    # No faults: a faithful round trip (pyarrow's UploadPart sends a chunked body with Expect: 100-continue).
    pq.write_table(table, f"{root}/t.parquet", filesystem=fs)
    assert pq.read_table(f"{root}/t.parquet", filesystem=fs).equals(table)
    assert proxy.counts["forwarded"] > 0 and proxy.faults == 0

    copy = pickle.loads(pickle.dumps(fs))
    # the same filesystem but for the credentials, which never travel (the copy finds its own: galray.storage)
    assert isinstance(copy, pafs.S3FileSystem) and copy.max_attempts == 2 and copy.region == fs.region
    for f in (fs, copy):
        proxy.set_plan(FaultPlan(rate=1.0, kinds=("slowdown",)))
        with pytest.raises(OSError, match="503"):
            f.get_file_info(f"{root}/t.parquet")
        assert proxy.counts["slowdown"] == 2 and proxy.counts["forwarded"] == 0

    # One fault of each kind in turn, then clean answers: every request succeeds on a retry.
    proxy.set_plan(FaultPlan(every=2, kinds=FAULT_KINDS))
    for _ in range(2):
        assert copy.get_file_info(f"{root}/t.parquet").size == fs.get_file_info(f"{root}/t.parquet").size
    assert pq.read_table(f"{root}/t.parquet", filesystem=copy).equals(table)
    assert all(proxy.counts[k] >= 1 for k in FAULT_KINDS), proxy.counts


def test_embed_through_flaky_storage_writes_every_row_exactly_once(s3_server, proxy, ray_session):
    from ray.data import DataContext

    bucket = s3_server.new_bucket()
    src, dst = f"s3://{bucket}/cutouts", f"s3://{bucket}/embeddings"
    shards = _write_store(src, _storage(s3_server.endpoint, 1), shards=3, rows=8)  # direct, no faults

    def job(max_attempts: int) -> EmbedJob:
        return EmbedJob(input=src, output=dst, backbone=BackboneConfig(MODEL, pretrained=False, input_size=SIZE),
                        batch_size=4, pool=ActorPoolConfig(actors=1), storage=_storage(proxy.url, max_attempts))

    ctx = DataContext.get_current()
    saved = ctx.retried_io_errors
    ctx.retried_io_errors = []  # Ray Data's own I/O retries would hide whether galray's work
    try:
        # Control: without retries, a fault fails the job. Every 3rd request faults (the first one a
        # 503), so the driver's first storage calls (access checks, before any Ray task) meet one for certain.
        proxy.set_plan(FaultPlan(every=3))
        with pytest.raises((StorageError, OSError), match="503"):
            embed_store(job(max_attempts=1))
        assert proxy.counts["slowdown"] == 1

        proxy.set_plan(FaultPlan(rate=0.1, seed=0))
        summary = embed_store(job(max_attempts=10))
    finally:
        ctx.retried_io_errors = saved

    # Faults of every kind really happened: one in every 10 requests, kinds in turn, and the job
    # makes some 70 requests (30 would do).
    counts = dict(proxy.counts)
    assert all(counts.get(k, 0) >= 1 for k in FAULT_KINDS), (counts, proxy.faulted_requests)
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (24, 24, 0)

    # Exactly once, read back directly: one output file per input shard holding exactly its ids.
    fs, root = arrow_filesystem(dst, _storage(s3_server.endpoint, 1))
    files = list_parquet(fs, root)
    assert [f.base_name.removesuffix(".parquet") for f in files] == sorted(shards)
    for f in files:
        ids = pq.read_table(f.path, filesystem=fs).column("object_id").to_pylist()
        assert ids == sorted(shards[f.base_name.removesuffix(".parquet")])  # no duplicates, none missing
    assert not list_parquet(fs, f"{root}/{ERRORS_DIR}")
    print(f"flaky storage: {counts}", *proxy.faulted_requests, sep="\n")
