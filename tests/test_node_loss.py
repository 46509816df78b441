"""A real 2-node cluster (``ray.cluster_utils.Cluster``, tests/node_loss_harness.py, in a fresh process so the
suite's own Ray is untouched): the cluster's ``cpu_debug`` embed job uses both nodes' replicas; an embed job
that loses its worker node finishes with every row exactly once; a 2-worker training run that loses one
resumes from its last checkpoint on the remaining node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import _kill_processes_under

pytestmark = pytest.mark.slow  # a 2-node Ray cluster of its own, three real runs
HARNESS = Path(__file__).with_name("node_loss_harness.py")


@pytest.fixture(scope="module")
def node_loss_report(tmp_path_factory):
    pytest.importorskip("aiohttp_cors", reason="Ray's State API needs ray[default] (the test extra installs it)")
    work = tmp_path_factory.mktemp("node-loss")
    ray_tmp = tempfile.mkdtemp(prefix="gnl", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp  # Ray's files, and the address file Cluster writes, stay private to this test
    out = work / "report.json"
    try:
        proc = subprocess.run([sys.executable, str(HARNESS), str(work), str(out)], env=env, capture_output=True,
                              text=True, timeout=1500)
    finally:
        _kill_processes_under(ray_tmp)  # whatever the harness left, and nothing else
    assert out.exists(), proc.stderr[-4000:]
    report = json.loads(out.read_text())
    report["harness_stderr"] = proc.stderr[-4000:]
    return report


@pytest.mark.timeout(1800)
def test_cpu_debug_job_uses_both_nodes(node_loss_report):
    r = node_loss_report["cpu_debug"]
    assert r["returncode"] == 0, r["stderr"]
    assert r["ids"] == r["expected_ids"]
    # shard calls ran on the head and on the worker node
    assert r["task_nodes"] == sorted([node_loss_report["head_node"], node_loss_report["worker_node"]]), r


@pytest.mark.timeout(1800)
def test_embed_finishes_exactly_once_after_losing_a_node(node_loss_report):
    r = node_loss_report["embed"]
    assert "error" not in r, r.get("error")
    assert r["removed_while_running"], "the node went after the job had finished: nothing was tested"
    assert node_loss_report["worker_node"] in r["task_nodes"], r["task_nodes"]  # it did work before it went
    assert r["ids"] == r["expected_ids"]  # every row, once
    assert r["summary"]["rows_out"] == len(r["expected_ids"])


@pytest.mark.timeout(1800)
def test_training_resumes_from_its_checkpoint_after_losing_a_node(node_loss_report):
    r = node_loss_report["train"]
    assert "error" not in r, r.get("error")
    assert r["removed_while_running"]
    assert r["worker_node"] in r["actor_nodes"] and len(r["actor_nodes"]) == 2, r["actor_nodes"]
    assert r["summary"]["step"] == 120
    assert r["summary"]["resumed_from_step"] > 0  # from the last checkpoint, not from scratch
    assert r["summary"]["replica_max_diff"] == 0.0
