"""A shared MLflow tracking server, as a cluster uses one (the ``mlflow_server`` fixture in conftest:
`mlflow server` on 127.0.0.1 with its artifacts on the S3 test server). An embed job logs to it over HTTP
and its params, metrics with steps and input store are read back through the client. The 2-worker training run that logs to the same server
(params, metrics with steps, checkpoint artifacts on S3, the registered model) is
tests/test_train.py::test_encode_then_prior_two_workers, so the suite pays for one Ray Train run, not two."""

from __future__ import annotations

import pytest
from conftest import write_cutouts

from galray.tracking import TrackingConfig

pytestmark = pytest.mark.slow  # an mlflow server and an embed job
SHARDS, ROWS = 2, 24


def test_embed_job_logs_to_a_tracking_server(mlflow_server, ray_session, tmp_path, monkeypatch):
    import mlflow

    from galray.stages.embed import embed_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_cutouts(str(tmp_path / "cutouts"), SHARDS, ROWS)
    embed = embed_dataset(str(tmp_path / "cutouts"), str(tmp_path / "emb"), "test_convnext", pretrained=False,
                          input_size=32, batch_size=16, actors=1, cpus_per_actor=0.5,
                          tracking=TrackingConfig(uri=mlflow_server.uri, experiment="server-embed"))
    assert embed.rows_out == SHARDS * ROWS

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name("server-embed").experiment_id])
    assert run.data.params["backbone.name"] == "test_convnext" and run.info.status == "FINISHED"
    assert run.data.params["output"] == str(tmp_path / "emb")
    # metrics with their steps (the step of a stage's figures is the rows read), and the input store
    rows_out = client.get_metric_history(run.info.run_id, "rows_out")
    assert [(m.step, m.value) for m in rows_out] == [(SHARDS * ROWS, SHARDS * ROWS)]
    assert [d.dataset.source for d in run.inputs.dataset_inputs] and \
        str(tmp_path / "cutouts") in run.inputs.dataset_inputs[0].dataset.source
