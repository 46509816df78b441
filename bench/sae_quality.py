"""SAE quality benchmark: PCA vs the wu2025 preset vs the galray preset on one planted embedding set.

Run from the repo root:  python3 bench/sae_quality.py --quick --json OUT.json

One train/held-out split of planted-dictionary embeddings at d=640 (Zipf-distributed feature
frequencies, more features than latents). All three methods are fitted on the training split and
scored on the held-out split, normalised with the training statistics:
- PCA with k components (scikit-learn), the linear baseline at equal L0;
- the wu2025 preset (Wu & Walmsley 2025 recipe: AdamW 1e-4, L1, their AuxK, BatchTopK inference);
- the galray preset (threshold inference, no L1, Adam + warmup/decay, AuxK, gather kernels).
Both SAEs get the same width, k and number of training steps. Training throughput is measured on
the same machine in the same run, with the two SAEs trained in alternating chunks so load from other
processes hits both alike.

Writes one flat JSON object: fvu_pca, fvu_wu2025, fvu_galray, dead_frac_wu2025, dead_frac_galray,
l0_threshold_galray, k, samples_per_s_wu2025, samples_per_s_galray, fvu_prefix_galray.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import numpy as np
import torch
from sklearn.decomposition import PCA

from galray.models.sae import SparseAutoencoder, evaluate_sae, planted_dictionary, sae_preset
from galray.train.loop import set_lr
from galray.train.sae_loop import lr_at, make_optimizer, sae_train_preset, train_step


def fvu_pca(x_train: np.ndarray, x_test: np.ndarray, k: int, seed: int) -> float:
    pca = PCA(n_components=k, random_state=seed).fit(x_train)
    recon = pca.inverse_transform(pca.transform(x_test))
    return float(((x_test - recon) ** 2).sum() / ((x_test - x_test.mean(0)) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budget (under 3 minutes on 2 cores)")
    ap.add_argument("--json", type=str, default=None, help="write the JSON figures here")
    ap.add_argument("--steps", type=int, default=None, help="training steps per SAE (overrides the mode)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 2 if args.quick else 64)))
    d, n_features, k_active = 640, 4096, 32
    n_train, n_test = (24_576, 4096) if args.quick else (200_000, 20_000)
    steps = args.steps or (300 if args.quick else 20_000)
    chunk = 40  # steps per alternation between the two SAEs

    t0 = time.perf_counter()
    x, _ = planted_dictionary(n_train + n_test, d, n_features, k_active, noise=0.01, zipf=1.0,
                              seed=args.seed, frame="gaussian")
    x_train, x_test = x[:n_train], x[n_train:]

    runs = {}
    for name in ("wu2025", "galray"):
        cfg = sae_preset(name, d, seed=args.seed)
        tcfg = sae_train_preset(name, steps=steps, seed=args.seed)
        # Scale "dead" to the budget alike for both (their 256 batches would exceed a quick run).
        cfg = replace(cfg, dead_after_samples=min(cfg.dead_after_samples, steps * tcfg.batch_size // 8))
        model = SparseAutoencoder(cfg)
        model.fit_normalization(x_train)
        model.init_from_sample(x_train[:8192])
        opt = make_optimizer(model, tcfg)
        runs[name] = {"model": model, "tcfg": tcfg, "opt": opt,
                      "gen": torch.Generator().manual_seed(args.seed), "time": 0.0, "samples": 0}
    k = runs["galray"]["model"].cfg.k
    assert runs["wu2025"]["model"].cfg.k == k and runs["wu2025"]["model"].cfg.n_latents == \
        runs["galray"]["model"].cfg.n_latents, "presets must compare at equal k and width"

    # PCA in the same normalised space the SAEs are scored in (training statistics).
    norm = runs["galray"]["model"]
    with torch.no_grad():
        xn_train, xn_test = norm.normalize(x_train).numpy(), norm.normalize(x_test).numpy()
    fvu_p = fvu_pca(xn_train, xn_test, k, args.seed)

    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for r in runs.values():
            model, tcfg = r["model"], r["tcfg"]
            model.train()
            idx = torch.randint(0, n_train, (n, tcfg.batch_size), generator=r["gen"])
            t = time.perf_counter()
            for i in range(n):
                set_lr(r["opt"], lr_at(done + i, tcfg))
                train_step(model, r["opt"], {"x": x_train[idx[i]]}, tcfg)
            r["time"] += time.perf_counter() - t
            r["samples"] += n * tcfg.batch_size
        done += n

    evals = {}
    for name, r in runs.items():
        r["model"].eval()
        # Each preset is scored with its own inference mode (wu2025: BatchTopK at batch 256).
        evals[name] = evaluate_sae(r["model"], x_test, batch_size=256)
    g_batch = evaluate_sae(runs["galray"]["model"], x_test, batch_size=256, mode="batchtopk")

    out = {
        "fvu_pca": fvu_p,
        "fvu_wu2025": evals["wu2025"]["fvu"],
        "fvu_galray": evals["galray"]["fvu"],
        "dead_frac_wu2025": evals["wu2025"]["dead_frac"],
        "dead_frac_galray": evals["galray"]["dead_frac"],
        "l0_threshold_galray": evals["galray"]["l0_mean"],
        "k": k,
        "samples_per_s_wu2025": runs["wu2025"]["samples"] / runs["wu2025"]["time"],
        "samples_per_s_galray": runs["galray"]["samples"] / runs["galray"]["time"],
        "fvu_prefix_galray": evals["galray"]["fvu_prefix"],
    }
    print(f"# {steps} steps x batch 256 per SAE, {n_train} train / {n_test} held-out, d={d}, "
          f"{n_features} planted features, {k_active} active; galray BatchTopK-inference FVU "
          f"{g_batch['fvu']:.4f}; throughput ratio galray/wu2025 "
          f"{out['samples_per_s_galray'] / out['samples_per_s_wu2025']:.2f}; "
          f"wall {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    text = json.dumps(out)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
