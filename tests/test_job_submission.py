"""Submitting galray's jobs to a real Ray head (`ray start --head`, dashboard on 127.0.0.1, token auth), as a
user submits them to a cloud cluster: `ray job submit --working-dir .` and JobSubmissionClient.

The cutouts and embeddings live on moto's S3 server, which checks credentials; the head's node holds them in
its environment (a cloud node's instance role), and the job is given none: its entrypoint, runtime env,
logs, `_config.yaml`, task arguments and MLflow params must not show the secret.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import write_cutouts
from pyarrow.fs import FileSelector

from galray.data.shards import CONFIG_NAME
from galray.storage import StorageConfig, arrow_filesystem

pytestmark = pytest.mark.slow  # a Ray head of its own and two real jobs
ROOT = Path(__file__).resolve().parent.parent
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
SHARDS, ROWS = 2, 6


def _storage(server) -> StorageConfig:
    return StorageConfig(endpoint_url=server.endpoint, access_key_id=server.access_key,
                         secret_access_key=server.secret_key)


def _entrypoint(bucket: str, out: str, server, tmp_path: Path) -> str:
    """The job's command line: settings only (each job its own sqlite store on this one-node cluster)."""
    return (f"python jobs/embed.py --config jobs/configs/embed_cpu_debug.yaml --input s3://{bucket}/cutouts "
            f"--output s3://{bucket}/{out} --set storage.endpoint_url={server.endpoint} "
            f"--tracking-uri sqlite:///{tmp_path / out}.db --set tracking.experiment=jobs")


# The SDK side, in a process of its own like a user's script: submit and wait, or report on both jobs.
CLIENT = textwrap.dedent("""\
    import json, sys, time
    from ray.job_submission import JobSubmissionClient, JobStatus
    client = JobSubmissionClient()  # RAY_ADDRESS and the token from the environment
    if sys.argv[1] == "submit":
        client.submit_job(entrypoint=sys.argv[2], submission_id="sdk", runtime_env=json.loads(sys.argv[3]))
        while client.get_job_status("sdk") not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            time.sleep(1)
        sys.exit(0)
    for s in ("sdk", "cli"):
        info = client.get_job_info(s)
        print(json.dumps({"id": s, "status": str(info.status), "entrypoint": info.entrypoint,
                          "runtime_env": info.runtime_env, "logs": client.get_job_logs(s)}))
    """)


@pytest.mark.timeout(1800)  # the head's start-up and two jobs; a few minutes on a quiet 2-core machine
def test_embed_job_submitted_to_a_ray_head_succeeds_with_no_secret_in_flight(ray_head, s3_auth_server, tmp_path):
    import mlflow
    import yaml

    server, secret = s3_auth_server, ray_head.node_secret
    bucket = server.new_bucket()
    storage = _storage(server)
    write_cutouts(f"s3://{bucket}/cutouts", SHARDS, ROWS, storage)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # the client has no keys
    env.update(ray_head.client_env)

    # The Python SDK (JobSubmissionClient), with the same runtime env (working dir as an absolute path) ...
    runtime_env = {**yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text()), "working_dir": str(ROOT)}
    sdk = subprocess.run([sys.executable, "-c", CLIENT, "submit", _entrypoint(bucket, "emb-sdk", server, tmp_path),
                          json.dumps(runtime_env)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert sdk.returncode == 0, sdk.stderr[-3000:]
    # ... then the CLI as the README says (it waits for its job and follows its logs). One after the other: each
    # job's pool takes every CPU of this one-node cluster.
    cli = subprocess.run([*RAY, "job", "submit", "--submission-id", "cli", "--working-dir", ".",
                          "--runtime-env", "jobs/runtime_env.yaml", "--",
                          *_entrypoint(bucket, "emb-cli", server, tmp_path).split()],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    sdk = subprocess.run([sys.executable, "-c", CLIENT, "report"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert sdk.returncode == 0, sdk.stderr[-3000:]
    jobs = [json.loads(line) for line in sdk.stdout.splitlines() if line.startswith("{")]
    assert [j["status"] for j in jobs] == ["SUCCEEDED", "SUCCEEDED"], [j["logs"][-2000:] for j in jobs]

    # outputs on the S3 server: one embedding file per input shard, every row once
    import pyarrow.parquet as pq

    fs, _ = arrow_filesystem(f"s3://{bucket}", storage)
    for out in ("emb-cli", "emb-sdk"):
        files = sorted(f.path for f in fs.get_file_info(FileSelector(f"{bucket}/{out}"))
                       if f.path.endswith(".parquet"))
        assert len(files) == SHARDS
        ids = [i for f in files for i in pq.read_table(f, filesystem=fs, columns=["object_id"])["object_id"].to_pylist()]
        assert sorted(ids) == [f"obj-{i:05d}" for i in range(SHARDS * ROWS)]

    # the secret is nowhere: entrypoints, runtime envs, job logs, _config.yaml, task arguments, MLflow, Ray's logs
    seen = {f"job {j['id']} {k}": json.dumps(j[k]) for j in jobs for k in ("entrypoint", "runtime_env", "logs")}
    for out in ("emb-cli", "emb-sdk"):
        with fs.open_input_stream(f"{bucket}/{out}/{CONFIG_NAME}") as f:
            seen[f"{out}/{CONFIG_NAME}"] = f.read().decode()
    tasks = subprocess.run([*RAY, "list", "tasks", "--detail", "--format", "json", "--limit", "10000",
                            "--address", ray_head.dashboard], env=env, capture_output=True, text=True, timeout=120)
    assert tasks.returncode == 0 and "MapWorker" in tasks.stdout, tasks.stderr[-2000:]  # the replicas' calls
    seen["ray list tasks --detail"] = tasks.stdout
    runs = []
    for out in ("emb-cli", "emb-sdk"):
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / out}.db")
        runs += client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    seen["MLflow params"] = json.dumps([r.data.params for r in runs])
    for log in (ray_head.session_dir / "logs").rglob("*"):
        if log.is_file():
            seen[f"Ray log {log.name}"] = log.read_text(errors="replace")
    assert "storage.endpoint_url" in seen["MLflow params"] and server.endpoint in seen["emb-cli/_config.yaml"]
    leaks = [where for where, text in seen.items() if secret in text or server.access_key in text]
    assert not leaks, leaks


def test_a_client_without_the_token_is_refused(ray_head):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = "not-the-token"
    proc = subprocess.run([*RAY, "job", "list", "--address", ray_head.dashboard], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
