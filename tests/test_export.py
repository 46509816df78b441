"""Models others can load: MLflow pyfunc models, the SAELens export, the Hugging Face hub layout.

- every registered kind loads through ``mlflow.pyfunc.load_model`` in a fresh process, from the code
  bundled in the model (no Ray, no training code), and predicts what galray's own forward pass gives;
- SAELens (the real package) loads the SAE export and reproduces galray's threshold-mode codes,
  reconstructions and FVU, and its sparsity log;
- the hub-layout exports of a VQ-VAE and of a timm encoder give `galray embed --model local-dir:...`
  the same embeddings as the originals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from galray.cli import main as galray_main
from galray.data.shards import ImageSpec, make_table, shard_name, write_table
from galray.data.stores import embedding_table, read_embeddings
from galray.export.mlflow_model import log_galray_model
from galray.models.backbones import BackboneConfig, create_backbone, to_model_input
from galray.models.checkpoint import save_model
from galray.models.encoder import SurveyEncoder, encoder_preset
from galray.models.prior import Prior, PriorConfig
from galray.models.sae import SAEConfig, SparseAutoencoder, evaluate_sae, planted_dictionary
from galray.models.sampling import SamplingConfig, sample
from galray.models.vqvae import VQVAE, VQVAEConfig, pixels_to_model
from galray.stages.export import ExportJob, export
from galray.storage import arrow_filesystem
from galray.tracking import Tracker, TrackingConfig

D = 24


def _sae(seed: int = 0) -> tuple[SparseAutoencoder, torch.Tensor]:
    """A small SAE with fitted normalisation, a non-trivial encoder and a calibrated threshold."""
    x, _ = planted_dictionary(2000, D, 48, 3, seed=seed)
    x = x * torch.linspace(0.2, 4.0, D) + 2.0  # uneven scales and an offset: the z-score matters
    m = SparseAutoencoder(SAEConfig(d_in=D, group_sizes=(16, 16, 32), k=4, seed=seed))
    m.fit_normalization(x)
    m.init_from_sample(x)
    with torch.no_grad():
        m.b_enc_F.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    m.calibrate_threshold(x)
    return m.eval(), x


def _tiny_vqvae() -> VQVAE:
    """A tiny VQ-VAE whose codebook is k-means-initialised on random images (so its codes vary)."""
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(image_size=16, latent_size=4, channels=(8, 8), code_dim=8, codebook_size=16))
    vq.train()(torch.rand(8, 3, 16, 16) * 2 - 1)
    return vq.eval()


# --- MLflow -------------------------------------------------------------------------------------------

FRESH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import mlflow, numpy as np
    root = Path(sys.argv[1])
    mlflow.set_tracking_uri(sys.argv[2])
    info = {}
    for kind in ("sae", "vqvae", "prior", "encoder"):
        model = mlflow.pyfunc.load_model(f"models:/galray-{kind}/1")
        params = {"seed": 7, "temperature": 1.0} if kind == "prior" else None
        np.save(root / f"{kind}_out.npy", model.predict(np.load(root / f"{kind}_in.npy"), params=params))
        meta = model.metadata
        info[kind] = {"inputs": str(meta.get_input_schema()), "outputs": str(meta.get_output_schema()),
                      "example": meta.saved_input_example_info is not None}
    import galray
    info["galray_file"] = galray.__file__
    info["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "boto3", "s3fs")
                           or m.startswith(("galray.train", "galray.stages", "galray.data")))
    print(json.dumps(info))
""")


def test_registered_models_load_through_pyfunc_in_a_fresh_process_and_predict_like_galray(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment("export", artifact_location=(tmp_path / "artifacts").as_uri())
    tracker = Tracker(TrackingConfig(uri=uri, experiment="export"), run_name="models")
    tracker.log_input(str(tmp_path / "embeddings"), 1234, "embeddings")

    sae, x = _sae()
    vq = _tiny_vqvae()
    prior = Prior(PriorConfig(vocab_size=16, num_classes=3, seq_len=16, d_model=32, n_layers=1, n_heads=2)).eval()
    torch.manual_seed(0)
    enc = SurveyEncoder(encoder_preset("pico")).eval()  # 32 px
    inputs = {"sae": x[:64].numpy(), "vqvae": torch.rand(5, 3, 16, 16).numpy(), "prior": np.array([0, 2, -1, 1]),
              "encoder": torch.rand(3, 3, 32, 32).numpy()}
    for kind, model in (("sae", sae), ("vqvae", vq), ("prior", prior), ("encoder", enc)):
        save_model(model, tmp_path / f"ckpt-{kind}")
        (tmp_path / f"ckpt-{kind}" / "train_state.pt").write_bytes(b"optimizer state stays out of the model")
        info = log_galray_model(kind, tmp_path / f"ckpt-{kind}", uri, tracker.run_id, registered_name=f"galray-{kind}")
        assert info.registered_model_version == 1
        np.save(tmp_path / f"{kind}_in.npy", inputs[kind])
    tracker.finish()

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path), uri], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    # galray ran from the copy inside the MLflow model, and nothing of Ray or training came in
    assert "/artifacts/code/galray/" in info["galray_file"], info["galray_file"]
    assert info["heavy"] == [], info["heavy"]
    for kind in ("sae", "vqvae", "prior", "encoder"):
        assert info[kind]["example"], kind
    assert "float32" in info["sae"]["inputs"] and f"(-1, {D})" in info["sae"]["inputs"]
    assert "int64" in info["vqvae"]["outputs"] and "(-1, 4, 4)" in info["vqvae"]["outputs"]

    with torch.no_grad():
        want = {"sae": sae.encode(torch.from_numpy(inputs["sae"])).numpy(),
                "vqvae": vq.encode_indices(pixels_to_model(torch.from_numpy(inputs["vqvae"]))).numpy(),
                "encoder": enc.embed(torch.from_numpy(inputs["encoder"])).numpy(),
                "prior": sample(prior, torch.tensor([0, 2, 3, 1]), SamplingConfig(),
                                generator=torch.Generator().manual_seed(7)).numpy()}
    for kind, ref in want.items():
        got = np.load(tmp_path / f"{kind}_out.npy")
        assert got.shape == ref.shape, kind
        np.testing.assert_array_equal(got, ref, err_msg=kind)
    assert (want["sae"] > 0).any() and len(np.unique(want["vqvae"])) > 1

    run = client.get_run(tracker.run_id)
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and len(tags["mlflow.source.git.commit"]) == 40
    (ds,) = run.inputs.dataset_inputs
    assert json.loads(ds.dataset.profile) == {"num_rows": 1234}
    assert json.loads(ds.dataset.source)["uri"] == (tmp_path / "embeddings").as_uri()
    artifacts = [f.path for f in client.list_artifacts(tracker.run_id)]
    assert not any("train_state" in a for a in artifacts)


# --- SAELens ------------------------------------------------------------------------------------------

def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_saelens_loads_the_export_with_galray_threshold_codes_reconstructions_and_fvu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens", reason="pip install -e '.[peers]' (SAELens)")
    sae, x = _sae(seed=1)
    save_model(sae, tmp_path / "ckpt")
    ids = np.array([f"g{i:05d}" for i in range(len(x))], dtype=object)
    fs, root = arrow_filesystem(str(tmp_path / "emb"))
    for s, part in enumerate(np.array_split(np.arange(len(x)), 2)):
        write_table(embedding_table(ids[part], x[part].numpy(), {"embedding_dim": D}), fs, f"{root}/{shard_name(s)}")

    summary = export(ExportJob(kind="sae", checkpoint=str(tmp_path / "ckpt"), format="saelens",
                               output=str(tmp_path / "saelens"), input=str(tmp_path / "emb"), max_rows=1500))
    assert summary.files == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    assert summary.sparsity_rows == 1500

    loaded = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    assert type(loaded).__name__ == "JumpReLUSAE"
    xe = x[:1000]
    with torch.no_grad():
        ref_codes = sae.encode(xe, mode="threshold")
        ref_recon = sae.decode(ref_codes)
        codes = loaded.encode(xe)
        recon = loaded.decode(codes)
    assert 0 < float((ref_codes > 0).sum(1).float().mean()) < sae.cfg.n_latents / 2
    # float32 weights: a latent within rounding of the threshold may flip; none did here, and values agree
    assert int(((codes > 0) != (ref_codes > 0)).sum()) == 0
    torch.testing.assert_close(codes, ref_codes, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(recon, ref_recon, atol=5e-5, rtol=1e-5)
    assert abs(_fvu(xe, recon) - _fvu(xe, ref_recon)) < 1e-6
    # galray's own FVU (in its normalised space) from SAELens's reconstruction
    galray_fvu = evaluate_sae(sae, xe, mode="threshold")["fvu"]
    assert abs(_fvu(sae.normalize(xe), sae.normalize(recon)) - galray_fvu) < 1e-5

    with torch.no_grad():
        freq = (sae.encode(x[:1500], mode="threshold") > 0).double().mean(0)
    sparsity = load_file(str(tmp_path / "saelens" / "sparsity.safetensors"))["sparsity"]
    torch.testing.assert_close(sparsity, torch.log10(freq + 1e-10).float())


# --- Hugging Face hub layout -----------------------------------------------------------------------------

def _embed(store: Path, out: Path, *model_args: str) -> dict[str, np.ndarray]:
    assert galray_main(["embed", "--input", str(store), "--output", str(out), *model_args, "--batch-size", "4",
                        "--actors", "1", "--no-tracking"]) == 0
    ids, emb, _ = read_embeddings(str(out))
    return dict(zip(ids, emb))


def test_hub_layout_exports_round_trip_through_galray_embed(tmp_path, ray_session):
    timm = pytest.importorskip("timm")
    spec = ImageSpec(shape=(32, 32, 3), bands=("g", "r", "z"))
    rng = np.random.default_rng(0)
    fs, root = arrow_filesystem(str(tmp_path / "cutouts"))
    ids = np.array([f"obj-{i:03d}" for i in range(6)], dtype=object)
    write_table(make_table({"object_id": ids, "image": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)}, spec),
                fs, f"{root}/{shard_name(0)}")

    # timm encoder: `galray embed --model NAME --weights FILE` and `--model local-dir:EXPORT`
    enc = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    summary = export(ExportJob(kind="encoder", checkpoint=str(tmp_path / "enc.safetensors"), model="test_convnext",
                               format="hf", output=str(tmp_path / "enc-hf")))
    assert summary.files == ["README.md", "config.json", "model.safetensors"]
    a = _embed(tmp_path / "cutouts", tmp_path / "e-enc", "--model", "test_convnext", "--weights",
               str(tmp_path / "enc.safetensors"), "--input-size", "32")
    b = _embed(tmp_path / "cutouts", tmp_path / "e-enc-hf", "--model", f"local-dir:{tmp_path / 'enc-hf'}",
               "--input-size", "32")
    assert sorted(a) == sorted(b) == list(ids)
    for i in ids:
        np.testing.assert_array_equal(a[i], b[i])
    assert not np.allclose(a[ids[0]], a[ids[1]])
    # timm's own loaders read the folder too
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc.eval()(x)
        by_dir = timm.create_model(f"local-dir:{tmp_path / 'enc-hf'}", pretrained=True, num_classes=0).eval()(x)
        by_overlay = timm.create_model("test_convnext", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(
            file=str(tmp_path / "enc-hf" / "model.safetensors"))).eval()(x)
    torch.testing.assert_close(by_dir, ref, atol=0, rtol=0)
    torch.testing.assert_close(by_overlay, ref, atol=0, rtol=0)


def test_vqvae_hub_export_is_the_same_embed_backbone_with_a_model_card(tmp_path):
    save_model(_tiny_vqvae(), tmp_path / "ckpt")
    summary = export(ExportJob(kind="vqvae", checkpoint=str(tmp_path / "ckpt"), format="hf",
                               output=str(tmp_path / "hf")))
    assert summary.files == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: galray") and '"codebook_size": 16' in card
    # what `galray embed` builds for vqvae:CKPT and for local-dir:EXPORT
    orig = create_backbone(BackboneConfig(f"vqvae:{tmp_path / 'ckpt'}"))
    hub = create_backbone(BackboneConfig(f"local-dir:{tmp_path / 'hf'}"))
    assert hub.preprocessing == orig.preprocessing and hub.weights_id == orig.weights_id
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        want = orig.model(to_model_input(x, orig.preprocessing))
        got = hub.model(to_model_input(x, hub.preprocessing))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.allclose(want[0], want[1])
