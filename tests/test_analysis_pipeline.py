"""End to end on a small simulated survey: simulate -> VQ-VAE -> embed -> SAE -> `galray features` ->
`galray analyze` -> `galray report`, once per module, then what each stage must show:

- the feature store: every input id once, L0 per row near k, the catalog carried through, codes equal
  to the SAE's own threshold inference, a rerun skips every file, and the top-J query equals a brute
  force scan;
- the alignment: the SAE's best feature for the axis ratio (edge-on vs face-on) is one of its main
  features and its |rho| is far above the label-shuffle null;
- the report: self-contained, logged to MLflow, the same from the folder and from the run id, and it
  renders in headless Chromium with every image loaded.

The stages that run on Ray (simulate, embed, features, encode) use the session's Ray; the three
trainings run their pure loops in this process (Ray Train is tested in test_train.py), so the module
stays at a few minutes on two cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from conftest import render_page, run_cli
from galray.config import from_dict
from galray.data.shards import images_from_table, list_parquet
from galray.data.stores import read_embeddings, read_features, sparse_rows
from galray.storage import arrow_filesystem

N, SIZE = 1500, 32
K = 4
# The module fixture runs the whole chain once (about 3 minutes on an idle 2-core box); pytest-timeout charges
# it to the first test, so the limit is the module's, not the suite's 10 minutes per test.
pytestmark = pytest.mark.timeout(1800)


def _pixels(store: str) -> torch.Tensor:
    """(N, 3, S, S) uint8 pixels of a simulated store (its images are already the VQ-VAE's size)."""
    fs, root = arrow_filesystem(store)
    parts = [images_from_table(pq.read_table(f.path, filesystem=fs, columns=["object_id", "image"]))
             for f in list_parquet(fs, root)]
    return torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def pipeline(ray_session, tmp_path_factory):
    from galray.data.galsim_survey import SimConfig
    from galray.models.backbone_config import BackboneConfig
    from galray.models.checkpoint import save_model
    from galray.models.prior import Prior, PriorConfig
    from galray.models.sae import SAEConfig, SparseAutoencoder
    from galray.models.vqvae import VQVAE, VQVAEConfig
    from galray.stages.analyze import AnalyzeJob, analyze
    from galray.stages.embed import EmbedJob, embed_store
    from galray.stages.encode import EncodeJob, encode_store
    from galray.stages.features import FeaturesJob, features
    from galray.stages.report import ReportJob, report
    from galray.stages.simulate import SimulateJob, simulate_survey
    from galray.train import prior_loop, sae_loop, vqvae_loop

    root = tmp_path_factory.mktemp("analysis")
    p = {name: str(root / name) for name in ("sim", "vqvae", "emb", "sae", "feat", "codes", "prior", "analysis")}
    tracking = {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "test-analysis"}
    mlflow.MlflowClient(tracking["uri"]).create_experiment("test-analysis", artifact_location=(root / "art").as_uri())
    no_tracking = {"enabled": False}

    simulate_survey(SimulateJob(output=p["sim"], n=N, shard_rows=N // 3, sim=SimConfig(size=SIZE, seed=0)))
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(image_size=SIZE, latent_size=4, channels=(16, 32, 32), code_dim=16, codebook_size=64,
                           factorized_dim=8, kmeans_iters=5))
    pixels = _pixels(p["sim"])
    vqvae_loop.train(vq, [{"pixels": pixels[i:i + 32]} for i in range(0, N, 32)],
                     vqvae_loop.VQVAETrainConfig(steps=150, lr=2e-3, log_every=50))
    save_model(vq.eval(), p["vqvae"])
    embed_store(from_dict(EmbedJob, {"input": p["sim"], "output": p["emb"], "batch_size": 64,
                                     "backbone": {"name": f"vqvae:{p['vqvae']}"}, "tracking": no_tracking}))
    _, x, _ = read_embeddings(p["emb"])
    sae = SparseAutoencoder(SAEConfig(d_in=x.shape[1], group_sizes=(8, 24), k=K, dead_after_samples=2048))
    xt = torch.from_numpy(x)
    sae_loop.train(sae, xt, sae_loop.SAETrainConfig(lr=2e-3, batch_size=64, steps=400, log_every=100))
    sae.calibrate_threshold(xt)  # threshold-mode L0 = k on the training data (issue 15 moves this into training)
    save_model(sae.eval(), p["sae"])
    feat = features(from_dict(FeaturesJob, {"input": p["emb"], "sae": p["sae"], "output": p["feat"],
                                            "batch_size": 100, "tracking": no_tracking}))
    encode_store(from_dict(EncodeJob, {"input": p["sim"], "vqvae": p["vqvae"], "output": p["codes"]}))
    from galray.data.stores import list_column_values

    fs, croot = arrow_filesystem(p["codes"])
    codes_t = [pq.read_table(f.path, filesystem=fs) for f in list_parquet(fs, croot)]
    codes = torch.from_numpy(np.concatenate([list_column_values(t.column("codes")) for t in codes_t]).astype(np.int64))
    labels = torch.from_numpy(np.concatenate([t.column("label").to_numpy() for t in codes_t]))
    prior = Prior(PriorConfig(vocab_size=64, num_classes=10, seq_len=16, d_model=32, n_layers=2, n_heads=2))
    prior_loop.train(prior, codes, labels, prior_loop.PriorTrainConfig(steps=60, batch_size=32, lr=3e-3,
                                                                        warmup_steps=5))
    save_model(prior.eval(), p["prior"])
    summary = analyze(from_dict(AnalyzeJob, {"input": p["feat"], "output": p["analysis"], "codes": p["codes"],
                                             "prior": p["prior"], "gallery_size": 8, "generation_per_class": 3,
                                             "tsne_points": 200, "n_shuffles": 20, "tracking": tracking}))
    rep = report(from_dict(ReportJob, {"run": p["analysis"], "tracking": tracking}))
    return {"paths": p, "tracking": tracking, "sae": sae, "x": x, "features": feat, "analysis": summary,
            "report": rep, "root": root}


def test_feature_store_holds_every_id_once_with_l0_near_k(pipeline):
    from galray.stages.features import FeaturesJob, features

    p, sae = pipeline["paths"], pipeline["sae"]
    s = pipeline["features"]
    assert (s.rows_in, s.rows_out, s.rows_errored) == (N, N, 0)
    table, meta = read_features(p["feat"])
    ids = table.column("object_id").to_pylist()
    emb_ids, x, _ = read_embeddings(p["emb"])
    assert len(ids) == len(set(ids)) == N and set(ids) == set(emb_ids)
    assert meta["k"] == K and meta["inference"] == "threshold" and meta["weights"].startswith("sha256:")
    offsets, idx, val = sparse_rows(table)
    l0 = np.diff(offsets)
    assert abs(l0.mean() - K) <= 0.15 * K, l0.mean()  # calibrated on these rows: mean L0 = k
    assert np.median(l0) == pytest.approx(K, abs=1) and (l0 <= 4 * K).all()
    assert s.l0_mean == pytest.approx(l0.mean(), abs=1e-3)
    # The stored codes are the SAE's own threshold inference, whatever the batch (files of 160, batches of 100)
    order = {oid: i for i, oid in enumerate(emb_ids)}
    with torch.no_grad():
        ref = sae.encode(torch.from_numpy(x[[order[i] for i in ids]])).numpy()
    dense = np.zeros_like(ref)
    dense[np.repeat(np.arange(N), l0), idx] = val
    np.testing.assert_allclose(dense, ref, rtol=1e-5, atol=1e-6)
    assert all(np.all(np.diff(val[a:b]) <= 0) for a, b in zip(offsets[:-1], offsets[1:]))  # strongest first
    # The catalog travels with the features
    fs, root = arrow_filesystem(p["sim"])
    sim = pq.read_table(f"{root}/shard-00000.parquet", columns=["object_id", "axis_ratio", "class_name"]).to_pandas()
    feat = table.select(["object_id", "axis_ratio", "class_name"]).to_pandas().set_index("object_id")
    assert feat.loc[sim["object_id"]].reset_index().equals(sim)
    assert "image" not in table.column_names
    # A rerun finds every file done
    again = features(from_dict(FeaturesJob, {"input": p["emb"], "sae": p["sae"], "output": p["feat"],
                                             "tracking": {"enabled": False}}))
    assert again.skipped_shards == 3 and again.rows_in == 0


def test_top_j_query_from_the_cli_equals_a_brute_force_scan(pipeline):
    p = pipeline["paths"]
    table, _ = read_features(p["feat"])
    offsets, idx, val = sparse_rows(table)
    ids = np.asarray(table.column("object_id").to_pylist())
    j = int(np.bincount(idx).argmax())  # the most frequent latent: more hits than --n
    dense = np.zeros(N, np.float32)
    rows = np.repeat(np.arange(N), np.diff(offsets))
    dense[rows[idx == j]] = val[idx == j]
    expect = [i for i in np.argsort(-dense, kind="stable") if dense[i] > 0][:50]
    proc = run_cli("features", "--input", p["feat"], "--top", str(j), "--n", "50", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["latent"] == j and len(got["objects"]) == min(50, int((dense > 0).sum()))
    assert [o["object_id"] for o in got["objects"]] == list(ids[expect])
    np.testing.assert_allclose([o["value"] for o in got["objects"]], dense[expect], rtol=1e-6)


def test_axis_ratio_is_found_by_a_main_sae_feature_far_above_the_shuffle_null(pipeline):
    folder = Path(pipeline["paths"]["analysis"])
    recovery = pq.read_table(folder / "recovery.parquet").to_pandas().set_index("label")
    align = pq.read_table(folder / "alignment.parquet").to_pandas()
    sae = align[align["method"] == "sae"].sort_values("frequency", ascending=False).reset_index(drop=True)
    row = recovery.loc["axis_ratio"]
    print(recovery[["sae_feature", "sae_abs_rho", "sae_null_q", "pca_abs_rho", "pca_null_q"]].to_string())
    # far above what the best of all the SAE's features reaches for a shuffled axis ratio (99% quantile over the
    # shuffles; at N = 1500 one rho's standard error is 1/sqrt(N) = 0.026, so 2.5x that bar is several sigma)
    assert row["sae_abs_rho"] > 2.5 * row["sae_null_q"]
    # and it is one of the SAE's main features: among the most frequent third of the live latents
    rank = int(sae.index[sae["feature"] == row["sae_feature"]][0])
    assert rank < max(3, len(sae) // 3), (rank, len(sae))
    summary = json.loads((folder / "analysis.json").read_text())
    assert {"alignment", "galleries", "families", "codebook", "generations"} <= set(summary["sections"])


def test_neighbours_in_the_report_are_the_stores_and_the_probes_read_the_labels(pipeline):
    from galray.data.neighbours import nearest_neighbours

    p = pipeline["paths"]
    folder = Path(p["analysis"])
    summary = json.loads((folder / "analysis.json").read_text())
    galleries = pd.read_parquet(folder / "galleries.parquet")
    queries = summary["neighbour_galleries"]
    assert len(queries) == 4 and len({q["query"] for q in queries}) == 4
    for q in queries:
        rows = galleries[galleries["gallery"] == q["gallery"]].sort_values("rank")
        assert rows["object_id"].iloc[0] == q["query"] and rows["value"].iloc[0] == 1.0
        # The sample is the whole store here, so the report's neighbours are `galray neighbours`'s.
        search = nearest_neighbours(p["emb"], q["query"], k=8)
        assert list(rows["object_id"].iloc[1:]) == [n.object_id for n in search.neighbours]
        assert np.allclose(rows["value"].iloc[1:], [n.similarity for n in search.neighbours], atol=1e-5)
    probes = pd.read_parquet(folder / "probes.parquet").set_index("label")
    assert set(probes.loc[[c for c in probes.index if c.startswith("class:")], "metric"]) == {"AUC"}
    # Brightness is what a linear read-out of these embeddings recovers best (R^2 0.65 at 1,000 rows; labels
    # read out of step with the embeddings would give about 0); a position angle, a circular label, none
    # can. The class AUCs are out-of-fold ones, not a perfect fit.
    assert probes.loc["mag_r", "metric"] == "R2" and probes.loc["mag_r", "embedding"] > 0.3
    assert probes.loc["position_angle", "embedding"] < 0.1
    aucs = probes[probes["metric"] == "AUC"]
    assert ((aucs["embedding"] > 0.5) & (aucs["embedding"] < 1.0)).mean() > 0.5
    assert "neighbours" in summary["sections"]
    html = Path(pipeline["report"].output).read_text()
    assert 'id="neighbours"' in html and "Linear probes" in html


def test_report_is_self_contained_and_logged_to_the_analysis_run(pipeline, tmp_path):
    p, tracking, rep = pipeline["paths"], pipeline["tracking"], pipeline["report"]
    html = Path(rep.output).read_text()
    assert Path(rep.output) == Path(p["analysis"]) / "report.html"
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing outside the file
    assert not re.search(r"<(link|script)\b", html)
    assert {"headline", "galleries", "pca", "neighbours", "codebook", "generations", "tables", "run"} <= set(rep.sections)
    assert html.index('id="headline"') < html.index('id="tables"')  # pictures first
    assert html.count('loading="lazy"') >= html.count("<img ") - 3
    run_id = rep.mlflow_run_id
    client = mlflow.MlflowClient(tracking["uri"])
    assert {a.path for a in client.list_artifacts(run_id, "report")} == {"report/report.html"}
    assert "analysis/analysis.json" in {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert client.get_run(run_id).data.metrics["rho_sae_axis_ratio"] == pytest.approx(
        pipeline["analysis"].recovery["axis_ratio"]["sae"], abs=1e-3)
    # The same report from the MLflow run id alone
    out = tmp_path / "from-run.html"
    proc = run_cli("report", "--run", run_id, "--output", str(out), "--tracking-uri", tracking["uri"], "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["sections"] == rep.sections
    assert out.read_text().count("<img ") == html.count("<img ")
    bad = run_cli("report", "--run", "no-such-run", "--tracking-uri", tracking["uri"])
    assert bad.returncode == 1 and "neither an analysis folder nor an MLflow run" in bad.stderr


def test_report_renders_in_headless_chromium_with_every_image_loaded(pipeline, chromium, tmp_path):
    images, spread = render_page(chromium, Path(pipeline["report"].output), tmp_path / "report.png")
    assert len(images) == pipeline["report"].images > 20
    assert [i["alt"] for i in images if i["naturalWidth"] == 0] == []
    assert spread > 10, "the screenshot is blank"
