"""SAE quality: PCA, the wu2025 recipe, a library peer (SAELens) and the galray preset, on two inputs.

Run from the repo root:  python3 bench/sae_quality.py --quick --json OUT.json

Inputs (each split once into training and held-out rows; every method is fitted on the training rows
and scored on the held-out rows, in the z-scored space of the training statistics):
1. ``planted``: planted-dictionary embeddings at d=640 (Zipf feature frequencies, more features than
   latents), the synthetic kind the galray preset was tuned on;
2. ``real``: embeddings made by ``galray embed`` (timm convnext_nano, random init: hub downloads are
   not available here; 64 px) over real galaxies (the gz-examples development set, when present) and
   simulated cutouts (galray.data.galsim_survey), cached under /tmp for reruns.

Methods, all at the same width and k, trained on the same rows for the same number of epochs at batch
256 (so the same number of steps; quick: 3 epochs of the planted rows, 30 of the real ones):
- PCA with k components (scikit-learn), the linear baseline at equal L0;
- wu2025 (Wu & Walmsley 2025): AdamW 1e-4, L1, their AuxK, with its recipe's cosine schedule to lr/10
  spanning the whole run;
- the library peer, SAELens (``sae-lens``) ``MatryoshkaBatchTopKTrainingSAE`` with the same nested
  widths, driven by its public ``SAETrainer`` with its documented defaults (Adam lr 3e-4 decayed to
  lr/10 over the last 20% of steps, as SAELens's published baselines) and ``dead_feature_window``
  scaled to the run like the galray presets' dead-latent window (1/8 of the run);
- the galray preset (Adam + warmup/decay, AuxK, gather kernels).

Every SAE is scored with the same two inference rules: BatchTopK over held-out batches of 256, and a
batch-independent threshold (galray and wu2025: the threshold calibrated at the end of training on the
validation split, 10% of the fitting rows held back from training, as a `galray train` run's last
checkpoint is; SAELens: its own JumpReLU export, whose threshold is the running estimate its trainer
keeps). The headline ``fvu_<method>`` is the threshold rule's.

Keys (one flat JSON object; ``peer_library`` is the peer's name and version, the one string):
fvu_pca, fvu_wu2025, fvu_peer_library, fvu_galray; fvu_batchtopk_<sae>; dead_frac_<sae> (latents that
never fire on the held-out rows, threshold rule); l0_threshold_<sae>; fvu_first_group_galray; k; epochs,
steps; samples_per_s_wu2025, samples_per_s_galray (training throughput, alternating chunks so load from
other processes hits both alike); and the same with the suffix ``_real`` for the real embeddings.

Measured 2026-12-01, session 6 (--quick, a quiet 2-core machine, sae-lens 6.54.12; k = 64, width 2048;
notes/15-s6-sae_quality.json):
- planted (22,119 training rows, 3 epochs = 259 steps): FVU galray 0.201, wu2025 0.378, SAELens 0.638,
  PCA 0.604; threshold L0 galray 64.2 (+0.2% of k), wu2025 63.8, SAELens 104.8; dead fraction 0, 0, 0.061.
- real (3,630 embeddings: 630 gz-examples and 3,000 simulated; 30 epochs = 319 steps): FVU PCA 0.267,
  galray 0.272, SAELens 0.338, wu2025 0.380; threshold L0 galray 63.3 (-1.2% of k); dead fraction galray
  0.002, SAELens 0.439.
- ``l0_threshold_train_calibrated_<sae>``: the threshold set on the last training rows instead (the rule of
  ``sae_loop.train``): galray 71.5 planted, 78.4 real (+22%: after 30 passes the model has learnt its
  training rows, and unseen ones cross that threshold more often), which is why a run's end uses held-out
  rows. Before that change (session 5, calibrated on training rows, all fitting rows trained on): FVU galray
  0.198 planted, 0.262 real, L0 69.7 and 77.3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

# SAELens's trainer draws a tqdm bar on stdout; tqdm reads its TQDM_* settings when it is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch
from sklearn.decomposition import PCA

from galray.models.sae import SparseAutoencoder, evaluate_sae, planted_dictionary, sae_preset
from galray.train.loop import set_lr
from galray.train.sae_loop import CALIBRATION_ROWS, lr_at, make_optimizer, sae_train_preset, train_step

BATCH = 256
REAL_SIZE = 64


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The definition evaluate_sae uses: sum of squared errors over the sum of squares about the mean."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def fvu_pca(x_train: np.ndarray, x_test: np.ndarray, k: int, seed: int) -> float:
    pca = PCA(n_components=k, random_state=seed).fit(x_train)
    return fvu(torch.from_numpy(x_test), torch.from_numpy(pca.inverse_transform(pca.transform(x_test))))


# --- the library peer -------------------------------------------------------------------------------

def saelens_peer(xn_train: torch.Tensor, xn_test: torch.Tensor, groups: tuple[int, ...], k: int, steps: int,
                 seed: int) -> dict[str, float]:
    """SAELens's Matryoshka BatchTopK SAE on the z-scored rows, through its public trainer; scored with
    BatchTopK (its training SAE) and with its JumpReLU inference export."""
    from sae_lens import SAE, MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig, SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    def batches():  # SAETrainer's data provider is any Iterator[Tensor]: shuffled epochs of full batches
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(xn_train), generator=g).split(BATCH):
                if len(idx) == BATCH:
                    yield xn_train[idx]

    torch.manual_seed(seed)
    sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=xn_train.shape[1], d_sae=sum(groups), k=k, matryoshka_widths=[int(w) for w in np.cumsum(groups)]))
    lr = 3e-4  # SAETrainerConfig's default; lr_end must be given outside its LM runner
    cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=lr, lr_end=lr / 10,
                           lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=steps // 5, device="cpu",
                           dead_feature_window=max(1, steps // 8), feature_sampling_window=10 ** 9,
                           logger=LoggingConfig(log_to_wandb=False))
    t0 = time.perf_counter()
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches()).fit()
    train_s = time.perf_counter() - t0
    sae.eval()
    with torch.no_grad():
        x_hat_btk = torch.cat([sae.decode(sae.encode(xn_test[i:i + BATCH])) for i in range(0, len(xn_test), BATCH)])
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inf = SAE.load_from_disk(tmp, device="cpu")
        with torch.no_grad():
            codes = inf.encode(xn_test)
            x_hat_thr = inf.decode(codes)
    active = codes > 0
    return {"fvu": fvu(xn_test, x_hat_thr), "fvu_batchtopk": fvu(xn_test, x_hat_btk),
            "dead_frac": float((~active.any(0)).float().mean()), "l0_threshold": float(active.sum(1).float().mean()),
            "samples_per_s": steps * BATCH / train_s}


# --- one input --------------------------------------------------------------------------------------

VAL_FRACTION = 0.1
"""Training rows held back as the validation split, as ``galray train`` does (``val_fraction``): the
threshold is calibrated on them at the end of training (galray.train.workers)."""


def compare(x_fit: torch.Tensor, x_test: torch.Tensor, steps: int, seed: int) -> dict[str, float]:
    """Every method on one input; keys without the input's suffix. ``x_fit`` is split into the training
    rows every method is fitted on and a validation split (``VAL_FRACTION``); scores are on ``x_test``."""
    n_val = max(1, int(len(x_fit) * VAL_FRACTION))
    x_train, x_val = x_fit[n_val:], x_fit[:n_val]
    d = x_train.shape[1]
    runs = {}
    for name in ("wu2025", "galray"):
        cfg = sae_preset(name, d, seed=seed)
        tcfg = sae_train_preset(name, steps=steps, seed=seed, batch_size=BATCH)
        # "Dead" scaled to the budget alike for both (their 256 batches would exceed a quick run).
        cfg = replace(cfg, dead_after_samples=min(cfg.dead_after_samples, steps * BATCH // 8))
        torch.manual_seed(seed)
        model = SparseAutoencoder(cfg)
        model.fit_normalization(x_train)
        model.init_from_sample(x_train[:8192])
        runs[name] = {"model": model, "tcfg": tcfg, "opt": make_optimizer(model, tcfg),
                      "gen": torch.Generator().manual_seed(seed), "time": 0.0, "samples": 0}
    galray = runs["galray"]["model"]
    k, groups = galray.cfg.k, galray.cfg.group_sizes
    assert runs["wu2025"]["model"].cfg.k == k and runs["wu2025"]["model"].cfg.group_sizes == groups, \
        "the presets must compare at equal k and nesting"

    with torch.no_grad():
        xn_train, xn_test = galray.normalize(x_train), galray.normalize(x_test)
    out = {"fvu_pca": fvu_pca(xn_train.numpy(), xn_test.numpy(), k, seed)}

    # Both galray-code SAEs in alternating chunks of the same shuffled epochs.
    n_train, done, chunk = x_train.shape[0], 0, 40
    perms = {name: torch.randperm(n_train, generator=r["gen"]) for name, r in runs.items()}
    while done < steps:
        n = min(chunk, steps - done)
        for name, r in runs.items():
            model, tcfg = r["model"], r["tcfg"]
            model.train()
            t = time.perf_counter()
            for i in range(done, done + n):
                start = (i * BATCH) % (n_train - n_train % BATCH)
                if start == 0 and i > 0:
                    perms[name] = torch.randperm(n_train, generator=r["gen"])
                set_lr(r["opt"], lr_at(i, tcfg))
                train_step(model, r["opt"], {"x": x_train[perms[name][start:start + BATCH]]}, tcfg)
            r["time"] += time.perf_counter() - t
            r["samples"] += n * BATCH
        done += n

    for name, r in runs.items():
        model = r["model"]
        # The rule of galray.train.sae_loop.train (the last training rows), reported beside the rule of a
        # Ray Train run's end (galray.train.workers: the validation split), which the headline uses.
        model.calibrate_threshold(x_train[perms[name][-CALIBRATION_ROWS:]])
        out[f"l0_threshold_train_calibrated_{name}"] = evaluate_sae(model, x_test, batch_size=BATCH,
                                                                     mode="threshold")["l0_mean"]
        model.calibrate_threshold(x_val[:CALIBRATION_ROWS])
        thr = evaluate_sae(model, x_test, batch_size=BATCH, mode="threshold")
        btk = evaluate_sae(model, x_test, batch_size=BATCH, mode="batchtopk")
        out.update({f"fvu_{name}": thr["fvu"], f"fvu_batchtopk_{name}": btk["fvu"], f"dead_frac_{name}": thr["dead_frac"],
                    f"l0_threshold_{name}": thr["l0_mean"], f"samples_per_s_{name}": r["samples"] / r["time"]})
        if name == "galray":
            out["fvu_first_group_galray"] = thr["fvu_prefix"][0]
    peer = saelens_peer(xn_train, xn_test, groups, k, steps, seed)
    out.update({f"{key}_peer_library" if key != "fvu" else "fvu_peer_library": v for key, v in peer.items()})
    out.update({"k": k, "steps": steps, "epochs": steps * BATCH / n_train})
    return out


# --- the real embeddings ----------------------------------------------------------------------------

def real_embeddings(n_sim: int, gz_examples: Path | None, seed: int) -> np.ndarray:
    """convnext_nano embeddings made by `galray embed` of gz-examples (if present) and simulated cutouts."""
    cache = Path(f"/tmp/galray_sae_bench_real_{n_sim}_{int(gz_examples is not None)}_{seed}.npy")
    if cache.exists():
        return np.load(cache)
    from galray.data.formats import CutoutPolicy
    from galray.data.galsim_survey import SimConfig, render_batch
    from galray.data.shards import ImageSpec, make_table, shard_name, write_table
    from galray.data.stores import read_embeddings
    from galray.models.backbone_config import BackboneConfig
    from galray.session import ensure_ray
    from galray.stages.embed import EmbedJob, embed_store
    from galray.stages.ingest import IngestJob, ingest
    from galray.storage import arrow_filesystem
    from galray.tracking import TrackingConfig

    ensure_ray(num_cpus=2)
    parts = []
    with tempfile.TemporaryDirectory(prefix="galray-sae-bench-") as tmp:
        stores = []
        sim = Path(tmp) / "sim"
        fs, root = arrow_filesystem(str(sim))
        for s, start in enumerate(range(0, n_sim, 500)):
            b = render_batch(range(start, min(start + 500, n_sim)), SimConfig(size=REAL_SIZE, seed=seed))
            write_table(make_table({"object_id": b["object_id"], "image": b["image"]}, ImageSpec(shape=(REAL_SIZE, REAL_SIZE, 3))),
                        fs, f"{root}/{shard_name(s)}")
        stores.append(sim)
        if gz_examples is not None:
            ingest(IngestJob(format="images", input=str(gz_examples / "images"), output=str(Path(tmp) / "gz"),
                             cutout=CutoutPolicy(size=REAL_SIZE)))
            stores.append(Path(tmp) / "gz")
        for store in stores:
            out = Path(tmp) / f"emb-{store.name}"
            embed_store(EmbedJob(input=str(store), output=str(out), batch_size=64,
                                 backbone=BackboneConfig("convnext_nano", pretrained=False, input_size=REAL_SIZE),
                                 tracking=TrackingConfig(enabled=False)))
            parts.append(read_embeddings(str(out))[1])
    x = np.concatenate(parts).astype(np.float32)
    np.save(cache, x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budget (about 3 minutes on 2 cores, cached embeddings)")
    ap.add_argument("--json", type=str, default=None, help="write the JSON figures here")
    ap.add_argument("--epochs", type=float, default=None, help="training epochs of each SAE on the planted input")
    ap.add_argument("--epochs-real", type=float, default=None, help="training epochs of each SAE on the real embeddings")
    ap.add_argument("--gz-examples", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/gz-examples",
                    help="the gz-examples folder (real galaxies); skipped when missing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2 if args.quick else 64)))
    t0 = time.perf_counter()
    n_train, n_test = (24_576, 4096) if args.quick else (200_000, 20_000)
    epochs = args.epochs or (3.0 if args.quick else 25.0)
    x, _ = planted_dictionary(n_train + n_test, 640, 4096, 32, noise=0.01, zipf=1.0, seed=args.seed, frame="gaussian")
    out = compare(x[:n_train], x[n_train:], max(1, int(epochs * n_train * (1 - VAL_FRACTION) / BATCH)), args.seed)

    gz = args.gz_examples if (args.gz_examples / "images").is_dir() else None
    real = torch.from_numpy(real_embeddings(3000 if args.quick else 20_000, gz, args.seed))
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))
    n_test_real = len(real) // 6
    r_train, r_test = real[perm[n_test_real:]], real[perm[:n_test_real]]
    epochs_real = args.epochs_real or (30.0 if args.quick else 100.0)  # a few thousand rows: more passes
    real_out = compare(r_train, r_test, max(1, int(epochs_real * len(r_train) * (1 - VAL_FRACTION) / BATCH)), args.seed)
    out.update({f"{key}_real": v for key, v in real_out.items()})
    out["rows_real"] = len(real)
    out["real_has_gz_examples"] = int(gz is not None)
    import sae_lens

    out["peer_library"] = f"sae-lens {sae_lens.__version__}"
    print(f"# wall {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = json.dumps(out)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
