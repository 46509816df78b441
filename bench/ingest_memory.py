"""Ingest memory: peak RSS of `galray ingest`'s whole process tree on N rows and on 10N rows.

Run from the repo root:  python3 bench/ingest_memory.py --quick --json OUT.json

Input: a Galaxy10-DECaLS-shaped HDF5 file (``images`` (N, 256, 256, 3) uint8 as the survey ships it,
``ans``, ``ra``, ``dec``, ``redshift``, ``pxscale``; smooth random blobs, not noise, so PNG-like
compressors do not dominate) made here. Each size is ingested in a fresh process (its own local Ray,
2 CPUs) with ``shard_rows`` rows per Ray task, resized to 64 px. A sampler sums VmRSS over that
process and all its descendants (driver, raylet, GCS, Ray workers) every 0.2 s; the peak is reported.
Streaming means one task holds one unit of ``shard_rows`` rows, so memory should not grow with N.

Keys (one flat JSON object of numbers):
- ``rows_small``, ``rows_large`` (10x), ``shard_rows``, ``input_mb_large``: the settings;
- ``peak_rss_small_mb``, ``peak_rss_large_mb``: peak RSS of the process tree;
- ``ratio_peak_rss_large_to_small``: the second over the first (target <= 1.2);
- ``rows_per_s_large``: rows written per wall second of the whole large run, Ray start-up included (beside it
  the small run's ``rows_per_s_small``, same settings).

Measured 2026-12-01 (--quick, a 2-core machine, notes/15-s4-ingest_memory.json): 300 rows peak 1,747 MB,
3,000 rows (563 MB of HDF5) peak 1,775 MB: ratio_peak_rss_large_to_small 1.016 (target <= 1.2: met);
122 rows/s on the large run, Ray start-up included (a test run shared the machine).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

SIDE = 256


def make_galaxy10(path: Path, n: int, seed: int, chunk: int = 256) -> None:
    """A Galaxy10-layout file written in chunks (never all N images in memory)."""
    import h5py

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIDE, :SIDE].astype(np.float32)
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (n, SIDE, SIDE, 3), dtype=np.uint8, chunks=(8, SIDE, SIDE, 3))
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            cx, cy, r = rng.uniform(64, 192, (3, m, 1, 1)).astype(np.float32)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 4) ** 2))  # (m, SIDE, SIDE)
            noise = rng.normal(0, 0.03, (m, SIDE, SIDE, 3)).astype(np.float32)
            images[start:start + m] = np.clip((blob[..., None] + noise) * 255, 0, 255).astype(np.uint8)
        f.create_dataset("ans", data=(np.arange(n) % 10).astype(np.uint8))
        for k, lo, hi in (("ra", 0, 360), ("dec", -30, 30), ("redshift", 0, 0.2)):
            f.create_dataset(k, data=rng.uniform(lo, hi, n))
        f.create_dataset("pxscale", data=np.full(n, 0.262))


def child(spec: str) -> None:
    """Ingest in this process (a child of the bench, so its tree is measured alone)."""
    from galray.config import from_dict
    from galray.session import ensure_ray
    from galray.stages.ingest import IngestJob, ingest

    s = json.loads(spec)
    ensure_ray(num_cpus=2)
    job = from_dict(IngestJob, {"format": "galaxy10-h5", "input": s["input"], "output": s["output"],
                                "shard_rows": s["shard_rows"], "cutout": {"size": 64}})
    summary = ingest(job)
    print("RESULT " + json.dumps({"rows": summary.rows_out, "errored": summary.rows_errored}), flush=True)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            pass
    return total


def run(h5: Path, out: Path, shard_rows: int) -> dict:
    spec = json.dumps({"input": str(h5), "output": str(out), "shard_rows": shard_rows})
    t0 = time.perf_counter()
    popen = subprocess.Popen([sys.executable, __file__, "--child", spec], stdout=subprocess.PIPE, text=True)
    proc, peak, stop = psutil.Process(popen.pid), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = {}
    for line in popen.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    popen.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    if popen.returncode != 0 or not result:
        raise RuntimeError(f"ingest child failed with exit code {popen.returncode}")
    return {**result, "peak_rss_mb": peak[0] / 2 ** 20, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N=300 and 10N=3,000 rows (under 3 minutes on 2 cores)")
    ap.add_argument("--json", type=str, default=None, help="write the JSON figures here")
    ap.add_argument("--rows", type=int, default=None, help="N (default 300 quick, 2000 full)")
    ap.add_argument("--shard-rows", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    small = args.rows or (300 if args.quick else 2000)
    large = 10 * small
    with tempfile.TemporaryDirectory(prefix="galray-ingest-memory-") as tmp:
        work = Path(tmp)
        runs = {}
        for name, n in (("small", small), ("large", large)):
            h5 = work / f"{name}.h5"
            make_galaxy10(h5, n, args.seed)
            runs[name] = run(h5, work / f"out-{name}", args.shard_rows)
            runs[name]["input_mb"] = h5.stat().st_size / 2 ** 20
            assert runs[name]["rows"] + runs[name]["errored"] == n, runs[name]
            print(f"# {name}: {n} rows, {runs[name]}", file=sys.stderr)
    out = {
        "rows_small": small, "rows_large": large, "shard_rows": args.shard_rows,
        "input_mb_large": runs["large"]["input_mb"],
        "peak_rss_small_mb": runs["small"]["peak_rss_mb"], "peak_rss_large_mb": runs["large"]["peak_rss_mb"],
        "ratio_peak_rss_large_to_small": runs["large"]["peak_rss_mb"] / runs["small"]["peak_rss_mb"],
        "rows_per_s_small": runs["small"]["rows"] / runs["small"]["seconds"],
        "rows_per_s_large": runs["large"]["rows"] / runs["large"]["seconds"],
    }
    text = json.dumps(out)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
