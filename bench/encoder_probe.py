"""Does galray's own encoder beat raw pixels? Linear probes of frozen embeddings, baselines in the same run.

    python bench/encoder_probe.py --quick --json encoder_probe.json [--size 64] [--batch 128] [--seeds 3]
        [--gz ../shared/data/gz-examples]

Data, all built here:

- a simulated survey (galray.data.galsim_survey, `galray simulate`): ``n_train`` galaxies used
  *unlabelled* for training, and ``n_probe`` others (indices from 1,000,000) held out for the probes,
  with the simulator's ground truth;
- the real Hubble XDF cutouts (`galray sample xdf`, SEP measurements): a fixed half is used
  unlabelled for training, the other half is held out for the probes;
- optionally the gz-examples development set (real, 7 surveys; ``--gz``), never trained on.

Feature sets, each embedded from the same pixels (``size`` px):

- ``encoder``: `galray train encoder`'s self-supervised loop (galray.train.encoder_loop, SimCLR) on
  simulated + real training cutouts (``real_share`` of each batch real), embedded by
  ``SurveyEncoder.embed`` (what `galray embed --model encoder:CKPT` runs: D4-averaged pooled features);
- ``encoder_realonly``: the same, trained on the real XDF training half only (the sim-to-real check);
- ``random``: the same encoder untrained (random init, same embedding path);
- ``random_peak``: the same, with the first release's input scaling and pooling
  (``normalization: peak``, ``pool: last``), so that changing the encoder's defaults can never
  weaken the random baseline unseen;
- ``pixels_pca``: PCA of the raw pixels, fitted on the same unlabelled training cutouts;
- ``vqvae``: galray's VQ-VAE (galray.train.vqvae_loop) trained on the same unlabelled cutouts,
  embedded by ``VQVAE.embed`` (what `galray embed --model vqvae:CKPT` runs).

Probes (galray.analysis.probes: 5-fold, logistic regression -> AUC, ridge -> R^2):
sim ring vs rest, barred spiral vs rest, edge-on vs rest, axis ratio, bulge fraction, log half-light
radius, arm count (galaxies with arms); XDF SEP axis ratio and log half-light radius; gz smooth vs
featured and edge-on (when ``--gz``). Keys: ``<probe>_<features>``, plus CPU seconds of each part
(getrusage: robust on shared cores) and ``margin_*`` = encoder minus the best baseline.

**Seeds.** Every feature set that is trained or randomly initialised (the encoders, the random
backbones, the VQ-VAE) is built ``--seeds`` times (3 by default) and probed each time; its key is the
mean over seeds and ``<key>_sd`` their standard deviation. On the 256 held-out XDF sources one
seed's figures move by up to 0.13 in R^2 (log size 0.52-0.65 over three seeds at 32 px), more than
most margins, so one seed cannot say which side wins.

**Size.** ``--size`` sets the cutout side. At 32 px (the default) the simulator's spiral arms are not
resolved: ``r2_arm_count_sim_fourier_reference``, a linear probe of hand-made azimuthal Fourier
amplitudes (m = 1..6 in 5 annuli, :func:`azimuthal_fourier`; a reference, not a baseline), is
about 0 there, and 0.1-0.2 at 48-64 px. At 64 px pixel PCA reads the simulated rings well (AUC
about 0.93), so a ring margin of 0.15 cannot be reached there (an AUC is at most 1). Measured
(bench/results/, 3 seeds): at 32 px the encoder beats every baseline on 8 of 11 probes (ring
margin +0.16); at 64 px on 9 of 11, and with ``--batch 128`` on all 11 (ring margin +0.06).

Runs in this process with ``--threads`` torch threads (1 by default: on 2 cores shared with other
work, extra threads mostly spin).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from galray.analysis.probes import probe_auc, probe_r2
from galray.data.cutouts import CropResizeConfig, crop_resize, decode_image
from galray.data.galsim_survey import SimConfig, render_batch
from galray.data.xdf import XDFConfig, xdf_sample
from galray.models.encoder import EncoderConfig, SurveyEncoder, encoder_preset
from galray.models.vqvae import VQVAE, VQVAEConfig, pixels_to_model
from galray.train import encoder_loop, vqvae_loop

PROBE_START = 1_000_000


@dataclass(frozen=True)
class Settings:
    size: int = 32
    n_train: int = 12000
    n_probe: int = 2500
    steps: int = 600
    realonly_steps: int = 300
    batch: int = 128
    real_share: float = 0.1
    vqvae_steps: int = 600
    pca_dim: int = 64
    gz_crop: float = 0.6


QUICK = Settings(n_train=2000, n_probe=1000, steps=300, realonly_steps=150, batch=64, vqvae_steps=300)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Clock:
    """CPU and wall seconds of a block."""

    def __enter__(self) -> "Clock":
        self.c0, self.w0 = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu, self.wall = cpu_seconds() - self.c0, time.perf_counter() - self.w0


# --- data ------------------------------------------------------------------------------------------

def nchw(images_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) on the [0, 1] scale."""
    return torch.from_numpy(np.ascontiguousarray(images_NHWC)).permute(0, 3, 1, 2).float() / 255.0


def load_data(s: Settings, gz: Path | None) -> dict[str, dict[str, np.ndarray]]:
    cfg = SimConfig(size=s.size)
    sim_train = render_batch(list(range(s.n_train)), cfg)
    sim_probe = render_batch(list(range(PROBE_START, PROBE_START + s.n_probe)), cfg)
    xdf = xdf_sample(XDFConfig(size=s.size))
    # A fixed half of the XDF sources (by crc32 of the id, as galray's validation split) is held out.
    held = np.array([zlib.crc32(str(i).encode()) % 2 == 1 for i in xdf["object_id"]])
    data = {"sim_train": sim_train, "sim": sim_probe,
            "xdf_train": {k: v[~held] for k, v in xdf.items()}, "xdf": {k: v[held] for k, v in xdf.items()}}
    if gz is not None:
        import csv

        rows = list(csv.DictReader(open(gz / "catalog.csv")))
        crop = CropResizeConfig(size=s.size, crop_fraction=s.gz_crop)
        images = [crop_resize(decode_image((gz / "images" / f"{r['object_id']}.jpg").read_bytes())[..., :3], crop)
                  for r in rows]
        data["gz"] = {"image": np.stack(images), **{k: np.array([r[k] for r in rows]) for k in ("question", "answer")}}
    return data


def mixed_batches(sim: torch.Tensor, real: torch.Tensor, batch: int, real_share: float, seed: int
                  ) -> "Iterator[dict[str, torch.Tensor]]":
    """Endless random batches, ``real_share`` of each from ``real`` (all real when ``sim`` is empty)."""
    g = torch.Generator().manual_seed(seed)
    n_real = batch if len(sim) == 0 else int(round(batch * real_share))
    while True:
        parts = [real[torch.randint(len(real), (n_real,), generator=g)]]
        if batch > n_real:
            parts.append(sim[torch.randint(len(sim), (batch - n_real,), generator=g)])
        yield {"pixels": torch.cat(parts)}


class Stream:
    """A re-iterable over one shared endless iterator (the loops' ``train`` cycles over re-iterables)."""

    def __init__(self, it: Iterator[dict[str, torch.Tensor]]):
        self.it = it

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.it


# --- feature sets ----------------------------------------------------------------------------------

@torch.no_grad()
def embed_all(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([fn(x[i:i + batch]).float() for i in range(0, len(x), batch)]).numpy()


def train_encoder(s: Settings, sim: torch.Tensor, real: torch.Tensor, steps: int, seed: int = 0) -> tuple[SurveyEncoder, list]:
    torch.manual_seed(seed)
    model = SurveyEncoder(replace(encoder_preset("pico"), image_size=s.size))
    cfg = encoder_loop.EncoderTrainConfig(steps=steps, log_every=max(1, steps // 6), seed=seed)
    hist = encoder_loop.train(model, Stream(mixed_batches(sim, real, s.batch, s.real_share, seed)), cfg,
                              on_log=lambda step, rec: print(f"  step {step} loss {rec['loss']:.3f} "
                                                             f"top1 {rec['top1']:.2f}", flush=True))
    return model.eval(), hist


def train_vqvae(s: Settings, sim: torch.Tensor, real: torch.Tensor, seed: int = 0) -> VQVAE:
    torch.manual_seed(seed)
    # The scale of galray's VQ-VAE experiments on 64 px cutouts, at size / 8 latents.
    model = VQVAE(VQVAEConfig(image_size=s.size, channels=(32, 64, 128), latent_size=s.size // 8, code_dim=64,
                              codebook_size=512, factorized_dim=16))
    cfg = vqvae_loop.VQVAETrainConfig(steps=s.vqvae_steps, lr=1e-3, log_every=max(1, s.vqvae_steps // 3))
    vqvae_loop.train(model, Stream(mixed_batches(sim, real, s.batch, s.real_share, 1 + seed)), cfg,
                     on_log=lambda step, rec: print(f"  step {step} recon {rec['recon_loss']:.4f}", flush=True))
    return model.eval()


def pixel_pca(train: torch.Tensor, sets: dict[str, torch.Tensor], dim: int) -> dict[str, np.ndarray]:
    from sklearn.decomposition import PCA

    pca = PCA(dim, random_state=0).fit(train.flatten(1).numpy())
    return {k: pca.transform(v.flatten(1).numpy()) for k, v in sets.items()}


# --- probes ----------------------------------------------------------------------------------------

def probe_tasks(data: dict[str, dict[str, np.ndarray]]) -> list[tuple[str, str, str, np.ndarray, np.ndarray]]:
    """(key, which set, auc|r2, row mask, target) of every probe."""
    sim, xdf = data["sim"], data["xdf"]
    cls = np.asarray(sim["class_name"]).astype(str)
    gal = cls != "star"
    arms = np.asarray(sim["arm_count"]) > 0
    q, r = np.asarray(xdf["axis_ratio"], float), np.asarray(xdf["half_light_radius"], float)
    ok = np.isfinite(q) & np.isfinite(r) & (r > 0)
    tasks = [
        ("auc_ring_sim", "sim", "auc", np.ones(len(cls), bool), cls == "ring"),
        ("auc_bar_sim", "sim", "auc", np.ones(len(cls), bool), cls == "barred_spiral"),
        ("auc_edge_on_sim", "sim", "auc", np.ones(len(cls), bool), np.char.startswith(cls, "edge_on")),
        ("r2_axis_ratio_sim", "sim", "r2", gal, np.asarray(sim["axis_ratio"], float)),
        ("r2_bulge_fraction_sim", "sim", "r2", gal, np.asarray(sim["bulge_fraction"], float)),
        ("r2_log_size_sim", "sim", "r2", gal, np.log(np.maximum(np.asarray(sim["half_light_radius"], float), 1e-3))),
        ("r2_arm_count_sim", "sim", "r2", arms, np.asarray(sim["arm_count"], float)),
        ("r2_axis_ratio_xdf", "xdf", "r2", ok, q),
        ("r2_log_size_xdf", "xdf", "r2", ok, np.log(np.maximum(r, 1e-3))),
    ]
    if "gz" in data:
        qn, an = data["gz"]["question"], data["gz"]["answer"]
        smooth = (qn == "Round") | ((qn == "Shape") & (an == "Smooth"))
        disk = np.isin(qn, ["Spiral", "Bar"]) | ((qn == "Shape") & np.isin(an, ["Features", "Features or disk"]))
        tasks += [("auc_smooth_vs_disk_gz", "gz", "auc", smooth | disk, disk),
                  ("auc_edge_on_gz", "gz", "auc", qn == "Disk", an == "Yes")]
    return tasks


def run_probes(features: dict[str, dict[str, np.ndarray]], data: dict) -> dict[str, float]:
    out = {}
    for key, which, kind, mask, y in probe_tasks(data):
        for name, sets in features.items():
            if which not in sets:
                continue
            X = sets[which][mask]
            out[f"{key}_{name}"] = round(probe_auc(X, y[mask].astype(int)) if kind == "auc" else probe_r2(X, y[mask]), 4)
    return out


# --- a hand-made reference for the arm count ---------------------------------------------------------

def azimuthal_fourier(images_NHWC: np.ndarray, annuli: int = 5, orders: int = 6) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, annuli * orders) |m-th azimuthal Fourier amplitude| / flux of each annulus
    (m = 1..orders), from the band-summed, sky-subtracted image about its centre: how strongly an
    m-fold pattern (m arms) shows. Not a baseline and not trained: it tells whether the arm count is
    in the pixels at this size at all (a linear probe of it is the ceiling a simple analysis reaches)."""
    img = images_NHWC.astype(np.float64).mean(-1)
    img -= np.median(img.reshape(len(img), -1), 1)[:, None, None]
    n = img.shape[1]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r, theta = np.hypot(xx, yy), np.arctan2(yy, xx)
    edges = np.linspace(1.0, 0.45 * n, annuli + 1) if n >= 8 else np.array([0.0, n])
    out = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        ring = (r >= r0) & (r < r1)
        flux = np.abs(img[:, ring].sum(1)) + 1e-3
        for m in range(1, orders + 1):
            out.append(np.abs((img[:, ring] * np.exp(-1j * m * theta[ring])).sum(1)) / flux)
    return np.array(out).T


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of every key, plus ``<key>_sd`` (standard deviation) when there is more than one seed."""
    out = {}
    for k in per_seed[0]:
        v = np.array([d[k] for d in per_seed], float)
        out[k] = round(float(v.mean()), 4)
        if len(v) > 1:
            out[f"{k}_sd"] = round(float(v.std(ddof=1)), 4)
    return out


# --- main ------------------------------------------------------------------------------------------

BASELINES = ("pixels_pca", "random", "random_peak", "vqvae")


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few CPU minutes a seed: fewer galaxies, steps and probes")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--gz", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/gz-examples",
                    help="gz-examples folder (real galaxies, 7 surveys); probed when present")
    ap.add_argument("--size", type=int, help="cutout side in pixels (default: the settings' own, %d)" % Settings.size)
    ap.add_argument("--batch", type=int, help="cutouts a training step, for every trained feature set "
                                              "(default: the settings' own, %d with --quick)" % QUICK.batch)
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds of every trained or randomly initialised feature set (encoders, random "
                         "backbones, VQ-VAE); figures are means over seeds, with _sd their spread")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else Settings()
    if args.size:
        s = replace(s, size=args.size)
    if args.batch:
        s = replace(s, batch=args.batch)
    gz = args.gz if (args.gz / "catalog.csv").is_file() else None
    out: dict[str, float] = {"quick": float(args.quick), "size": s.size, "seeds": args.seeds, "n_train_sim": s.n_train,
                             "n_probe_sim": s.n_probe, "encoder_steps": s.steps, "batch": s.batch}
    t_all = Clock().__enter__()

    print(f"data: simulate, cut XDF{', read gz-examples' if gz else ''} at {s.size} px", flush=True)
    with Clock() as c:
        data = load_data(s, gz)
    out["cpu_s_data"] = round(c.cpu, 1)
    x = {k: nchw(v["image"]) for k, v in data.items()}
    out["n_xdf_train"], out["n_xdf_probe"] = len(x["xdf_train"]), len(x["xdf"])
    probe_sets = [k for k in ("sim", "xdf", "gz") if k in x]
    cpu: dict[str, float] = {}

    def timed(part: str, fn: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        with Clock() as c:
            result = fn()
        cpu[part] = cpu.get(part, 0.0) + c.cpu
        return result

    def encoder_features(seed: int) -> dict[str, np.ndarray]:
        enc, hist = train_encoder(s, x["sim_train"], x["xdf_train"], s.steps, seed)
        out[f"encoder_loss_last_seed{seed}"] = round(hist[-1]["loss"], 4)
        return {k: embed_all(enc.embed, x[k]) for k in probe_sets}

    def realonly_features(seed: int) -> dict[str, np.ndarray]:
        enc, _ = train_encoder(s, x["sim_train"][:0], x["xdf_train"], s.realonly_steps, seed)
        return {k: embed_all(enc.embed, x[k]) for k in probe_sets if k != "sim"}

    def random_features(seed: int, cfg: EncoderConfig) -> dict[str, np.ndarray]:
        torch.manual_seed(seed)
        rand = SurveyEncoder(cfg).eval()
        return {k: embed_all(rand.embed, x[k]) for k in probe_sets}

    def vqvae_features(seed: int) -> dict[str, np.ndarray]:
        vq = train_vqvae(s, x["sim_train"], x["xdf_train"], seed)
        return {k: embed_all(lambda b: vq.embed(pixels_to_model(b)), x[k]) for k in probe_sets}

    pico = replace(encoder_preset("pico"), image_size=s.size)
    seeded: dict[str, Callable[[int], dict[str, np.ndarray]]] = {
        "encoder": encoder_features,
        "encoder_realonly": realonly_features,
        "random": lambda seed: random_features(seed, pico),
        "random_peak": lambda seed: random_features(seed, replace(pico, normalization="peak", pool="last")),
        "vqvae": vqvae_features,
    }
    per_seed: dict[str, list[dict[str, float]]] = {name: [] for name in seeded}
    for seed in range(args.seeds):
        for name, fn in seeded.items():
            print(f"seed {seed}: {name}", flush=True)
            feats = timed(name, lambda: fn(seed))
            with Clock() as c:
                per_seed[name].append(run_probes({name: feats}, data))
            cpu["probes"] = cpu.get("probes", 0.0) + c.cpu
    for name, results in per_seed.items():
        out.update(aggregate(results))
    with Clock() as c:
        pca = pixel_pca(torch.cat([x["sim_train"], x["xdf_train"]]), {k: x[k] for k in probe_sets}, s.pca_dim)
        out.update(run_probes({"pixels_pca": pca}, data))
    cpu["pixels_pca"] = c.cpu
    # The reference for the arm count (not a baseline): is the arm count in the pixels at this size?
    arms = np.asarray(data["sim"]["arm_count"]) > 0
    out["r2_arm_count_sim_fourier_reference"] = round(
        probe_r2(azimuthal_fourier(data["sim"]["image"][arms]), np.asarray(data["sim"]["arm_count"], float)[arms]), 4)
    out.update({f"cpu_s_{k}": round(v, 1) for k, v in cpu.items()})

    beats = []
    for key in sorted(task[0] for task in probe_tasks(data)):
        best = max(out[f"{key}_{b}"] for b in BASELINES)
        out[f"margin_{key}"] = round(out[f"{key}_encoder"] - best, 4)
        beats.append(out[f"margin_{key}"] > 0)
    out["probes_encoder_beats_all_baselines"] = float(sum(beats))
    out["probes_total"] = float(len(beats))
    t_all.__exit__()
    out["cpu_s_total"], out["wall_s_total"] = round(t_all.cpu, 1), round(t_all.wall, 1)
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
