"""`galray tune`: search spaces checked before Ray starts, and real campaigns (Ray Tune, ASHA, MLflow).

The two campaign tests run `galray tune` in a subprocess with its own fresh Ray, as a user would:
a placement group leaked by a trial (ray-project/ray#54305, see galray.train.tune_trial) would
otherwise starve every later test of the shared session, and the interruption test must kill
the driver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from galray.config import ConfigError, from_dict, load
from galray.data.shards import shard_name, write_table
from galray.storage import arrow_filesystem
from galray.train.config import TrainJob
from galray.train.tune_space import SearchSpace, apply_values

ROOT = Path(__file__).resolve().parents[1]
BASE = {"kind": "sae", "input": "/tmp/nowhere", "name": "t", "steps": 40, "batch_size": 32,
        "sae": {"model": {"group_sizes": [8, 24], "k": 4}}, "scaling": {"num_workers": 1}}
# The campaigns: a tiny SAE, 4 grid points of k (ASHA reports every 10 of 40 steps).
SPACE = "sae.model.k: {grid: [2, 4, 6, 8]}\n"
CAMPAIGN_FLAGS = ["--steps", "40", "--batch-size", "32", "--set", "sae.model.group_sizes=[8,24]",
                  "--set", "sae.model.k=4", "--set", "sae.norm_samples=400", "--set", "tune.report_every=10",
                  "--set", "tune.eval_rows=256"]


def _base(**changes) -> TrainJob:
    return from_dict(TrainJob, {**BASE, **changes})


# --- search spaces (no Ray) --------------------------------------------------------------------------

@pytest.mark.parametrize("space, key, words", [
    ({"sae.k": {"choice": [4, 8]}}, "space.sae.k", "unknown"),
    ({"sae.model.k": {"uniform": [2, 8]}}, "space.sae.model.k", "2.0"),            # a float range for an int
    ({"steps": {"uniform": [10, 40]}}, "space.steps", "the config rejects"),
    ({"sae.model.k": {"grid": []}}, "space.sae.model.k", "empty"),
    ({"sae.model.k": {"choice": [0, 4]}}, "space.sae.model.k", "k"),             # out of the field's range
    ({"sae.train.optimizer": {"choice": ["sgd"]}}, "space.sae.train.optimizer", "sgd"),
    ({"sae.train.lr": {"loguniform": [0, 1.0e-2]}}, "space.sae.train.lr", "low > 0"),
    ({"sae.model.k": {"randint": [2.5, 8]}}, "space.sae.model.k", "integer"),
    ({"sae.model.k": {"normal": [2, 8]}}, "space.sae.model.k", "unknown distribution"),
    ({"vqvae.model.beta": {"uniform": [0.1, 0.5]}}, "space.vqvae.model.beta", "campaign trains sae"),
    ({"input": {"choice": ["a", "b"]}}, "space.input", "training data"),
    ({"scaling.num_workers": {"choice": [1, 2]}}, "space.scaling.num_workers", "fixed"),
    ({"sae.model.k": {"choice": [4, 64]}}, "space.sae.model.k", "64"),            # k above the width (32)
    ({"sae.model.k": {"choice": [4, 20]}, "sae.model.group_sizes": {"choice": [[16, 48], [8, 8]]}}, "space",
     "sae.model.k=20, sae.model.group_sizes=[8, 8]"),                           # only some combinations conflict
])
def test_bad_space_fails_naming_the_key(space, key, words):
    with pytest.raises(ConfigError) as err:
        SearchSpace.parse(space).validate(_base())
    assert err.value.field == key, str(err.value)
    assert words in str(err.value)


def test_space_numbers_grid_and_optuna():
    # YAML's 1e-3 (no dot) is text; a range takes it as the number it reads as.
    space = SearchSpace.parse({"sae.train.lr": {"loguniform": ["1e-4", "1e-2"]}, "sae.model.k": {"grid": [2, 4, 8]},
                               "sae.model.group_sizes": {"choice": [[8, 24], [16, 48]]}})
    space.validate(_base())
    assert space.param("sae.train.lr").args == (1e-4, 1e-2)
    with pytest.raises(ConfigError, match="optuna") as err:
        space.validate(_base(), search="optuna")
    assert err.value.field == "space.sae.model.k"
    # Grid points: each point trials/size times, a seeded shuffle (not Tune's sorted order), lists encoded as text.
    points = space.grid_points(6, seed=0)
    assert sorted(p["sae.model.k"] for p in points) == [2, 2, 4, 4, 8, 8]
    assert points == space.grid_points(6, seed=0) != space.grid_points(6, seed=1)
    suggested = {"sae.model.k": 8, "sae.train.lr": 0.001, "sae.model.group_sizes": "[16, 48]"}
    values = space.decode(suggested)
    assert values == {"sae.model.k": 8, "sae.train.lr": 0.001, "sae.model.group_sizes": [16, 48]}
    job = apply_values(_base(), values)
    assert (job.sae.model["k"], job.sae.model["group_sizes"], job.sae.train["lr"]) == (8, (16, 48), 0.001)


def test_tune_job_refuses_early_stopping_of_multi_worker_trials():
    from galray.stages.tune import TuneJob

    space = {"sae.model.k": {"grid": [2, 4]}}
    with pytest.raises(ConfigError, match="54305") as err:
        from_dict(TuneJob, {**BASE, "scaling": {"num_workers": 2}, "tune": {"space": space}})
    assert err.value.field == "tune.scheduler"
    from_dict(TuneJob, {**BASE, "scaling": {"num_workers": 2}, "tune": {"space": space, "scheduler": "none"}})
    with pytest.raises(ConfigError) as err:
        from_dict(TuneJob, BASE)
    assert err.value.field == "tune.space"


def test_objective_and_trials_per_kind(tmp_path):
    """SAE campaigns minimise held-out FVU, VQ-VAE campaigns held-out MSE; another metric needs its mode."""
    from galray.stages.tune import TuneJob, plan

    sae = plan(from_dict(TuneJob, {**BASE, "storage_path": str(tmp_path),
                                   "tune": {"space": {"sae.model.k": {"grid": [2, 4]}}, "trials": 4}}))
    assert (sae.metric, sae.mode, sae.trials, sae.report_every) == ("val_fvu", "min", 4, 4)
    vq = {"kind": "vqvae", "input": "/tmp/nowhere", "name": "v", "storage_path": str(tmp_path),
          "scaling": {"num_workers": 1}, "tune": {"space": {"vqvae.model.beta": {"uniform": [0.1, 0.5]}}, "trials": 3}}
    p = plan(from_dict(TuneJob, vq))
    assert (p.metric, p.mode, p.trials) == ("val_mse", "min", 3)
    assert plan(from_dict(TuneJob, {**vq, "tune": {**vq["tune"], "metric": "val_perplexity", "mode": "max"}})).mode == "max"
    for tune_changes, field in (({"metric": "val_perplexity"}, "tune.mode"), ({"metric": "loss_typo"}, "tune.metric"),
                                ({"trials": None}, "tune.trials")):
        with pytest.raises(ConfigError) as err:
            plan(from_dict(TuneJob, {**vq, "tune": {**vq["tune"], **tune_changes}}))
        assert err.value.field == field, str(err.value)
    with pytest.raises(ConfigError) as err:  # grid points each run the same number of trials
        plan(from_dict(TuneJob, {**BASE, "storage_path": str(tmp_path),
                                 "tune": {"space": {"sae.model.k": {"grid": [2, 4]}}, "trials": 3}}))
    assert err.value.field == "tune.trials"


def test_concurrent_trials_follow_the_resources():
    """One GPU per trial on a GPU cluster; on CPUs as many trials as CPUs; a CPU kept for Ray Data when streaming."""
    from galray.stages.tune import TuneJob, max_concurrent, trial_resources

    def job(**changes):
        return from_dict(TuneJob, {**BASE, **changes, "tune": {"space": {"sae.model.k": {"grid": [2, 4]}}}})

    gpu = job(scaling={"num_workers": 1, "use_gpu": True})
    assert trial_resources(gpu) == {"CPU": 1.0, "GPU": 1.0}
    assert max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0}) == 4
    assert max_concurrent(job(), {"CPU": 2.0}) == 2
    assert max_concurrent(job(materialize=False), {"CPU": 8.0}) == 7
    multi = from_dict(TuneJob, {**BASE, "scaling": {"num_workers": 2},
                                "tune": {"space": {"sae.model.k": {"grid": [2, 4]}}, "scheduler": "none"}})
    assert trial_resources(multi) == {"CPU": 0.01} and max_concurrent(multi, {"CPU": 9.0}) == 4


def test_bad_space_fails_before_ray_starts(tmp_path):
    """From the command line: the key is named and Ray never started in the process."""
    (tmp_path / "space.yaml").write_text("sae.model.k: {uniform: [2, 8]}\n")
    code = ("import sys, ray; from galray.cli import main; rc = main(sys.argv[1:]); "
            "print('RAY', ray.is_initialized()); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "tune", "sae", "--input", str(tmp_path / "emb"), "--name", "bad",
                          "--space", str(tmp_path / "space.yaml"), "--storage-path", str(tmp_path / "runs"),
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *CAMPAIGN_FLAGS],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert "space.sae.model.k" in out.stderr and "config error" in out.stderr, out.stderr[-2000:]
    assert "RAY False" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_campaign_figure_marks_stopped_trials():
    from galray.analysis.tune_figures import campaign_figure

    curves = {"a": ([10, 20, 30], [0.9, 0.7, 0.5]), "b": ([10], [0.95]), "c": ([10, 20, 30], [0.8, 0.6, 0.4])}
    fig = campaign_figure(curves, {"a": False, "b": True, "c": False}, {t: {"k": i} for i, t in enumerate("abc")},
                          [("k", "grid")], "val_fvu", best="c")
    curves_ax, k_ax = fig.axes[:2]
    ends = [ln for ln in curves_ax.lines if len(ln.get_xdata()) == 1 and ln.get_marker() != "None"]
    assert sorted(ln.get_marker() for ln in ends) == ["o", "o", "x"]        # b, stopped early, ends in a cross
    assert [ln.get_linewidth() for ln in curves_ax.lines if ln.get_label() == "c (best)"] == [2.4]
    assert k_ax.get_xlabel() == "k" and len(k_ax.collections) == 3            # finished, stopped, best


# --- campaigns (own Ray, in a subprocess) -----------------------------------------------------------

def _embedding_store(uri: str, rows: int = 1200, d: int = 16) -> None:
    from galray.data.stores import embedding_table
    from galray.models.sae import planted_dictionary

    x, _ = planted_dictionary(rows, d, n_features=24, k_active=2, noise=0.01, seed=0)
    fs, root = arrow_filesystem(uri)
    fs.create_dir(root, recursive=True)
    for s in range(2):
        part = slice(s * rows // 2, (s + 1) * rows // 2)
        ids = np.array([f"emb-{i:06d}" for i in range(part.start, part.stop)], dtype=object)
        write_table(embedding_table(ids, x[part].numpy(), {"embedding_dim": d}), fs, f"{root}/{shard_name(s)}")


def _campaign_args(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "galray.cli", "tune", "sae", "--input", str(tmp / "emb"), "--space",
            str(tmp / "space.yaml"), "--name", name, "--storage-path", str(tmp / "runs"), "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db", "--json", *CAMPAIGN_FLAGS, *extra]


def _summary(stdout: str) -> dict:
    """The --json summary: Ray's own driver lines (e.g. "(raylet) Task ... failed due to oom" on a loaded
    machine) can come before it on stdout."""
    lines = stdout.splitlines()
    start = lines.index("{")
    end = len(lines) - lines[::-1].index("}")
    return json.loads("\n".join(lines[start:end]))


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # a fresh Ray of its own, never the suite's shared one
    return env


@pytest.fixture(scope="module")
def campaign_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tune")
    _embedding_store(str(tmp / "emb"))
    (tmp / "space.yaml").write_text(SPACE)
    return tmp


def _children(tmp: Path, parent: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_run(parent).info.experiment_id
    return client, client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def _histories(client, runs: list, key: str = "val_fvu") -> dict[str, list[tuple[int, float]]]:
    return {r.data.tags["galray.trial_id"]: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, key))
            for r in runs}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes on an idle 2-core machine; far more on a loaded one
def test_asha_campaign_releases_resources_and_records_every_trial(campaign_dir):
    tmp = campaign_dir
    out = subprocess.run(_campaign_args(tmp, "asha"), capture_output=True, text=True, timeout=1500, cwd=tmp, env=_env())
    assert out.returncode == 0, out.stderr[-4000:]
    summary = _summary(out.stdout)
    # No leaked resources: the campaign's own Ray has all its CPUs free again, no placement group left.
    assert summary["cpu_total"] >= 1 and summary["cpu_available"] == summary["cpu_total"], summary
    assert summary["leaked_placement_groups"] == 0, summary
    assert summary["trials"] == 4 and summary["errored"] == 0, summary
    assert summary["finished"] + summary["stopped"] == 4, summary
    # The MLflow parent run has 4 children, one per trial, each with its values and metrics by step.
    client, children = _children(tmp, summary["mlflow_run_id"])
    assert len(children) == 4
    assert {r.data.tags["galray.trial_id"] for r in children} == {r["trial"] for r in summary["rows"]}
    for r in children:
        assert r.data.params["sae.model.k"] in {"2", "4", "6", "8"}
        assert {"val_fvu", "val_l0_mean", "val_dead_frac", "fvu"} <= set(r.data.metrics), r.data.metrics
        assert r.info.status == "FINISHED"
    # Results: sorted by the objective, the best config runs `galray train` unchanged, the figure and
    # best checkpoint are logged, and the checkpoint is registered.
    fvu = [row["val_fvu"] for row in summary["rows"]]
    assert fvu == sorted(fvu) and summary["best_value"] == fvu[0]
    csv_rows = (Path(summary["results_csv"]).read_text().splitlines())
    assert len(csv_rows) == 5 and csv_rows[1].startswith(summary["best_trial"]), csv_rows
    best = load(TrainJob, summary["best_config"])
    assert best.sae.model["k"] == summary["best_values"]["sae.model.k"] and best.kind == "sae"
    parent = client.get_run(summary["mlflow_run_id"])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    logged |= {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/tune_campaign.png", "results.csv", "best_config.yaml"} <= logged, logged
    assert client.search_model_versions("name='galray-sae'")
    assert (Path(summary["campaign"]) / "tune_campaign.png").stat().st_size > 10_000
    # Progress lines went to stderr as the trials ended.
    assert out.stderr.count(" started: ") == 4 and "best val_fvu" in out.stderr, out.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes on an idle 2-core machine; far more on a loaded one
def test_killed_campaign_resumes_without_running_a_trial_twice(campaign_dir):
    tmp = campaign_dir
    args = _campaign_args(tmp, "killed", "--max-concurrent", "1")
    done = tmp / "runs" / "killed" / "done"
    log = tmp / "killed.log"
    with log.open("w") as f:  # a file, not a pipe: nobody reads a pipe while the driver runs
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=tmp, env=_env(), start_new_session=True)
    deadline = time.monotonic() + 1500
    while len(list(done.glob("*.json"))) < 2:
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no 2 trials finished in 1500 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait(timeout=60)
    finished_before = {p.stem for p in done.glob("*.json")}
    assert len(finished_before) >= 2
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`galray.campaign` = '{tmp / 'runs' / 'killed'}' and "
                                            "tags.`galray.role` = 'trial'")
    before = _histories(client, [r for r in runs if r.data.tags["galray.trial_id"] in finished_before])

    out = subprocess.run(args + ["--resume", str(tmp / "runs" / "killed")], capture_output=True, text=True,
                         timeout=1500, cwd=tmp, env=_env())
    assert out.returncode == 0, out.stderr[-4000:]
    summary = _summary(out.stdout)
    # As many trials as requested, each once, all with a result.
    assert summary["trials"] == 4 and summary["errored"] == 0
    assert len({r["trial"] for r in summary["rows"]}) == 4 and all(r["val_fvu"] is not None for r in summary["rows"])
    client, children = _children(tmp, summary["mlflow_run_id"])
    assert sorted(r.data.tags["galray.trial_id"] for r in children) == sorted(r["trial"] for r in summary["rows"])
    after = _histories(client, children)
    # The trials finished before the kill were not trained again: their records are as they were.
    assert {t: after[t] for t in finished_before} == before
    # No trial reached its end twice (a trial running at the kill may redo steps after its last checkpoint).
    for trial, history in after.items():
        last = max(s for s, _ in history)
        assert [s for s, _ in history].count(last) == 1, (trial, history)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes on an idle 2-core machine; far more on a loaded one
def test_optuna_campaign_then_train_the_best(ray_session, campaign_dir, tmp_path):
    """The library call the demo makes: a campaign (here Optuna's sampler, no early stopping), then
    `galray train` at the best setting, in the suite's shared Ray."""
    import mlflow

    from galray.stages.tune import TuneJob, tune_then_train

    space = {"sae.model.k": {"choice": [2, 4]}, "sae.train.lr": {"loguniform": [1.0e-3, 1.0e-2]}}
    job = from_dict(TuneJob, {**BASE, "input": str(campaign_dir / "emb"), "name": "optuna", "steps": 20,
                              "storage_path": str(tmp_path / "runs"), "register": False,
                              "sae": {"model": {"group_sizes": [8, 24], "k": 4}, "norm_samples": 400},
                              "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
                              "tune": {"space": space, "trials": 2, "search": "optuna", "scheduler": "none",
                                       "report_every": 10, "eval_rows": 256}})
    campaign, trained = tune_then_train(job)
    assert campaign.trials == 2 and campaign.finished == 2 and campaign.errored == 0
    assert list((tmp_path / "runs" / "optuna").glob("searcher-state-*.pkl"))  # OptunaSearch's saved state
    assert 1e-3 <= campaign.best_values["sae.train.lr"] <= 1e-2
    assert trained.name == "optuna-best" and trained.step == 20
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(trained.mlflow_run_id)
    assert run.data.params["sae.model.k"] == str(campaign.best_values["sae.model.k"])


@pytest.mark.parametrize("space", sorted((ROOT / "jobs" / "configs").glob("tune_*_space*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_fit_their_configs(space):
    """Every search space in jobs/configs is valid for the training config it names in its comment."""
    kind = space.name.split("_")[1]
    config = ROOT / "jobs" / "configs" / (f"{kind}_cpu_debug.yaml" if "cpu_debug" in space.name else f"{kind}.yaml")
    SearchSpace.load(space).validate(load(TrainJob, config))


def test_seeded_training_data_comes_in_the_same_order_every_time(ray_session, tmp_path):
    """One config must train the same in every trial of a campaign (and in a rerun): the training split's
    rows come in one seeded order. Without Ray Data's preserve_order, blocks arrive in the order their
    read tasks finish, and two trials of the same config in bench/tune_efficiency ended 7% apart."""
    from galray.data.stores import embedding_table
    from galray.storage import StorageConfig
    from galray.train.datasets import build_datasets

    fs, root = arrow_filesystem(str(tmp_path / "emb"))
    fs.create_dir(root, recursive=True)
    rng = np.random.default_rng(0)
    for s in range(16):  # many small shards: many read tasks racing
        ids = np.array([f"emb-{s:02d}-{i:03d}" for i in range(40)], dtype=object)
        write_table(embedding_table(ids, rng.normal(size=(40, 8)).astype(np.float32), {"embedding_dim": 8}), fs,
                    f"{root}/{shard_name(s)}")
    job = _base(input=str(tmp_path / "emb"), materialize=True, val_fraction=0.2,
                sae={"model": {"group_sizes": [8, 24], "k": 4}, "norm_samples": 200})

    def rows() -> np.ndarray:
        train = build_datasets(job, StorageConfig()).datasets["train"]
        return np.concatenate([b["x"] for b in train.iter_batches(batch_size=None, batch_format="numpy")])

    first, second = rows(), rows()
    assert len(first) > 400
    np.testing.assert_array_equal(first, second)
