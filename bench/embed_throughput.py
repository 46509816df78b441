"""Embedding throughput: the model's own limit, a naive loop, and galray's Ray Data pipeline.

One realistic backbone (convnext_nano at its native 224 px, random weights: speed does not depend
on them), on cutout stores of 64 px uint8 colour images that must be resized to 224:

(a) model only: forward passes on preprocessed tensors already in memory, the upper bound;
(b) naive: one process reads each shard, preprocesses image by image, runs the model and writes
    the shard's embeddings, one step after another (on the 10N store, model creation included, as
    the pipeline's figure includes its actor's start);
(c) pipeline: ``galray.embed.embed_store`` from the store to the output store, in a fresh process
    with its own local Ray (time from the call to the summary: actor start and model load included,
    Ray's own start excluded, as a cluster is up before a job). Measured at N and 10N rows; the
    throughput reported is the 10N run's, the peak RSS is the whole process tree's (driver, raylet,
    GCS, workers) sampled every 0.1 s, for each run.

All three use the same torch thread count (default: every core) and batch size.
Sizes: --quick N=16 (10N=160) batch 16; full N=64 (10N=640) batch 32. On a 2-core box convnext_nano
at 224 px runs ~45 img/s when the machine is otherwise idle, so --quick fits in 3 minutes there.

    python3 bench/embed_throughput.py --quick --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODEL = "convnext_nano"
IMAGE_SIZE = 64


def make_store(uri: str, rows: int, shard_rows: int, seed: int = 0) -> None:
    """uint8 (64, 64, 3) galaxy-like blobs plus noise, in shards of ``shard_rows``."""
    from galray.data.shards import ImageSpec, make_table, shard_name, write_table
    from galray.storage import arrow_filesystem

    spec = ImageSpec(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), bands=("g", "r", "z"))
    rng = np.random.default_rng(seed)
    fs, root = arrow_filesystem(uri)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE] - IMAGE_SIZE / 2
    for s, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        r = rng.uniform(3, 12, (n, 1, 1))
        blob = np.exp(-(xx ** 2 + yy ** 2)[None] / (2 * r ** 2))[..., None] * rng.uniform(80, 250, (n, 1, 1, 3))
        images = np.clip(blob + rng.normal(10, 4, (n, IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
        ids = np.array([f"bench-{i:08d}" for i in range(start, start + n)], dtype=object)
        write_table(make_table({"object_id": ids, "image": images}, spec), fs, f"{root}/{shard_name(s)}")


def model_only(rows: int, batch: int) -> float:
    """img/s of forward passes alone on in-memory preprocessed inputs."""
    import torch

    from galray.models.backbones import BackboneConfig, create_backbone, to_model_input

    b = create_backbone(BackboneConfig(MODEL, pretrained=False))
    s = b.preprocessing.input_size
    x = to_model_input(torch.randint(0, 256, (rows, 3, s, s), dtype=torch.uint8), b.preprocessing)
    with torch.inference_mode():
        b.model(x[:batch])  # warm-up: allocator, kernels
        t0 = time.perf_counter()
        for i in range(0, rows, batch):
            b.model(x[i:i + batch])
        return rows / (time.perf_counter() - t0)


def naive(store: str, out: str, batch: int) -> tuple[float, int]:
    """img/s of a plain loop: read shard -> preprocess each image -> forward -> write, sequentially."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from galray.data.cutouts import CropResizeConfig, crop_resize
    from galray.data.shards import images_from_table, list_parquet
    from galray.models.backbones import BackboneConfig, create_backbone, to_model_input
    from galray.storage import arrow_filesystem

    t0 = time.perf_counter()
    b = create_backbone(BackboneConfig(MODEL, pretrained=False))
    crop = CropResizeConfig(size=b.preprocessing.input_size)
    fs, root = arrow_filesystem(store)
    Path(out).mkdir(parents=True, exist_ok=True)
    n = 0
    for info in list_parquet(fs, root):
        table = pq.read_table(info.path, filesystem=fs)
        images = images_from_table(table)
        pixels = np.stack([crop_resize(img, crop).transpose(2, 0, 1) for img in images])
        embs = []
        with torch.inference_mode():
            for i in range(0, len(pixels), batch):
                embs.append(b.model(to_model_input(torch.from_numpy(pixels[i:i + batch]), b.preprocessing)).numpy())
        emb = np.concatenate(embs)
        flat = pa.array(emb.reshape(-1), pa.float32())
        pq.write_table(pa.table({"object_id": table.column("object_id"),
                                 "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])}),
                       f"{out}/{info.base_name}")
        n += len(images)
    return n / (time.perf_counter() - t0), n


# --- the pipeline, in a child process whose whole tree we measure ----------------------------------

def tree_rss_bytes(root_pid: int) -> int:
    """Sum of VmRSS over ``root_pid`` and all its descendants (Linux /proc)."""
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
    return sum(rss.get(p, 0) for p in tree)


def pipeline_child(store: str, out: str, batch: int, threads: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from galray.embed import EmbedJob, embed_store
    from galray.session import ensure_ray

    ensure_ray(num_cpus=os.cpu_count())
    job = EmbedJob(input=store, output=out, model=MODEL, pretrained=False, batch_size=batch, actors=1,
                   torch_threads=threads, cpus_per_actor=1, preprocess_cpus=1)
    t0 = time.perf_counter()
    summary = embed_store(job)
    seconds = time.perf_counter() - t0
    print(summary.format(), file=sys.stderr)
    print("RESULT " + json.dumps({"seconds": seconds, "rows": summary.rows_out}), flush=True)


def run_pipeline(store: str, out: str, batch: int, threads: int) -> tuple[float, float, int]:
    """(img/s, peak RSS of the process tree in MB, rows) of one pipeline run in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, __file__, "--child", store, out, str(batch), str(threads)],
                            stdout=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline run failed with exit code {proc.returncode}")
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    return result["rows"] / result["seconds"], peak / 2 ** 20, result["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=16 rows (10N=160), batch 16: under 3 min on 2 cores")
    parser.add_argument("--json", metavar="PATH", help="write the figures here as one JSON object")
    parser.add_argument("--rows", type=int, help="N (default 16 quick, 64 full)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default 16 quick, 32 full)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        store, out, batch, threads = args.child
        import torch

        torch.set_num_threads(int(threads))
        pipeline_child(store, out, int(batch), int(threads))
        return

    import torch

    torch.set_num_threads(args.threads)
    n = args.rows or (16 if args.quick else 64)
    batch = args.batch_size or (16 if args.quick else 32)
    shard_rows = max(4, n // 2)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="galray-bench-embed-") as tmp:
        make_store(f"{tmp}/store_n", n, shard_rows)
        make_store(f"{tmp}/store_10n", 10 * n, shard_rows, seed=1)
        ips_model = model_only(max(n, 2 * batch), batch)
        print(f"model only: {ips_model:.1f} img/s", file=sys.stderr)
        ips_naive, rows_naive = naive(f"{tmp}/store_10n", f"{tmp}/naive_out", batch)
        print(f"naive loop on 10N={rows_naive}: {ips_naive:.1f} img/s", file=sys.stderr)
        ips_n, rss_n, rows_n = run_pipeline(f"{tmp}/store_n", f"{tmp}/out_n", batch, args.threads)
        print(f"pipeline N={rows_n}: {ips_n:.1f} img/s, peak RSS {rss_n:.0f} MB", file=sys.stderr)
        ips_10n, rss_10n, rows_10n = run_pipeline(f"{tmp}/store_10n", f"{tmp}/out_10n", batch, args.threads)
        print(f"pipeline 10N={rows_10n}: {ips_10n:.1f} img/s, peak RSS {rss_10n:.0f} MB", file=sys.stderr)
        assert rows_n == n and rows_10n == 10 * n, "the pipeline lost rows"
    result = {
        "model": MODEL,
        "rows": n,
        "img_per_s_model_only": round(ips_model, 2),
        "img_per_s_naive": round(ips_naive, 2),
        "img_per_s_pipeline": round(ips_10n, 2),
        "ratio_pipeline_to_model": round(ips_10n / ips_model, 3),
        "ratio_pipeline_to_naive": round(ips_10n / ips_naive, 3),
        "peak_rss_mb_n": round(rss_n, 1),
        "peak_rss_mb_10n": round(rss_10n, 1),
    }
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
