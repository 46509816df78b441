"""The cutout store on local disk and on a real S3 server (moto over HTTP), through pyarrow, s3fs and Ray."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from galray.data.shards import ImageSpec, images_from_table, list_parquet, make_table, shard_name, write_table
from galray.data.store import read_store, store_summary
from galray.storage import StorageConfig, StorageError, arrow_filesystem, check_access, fsspec_filesystem


def _columns(rng: np.random.Generator, start: int, n: int, spec: ImageSpec) -> dict:
    return {
        "object_id": np.array([f"obj-{i:06d}" for i in range(start, start + n)], dtype=object),
        "image": rng.integers(0, 256, (n, *spec.shape), dtype=np.uint8),
        "label": rng.integers(0, 3, n),
        "class_name": np.array([f"c{i % 3}" for i in range(n)], dtype=object),
        "ra": rng.uniform(0, 360, n),
    }


def _write_store(uri: str, storage: StorageConfig | None = None, shards: int = 3, rows: int = 7):
    spec = ImageSpec(shape=(16, 12, 3), bands=("g", "r", "z"))
    rng = np.random.default_rng(0)
    fs, root = arrow_filesystem(uri, storage)
    written = []
    for s in range(shards):
        cols = _columns(rng, s * rows, rows, spec)
        write_table(make_table(cols, spec), fs, f"{root}/{shard_name(s)}")
        written.append(cols)
    return spec, written


def test_local_store_roundtrip_and_info(tmp_path, ray_session):
    spec, written = _write_store(str(tmp_path / "store"))
    names = [f.base_name for f in list_parquet(*arrow_filesystem(str(tmp_path / "store")))]
    assert names == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    table = pq.read_table(tmp_path / "store" / "shard-00001.parquet")
    assert np.array_equal(images_from_table(table), written[1]["image"])
    summary = store_summary(str(tmp_path / "store"))
    assert summary.rows == 21 and summary.shards == 3 and summary.image == spec
    assert summary.label_counts["class_name"] == {"c0": 9, "c1": 6, "c2": 6}
    assert sum(summary.label_counts["label"].values()) == 21
    assert "object_id" not in summary.label_counts and "ra" not in summary.label_counts


def test_s3_store_write_read_bit_exact_and_list(s3_server, ray_session):
    bucket = s3_server.new_bucket()
    storage = StorageConfig(endpoint_url=s3_server.endpoint, access_key_id=s3_server.access_key,
                            secret_access_key=s3_server.secret_key)
    uri = f"s3://{bucket}/surveys/test"
    spec, written = _write_store(uri, storage)
    # listing through s3fs sees exactly the deterministic shard names
    fs, path = fsspec_filesystem(uri, storage)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path)) == [shard_name(i) for i in range(3)]
    # Ray Data streams it back bit-exact
    ds = read_store(uri, storage)
    rows = {r["object_id"]: r for r in ds.iter_rows()}
    assert len(rows) == 21
    for cols in written:
        for oid, img, ra in zip(cols["object_id"], cols["image"], cols["ra"]):
            assert np.array_equal(rows[oid]["image"], img) and rows[oid]["ra"] == ra
    batch = next(iter(ds.iter_batches(batch_size=5, batch_format="numpy")))
    assert batch["image"].shape == (5, *spec.shape) and batch["image"].dtype == np.uint8


def test_missing_bucket_is_a_clear_error(s3_server):
    storage = StorageConfig(endpoint_url=s3_server.endpoint, access_key_id="testing", secret_access_key="testing")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-xyz' does not exist"):
        check_access("s3://no-such-bucket-xyz/prefix", storage)


def test_bad_credentials_are_a_clear_error(s3_auth_server):
    good = StorageConfig(endpoint_url=s3_auth_server.endpoint, access_key_id=s3_auth_server.access_key,
                         secret_access_key=s3_auth_server.secret_key)
    bucket = s3_auth_server.new_bucket()
    check_access(f"s3://{bucket}/x", good)  # the right key works
    bad = StorageConfig(endpoint_url=s3_auth_server.endpoint, access_key_id="AKIAWRONGWRONGWRONG",
                        secret_access_key="not-the-secret", max_attempts=1)
    with pytest.raises(StorageError, match="access denied") as info:
        check_access(f"s3://{bucket}/x", bad)
    assert "not-the-secret" not in str(info.value)
    # and from the CLI: one line on stderr, exit 1, no traceback, no secret
    env = {**s3_auth_server.env(), "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG",
           "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = run_cli("info", f"s3://{bucket}/x", env=env, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "access denied" in proc.stderr and "Traceback" not in proc.stderr
    assert "not-the-secret" not in proc.stderr + proc.stdout


def test_cli_info_with_only_aws_variables(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/store"
    storage = StorageConfig(endpoint_url=s3_server.endpoint, access_key_id="testing", secret_access_key="testing")
    _write_store(uri, storage, shards=2, rows=5)
    proc = run_cli("info", uri, env=s3_server.env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "10 in 2 shard(s)" in proc.stdout and "uint8 (16, 12, 3) HWC" in proc.stdout
    proc = run_cli("info", f"s3://missing-bucket-{bucket}/x", env=s3_server.env(), timeout=60)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
