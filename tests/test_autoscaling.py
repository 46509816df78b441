"""Stages on an autoscaling cluster: a pool that needs a resource only a worker type has (min_workers 0) asks the
autoscaler for that node, waits for it, and finishes exactly once; a resource no node type has fails at once.

The cluster is Ray's fake multi-node autoscaler, as ``ray.cluster_utils.AutoscalingCluster`` builds it (its
fake multi-node provider adds real raylets on this machine; autoscaler v2, the default of ``ray up``).
``AutoscalingCluster`` itself cannot be used: its ``start()`` runs ``ray stop --force``, which would kill every
Ray on the machine, and Ray 2.60's wheel lacks the example.yaml its config (and the ``fake_multinode``
provider type) starts from. So the same config and the same ``ray start`` are written here, the provider
named by its class, in a private temp folder whose processes the fixture kills.
The worker type declares a custom resource (``galray_pool``), as a cloud node type declares its accelerator
(``accelerator_type:A10G``). GPUs take the same path (``pool.num_gpus`` joins the same bundle); a GPU declared
without CUDA behind it would prove no more.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import _free_port, _kill_processes_under, own_ports, run_cli, start_ray_head, write_cutouts

pytestmark = pytest.mark.slow  # a Ray head with a fake autoscaler, and real jobs
ROOT = Path(__file__).resolve().parent.parent
SHARDS, ROWS = 2, 4


def _fake_cluster_config(gcs_address: str) -> dict:
    """ray.cluster_utils.AutoscalingCluster's config (fake_multinode provider, autoscaler v2), one worker type:
    a node with 2 CPUs and the custom resource ``galray_pool``, none at start."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    return {
        "cluster_name": "galray-fake", "max_workers": 1, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        # "external" with the fake provider's class: the same provider as type fake_multinode, whose defaults
        # file (fake_multi_node/example.yaml) Ray 2.60's wheel does not ship.
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "launch_multiple": True,
                     "head_node_id": FAKE_HEAD_NODE_ID, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "pool_node": {"resources": {"CPU": 2, "galray_pool": 1}, "node_config": {}, "min_workers": 0,
                          "max_workers": 1},
        },
        "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@pytest.fixture(scope="module")
def autoscaling_cluster():
    from ray._private.services import resolve_ip_for_localhost
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    temp = Path(tempfile.mkdtemp(prefix="gas", dir="/tmp"))
    port = _free_port()
    gcs = f"{resolve_ip_for_localhost('127.0.0.1')}:{port}"
    cfg = temp / "autoscaling.json"
    cfg.write_text(json.dumps(_fake_cluster_config(gcs)))
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
           "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
           "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
    env.pop("RAY_ADDRESS", None)
    try:
        start_ray_head([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}",
                        f"--autoscaling-config={cfg}", "--num-cpus=1", "--include-dashboard=false", *own_ports(),
                        f"--temp-dir={temp}", "--disable-usage-stats"], env, str(temp))
        yield gcs
    finally:
        _kill_processes_under(str(temp))


def _embed(gcs: str, src: Path, dst: Path, *extra: str, timeout: float = 600):
    return run_cli("embed", "--config", str(ROOT / "jobs" / "configs" / "embed_cpu_debug.yaml"),
                   "--input", str(src), "--output", str(dst), "--no-tracking", *extra,
                   env={"RAY_ADDRESS": gcs}, timeout=timeout)


def test_embed_waits_for_the_autoscaler_and_finishes_exactly_once(autoscaling_cluster, tmp_path):
    ids = write_cutouts(str(tmp_path / "in"), SHARDS, ROWS)
    # A resource no node type has: fails at once, naming the field.
    bad = _embed(autoscaling_cluster, tmp_path / "in", tmp_path / "bad", "--actors", "1",
                 "--set", "pool.resources.tpu_v9=1", "--set", "pool.wait_s=60", timeout=300)
    assert bad.returncode == 2 and "pool.resources" in bad.stderr and "no node type" in bad.stderr, bad.stderr[-2000:]
    # at once: before the first progress line (10 s into a wait); the process's start-up is not the wait
    assert "asked the autoscaler" in bad.stderr and "waiting for the autoscaler:" not in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("*.parquet"))
    # The worker type's resource: no such node yet; the job asks, waits, and runs once it came.
    ok = _embed(autoscaling_cluster, tmp_path / "in", tmp_path / "out", "--actors", "1",
                "--set", "pool.resources.galray_pool=1", "--set", "pool.cpus_per_actor=1", "--set", "pool.wait_s=400")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "asked the autoscaler for 1 galray_pool" in ok.stderr and "the cluster has 1 galray_pool after" in ok.stderr, \
        ok.stderr[-3000:]
    files = sorted((tmp_path / "out").glob("*.parquet"))
    assert len(files) == SHARDS
    got = [i for f in files for i in pq.read_table(f, columns=["object_id"])["object_id"].to_pylist()]
    assert sorted(got) == ids  # every row once
