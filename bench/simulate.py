"""Simulator throughput: galaxies/s through the Ray Data pipeline at 64 and 128 px.

Baseline, measured in the same run: the same renderer in one process, serially, with no Ray and
no Parquet writes. The ratio shows what the parallel pipeline buys on this machine.

    python bench/simulate.py --quick --json bench/out/simulate.json

Keys: galaxies_per_s_64, galaxies_per_s_128 (pipeline, writes included, Ray already started),
serial_galaxies_per_s_64, serial_galaxies_per_s_128, speedup_64, speedup_128, n, cpus.
Target: galaxies_per_s_64 >= 200 on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from galray.data.galsim_survey import SimConfig, render_batch
from galray.session import ensure_ray
from galray.stages.simulate import SimulateJob, simulate_survey


def serial_rate(size: int, n: int) -> float:
    cfg = SimConfig(size=size, seed=1)
    render_batch(range(4), cfg)  # warm caches (PSF, profile tables)
    t0 = time.perf_counter()
    render_batch(range(n), cfg)
    return n / (time.perf_counter() - t0)


def pipeline_rate(size: int, n: int, shard_rows: int, workdir: Path) -> float:
    out = workdir / f"sim{size}"
    job = SimulateJob(output=str(out), n=n, shard_rows=shard_rows, sim=SimConfig(size=size, seed=0))
    t0 = time.perf_counter()
    summary = simulate_survey(job)
    seconds = time.perf_counter() - t0
    assert summary.rendered == n
    shutil.rmtree(out)
    return n / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=2000 pipeline, 200-galaxy serial baseline")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    n_serial = 200 if args.quick else 1000
    ensure_ray()  # start-up is not part of the throughput
    import ray

    cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    # one shard per ~1/8 of the work keeps every CPU busy to the end
    shard_rows = max(50, n // (4 * cpus))
    pipeline_rate(64, 2 * cpus * 10, 10, Path(tempfile.mkdtemp()))  # warm the workers' imports
    out: dict = {"n": n, "cpus": cpus}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (64, 128):
            out[f"galaxies_per_s_{size}"] = round(pipeline_rate(size, n, shard_rows, Path(tmp)), 1)
            out[f"serial_galaxies_per_s_{size}"] = round(serial_rate(size, n_serial), 1)
            out[f"speedup_{size}"] = round(out[f"galaxies_per_s_{size}"] / out[f"serial_galaxies_per_s_{size}"], 2)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
