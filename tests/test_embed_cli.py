"""`galray embed` as a user runs it: a summary line, an embedding store, and a clear GPU error."""

from __future__ import annotations

import pyarrow.parquet as pq
from conftest import run_cli

from galray.data.shards import make_table, shard_name, write_table
from galray.data.galsim_survey import SimConfig, render_batch
from galray.storage import arrow_filesystem


def test_cli_embed_writes_one_file_per_shard_and_refuses_missing_gpus(tmp_path):
    sim = SimConfig(size=32, seed=4)
    fs, root = arrow_filesystem(str(tmp_path / "cutouts"))
    for s in range(2):
        cols = render_batch(range(6 * s, 6 * s + 6), sim)
        write_table(make_table(cols, sim.image_spec()), fs, f"{root}/{shard_name(s)}")
    out = tmp_path / "emb"
    args = ["embed", "--input", str(tmp_path / "cutouts"), "--output", str(out), "--model", "test_convnext",
            "--random-init", "--input-size", "32", "--batch-size", "4", "--actors", "1"]
    proc = run_cli(*args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 rows in, 12 out, 0 errored" in proc.stdout
    assert sorted(p.name for p in out.glob("*.parquet")) == [shard_name(0), shard_name(1)]
    table = pq.read_table(out / shard_name(1))
    assert table.column("object_id").to_pylist() == [f"sim-4-{i:09d}" for i in range(6, 12)]
    gpu = run_cli(*args[:-2], "--num-gpus", "1", "--overwrite", timeout=120)
    assert gpu.returncode == 2 and "GPU" in gpu.stderr and "Traceback" not in gpu.stderr
