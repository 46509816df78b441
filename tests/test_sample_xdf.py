"""Real galaxies from the Hubble XDF: detection, cutouts, measured shapes, and the CLI against S3."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from galray.data.shards import images_from_table
from galray.data.xdf import XDFConfig, cutout, xdf_sample
from galray.storage import StorageConfig, arrow_filesystem


@pytest.fixture(scope="module")
def sample():
    return xdf_sample(XDFConfig(size=48))


def test_detects_hundreds_of_sources_with_sane_shapes(sample):
    n = len(sample["object_id"])
    assert 200 < n < 2000
    assert sample["image"].shape == (n, 48, 48, 3) and sample["image"].dtype == np.uint8
    assert len(set(sample["object_id"])) == n
    assert np.all((sample["axis_ratio"] > 0) & (sample["axis_ratio"] <= 1.0001))
    assert np.all(sample["b"] <= sample["a"] + 1e-4)
    assert np.median(sample["half_light_radius"]) > 1
    assert np.all(sample["snr"] > 0)


def test_cutouts_are_centred_on_the_source(sample):
    # The detected object is brighter at the cutout centre than at its border, on average.
    img = sample["image"].astype(np.float32).mean(axis=3)
    centre = img[:, 20:28, 20:28].mean(axis=(1, 2))
    border = np.concatenate([img[:, :4].reshape(len(img), -1), img[:, -4:].reshape(len(img), -1)], 1).mean(1)
    assert np.mean(centre > border) > 0.9


def test_cutout_pads_at_the_edge():
    image = np.full((50, 50, 3), 7, np.uint8)
    image[0, 0] = 255
    out, outside = cutout(image, 0.0, 0.0, 20, 20)
    assert out.shape == (20, 20, 3) and 0.7 < outside < 0.8
    inside, none_out = cutout(image, 25.0, 25.0, 10, 10)
    assert none_out == 0.0 and np.all(inside == 7)


def test_cli_sample_xdf_to_s3_with_aws_variables(s3_server):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/xdf"
    proc = run_cli("sample", "xdf", "--output", uri, "--size", "32", env=s3_server.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "real galaxies" in proc.stdout
    storage = StorageConfig(endpoint_url=s3_server.endpoint, access_key_id="testing", secret_access_key="testing")
    fs, root = arrow_filesystem(uri, storage)
    table = pq.read_table(f"{root}/shard-00000.parquet", filesystem=fs)
    assert images_from_table(table).shape[1:] == (32, 32, 3)
    assert {"half_light_radius", "axis_ratio", "position_angle", "flux"} <= set(table.column_names)
    info = run_cli("info", uri, env=s3_server.env(), timeout=60)
    assert info.returncode == 0 and f"{table.num_rows:,} in 1 shard(s)" in info.stdout
