"""Run by tests/test_node_loss.py in a fresh process: a 2-node ``ray.cluster_utils.Cluster`` on this machine.

    python tests/node_loss_harness.py WORKDIR OUT_JSON

The cluster is the head (2 CPUs, the dashboard on 127.0.0.1 for Ray's State API) and one worker node
(2 CPUs). Three runs, what happened written to OUT_JSON for the test to check:

1. ``jobs/embed.py --config jobs/configs/embed_cpu_debug.yaml`` as a job's driver would run it (a subprocess
   joining the cluster): its pool sizes itself to the cluster; which nodes ran its shard calls.
2. An embed job whose worker node is removed (raylet and workers killed) once shards are coming out.
3. A 2-worker training run spread over a fresh worker node and the head, which loses that node once it has
   written a checkpoint.

Ray keeps its files under a private RAY_TMPDIR (set by the test): ``Cluster`` writes the address of the
cluster it starts to ``<Ray's temp dir>/ray_current_cluster``, which a plain ``ray.init()`` elsewhere on the
machine would join.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import _free_port, _kill_processes_under, registered_steps, write_cutouts  # tests/ is this script's folder, first on sys.path

ROOT = Path(__file__).resolve().parent.parent
EMBED_CALL = "MapWorker"  # the shard calls of a Ray Data actor pool are its _MapWorker actors' submit tasks
TRAIN_WORKER = "RayTrainWorker"


def _ids(folder: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(i for f in folder.glob("*.parquet") for i in pq.read_table(f, columns=["object_id"])
                  ["object_id"].to_pylist())


def _task_nodes(actor_class: str, job_id: str | None, want: int, wait_s: float = 30) -> list[str]:
    """Nodes that ran finished ``submit`` calls of actors whose class name contains ``actor_class`` (Ray's State
    API, from the GCS's task events; they arrive about a second after a call ends, so poll until ``want`` are
    seen or ``wait_s``)."""
    from ray.util.state import list_tasks

    deadline = time.time() + wait_s
    while True:
        tasks = [t for t in list_tasks(filters=[("state", "=", "FINISHED"), ("type", "=", "ACTOR_TASK")],
                                       detail=True, limit=10000, raise_on_missing_output=False)
                 if actor_class in f"{t.name} {t.func_or_class_name}" and "submit" in t.name
                 and (job_id is None or t.job_id == job_id)]
        if len(tasks) >= want or time.time() > deadline:
            return sorted({t.node_id for t in tasks})
        time.sleep(1)


def _actor_nodes(class_part: str) -> set[str]:
    """Nodes of the actors (alive or dead) whose class name contains ``class_part`` (the GCS's actor table)."""
    import ray

    return {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if class_part in a.get("ActorClassName", "") and a["Address"].get("NodeID")}


def _run_losing_node(cluster, worker, target, ready) -> dict:
    """Run ``target`` in a thread; once ``ready()`` is true remove ``worker`` (no graceful shutdown)."""
    out: dict = {}

    def run():
        try:
            out["summary"] = target()
        except BaseException as err:  # reported to the test
            out["error"] = repr(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 600
    while not ready() and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    out["removed_while_running"] = thread.is_alive()
    t0 = time.time()
    cluster.remove_node(worker, allow_graceful=False)
    thread.join(900)
    out["seconds_after_removal"] = round(time.time() - t0, 1)
    if "summary" in out:
        out["summary"] = out["summary"].to_json()
    return out


def cpu_debug_job(cluster, workdir: Path) -> dict:
    ids = write_cutouts(str(workdir / "debug-in"), shards=8, rows=16)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    proc = subprocess.run([sys.executable, "jobs/embed.py", "--config", "jobs/configs/embed_cpu_debug.yaml",
                           "--input", str(workdir / "debug-in"), "--output", str(workdir / "debug-out"),
                           "--no-tracking"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = {"returncode": proc.returncode, "stderr": proc.stderr[-3000:], "expected_ids": ids,
           "ids": _ids(workdir / "debug-out")}
    out["task_nodes"] = _task_nodes(EMBED_CALL, None, want=8) if proc.returncode == 0 else []
    return out


def embed_losing_a_node(cluster, worker, workdir: Path) -> dict:
    import ray

    from galray.stages.embed import embed_dataset

    # Enough work (about 10 s of steady embedding, the model at 64 px) that the node is still running shards when
    # the Ray State API (task events, about 1 s behind) shows it has finished one.
    ids = write_cutouts(str(workdir / "cutouts"), shards=48, rows=64)
    out_dir = workdir / "embeddings"
    job_id = ray.get_runtime_context().get_job_id()
    # 2 replicas of 1 CPU: Ray Data spreads them (one a node); the one that dies restarts on the head.
    report = _run_losing_node(
        cluster, worker,
        lambda: embed_dataset(str(workdir / "cutouts"), str(out_dir), "test_convnext", pretrained=False,
                              input_size=64, batch_size=16, actors=2, cpus_per_actor=1, torch_threads=1,
                              tracking={"enabled": False}),
        lambda: len(list(out_dir.glob("*.parquet"))) >= 2 and worker.node_id in _task_nodes(EMBED_CALL, job_id, 1, wait_s=0))
    report.update(expected_ids=ids, ids=_ids(out_dir), task_nodes=_task_nodes(EMBED_CALL, job_id, want=48))
    return report


def _registered_steps(run_dir: Path) -> set[int]:
    """Steps of the checkpoints Ray Train has registered for the run in ``run_dir``."""
    try:
        return registered_steps((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except OSError:
        return set()


def train_losing_a_node(cluster, workdir: Path) -> dict:
    from galray.config import from_dict
    from galray.train.config import TrainJob
    from galray.train.launch import fit

    worker = cluster.add_node(num_cpus=2)  # a fresh worker node, as an autoscaler would add
    cluster.wait_for_nodes()
    runs = workdir / "runs"
    job = from_dict(TrainJob, {
        "kind": "sae", "input": str(workdir / "embeddings"), "name": "sae-node-loss", "storage_path": f"file://{runs}",
        "steps": 120, "batch_size": 8, "checkpoint_every": 10, "log_every": 10, "max_failures": 2,
        "val_fraction": 0.1, "materialize": True,
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5, "placement_strategy": "SPREAD"},
        "tracking": {"enabled": False},
        "sae": {"model": {"group_sizes": [16, 48], "k": 4}, "train": {"lr": 3e-3, "warmup_frac": 0.0}}})
    report = _run_losing_node(cluster, worker, lambda: fit(job),
                              lambda: _registered_steps(runs / "sae-node-loss")
                              and worker.node_id in _actor_nodes(TRAIN_WORKER))
    report["worker_node"] = worker.node_id
    report["actor_nodes"] = sorted(_actor_nodes(TRAIN_WORKER))
    return report


def _start_cluster(attempts: int = 3):
    """The head and one worker node. Retried: Ray gives a new raylet 30 s (hard-coded) to register with the
    GCS, which a loaded machine can miss; a failed attempt's processes are killed before the next."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                # The GCS declares a node dead after 3 failed health checks 1 s apart, not Ray's default
                # 5 at 3 s: the same path, a lost node noticed in seconds instead of about 15.
                "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
                "dashboard_port": _free_port(),
                "dashboard_agent_listen_port": _free_port()})  # not the fixed defaults: another Ray may hold them
            worker = cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
            return cluster, worker
        except Exception:
            _kill_processes_under(os.environ["RAY_TMPDIR"])
            if attempt == attempts - 1:
                raise


def main(workdir: Path, out_json: Path) -> None:
    import ray

    cluster, worker = _start_cluster()
    report: dict = {}
    try:
        ray.init(address=cluster.address)
        report.update(head_node=cluster.head_node.node_id, worker_node=worker.node_id)
        seconds = report["seconds"] = {}
        for name, run in (("cpu_debug", lambda: cpu_debug_job(cluster, workdir)),
                          ("embed", lambda: embed_losing_a_node(cluster, worker, workdir)),
                          ("train", lambda: train_losing_a_node(cluster, workdir))):
            t0 = time.time()
            report[name] = run()
            seconds[name] = round(time.time() - t0, 1)
    finally:
        out_json.write_text(json.dumps(report, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
