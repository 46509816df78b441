"""Codebook use of galray's vector quantizer vs vector-quantize-pytorch's VectorQuantize.

One run on a simulated survey (>= 5k cutouts, 64 px): the same encoder/decoder (same initial
weights, same batches, same steps, same CPU budget) is trained twice, once with galray's
quantizer (EMA, k-means init, dead-code restarts) and once with ``VectorQuantize`` at its
default settings, as the reference blog used it. Both are then evaluated on held-out cutouts.

    python3 bench/vq_codebook.py --quick --json OUT.json

Keys: codebook_size, utilisation_galray, perplexity_galray, mse_galray, utilisation_peer,
perplexity_peer, mse_peer. Target at 1024 codes: utilisation >= 0.95 and perplexity >= 700 at
MSE <= the peer's. Cutouts come from galray.data.galsim_survey.render_batch when importable, else from
a small Sersic-blob generator below; they are cached under /tmp for reruns.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn
import torch.nn.functional as F

from galray.models.codebook_metrics import CodebookMetrics
from galray.models.vqvae import VQVAE, VQVAEConfig, pixels_to_model


# ---- data ---------------------------------------------------------------------------------------
def _render_chunk(args: tuple[list[int], object]) -> np.ndarray:
    from galray.data.galsim_survey import render_batch

    indices, cfg = args
    return render_batch(indices, cfg)["image"]


def _simulated(n: int, size: int, seed: int, workers: int) -> np.ndarray | None:
    """Cutouts from galray's GalSim survey simulator, or None if it is not importable."""
    try:
        from galray.data.galsim_survey import SimConfig
    except ImportError:
        return None
    cfg = SimConfig(size=size, seed=seed)
    chunks = [(list(range(s, min(s + 250, n))), cfg) for s in range(0, n, 250)]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            return np.concatenate(pool.map(_render_chunk, chunks))
    return np.concatenate([_render_chunk(c) for c in chunks])


def _sersic_blobs(n: int, size: int, seed: int) -> np.ndarray:
    """Fallback survey: 1-3 Sersic-profile galaxies per cutout (random index, radius, shape,
    colour), a few point sources, sky noise, arcsinh stretch to uint8 (N, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((size, size, 3), np.float32)
        n_gal = rng.choice([1, 1, 2, 3])
        for g in range(n_gal):
            centre = size / 2 + (rng.normal(0, 1.5, 2) if g == 0 else rng.uniform(-size / 2.5, size / 2.5, 2))
            r_e = rng.uniform(1.5, size / 6) * (1.0 if g == 0 else 0.5)
            sersic_n = rng.uniform(0.5, 4.0)
            b_n = 2 * sersic_n - 1 / 3
            q = rng.uniform(0.3, 1.0)
            phi = rng.uniform(0, np.pi)
            dx, dy = xx - centre[0], yy - centre[1]
            u = dx * np.cos(phi) + dy * np.sin(phi)
            v = (-dx * np.sin(phi) + dy * np.cos(phi)) / q
            r = np.sqrt(u**2 + v**2) + 1e-3
            profile = np.exp(-b_n * ((r / r_e) ** (1 / sersic_n) - 1))
            if rng.random() < 0.4:  # spiral-ish arms modulate discs
                theta = np.arctan2(v, u)
                arms = 1 + 0.6 * np.cos(2 * theta - 2.5 * np.log(r + 1) + rng.uniform(0, 2 * np.pi))
                profile = profile * np.where(r > r_e * 0.5, arms, 1.0)
            colour = rng.dirichlet([3, 3, 3]) * 3 * (1.3 if sersic_n > 2 else 1.0)
            flux = 10 ** rng.uniform(0.5, 2.0) / (r_e**2)
            img += flux * profile[..., None] * colour[None, None, :] * 0.2
        for _ in range(rng.poisson(1.0)):  # stars
            sx, sy = rng.uniform(0, size, 2)
            img += 10 ** rng.uniform(0, 1.5) * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / 1.5)[..., None]
        img += rng.normal(0, 0.05, img.shape).astype(np.float32)
        stretched = np.arcsinh(img / 0.1) / np.arcsinh(100.0 / 0.1 / 2)
        out[i] = np.clip(stretched * 255, 0, 255).astype(np.uint8)
    return out


def load_cutouts(n: int, size: int, seed: int = 0, workers: int = 2) -> tuple[np.ndarray, str]:
    """(N, size, size, 3) uint8 cutouts and their source ("simulate" or the "sersic" fallback),
    cached as .npy under /tmp for reruns."""
    try:
        import galray.data.galsim_survey  # noqa: F401

        source = "simulate"
    except ImportError:
        source = "sersic"
    path = Path(f"/tmp/galray_vq_bench_{source}_{n}_{size}_{seed}.npy")
    if path.exists():
        return np.load(path), source
    images = _simulated(n, size, seed, workers) if source == "simulate" else _sersic_blobs(n, size, seed)
    np.save(path, images)
    return images, source


# ---- the peer: the same encoder/decoder around vector-quantize-pytorch ---------------------------
class PeerVQVAE(nn.Module):
    """galray's encoder/decoder (copied weights) with ``VectorQuantize(dim, codebook_size)``."""

    def __init__(self, base: VQVAE):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.encoder = copy.deepcopy(base.encoder)
        self.decoder = copy.deepcopy(base.decoder)
        self.vq = VectorQuantize(dim=base.cfg.code_dim, codebook_size=base.cfg.codebook_size)
        self.latent_size = base.cfg.latent_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = rearrange(self.encoder(x), "b d h w -> b (h w) d")
        q, idx, commit = self.vq(z)
        q = rearrange(q, "b (h w) d -> b d h w", h=self.latent_size)
        x_hat = self.decoder(q)
        loss = F.mse_loss(x_hat, x) + commit.sum()
        return x_hat, rearrange(idx, "b (h w) -> b h w", h=self.latent_size), loss


def train_and_eval(model: nn.Module, forward, train_x: torch.Tensor, val_x: torch.Tensor, steps: int, batch: int, lr: float, seed: int, K: int) -> dict[str, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)  # the same batches for both quantizers
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, train_x.shape[0], (batch,), generator=gen)
        x = pixels_to_model(rearrange(torch.as_tensor(train_x[idx]), "b h w c -> b c h w"))
        _, _, loss = forward(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    metrics = CodebookMetrics(K)
    with torch.no_grad():
        for s in range(0, val_x.shape[0], 256):
            x = pixels_to_model(rearrange(torch.as_tensor(val_x[s : s + 256]), "b h w c -> b c h w"))
            x_hat, indices, _ = forward(model, x)
            metrics.update(indices, x=x, x_hat=x_hat)
    r = metrics.compute()
    return {"utilisation": r.utilisation, "perplexity": r.perplexity, "perplexity_fg": r.perplexity_foreground,
            "mse": r.mse, "train_s": train_s, "background_share": r.background_share}


def galray_forward(model: VQVAE, x: torch.Tensor):
    out = model(x)
    return out.x_hat, out.indices, out.loss


def peer_forward(model: PeerVQVAE, x: torch.Tensor):
    return model(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small budget (< 3 min on 2 cores)")
    ap.add_argument("--json", type=str, default=None, help="write the figures here")
    ap.add_argument("--n", type=int, default=5000, help="cutouts in the simulated survey")
    ap.add_argument("--size", type=int, default=64, help="cutout size in pixels")
    ap.add_argument("--steps", type=int, default=None, help="training steps per quantizer")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the fixed CPU budget)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = args.steps or (200 if args.quick else 2000)
    batch, lr, seed, K = 32, 1e-3, 0, 1024

    t0 = time.perf_counter()
    images, source = load_cutouts(args.n, args.size, workers=args.threads)
    n_val = max(args.n // 10, 256)
    train_x, val_x = torch.from_numpy(images[n_val:]), torch.from_numpy(images[:n_val])
    data_s = time.perf_counter() - t0

    # A small model for the CPU budget (64 px, 16x16 grid, narrow channels). galray's quantizer
    # with factorised l2-normalised 16-d codes; EMA decay 0.9 because the run is short (200 steps).
    cfg = VQVAEConfig(
        image_size=args.size, channels=(16, 32), latent_size=16, code_dim=64, codebook_size=K,
        factorized_dim=16, ema_decay=0.9, dead_code_fraction=0.5, restart_sampling="uniform",
    )
    torch.manual_seed(seed)
    ours = VQVAE(cfg)
    peer = PeerVQVAE(ours)  # same initial encoder/decoder weights
    r_ours = train_and_eval(ours, galray_forward, train_x, val_x, steps, batch, lr, seed, K)
    r_peer = train_and_eval(peer, peer_forward, train_x, val_x, steps, batch, lr, seed, K)

    result = {
        "codebook_size": K,
        "utilisation_galray": r_ours["utilisation"],
        "perplexity_galray": r_ours["perplexity"],
        "mse_galray": r_ours["mse"],
        "utilisation_peer": r_peer["utilisation"],
        "perplexity_peer": r_peer["perplexity"],
        "mse_peer": r_peer["mse"],
    }
    print(
        f"# data={source} n={args.n} size={args.size} steps={steps} batch={batch} data_s={data_s:.1f} "
        f"train_s galray={r_ours['train_s']:.1f} peer={r_peer['train_s']:.1f} "
        f"fg_perplexity galray={r_ours['perplexity_fg']:.1f} peer={r_peer['perplexity_fg']:.1f} "
        f"background_share={r_ours['background_share']:.2f} total_s={time.perf_counter() - t0:.1f}"
    )
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
