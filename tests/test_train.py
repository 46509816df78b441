"""Ray Train for the SAE, VQ-VAE and prior: 2 CPU workers (gloo), S3 checkpoints, MLflow records,
recovery from a worker process killed from outside, resume by run name, and `galray encode`.

Each training test runs a real 2-worker TorchTrainer against the moto S3 server; models, data
and step counts are tiny so the file stays a few minutes on a 2-core machine.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.models import Model

from galray.config import ConfigError, from_dict
from galray.data.shards import ImageSpec, make_table, shard_name, write_table
from galray.data.galsim_survey import SimConfig, object_id, render_batch
from galray.storage import arrow_filesystem
from galray.train.config import TrainJob
from galray.data.split import is_val

from conftest import registered_steps

# Rows per shard and shards of the test stores.
ROWS, SHARDS = 120, 2
# Ray Data needs CPUs for its read tasks next to 2 workers on a 2-CPU Ray.
SCALING = {"num_workers": 2, "cpus_per_worker": 0.5}


# --- helpers ---------------------------------------------------------------------------------------

def _tracking(tmp_path: Path) -> dict:
    return {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test-train"}


def _history(uri: str, run_id: str, key: str) -> list:
    """Metric history in logging order."""
    return sorted(mlflow.MlflowClient(tracking_uri=uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)


def _assert_loss_decreased(uri: str, run_id: str) -> None:
    values = [m.value for m in _history(uri, run_id, "loss")]
    assert len(values) >= 6, values
    assert np.mean(values[-3:]) < 0.9 * np.mean(values[:3]), values


def _assert_run_recorded(uri: str, run_id: str, kind: str, figures: set[str]) -> None:
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    params = run.data.params
    assert params["kind"] == kind and params["scaling.num_workers"] == "2"
    assert params["global_batch_size"] == str(2 * int(params["batch_size"]))
    assert any(k.startswith("resolved.model.") for k in params)
    for key in ("loss", "lr", "samples_per_s"):
        assert client.get_metric_history(run_id, key), key
    assert run.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "checkpoint", "figures"} <= top
    ckpt = {Path(a.path).name for a in client.list_artifacts(run_id, "checkpoint")}
    assert {"config.json", "model.safetensors", "train_state.pt"} <= ckpt
    assert {f"{f}.png" for f in figures} <= {Path(a.path).name for a in client.list_artifacts(run_id, "figures")}
    # The registered version is an MLflow model (pyfunc, signature, input example); the run names its input store.
    version = max(client.search_model_versions(f"name='galray-{kind}'"), key=lambda v: int(v.version))
    where = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    model = Model.load(mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/MLmodel", tracking_uri=uri))
    assert "python_function" in model.flavors and model.signature is not None and model.saved_input_example_info
    (store,) = run.inputs.dataset_inputs
    assert json.loads(store.dataset.profile)["num_rows"] > 0


def _assert_skipped(uri: str, summary, reason: str, ids: set[str]) -> None:
    """The summary and the MLflow run both name the rows training left out, and why."""
    assert summary.skipped_rows == {reason: len(ids)}, summary.skipped_rows
    assert f"skipped {len(ids)} row(s): {reason}" in summary.format()
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_run(summary.mlflow_run_id).data.metrics["rows_skipped"] == len(ids)
    report = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=summary.mlflow_run_id, tracking_uri=uri,
                                                                 artifact_path="skipped_rows.json")).read_text())
    assert report[reason]["rows"] == len(ids) and set(report[reason]["examples"]) == ids


def _s3_checkpoints(s3_server, bucket: str, prefix: str) -> set[str]:
    objs = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"].split("/")[-2] for o in objs if o["Key"].endswith("/model.safetensors")}


def _cutout_store(uri: str, n_shards: int, rows: int, size: int = 32, flux: bool = False,
                  nan_rows: tuple[int, ...] = ()) -> None:
    fs, root = arrow_filesystem(uri)
    cfg = SimConfig(size=size, keep_flux=flux)
    for s in range(n_shards):
        b = render_batch(range(s * rows, (s + 1) * rows), cfg)
        if flux:
            images = b["flux_image"]
            for i in nan_rows:
                images[i] = np.nan
            spec = ImageSpec(shape=images.shape[1:], layout="CHW", dtype="float32", bands=("g", "r", "z"))
        else:
            images, spec = b["image"], ImageSpec(shape=(size, size, 3))
        write_table(make_table({"object_id": b["object_id"], "image": images, "label": b["label"]}, spec),
                    fs, f"{root}/{shard_name(s)}")


def _embedding_store(uri: str, d: int = 16, nan_rows: tuple[int, ...] = ()) -> None:
    from galray.data.stores import embedding_table
    from galray.models.sae import planted_dictionary

    x, _ = planted_dictionary(ROWS * SHARDS, d, n_features=24, k_active=2, noise=0.01, seed=0)
    x[list(nan_rows), 1] = float("nan")
    fs, root = arrow_filesystem(uri)
    for s in range(SHARDS):
        ids = np.array([f"emb-{i:06d}" for i in range(s * ROWS, (s + 1) * ROWS)], dtype=object)
        write_table(embedding_table(ids, x[s * ROWS:(s + 1) * ROWS].numpy(), {"embedding_dim": d}), fs,
                    f"{root}/{shard_name(s)}")


# --- pure parts ------------------------------------------------------------------------------------

def test_split_is_deterministic_and_sized():
    ids = [f"sim-0-{i:09d}" for i in range(20_000)]
    val = is_val(ids, 0.1)
    assert abs(val.mean() - 0.1) < 0.01
    assert np.array_equal(val, is_val(list(reversed(ids)), 0.1)[::-1])  # per object, not per position
    assert not is_val(ids, 0.0).any()
    assert np.array_equal(is_val(ids[:500], 0.1), val[:500])


def test_job_config_validation():
    job = from_dict(TrainJob, {"kind": "sae", "input": "x", "name": "r", "batch_size": 8, "scale_lr": True,
                               "sae": {"model": {"group_sizes": [8, 24], "k": 4}, "train": {"lr": 1e-3}}})
    assert job.global_batch_size == 16
    assert job.train_config().lr == pytest.approx(2e-3) and job.train_config().batch_size == 8
    assert job.sae.model_config(16).n_latents == 32 and job.sae.model_config(16).d_in == 16
    with pytest.raises(ConfigError, match="sae.model.nope"):
        from_dict(TrainJob, {"kind": "sae", "input": "x", "name": "r", "sae": {"model": {"nope": 1}}})
    with pytest.raises(ConfigError, match="sae.model.k"):
        from_dict(TrainJob, {"kind": "sae", "input": "x", "name": "r", "sae": {"model": {"group_sizes": [4], "k": 8}}})
    with pytest.raises(ConfigError, match="kind"):
        from_dict(TrainJob, {"kind": "gan", "input": "x", "name": "r"})
    with pytest.raises(ConfigError, match="name"):
        from_dict(TrainJob, {"kind": "sae", "input": "x", "name": "a/b"})


def test_extra_inputs_read_as_one_training_set(ray_session, tmp_path):
    """A self-supervised encoder's data from two cutout stores whose image columns agree (the second has
    other catalog columns and no label, like `galray sample xdf`'s): every usable training row of both (split
    by object_id); a store with images of another size, or on another filesystem, fails naming extra_inputs."""
    from galray.train.datasets import build_datasets

    def real_store(name: str, n: int, size: int) -> str:
        fs, root = arrow_filesystem(str(tmp_path / name))
        pixels = np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)
        write_table(make_table({"object_id": np.array([f"xdf-{i:04d}" for i in range(n)], dtype=object),
                                "image": pixels, "flux_auto": np.arange(float(n))}, ImageSpec(shape=(size, size, 3))),
                    fs, f"{root}/{shard_name(0)}")
        return str(tmp_path / name)

    _cutout_store(str(tmp_path / "sim"), 1, 40)
    spec = {"kind": "encoder", "input": str(tmp_path / "sim"), "extra_inputs": [real_store("real", 30, 32)],
            "name": "enc", "val_fraction": 0.2, "encoder": {"preset": "pico"}}
    job = from_dict(TrainJob, spec)
    train = build_datasets(job, job.storage).datasets["train"]
    ids = [f"sim-0-{i:09d}" for i in range(40)] + [f"xdf-{i:04d}" for i in range(30)]
    assert sum(len(b["pixels"]) for b in train.iter_batches(batch_size=None)) == int((~is_val(ids, 0.2)).sum())

    with pytest.raises(ConfigError, match="extra_inputs"):
        build_datasets(from_dict(TrainJob, {**spec, "extra_inputs": [real_store("big", 5, 48)]}), job.storage)
    with pytest.raises(ConfigError, match="extra_inputs"):
        from_dict(TrainJob, {**spec, "extra_inputs": ["s3://bucket/real"]})


# --- Ray Train -------------------------------------------------------------------------------------

def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes. The local Ray's raylet is a child of this process and
    starts the workers, so they are among its descendants (other Ray instances on the machine are not);
    Ray names each actor's process ``ray::RayTrainWorker...``."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.cmdline()[:1] and p.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _registered_checkpoints(s3, bucket: str, run_prefix: str) -> set[int]:
    """Steps of the checkpoints Ray Train has registered for the run under ``run_prefix`` on S3."""
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{run_prefix}checkpoint_manager_snapshot.json")
    except Exception:  # not written yet
        return set()
    return registered_steps(body["Body"].read().decode())


class _Killer(threading.Thread):
    """Waits until Ray Train has registered the run's checkpoint at ``step``, then SIGKILLs one live
    Train worker process from outside, as a crashed or OOM-killed worker would die."""

    def __init__(self, s3_server, bucket: str, run_prefix: str, step: int):
        super().__init__(daemon=True)
        self.s3_server, self.bucket, self.run_prefix, self.step = s3_server, bucket, run_prefix, step
        self.killed: psutil.Process | None = None
        self.registered_at_kill: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        s3 = self.s3_server.client()
        while not self.done.is_set():
            if self.step in _registered_checkpoints(s3, self.bucket, self.run_prefix):
                workers = _train_workers()
                if len(workers) == 2:
                    self.killed = max(workers, key=lambda p: p.pid)
                    self.killed.send_signal(signal.SIGKILL)
                    self.registered_at_kill = _registered_checkpoints(s3, self.bucket, self.run_prefix)
                    return
            time.sleep(0.05)


def test_sae_recovers_from_a_killed_worker_and_resumes(ray_session, s3_env, s3_server, tmp_path, monkeypatch):
    from galray.train.launch import fit

    monkeypatch.chdir(tmp_path)  # MLflow's local artifact root
    bucket = s3_env
    _embedding_store(f"s3://{bucket}/emb", nan_rows=(5, 130))  # rows training leaves out, and reports
    tracking = _tracking(tmp_path)
    steps, every = 15, 5
    base = {"kind": "sae", "input": f"s3://{bucket}/emb", "name": "sae-fault", "storage_path": f"s3://{bucket}/runs",
            "steps": steps, "batch_size": 16, "checkpoint_every": every, "log_every": 1, "max_failures": 1,
            "val_fraction": 0.1, "materialize": True, "scaling": SCALING, "tracking": tracking,
            "sae": {"model": {"group_sizes": [16, 48], "k": 4}, "train": {"lr": 3e-3, "warmup_frac": 0.0}}}
    killer = _Killer(s3_server, bucket, "runs/sae-fault/", every)
    killer.start()
    try:
        s = fit(from_dict(TrainJob, base))
    finally:
        killer.done.set()
        killer.join()

    # A worker process died by SIGKILL after the first checkpoint; Ray Train restarted the group from the
    # latest checkpoint written before it died, and the run still finished every step.
    assert killer.killed is not None, "no Train worker was killed"
    assert not killer.killed.is_running() or killer.killed.status() == psutil.STATUS_ZOMBIE
    assert killer.killed.pid not in {p.pid for p in _train_workers()}
    resumed = s.resumed_from_step
    assert s.step == steps and resumed % every == 0, resumed
    assert max(killer.registered_at_kill) <= resumed < steps, (resumed, killer.registered_at_kill)
    assert s.replica_max_diff == 0.0  # SAE weights, normalisation, threshold identical on both ranks
    assert _s3_checkpoints(s3_server, bucket, "runs/sae-fault/") >= {f"step-{i:08d}" for i in range(resumed, steps + 1,
                                                                                                     every)}
    steps_logged = [int(m.step) for m in _history(tracking["uri"], s.mlflow_run_id, "loss")]
    restart = next(i for i in range(1, len(steps_logged)) if steps_logged[i] <= steps_logged[i - 1])
    assert steps_logged[:restart] == list(range(1, restart + 1)) and restart >= resumed  # the killed attempt
    assert steps_logged[restart:] == list(range(resumed + 1, steps + 1))  # continued from the checkpoint, not 0
    _assert_loss_decreased(tracking["uri"], s.mlflow_run_id)
    _assert_run_recorded(tracking["uri"], s.mlflow_run_id, "sae", {"loss_curves", "feature_density"})
    # The last checkpoint's threshold was calibrated on the validation rows: threshold-mode L0 there is k.
    assert abs(s.eval["val_l0_mean"] - 4) <= 0.4, s.eval
    _assert_skipped(tracking["uri"], s, "embedding has NaN or infinite values", {"emb-000005", "emb-000130"})

    # Same name and storage path again, with more steps: resumes from the last checkpoint, same MLflow run.
    again = fit(from_dict(TrainJob, {**base, "steps": steps + 3}))
    assert again.resumed_from_step == steps and again.step == steps + 3
    assert again.mlflow_run_id == s.mlflow_run_id
    assert f"step-{steps + 3:08d}" in _s3_checkpoints(s3_server, bucket, "runs/sae-fault/")
    from galray.models.checkpoint import load_model
    from galray.models.sae import SparseAutoencoder

    fs, path = arrow_filesystem(again.checkpoint)
    local = tmp_path / "ckpt"
    local.mkdir()
    for name in ("config.json", "model.safetensors", "train_state.pt"):
        with fs.open_input_stream(f"{path}/{name}") as f:
            (local / name).write_bytes(f.read())
    sae = load_model(SparseAutoencoder, local)
    assert bool(sae.norm_fitted) and int(sae.threshold_updates) == steps + 3
    state = torch.load(local / "train_state.pt", weights_only=True)
    assert state["step"] == steps + 3 and state["mlflow_run_id"] == s.mlflow_run_id


def test_vqvae_two_workers(ray_session, s3_env, s3_server, tmp_path, monkeypatch):
    from galray.train.launch import fit

    monkeypatch.chdir(tmp_path)
    bucket = s3_env
    # Resized to the model's 16 px; one unusable (all-NaN) image per shard, left out and reported.
    _cutout_store(str(tmp_path / "cutouts"), SHARDS, ROWS, size=32, flux=True, nan_rows=(3,))
    tracking = _tracking(tmp_path)
    job = from_dict(TrainJob, {
        "kind": "vqvae", "input": str(tmp_path / "cutouts"), "name": "vq", "storage_path": f"s3://{bucket}/runs",
        "steps": 20, "batch_size": 16, "checkpoint_every": 10, "log_every": 1, "materialize": True,
        "val_fraction": 0.1, "scaling": SCALING, "tracking": tracking,
        "vqvae": {"model": {"image_size": 16, "latent_size": 4, "channels": [8, 16], "code_dim": 8,
                            "codebook_size": 16, "kmeans_iters": 3},
                  "train": {"lr": 3e-3}}})
    s = fit(job)
    assert s.step == 20 and s.resumed_from_step == 0
    assert s.replica_max_diff == 0.0  # the codebook (EMA buffers) and weights are identical across ranks
    assert _s3_checkpoints(s3_server, bucket, "runs/vq/") == {"step-00000010", "step-00000020"}
    _assert_loss_decreased(tracking["uri"], s.mlflow_run_id)
    _assert_run_recorded(tracking["uri"], s.mlflow_run_id, "vqvae", {"loss_curves", "codebook_usage"})
    for key in ("perplexity", "utilisation"):
        assert _history(tracking["uri"], s.mlflow_run_id, key)
    # A healthy codebook, not just any: 16 codes over 24 held-out images x 16 positions, k-means init and
    # restarts on (a collapsed codebook would use a few codes; see tests/test_vqvae.py for the contrast).
    assert s.eval["val_utilisation"] >= 0.9 and s.eval["val_perplexity"] >= 0.5 * 16, s.eval
    sim = SimConfig(size=32, keep_flux=True)
    _assert_skipped(tracking["uri"], s, "all pixels are NaN or inf", {object_id(3, sim), object_id(ROWS + 3, sim)})


def test_encode_then_prior_two_workers(ray_session, s3_env, s3_server, mlflow_server, tmp_path, monkeypatch):
    from galray.stages.encode import EncodeJob, encode_store
    from galray.models.checkpoint import save_model
    from galray.models.vqvae import VQVAE, VQVAEConfig
    from galray.train.launch import fit

    monkeypatch.chdir(tmp_path)
    bucket = s3_env
    # A float flux store (stretched to colour by the shared preprocessing), one unusable row per shard.
    _cutout_store(str(tmp_path / "flux"), SHARDS, ROWS, size=32, flux=True, nan_rows=(3,))
    torch.manual_seed(0)
    save_model(VQVAE(VQVAEConfig(image_size=16, latent_size=4, channels=(8, 16), code_dim=8, codebook_size=16)),
               tmp_path / "vq")
    out = f"s3://{bucket}/codes"
    summary = encode_store(from_dict(EncodeJob, {"input": str(tmp_path / "flux"), "vqvae": str(tmp_path / "vq"),
                                                 "output": out, "batch_size": 32, "pool": {"actors": 1}}))
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (SHARDS * ROWS, SHARDS * (ROWS - 1), SHARDS)
    fs, root = arrow_filesystem(out)
    table = pq.read_table(f"{root}/{shard_name(0)}", filesystem=fs)
    assert table.schema.field("codes").type.list_size == 16 and str(table.schema.field("codes").type.value_type) == "int16"
    meta = json.loads(table.schema.metadata[b"galray"])
    assert meta["grid"] == [4, 4] and meta["codebook_size"] == 16
    codes = np.stack(table.column("codes").to_numpy(zero_copy_only=False))
    assert codes.min() >= 0 and codes.max() < 16
    assert set(table.column("label").to_pylist()) <= set(range(10))
    errors = pq.read_table(f"{root}/_errors/shard-00000.parquet", filesystem=fs)
    assert errors.column("stage").to_pylist() == ["encode"] and "NaN" in errors.column("reason")[0].as_py()
    again = encode_store(EncodeJob(input=str(tmp_path / "flux"), vqvae=str(tmp_path / "vq"), output=out))
    assert again.skipped_shards == SHARDS and again.rows_in == 0  # finished shards are not redone
    # Two rows with codes outside the codebook (a store from elsewhere): the prior leaves them out and reports them.
    from galray.data.stores import codes_table
    write_table(codes_table(["bad-0", "bad-1"], np.array([[16] + [0] * 15, [-3] + [0] * 15]), np.zeros(2, np.int64),
                            16, meta), fs, f"{root}/shard-00009.parquet")

    # This run logs over HTTP to a shared `mlflow server` whose artifacts are on S3 (conftest.mlflow_server),
    # as on a cluster; tests/test_mlflow_server.py has an embed job logging to the same server.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = {"uri": mlflow_server.uri, "experiment": "test-train-server"}
    s = fit(from_dict(TrainJob, {
        "kind": "prior", "input": out, "name": "prior", "storage_path": f"s3://{bucket}/runs", "steps": 20,
        "batch_size": 16, "checkpoint_every": 10, "log_every": 1, "materialize": True, "val_fraction": 0.1,
        "scaling": SCALING, "tracking": tracking,
        "prior": {"model": {"vocab_size": 16, "num_classes": 10, "seq_len": 16, "d_model": 32, "n_layers": 2,
                            "n_heads": 2},
                  "train": {"lr": 3e-3, "warmup_steps": 2}}}))
    assert s.step == 20 and s.replica_max_diff == 0.0
    assert _s3_checkpoints(s3_server, bucket, "runs/prior/") == {"step-00000010", "step-00000020"}
    _assert_loss_decreased(tracking["uri"], s.mlflow_run_id)
    _assert_run_recorded(tracking["uri"], s.mlflow_run_id, "prior", {"loss_curves"})
    # Read back through the server: params, metrics with steps, the checkpoint's artifacts (on S3, under the
    # server's artifact root: the workers never see S3 for them) and the registered model.
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(s.mlflow_run_id)
    assert run.data.params["scaling.num_workers"] == "2" and run.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(s.mlflow_run_id, "loss")}) == list(range(1, 21))
    assert {"config.json", "model.safetensors"} <= {Path(a.path).name for a in
                                                   client.list_artifacts(s.mlflow_run_id, "checkpoint")}
    local = client.download_artifacts(s.mlflow_run_id, "checkpoint/config.json", str(tmp_path / "dl"))
    assert json.loads(Path(local).read_text())
    [version] = client.search_model_versions("name='galray-prior'")
    assert version.run_id == s.mlflow_run_id
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=mlflow_server.bucket, Prefix="mlflow/")
            .get("Contents", [])]
    assert any(k.endswith(f"{s.mlflow_run_id}/artifacts/checkpoint/model.safetensors") for k in keys), keys[:20]
    assert "val_loss" in s.eval
    _assert_skipped(tracking["uri"], s, "codes outside the prior's vocabulary [0, 16)", {"bad-0", "bad-1"})

    with pytest.raises(ConfigError, match="seq_len"):
        fit(from_dict(TrainJob, {"kind": "prior", "input": out, "name": "bad", "prior": {"model": {"seq_len": 64,
                                                                                                  "vocab_size": 16}}}))
