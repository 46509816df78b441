"""`galray simulate` through Ray Data: deterministic shards, resume, S3 with only the AWS variables."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow.parquet as pq
from conftest import run_cli

from galray.data.shards import images_from_table
from galray.data.galsim_survey import CLASS_NAMES, SimConfig, render_batch
from galray.data.store import store_summary
from galray.stages.simulate import SimulateJob, simulate_survey


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.parquet"))}


def test_same_seed_same_bytes_and_resume(tmp_path, ray_session):
    sim = SimConfig(size=32, seed=7)
    a, b = tmp_path / "a", tmp_path / "b"
    sa = simulate_survey(SimulateJob(output=str(a), n=50, shard_rows=20, sim=sim))
    # different sharding must not change the galaxies, only how they are split
    simulate_survey(SimulateJob(output=str(b), n=50, shard_rows=20, sim=sim))
    assert sa.shards == 3 and sa.rendered == 50
    assert _digests(a) == _digests(b) and len(_digests(a)) == 3
    # rows equal a direct render of the same indices
    table = pq.read_table(a / "shard-00001.parquet")
    direct = render_batch(range(20, 40), sim)
    assert table.column("object_id").to_pylist() == list(direct["object_id"])
    assert np.array_equal(images_from_table(table), direct["image"])
    # a different seed gives different galaxies
    c = tmp_path / "c"
    simulate_survey(SimulateJob(output=str(c), n=50, shard_rows=20, sim=SimConfig(size=32, seed=8)))
    assert _digests(c) != _digests(a)
    # delete one shard: the rerun renders only it, and the store is as before
    before = _digests(a)
    (a / "shard-00001.parquet").unlink()
    again = simulate_survey(SimulateJob(output=str(a), n=50, shard_rows=20, sim=sim))
    assert again.rendered == 20 and again.skipped_shards == 2
    assert _digests(a) == before
    summary = store_summary(str(a))
    assert summary.rows == 50 and summary.image.shape == (32, 32, 3)
    assert set(summary.label_counts["class_name"]) <= set(CLASS_NAMES)
    assert (a / "_config.yaml").exists()


def test_cli_simulate_to_s3_with_only_aws_variables(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    uri = f"s3://{bucket}/sim"
    preview = tmp_path / "montage.png"
    proc = run_cli("simulate", "--n", "40", "--size", "32", "--seed", "3", "--output", uri, "--shard-rows", "20",
                   "--preview", str(preview), env=s3_server.env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simulated 40 galaxies" in proc.stdout
    assert preview.exists() and preview.stat().st_size > 1000
    info = run_cli("info", uri, env=s3_server.env(), timeout=60)
    assert info.returncode == 0 and "40 in 2 shard(s)" in info.stdout and "class_name" in info.stdout


def test_cli_bad_config_names_the_field(tmp_path):
    proc = run_cli("simulate", "--n", "10", "--output", str(tmp_path / "x"), "--set", "sim.sizee=3", timeout=60)
    assert proc.returncode == 2 and "sim.sizee" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("simulate", "--n", "0", "--output", str(tmp_path / "x"), timeout=60)
    assert proc.returncode == 2 and "n:" in proc.stderr
    proc = run_cli("simulate", "--print-config", "--size", "48", timeout=60)
    assert proc.returncode == 0 and "size: 48" in proc.stdout
