"""MLflow tracking against a real sqlite store: params, metrics, artifacts, rank-0 only."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow

from galray.config import from_dict
from galray.storage import StorageConfig
from galray.tracking import Tracker, TrackingConfig


def test_run_records_params_metrics_artifacts(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = TrackingConfig(uri=uri, experiment="t", register_model="demo-model")
    tr = Tracker(cfg, run_name="unit")
    tr.log_params({"a.b": 1, "storage.secret_access_key": "***"})
    tr.log_params(from_dict(StorageConfig, {"secret_access_key": "hush"}))
    for step in range(3):
        tr.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    tr.log_figure(fig, "curve.png")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    tr.log_artifact(tmp_path / "ckpt", "checkpoint")
    tr.register("checkpoint")
    tr.finish()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(tr.run_id)
    assert run.data.params["a.b"] == "1" and run.data.params["secret_access_key"] == "***"
    assert [m.value for m in client.get_metric_history(tr.run_id, "loss")] == [1.0, 0.5, 1 / 3]
    arts = {a.path for a in client.list_artifacts(tr.run_id)}
    assert {"figures", "checkpoint"} <= arts
    assert client.get_registered_model("demo-model").name == "demo-model"
    assert run.info.status == "FINISHED"


def test_disabled_and_non_zero_rank_do_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Tracker(TrackingConfig(enabled=False)).log_metrics({"x": 1})
    monkeypatch.setenv("RANK", "1")
    tr = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/r.db"))
    tr.log_metrics({"x": 1})
    assert tr.run_id is None and not (tmp_path / "r.db").exists() and not (tmp_path / "mlflow.db").exists()
