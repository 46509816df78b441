"""Pipeline ceiling: `galray embed` with a backbone that costs almost nothing.

On a GPU node the model is fast, and the pipeline's own CPU cost per row (reading, decoding,
preparing, Ray's machinery, writing) sets the speed and the bill. This bench measures that cost
with ``galray_pool_linear`` (galray.models.backbones: 8x8 average pool + one Linear to D=640,
convnext_nano's width, so each row writes a real backbone's bytes; ~0.03 ms of CPU a row), run
by ``galray.stages.embed.embed_store`` exactly as `galray embed` runs it: one single-threaded
replica per core, batch 64, the default block of 1,024 rows.

Stores, written here in the cutout-store format (no GalSim): 64 px uint8 HWC cutouts (a Gaussian
blob, a fainter neighbour, sky noise: compresses like real cutouts) in 1,000-row shards (galray
simulate's size), as the fixed-shape tensor column, and the same pixels as JPEG q90 bytes (keys
prefixed ``jpeg_``).

Keys (each store):
- rows: rows embedded.
- model_only_rows_per_s: the baseline, measured in the same run: the replicas' forward pass alone
  (galray.models.inference.InferenceModel, batch 64, one thread) on in-memory uint8 batches, one
  process per core, started together; all their rows over the slowest one's time.
- pipeline_rows_per_s: galray's steady rate (StageSummary.steady_rows_per_s: rows of the shards
  finished after the first quarter, over their time); pipeline_rows_per_s_end_to_end: all rows over
  the whole job (replicas' start-up included, Ray's own start excluded).
- cpu_ms_per_row: CPU of every process of the job's tree (the driver, Ray's daemons and workers),
  from /proc (utime + stime, sampled every 0.5 s; a process that exits keeps its last value), over
  the steady window, per row. Its split, per 1,000 rows:
  driver_cpu_ms_per_1k_rows (the job's Python process, Ray Data's executor threads included);
  preprocess_cpu_ms_per_1k_rows (in the replicas, the CPU of their shard calls outside the forward
  pass: Parquet read, prepare, id checks, the Parquet write; from process and thread CPU clocks
  around each call, averaged over every shard);
  replica_cpu_ms_per_1k_rows (the rest of the replicas' processes: forward passes and Ray's
  machinery in the worker); ray_overhead_cpu_ms_per_1k_rows (raylet, GCS, agents, idle workers).
  cpu_ms_per_row_end_to_end: the same total over the whole job.
- rows_per_s_at_full_cores: cores / cpu_ms_per_row: the rate with every core to the job. On a
  shared machine the steady rate shows only the share of the cores the job got (steady_cores).
- peak_rss_mb: peak summed RSS of the job's process tree (shared pages count once per process).
- ratio_pipeline_to_model_only.

    python bench/pipeline_ceiling.py --quick --json OUT.json      # 50,000 rows a store, ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL = "galray_pool_linear"
SIZE = 64
SHARD_ROWS = 1000
BATCH = 64
REPLICA_MARK = "Embedder"  # Ray titles the replicas' processes ray::MapWorker(MapBatches(<class>)): MeteredEmbedder here
ROLES = ("driver", "replica", "ray")
SPLIT = ("driver_cpu_ms_per_1k_rows", "preprocess_cpu_ms_per_1k_rows", "replica_cpu_ms_per_1k_rows",
         "ray_overhead_cpu_ms_per_1k_rows")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --- stores -----------------------------------------------------------------------------------------

def cutouts(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 64, 64, 3) uint8: a Gaussian blob of random size and colour, a fainter neighbour, sky noise."""
    yy, xx = (np.mgrid[:SIZE, :SIZE] - SIZE / 2).astype(np.float32)
    r = rng.uniform(2, 10, (n, 1, 1)).astype(np.float32)
    img = np.exp(-(xx ** 2 + yy ** 2)[None] / (2 * r ** 2))[..., None] * rng.uniform(80, 250, (n, 1, 1, 3))
    d = rng.uniform(-24, 24, (n, 2, 1, 1)).astype(np.float32)
    img = img + np.exp(-((xx - d[:, 0]) ** 2 + (yy - d[:, 1]) ** 2) / 8)[..., None] * rng.uniform(40, 200, (n, 1, 1, 3))
    img += rng.normal(12, 5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_store(uri: str, rows: int, encoding: str, seed: int = 0) -> None:
    """A cutout store of ``rows`` rows in SHARD_ROWS-row shards: tensor column or JPEG q90 bytes."""
    import pyarrow as pa
    from PIL import Image

    from galray.data.shards import ImageSpec, make_table, shard_name, write_table
    from galray.storage import arrow_filesystem

    fs, root = arrow_filesystem(uri)
    rng = np.random.default_rng(seed)
    spec = ImageSpec(shape=(SIZE, SIZE, 3), bands=("g", "r", "z"))
    for s, start in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - start)
        img = cutouts(rng, n)
        ids = np.array([f"obj-{i:09d}" for i in range(start, start + n)], dtype=object)
        if encoding == "tensor":
            table = make_table({"object_id": ids, "image": img}, spec)
        else:
            blobs = []
            for im in img:
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, "JPEG", quality=90)
                blobs.append(buf.getvalue())
            table = pa.table({"object_id": pa.array(ids.tolist(), pa.string()), "image": pa.array(blobs, pa.binary())})
        write_table(table, fs, f"{root}/{shard_name(s)}")


# --- the job's process tree, from /proc ------------------------------------------------------------

class TreeSampler:
    """Cumulative CPU seconds per role (driver, replica, ray) and peak summed RSS of a process tree.

    Every ``interval`` s: /proc/<pid>/stat of every process below ``root``; a process that has
    exited keeps the last CPU value seen (it loses at most one interval). Roles from the command
    line Ray gives its workers.
    """

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.series: list[tuple[float, dict[str, float]]] = []
        self.peak_rss = 0
        self._last: dict[int, tuple[str, float]] = {}
        self._cmd: dict[int, str] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def _role(self, pid: int) -> str:
        cmd = self._cmd.get(pid)
        if cmd is None or not cmd.startswith("ray::") or cmd.startswith("ray::IDLE"):  # titles change
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = self._cmd[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        if pid == self.root:
            return "driver"
        return "replica" if cmd.startswith("ray::") and REPLICA_MARK in cmd.split(" ", 1)[0] else "ray"

    def sample(self) -> None:
        stats: dict[int, tuple[int, float, int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / CLOCK_TICKS, int(rest[21]) * PAGE)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        tree, frontier = set(), [self.root] if self.root in stats else []
        tree.update(frontier)
        while frontier:
            for c in children.get(frontier.pop(), []):
                if c not in tree:
                    tree.add(c)
                    frontier.append(c)
        rss = 0
        with self._lock:
            for pid in tree:
                try:
                    self._last[pid] = (self._role(pid), stats[pid][1])
                except OSError:
                    continue
                rss += stats[pid][2]
            self.peak_rss = max(self.peak_rss, rss)
            totals = dict.fromkeys(ROLES, 0.0)
            for role, cpu in self._last.values():
                totals[role] += cpu
            self.series.append((time.perf_counter(), totals))

    def at(self, t: float) -> dict[str, float]:
        """Per-role CPU seconds at time t (linear between the samples around it)."""
        with self._lock:
            s = list(self.series)
        if not s or t <= s[0][0]:
            return s[0][1] if s else dict.fromkeys(ROLES, 0.0)
        for (t0, a), (t1, b) in zip(s, s[1:]):
            if t0 <= t <= t1:
                w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
                return {r: a[r] + w * (b[r] - a[r]) for r in ROLES}
        return s[-1][1]

    def between(self, t0: float, t1: float) -> dict[str, float]:
        a, b = self.at(t0), self.at(t1)
        return {r: b[r] - a[r] for r in ROLES}


# --- one pipeline run, in a child process with its own Ray ------------------------------------------

def child(store: str, out: str, calls: str) -> None:
    """Embed ``store`` like `galray embed`; the replicas append (rows, call CPU s, model CPU s) per shard to ``calls``."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from galray.models.backbone_config import BackboneConfig
    from galray.session import ensure_ray
    from galray.stages.embed import EmbedJob, ShardEmbedder, embed_store
    from galray.stages.pool import ActorPoolConfig
    from galray.tracking import TrackingConfig

    class MeteredEmbedder(ShardEmbedder):
        """galray's replica, timing its own shard calls (process CPU) and forward passes (thread CPU)."""

        def embed_pixels(self, pixels, layout):
            c0 = time.thread_time()
            try:
                return super().embed_pixels(pixels, layout)
            finally:
                self.model_cpu += time.thread_time() - c0

        def embed_shard(self, path):
            self.model_cpu, c0 = 0.0, time.process_time()
            written, errored = super().embed_shard(path)
            with open(calls, "a") as f:
                f.write(f"{written + errored} {time.process_time() - c0} {self.model_cpu}\n")
            return written, errored

    cores = os.cpu_count() or 1
    ensure_ray(num_cpus=cores)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    job = EmbedJob(input=store, output=out, backbone=BackboneConfig(MODEL, pretrained=False, input_size=SIZE),
                   batch_size=BATCH, pool=ActorPoolConfig(actors=cores), torch_threads=1,
                   tracking=TrackingConfig(enabled=False))
    print("START", flush=True)
    t0 = time.perf_counter()
    s = embed_store(job, embedder_cls=MeteredEmbedder)
    print(s.format(), file=sys.stderr)
    print("RESULT " + json.dumps({"t0": t0, "seconds": s.seconds, "rows": s.rows_out + s.rows_errored,
                                  "startup_s": s.startup_s, "steady": s.steady_rows_per_s,
                                  "window": s.steady_window_s}), flush=True)


def run_pipeline(store: str, out: str, calls: str) -> dict:
    """One pipeline run in a fresh process; the issue's keys from /proc and the replicas' call log."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", store, out, calls], stdout=subprocess.PIPE,
                            text=True, env=env)
    sampler = TreeSampler(proc.pid).start()
    result: dict = {}
    for line in proc.stdout:
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    proc.wait()
    sampler.stop()
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"pipeline run failed ({proc.returncode}) on {store}")
    rows, t0 = result["rows"], result["t0"]
    out_keys = {"rows": rows, "pipeline_rows_per_s": result["steady"],
                "pipeline_rows_per_s_end_to_end": round(rows / result["seconds"], 1),
                "startup_s": result["startup_s"], "peak_rss_mb": round(sampler.peak_rss / 2 ** 20, 1)}
    logged = np.loadtxt(calls, ndmin=2)  # rows, call CPU s, model CPU s per shard call
    prep_ms_per_row = 1000 * float((logged[:, 1] - logged[:, 2]).sum() / logged[:, 0].sum())
    if result["window"]:
        w0, w1 = t0 + result["window"][0], t0 + result["window"][1]
        win_rows = result["steady"] * (w1 - w0)
        cpu = sampler.between(w0, w1)
        total = sum(cpu.values())
        out_keys["cpu_ms_per_row"] = round(1000 * total / win_rows, 4)
        out_keys["driver_cpu_ms_per_1k_rows"] = round(1e6 * cpu["driver"] / win_rows, 1)
        prep = min(prep_ms_per_row, 1000 * cpu["replica"] / win_rows)
        out_keys["preprocess_cpu_ms_per_1k_rows"] = round(1000 * prep, 1)
        out_keys["replica_cpu_ms_per_1k_rows"] = round(1e6 * cpu["replica"] / win_rows - 1000 * prep, 1)
        out_keys["ray_overhead_cpu_ms_per_1k_rows"] = round(1e6 * cpu["ray"] / win_rows, 1)
        out_keys["steady_cores"] = round(total / (w1 - w0), 2)
    whole = sampler.between(t0, t0 + result["seconds"])
    out_keys["cpu_ms_per_row_end_to_end"] = round(1000 * sum(whole.values()) / rows, 4)
    return out_keys


# --- the baseline: the model alone -----------------------------------------------------------------

def _model_proc(seconds: float, barrier, results) -> None:
    import torch

    from galray.models.backbones import BackboneConfig, create_backbone
    from galray.models.inference import InferenceModel

    torch.set_num_threads(1)
    b = create_backbone(BackboneConfig(MODEL, pretrained=False, input_size=SIZE))
    runner = InferenceModel(b.model, b.preprocessing, BATCH)
    x = torch.from_numpy(cutouts(np.random.default_rng(0), BATCH)).permute(0, 3, 1, 2).contiguous()
    for _ in range(5):
        runner(x)
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner(x)
        n += BATCH
    results.put((n, time.perf_counter() - t0))


def model_only(seconds: float = 3.0) -> float:
    """Rows/s of the replicas' forward pass alone: one single-threaded process per core, started together."""
    ctx = mp.get_context("spawn")
    cores = os.cpu_count() or 1
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_model_proc, args=(seconds, barrier, results)) for _ in range(cores)]
    for p in procs:
        p.start()
    got = [results.get() for _ in procs]
    for p in procs:
        p.join()
    return round(sum(g[0] for g in got) / max(g[1] for g in got), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="50,000 rows a store (default 200,000)")
    p.add_argument("--rows", type=int, help="rows a store (overrides --quick)")
    p.add_argument("--json", help="write the flat JSON of figures here")
    p.add_argument("--no-jpeg", action="store_true", help="the tensor store only")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = args.rows or (50_000 if args.quick else 200_000)
    cores = os.cpu_count() or 1
    t_start = time.perf_counter()
    result: dict = {"rows_requested": rows, "cores": cores, "batch_size": BATCH, "image_px": SIZE,
                    "model_only_rows_per_s": model_only()}
    kinds = [("", "tensor")] + ([] if args.no_jpeg else [("jpeg_", "jpeg")])
    with tempfile.TemporaryDirectory(prefix="galray-ceiling-") as tmp:
        for prefix, enc in kinds:
            make_store(f"{tmp}/{enc}", rows, enc)
            r = run_pipeline(f"{tmp}/{enc}", f"{tmp}/out_{enc}", f"{tmp}/calls_{enc}.txt")
            if r.get("cpu_ms_per_row"):
                r["rows_per_s_at_full_cores"] = round(cores / r["cpu_ms_per_row"] * 1000, 1)
            if r.get("pipeline_rows_per_s"):
                r["ratio_pipeline_to_model_only"] = round(r["pipeline_rows_per_s"] / result["model_only_rows_per_s"], 4)
            result.update({prefix + k: v for k, v in r.items()})
            print(f"{enc}: {json.dumps(r)}", file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
