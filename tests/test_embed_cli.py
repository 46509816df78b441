"""`galray embed` as a user runs it: a summary line and an embedding store, one file per input shard."""

from __future__ import annotations

import pyarrow.parquet as pq
from conftest import run_cli

from galray.data.shards import make_table, shard_name, write_table
from galray.data.galsim_survey import SimConfig, render_batch
from galray.storage import arrow_filesystem


def test_cli_embed_writes_one_file_per_shard(tmp_path):
    # Asking for GPUs a cluster lacks fails at once: tests/test_embed.py::test_gpus_requested_without_gpus_fail_at_once
    # (in the suite's Ray: a CLI run of its own costs ~20 s of Ray start-up); ConfigError -> exit 2: test_cli.py.
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
