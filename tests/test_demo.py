"""`galray demo --fast` end to end, through the CLI as a user runs it, in a fresh working directory.

One demo run is shared by the module (it is the slowest test of the suite); the other tests read
what it left: every artifact, the MLflow runs and their artifacts under the output folder, a rerun
that reuses every stage, and a subset whose inputs were never made failing at start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import render_page

STAGES = ("simulate", "xdf", "vqvae", "encoder", "embed_encoder", "codes", "prior", "embed", "sae", "generate", "features", "analyze", "report")
pytestmark = pytest.mark.timeout(1800)


def _galray(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "galray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=1700)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    cwd = tmp_path_factory.mktemp("demo-cwd")
    out = cwd / "out"
    proc = _galray("demo", "--fast", "--output", str(out), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return cwd, out, proc.stdout


def test_demo_writes_every_artifact_under_its_output(demo: tuple[Path, Path, str]) -> None:
    cwd, out, stdout = demo
    for name in ("sim", "xdf", "codes", "embeddings", "encoder_embeddings", "features", "xdf_embeddings",
                 "xdf_features"):
        assert list((out / name).glob("*.parquet")), name
    for name in ("sim_montage.png", "generated.png", "mlflow.db", "report.html", "analysis/analysis.json"):
        assert (out / name).stat().st_size > 0, name
    for run in ("vqvae-demo", "encoder-demo", "prior-demo", "sae-demo-best"):
        assert list((out / "runs" / run).glob("step-*/config.json")), run
    assert (out / "runs" / "sae-demo" / "results.csv").stat().st_size > 0
    # MLflow's artifacts live under the output folder, not in ./mlruns of wherever the user ran it
    assert not (cwd / "mlruns").exists()
    assert list((out / "mlartifacts").rglob("*.png"))
    assert "headline figures:" in stdout and "sae.val_fvu" in stdout and "vqvae.val_perplexity" in stdout
    assert "best |rho| with the ground truth" in stdout and "ring_radius" in stdout
    for i, stage in enumerate(STAGES, 1):
        assert f"[{i}/{len(STAGES)}] {stage}:" in stdout
        record = json.loads((out / "stages" / f"{stage}.json").read_text())
        assert all(Path(p).exists() for p in record["paths"].values()), stage


def test_demo_runs_are_in_mlflow_with_their_artifacts(demo: tuple[Path, Path, str]) -> None:
    import mlflow

    _, out, _ = demo
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("galray-demo")
    assert exp is not None
    assert exp.artifact_location.startswith((str(out / "mlartifacts"), (out / "mlartifacts").as_uri()))
    found = client.search_runs([exp.experiment_id])
    runs = {r.info.run_name: r for r in found}
    for name in ("vqvae-demo", "encoder-demo", "prior-demo", "sae-demo-best", "sae-demo"):
        assert name in runs, sorted(runs)
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.metrics, name
        assert client.list_artifacts(run.info.run_id), name
    # the self-supervised encoder read the real XDF cutouts beside the simulated ones
    assert {d.dataset.name for d in runs["encoder-demo"].inputs.dataset_inputs} == {"sim", "xdf"}
    # the Tune campaign is a parent run with one child run per trial
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == runs["sae-demo"].info.run_id]
    assert len(children) == 4


def test_demo_rerun_reuses_every_stage(demo: tuple[Path, Path, str]) -> None:
    cwd, out, _ = demo
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")}
    proc = _galray("demo", "--fast", "--output", str(out), cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("reusing the result of an earlier run") == len(STAGES)
    assert f"0 stages ran, {len(STAGES)} reused" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "stages").glob("*.json")} == before


def test_demo_subset_without_its_inputs_fails_at_start(tmp_path: Path) -> None:
    proc = _galray("demo", "--fast", "--output", str(tmp_path / "fresh"), "--set", "stages=[embed]", cwd=tmp_path)
    assert proc.returncode == 2
    assert "stages: stage embed needs what simulate, vqvae, xdf make" in proc.stderr
    assert not (tmp_path / "fresh").exists()


def test_demo_report_renders_in_headless_chromium(demo: tuple[Path, Path, str], chromium, tmp_path: Path) -> None:
    _, out, _ = demo
    images, spread = render_page(chromium, out / "report.html", tmp_path / "report.png")
    assert len(images) > 20
    assert [i["alt"] for i in images if i["naturalWidth"] == 0] == []
    assert spread > 10, "the screenshot is blank"


def test_demo_galleries_hold_real_xdf_galaxies_marked_as_such(demo: tuple[Path, Path, str]) -> None:
    """The SAE galleries draw from the simulated and the XDF feature stores together; the report captions
    the real galaxies "XDF", and the alignment stays on the simulated rows (the ones with ground truth)."""
    import pandas as pd

    _, out, _ = demo
    gal = pd.read_parquet(out / "analysis" / "galleries.parquet")
    sae = gal[gal["gallery"].str.startswith("sae ")]
    real = sae[sae["source"] == "XDF"]
    assert len(real) > 0 and real["object_id"].str.startswith("xdf-").all()
    assert not sae[sae["source"] == ""]["object_id"].str.startswith("xdf-").any()
    for _, g in sae.groupby("gallery"):  # one ranking over both stores: strongest first
        assert g.sort_values("rank")["value"].is_monotonic_decreasing
    summary = json.loads((out / "analysis" / "analysis.json").read_text())
    assert summary["gallery_sources"]["XDF"] == str(out / "xdf_features")
    assert int(summary["headline"]["objects analysed"].replace(",", "")) == 300  # the simulated rows only
    page = (out / "report.html").read_text()
    captioned = re.findall(r'alt="([^"]+)"[^>]*><span class="src">([^<]+)</span>', page)
    assert captioned and all(oid.startswith("xdf-") and src == "XDF" for oid, src in captioned)
    assert "have no ground truth" in page
