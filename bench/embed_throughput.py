"""Embedding throughput: the model's own limit, a naive loop, and galray's Ray Data pipeline.

One realistic backbone, convnext_nano at its native 224 px (random weights: speed does not depend
on them), on stores of 256 px JPEG colour cutouts, the form a cutout service (Legacy Survey,
Galaxy Zoo DESI) hands out, which must be decoded and resized to 224:

(a) model only: forward passes on preprocessed tensors already in memory, the limit. It runs the
    same replicas the pipeline runs (same count, torch threads, batch size, and torch.compile
    setting, through the same ``galray.models.inference.InferenceModel``), as parallel processes
    started together; the figure is all their images over the slowest one's time. This machine's
    speed drifts by 10-25% over minutes (shared cores), so the replicas are started once and
    measured twice, right before and right after the 10N pipeline run; ``img_per_s_model_only`` is
    the mean. The full run also gives the textbook figure, one eager process with every core
    (``img_per_s_model_only_eager_1proc``).
(b) naive: what one writes without galray. One process, every core, the model under the same
    torch.compile setting as the pipeline (``torch.compile(model)``, or eager with --no-compile):
    read a shard, decode and resize image by image, run the model, write the shard's embeddings, one
    step after another, over 2N rows. Its steady rate has the pipeline's window
    (``galray.stages.summary.SteadyRate``: the rows after the first quarter, from their arrival to
    the last), and its end-to-end rate counts from before model creation (so compilation is in it);
    each measured once before the limit and once after it: ``img_per_s_naive`` and
    ``img_per_s_naive_end_to_end`` are the means.
(c) pipeline: ``galray.stages.embed.embed_store`` from the store to the output store, at N and at 10N rows,
    each in a fresh process with its own local Ray. On a CPU-only machine it runs one single-threaded
    replica per core (several single-threaded replicas use the cores better than one multi-threaded
    one; each reads, decodes and resizes its own shards); on a GPU machine, one replica per GPU.
    ``img_per_s_pipeline`` is the 10N run's steady rate, which galray's summary reports: the rows
    that came back after the first quarter, over the time from then to the last. The fixed
    start-up (workers, model load, compilation) and the ramp while replicas finish compiling at
    different times are left out, as they vanish on a store of millions of rows; the start-up is
    reported beside it (``pipeline_startup_s``), with the end-to-end rate of the 10N run counted from
    before its Ray starts (``img_per_s_pipeline_end_to_end``; ``ratio_end_to_end_to_model`` is it over
    the limit, ``ratio_end_to_end_pipeline_to_naive`` over the naive loop's end-to-end rate).
    Peak RSS is the whole process tree's (driver, raylet, GCS, workers), sampled every 0.5 s, in
    the separate runs at N and 10N rows, so memory allocated up front in proportion to the store
    would show too. MLflow tracking is off in these runs (it adds a fixed start-up only).
    Diagnostics for the gap to the limit: the replicas' CPU milliseconds per image in the limit and
    in the pipeline's steady window (equal when nothing disturbs them: when they differ, the
    machine's speed moved between the measurements), and the cores the replicas kept busy in each
    (``replica_cores_model_only``, ``replica_cores_pipeline``: in the pipeline the rest went to Ray,
    preprocessing and the driver). Their quotient, ``ratio_replica_cores_pipeline_to_model``, is
    what ``ratio_pipeline_to_model`` would be at one and the same machine speed.
(d) flat memory: the pipeline's in-flight pixels are bounded by replicas x 2 blocks (read-ahead) x
    ``block_rows`` x the model's input bytes (``in_flight_cap_mb``). Two more pipeline runs, with a
    backbone that costs nothing (``galray_pool_linear`` at 224 px, so the same decode and resize to
    224 as above) and ``block_rows`` = 16 (quick) or 64, on stores whose decoded 224 px pixels are
    10x and 100x that cap (``rows_cap10x``, ``rows_cap100x``): ``peak_rss_mb_cap10x`` and
    ``peak_rss_mb_cap100x`` are the whole process tree's peaks, target
    ``ratio_peak_rss_cap100x_to_cap10x`` <= 1.2.

Sizes: --quick N=100 (10N=1,000) batch 16, about 3 minutes on 2 cores (the two pipeline start-ups
of 20-30 s each, and the first quarter of the 10N run that the steady rate leaves out, are most of
it); full N=1,000 batch 32.

    python3 bench/embed_throughput.py --quick --json OUT.json

Measured 2026-12-01 (--quick, a quiet 2-core machine, compile on for the pipeline and the naive loop):
steady img/s model only 23.7, pipeline 20.5, naive 17.9 (ratio_pipeline_to_model 0.863,
ratio_pipeline_to_naive 1.142); end to end pipeline 12.7, naive 9.7 (ratio_end_to_end_to_model 0.536;
the naive loop's first run compiled from a cold inductor cache, 3.6 img/s, its second 15.9); memory
at 10x and 100x the 9.2 MB in-flight cap (640 and 6,400 rows): peak RSS 4,206 and 4,585 MB, ratio 1.09
(target <= 1.2: met); 10N against N 1.036.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL = "convnext_nano"
IMAGE_SIZE = 256
MIN_SHARDS = 20  # galray's steady rate counts finished shards: a store of at least 20 keeps it fine-grained


def shard_rows(rows: int) -> int:
    """Cutouts per Parquet shard: 500 (galray simulate writes 1,000), fewer for small stores so that
    each has at least MIN_SHARDS shards (every replica finishes several before the steady window)."""
    return max(1, min(500, rows // MIN_SHARDS))


def make_store(uri: str, rows: int, shard_rows: int, seed: int = 0) -> None:
    """256 px JPEG (quality 90) colour cutouts: a galaxy-like blob, a neighbour, sky noise."""
    import pyarrow as pa
    from PIL import Image

    from galray.data.shards import shard_name, write_table
    from galray.storage import arrow_filesystem

    rng = np.random.default_rng(seed)
    fs, root = arrow_filesystem(uri)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] - IMAGE_SIZE / 2
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        blobs = []
        for _ in range(n):
            r, (dx, dy) = rng.uniform(6, 30), rng.uniform(-90, 90, 2)
            img = np.exp(-(xx ** 2 + yy ** 2) / (2 * r ** 2))[..., None] * rng.uniform(80, 250, 3)
            img += np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / 18)[..., None] * rng.uniform(40, 200, 3)
            img = np.clip(img + rng.normal(12, 5, img.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
        ids = [f"bench-{i:08d}" for i in range(start, start + n)]
        write_table(pa.table({"object_id": ids, "image": pa.array(blobs, pa.binary())}), fs, f"{root}/{shard_name(s)}")


# --- (a) model only ---------------------------------------------------------------------------------

def _replica(threads: int, batch: int, batches: int, compile: bool, barrier, commands, results) -> None:
    import torch

    from galray.models.backbones import BackboneConfig, create_backbone
    from galray.models.inference import InferenceModel

    torch.set_num_threads(threads)
    b = create_backbone(BackboneConfig(MODEL, pretrained=False))
    runner = InferenceModel(b.model, b.preprocessing, batch, compile=compile)  # compiles now, if asked
    s = b.preprocessing.input_size
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8)
    runner(x)  # warm-up: allocator, kernels
    results.put("ready")
    while commands.get():  # idle (blocked, no CPU) between measurements
        barrier.wait()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(batches):
            runner(x)
        results.put((batches * batch, time.perf_counter() - t0, time.process_time() - cpu0))


class ModelOnly:
    """``replicas`` processes that load and compile the model once, then measure on demand.

    Kept alive (idle) across the benchmark, so the limit can be measured both before and after the
    pipeline runs without paying the start-up twice. They are not in the pipeline's process tree.
    """

    def __init__(self, replicas: int, threads: int, batch: int, batches: int, compile: bool):
        ctx = mp.get_context("spawn")
        self.barrier, self.results = ctx.Barrier(replicas), ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(replicas)]
        self.procs = [ctx.Process(target=_replica, args=(threads, batch, batches, compile, self.barrier, q,
                                                         self.results)) for q in self.commands]
        for p in self.procs:
            p.start()

    def wait_ready(self) -> None:
        """Block until every replica has compiled and warmed up (and sits idle, using no CPU)."""
        for _ in self.procs:
            assert self.results.get(timeout=1800) == "ready"

    def measure(self) -> tuple[float, float]:
        """(img/s of all replicas running forward passes together: their images over the slowest one's
        time, the replicas' CPU milliseconds per image)."""
        for q in self.commands:
            q.put(True)
        done = [self.results.get(timeout=1800) for _ in self.procs]
        images = sum(n for n, _, _ in done)
        return images / max(t for _, t, _ in done), 1000 * sum(c for _, _, c in done) / images

    def close(self) -> None:
        for q in self.commands:
            q.put(False)
        for p in self.procs:
            p.join()


def model_only(replicas: int, threads: int, batch: int, batches: int, compile: bool) -> float:
    """img/s of ``replicas`` processes running forward passes together on in-memory pixels (one measurement)."""
    pool = ModelOnly(replicas, threads, batch, batches, compile)
    pool.wait_ready()
    try:
        return pool.measure()[0]
    finally:
        pool.close()


# --- (b) naive ----------------------------------------------------------------------------------------

def naive(store: str, out: str, batch: int, max_rows: int, compile: bool) -> tuple[float, float, int]:
    """(steady img/s, end-to-end img/s, rows) of a plain loop over the first ``max_rows`` rows of the
    store: read shard -> decode + resize each image -> forward -> write, sequentially.

    The steady rate has the pipeline's window (SteadyRate, updated as each shard is written); the
    end-to-end rate counts from before model creation, so a compile is in it, as in the pipeline's.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from galray.data.cutouts import CropResizeConfig, crop_resize, decode_image
    from galray.data.shards import list_parquet
    from galray.models.backbones import BackboneConfig, create_backbone, to_model_input
    from galray.stages.summary import SteadyRate
    from galray.storage import arrow_filesystem

    t0 = time.perf_counter()
    rate = SteadyRate(t0, total=max_rows)
    b = create_backbone(BackboneConfig(MODEL, pretrained=False))
    model = torch.compile(b.model.eval()) if compile else b.model.eval()  # compiles at its first call
    crop = CropResizeConfig(size=b.preprocessing.input_size)
    fs, root = arrow_filesystem(store)
    Path(out).mkdir(parents=True, exist_ok=True)
    n = 0
    for info in list_parquet(fs, root):
        table = pq.read_table(info.path, filesystem=fs).slice(0, max_rows - n)
        pixels = np.stack([crop_resize(decode_image(blob), crop).transpose(2, 0, 1)
                           for blob in table.column("image").to_pylist()])
        embs = []
        with torch.inference_mode():
            for i in range(0, len(pixels), batch):
                embs.append(model(to_model_input(torch.from_numpy(pixels[i:i + batch]), b.preprocessing)).numpy())
        emb = np.concatenate(embs)
        flat = pa.array(emb.reshape(-1), pa.float32())
        pq.write_table(pa.table({"object_id": table.column("object_id"),
                                 "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}),
                       f"{out}/{info.base_name}")
        n += len(pixels)
        rate.update(n)
        if n >= max_rows:
            break
    return rate.rows_per_s, n / (time.perf_counter() - t0), n


# --- (d) memory against the in-flight cap ---------------------------------------------------------------

POOL_LINEAR = "galray_pool_linear"  # galray's backbone that costs nothing (galray.models.backbones)
MODEL_INPUT_BYTES = 3 * 224 * 224  # a decoded, resized uint8 row at the model's input size


def in_flight_cap_bytes(replicas: int, block_rows: int) -> int:
    """The pixels the pipeline can hold at once: each replica's block in use and the one read ahead."""
    return replicas * 2 * block_rows * MODEL_INPUT_BYTES


# --- (c) the pipeline, in a child process whose whole tree we measure ----------------------------------

REPLICA_CMDLINE = "ray::MapWorker(MapBatches(ShardEmbedder))"  # how Ray names the model replicas' processes
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_sample(root_pid: int, cpu_prefix: str = REPLICA_CMDLINE) -> tuple[int, float]:
    """(sum of VmRSS in bytes over ``root_pid`` and all its descendants, CPU seconds so far of those
    whose command line starts with ``cpu_prefix``), from Linux /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    tree, frontier = {root_pid}, [root_pid]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    cpu = 0.0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(cpu_prefix.encode()):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        utime, stime = stat[stat.rfind(")") + 2:].split()[11:13]  # fields 14 and 15 of proc(5)
        cpu += (int(utime) + int(stime)) / CLOCK_TICKS
    return sum(rss.get(p, 0) for p in tree), cpu


def pipeline_child(store: str, out: str, batch: int, replicas: int, threads: int, compile: bool,
                   model: str = MODEL, block_rows: int = 1024) -> None:
    """Embed ``store`` in this process's own local Ray; a START line on stdout as the job starts, a RESULT line after."""
    t_ray = time.perf_counter()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from galray.models.backbone_config import BackboneConfig
    from galray.stages.embed import EmbedJob, embed_store
    from galray.stages.pool import ActorPoolConfig
    from galray.session import ensure_ray
    from galray.tracking import TrackingConfig

    cpus = os.cpu_count() or 1
    ensure_ray(num_cpus=cpus)
    backbone = BackboneConfig(model, pretrained=False, **({} if model == MODEL else {"input_size": 224}))
    job = EmbedJob(input=store, output=out, backbone=backbone, batch_size=batch, block_rows=block_rows,
                   pool=ActorPoolConfig(actors=replicas, cpus_per_actor=cpus / replicas),
                   torch_threads=threads, compile=compile,
                   tracking=TrackingConfig(enabled=False))
    print("START", flush=True)
    t0 = time.perf_counter()
    summary = embed_store(job)
    seconds = time.perf_counter() - t0
    print(summary.format(), file=sys.stderr)
    print("RESULT " + json.dumps({"seconds": seconds, "seconds_with_ray": time.perf_counter() - t_ray,
                                  "rows": summary.rows_out, "startup_s": summary.startup_s,
                                  "steady": summary.steady_rows_per_s, "steady_window_s": summary.steady_window_s}),
          flush=True)


RAY_CMDLINES = ("ray::", "site-packages/ray/")  # Ray's workers; raylet, GCS, agents and monitors


def _wait_for_exit(markers: tuple[str, ...], timeout_s: float) -> float:
    """Wait until no process on this machine has a command line starting with or containing one of
    ``markers``; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        alive = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            alive = alive or any(cmdline.startswith(m) or m in cmdline for m in markers)
        if not alive:
            break
        time.sleep(0.2)
    return time.monotonic() - t0


def run_pipeline(store: str, out: str, batch: int, replicas: int, threads: int, compile: bool, model: str = MODEL,
                 block_rows: int = 1024) -> dict:
    """The pipeline on ``store``, in a fresh process with its own local Ray.

    Returns seconds, rows, startup_s, steady (img/s), peak_rss_mb (the whole process tree's:
    driver, raylet, GCS, workers), and the replicas' cores and CPU ms per image in the steady window.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", store, out, str(batch), str(replicas), str(threads),
                             str(int(compile)), model, str(block_rows)], stdout=subprocess.PIPE, text=True, env=env)
    lock, peak = threading.Lock(), [0]
    cpu_series: list[tuple[float, float]] = []  # (time, replicas' CPU seconds so far)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, cpu = tree_sample(proc.pid)
            with lock:
                peak[0] = max(peak[0], rss)
                cpu_series.append((time.perf_counter(), cpu))
            stop.wait(0.5)  # a /proc scan costs CPU the Ray workers would lose; RSS moves slowly

    def replica_cores(t0: float, t1: float) -> float:
        """Cores the replicas used between t0 and t1 (CPU seconds over wall seconds)."""
        with lock:
            inside = [(t, c) for t, c in cpu_series if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 1:
            return float("nan")
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result: dict = {}
    started = 0.0
    for line in proc.stdout:
        if line.startswith("START"):
            started = time.perf_counter()  # the job's clock starts here: its startup_s and seconds count from it
        elif line.startswith("RESULT "):
            result = json.loads(line[7:])
    proc.wait()
    stop.set()
    sampler.join()
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"pipeline run failed with exit code {proc.returncode}")
    cores = replica_cores(*(started + t for t in result["steady_window_s"]))  # the steady rate's own window
    result.update(peak_rss_mb=peak[0] / 2 ** 20, replica_cores=cores,
                  replica_cpu_ms_per_img=1000 * cores / result["steady"])
    # Ray's processes outlive the driver by a moment: a measurement of the limit made while they
    # wind down would run on less than the whole machine (and flatter the pipeline).
    waited = _wait_for_exit(RAY_CMDLINES, timeout_s=60)
    print(f"Ray's processes gone {waited:.1f} s after the pipeline process exited", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=100 rows (10N=1,000), batch 16: about 3 min on 2 cores")
    parser.add_argument("--json", metavar="PATH", help="write the figures here as one JSON object")
    parser.add_argument("--rows", type=int, help="N (default 100 quick, 1000 full)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 16 quick, 32 full)")
    parser.add_argument("--replicas", type=int, default=os.cpu_count(),
                        help="model replicas in the pipeline and in the model-only limit (default: one per core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica (default 1)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run the replicas eagerly instead of under torch.compile")
    parser.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        store, out, batch, replicas, threads, compile, model, block_rows = args.child
        pipeline_child(store, out, int(batch), int(replicas), int(threads), bool(int(compile)), model, int(block_rows))
        return

    import torch

    cores = os.cpu_count() or 1
    n = args.rows or (100 if args.quick else 1000)
    batch = args.batch_size or (16 if args.quick else 32)
    t_start = time.perf_counter()

    def limit() -> tuple[float, float]:
        ips, cpu_ms = limit_pool.measure()
        print(f"model only, {args.replicas} replica(s) x {args.threads} thread(s), compile={args.compile}: "
              f"{ips:.1f} img/s, {cpu_ms:.1f} CPU ms/img", file=sys.stderr)
        return ips, cpu_ms

    with tempfile.TemporaryDirectory(prefix="galray-bench-embed-") as tmp:
        limit_pool = ModelOnly(args.replicas, args.threads, batch, max(6, n // (batch * args.replicas)), args.compile)
        make_store(f"{tmp}/store_n", n, shard_rows(n))  # while the replicas compile
        make_store(f"{tmp}/store_10n", 10 * n, shard_rows(10 * n), seed=1)
        limit_pool.wait_ready()  # nothing else may run while a figure is measured
        ips_eager_1proc = None
        if not args.quick:
            ips_eager_1proc = model_only(1, cores, batch, max(4, n // batch), compile=False)
            print(f"model only, 1 eager process x {cores} threads: {ips_eager_1proc:.1f} img/s", file=sys.stderr)
        torch.set_num_threads(cores)
        ips_naive_before, e2e_naive_before, rows_naive = naive(f"{tmp}/store_10n", f"{tmp}/naive_out", batch,
                                                               max_rows=2 * n, compile=args.compile)
        print(f"naive loop on {rows_naive} rows: {ips_naive_before:.1f} img/s steady, {e2e_naive_before:.1f} "
              f"end to end", file=sys.stderr)
        run_n = run_pipeline(f"{tmp}/store_n", f"{tmp}/out_n", batch, args.replicas, args.threads, args.compile)
        print(f"pipeline N={run_n['rows']}: {run_n}", file=sys.stderr)
        # The machine drifts: the limit is measured right before and right after the 10N run.
        ips_model_before, cpu_ms_model_before = limit()
        run_10n = run_pipeline(f"{tmp}/store_10n", f"{tmp}/out_10n", batch, args.replicas, args.threads,
                               args.compile)
        print(f"pipeline 10N={run_10n['rows']}: {run_10n}", file=sys.stderr)
        ips_model_after, cpu_ms_model_after = limit()
        limit_pool.close()
        ips_naive_after, e2e_naive_after, _ = naive(f"{tmp}/store_10n", f"{tmp}/naive_out", batch, max_rows=2 * n,
                                                    compile=args.compile)
        print(f"naive loop on {rows_naive} rows: {ips_naive_after:.1f} img/s steady, {e2e_naive_after:.1f} "
              f"end to end", file=sys.stderr)
        assert run_n["rows"] == n and run_10n["rows"] == 10 * n, "the pipeline lost rows"
        # (d) memory at 10x and 100x the in-flight cap, with the backbone that costs nothing.
        block_rows = 16 if args.quick else 64
        cap = in_flight_cap_bytes(args.replicas, block_rows)
        cap_runs = {}
        for times in (10, 100):
            rows = -(-times * cap // MODEL_INPUT_BYTES)
            make_store(f"{tmp}/store_cap{times}x", rows, max(block_rows, min(500, rows // MIN_SHARDS)), seed=2)
            cap_runs[times] = run_pipeline(f"{tmp}/store_cap{times}x", f"{tmp}/out_cap{times}x", batch, args.replicas,
                                           args.threads, args.compile, POOL_LINEAR, block_rows)
            assert cap_runs[times]["rows"] == rows, "the pipeline lost rows"
            cap_runs[times]["n"] = rows
            print(f"pipeline at {times}x the in-flight cap ({rows} rows): {cap_runs[times]}", file=sys.stderr)
    # This machine's speed drifts (shared cores): the limit and the naive loop are measured before
    # and after the pipeline runs, and the pipeline is compared with their means.
    ips_model = (ips_model_before + ips_model_after) / 2
    ips_naive = (ips_naive_before + ips_naive_after) / 2
    e2e_naive = (e2e_naive_before + e2e_naive_after) / 2
    e2e_pipeline = 10 * n / run_10n["seconds_with_ray"]
    ips_pipeline = run_10n["steady"]
    # Cores the replicas kept busy in the limit: images/s x CPU seconds per image.
    cores_model = (ips_model_before * cpu_ms_model_before + ips_model_after * cpu_ms_model_after) / 2000
    result = {
        "model": MODEL,
        "rows": n,
        "img_per_s_model_only": round(ips_model, 2),
        "img_per_s_naive": round(ips_naive, 2),
        "img_per_s_pipeline": round(ips_pipeline, 2),
        "ratio_pipeline_to_model": round(ips_pipeline / ips_model, 3),
        "ratio_pipeline_to_naive": round(ips_pipeline / ips_naive, 3),
        "peak_rss_mb_n": round(run_n["peak_rss_mb"], 1),
        "peak_rss_mb_10n": round(run_10n["peak_rss_mb"], 1),
        "ratio_peak_rss_10n_to_n": round(run_10n["peak_rss_mb"] / run_n["peak_rss_mb"], 3),
        "img_per_s_model_only_before": round(ips_model_before, 2),
        "img_per_s_model_only_after": round(ips_model_after, 2),
        "img_per_s_naive_before": round(ips_naive_before, 2),
        "img_per_s_naive_end_to_end_before": round(e2e_naive_before, 2),
        "img_per_s_naive_end_to_end_after": round(e2e_naive_after, 2),
        "img_per_s_naive_after": round(ips_naive_after, 2),
        "img_per_s_pipeline_end_to_end": round(e2e_pipeline, 2),
        "img_per_s_naive_end_to_end": round(e2e_naive, 2),
        "ratio_end_to_end_to_model": round(e2e_pipeline / ips_model, 3),
        "ratio_end_to_end_pipeline_to_naive": round(e2e_pipeline / e2e_naive, 3),
        "in_flight_cap_mb": round(cap / 2 ** 20, 1),
        "memory_block_rows": block_rows,
        "rows_cap10x": cap_runs[10]["n"],
        "rows_cap100x": cap_runs[100]["n"],
        "peak_rss_mb_cap10x": round(cap_runs[10]["peak_rss_mb"], 1),
        "peak_rss_mb_cap100x": round(cap_runs[100]["peak_rss_mb"], 1),
        "ratio_peak_rss_cap100x_to_cap10x": round(cap_runs[100]["peak_rss_mb"] / cap_runs[10]["peak_rss_mb"], 3),
        # Where the gap to the limit comes from: the replicas' CPU cost per image (the same in both
        # if nothing disturbs them) and how many cores they got in the pipeline's steady window.
        "replica_cpu_ms_per_img_model_only": round((cpu_ms_model_before + cpu_ms_model_after) / 2, 1),
        "replica_cpu_ms_per_img_pipeline": round(run_10n["replica_cpu_ms_per_img"], 1),
        "replica_cores_model_only": round(cores_model, 3),
        "replica_cores_pipeline": round(run_10n["replica_cores"], 3),
        "ratio_replica_cores_pipeline_to_model": round(run_10n["replica_cores"] / cores_model, 3),
        "pipeline_startup_s": run_10n["startup_s"],
        "img_per_s_model_only_eager_1proc": ips_eager_1proc and round(ips_eager_1proc, 2),
        "naive_rows": rows_naive,
        "replicas": args.replicas,
        "threads_per_replica": args.threads,
        "compile": args.compile,
        "batch_size": batch,
        "input": f"{IMAGE_SIZE} px JPEG, resized to 224",
        "cores": cores,
    }
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
