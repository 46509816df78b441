"""`galray demo`: the whole pipeline on embedded defaults, end to end on a laptop, offline.

1. simulate a small survey with GalSim (+ a montage with one row per class);
2. train a VQ-VAE on the cutouts with Ray Train (2 workers);
3. embed every cutout with that VQ-VAE's encoder (Ray Data actor pool);
4. train a Matryoshka BatchTopK SAE on the embeddings;
5. encode the cutouts to code grids and train the class-conditional prior on them;
6. sample new galaxies from the prior with classifier-free guidance.

No download is needed: the VQ-VAE is galray's own, trained here. Every run is recorded in an
MLflow store inside the output folder. Model sizes and step counts are tiny so that the demo
finishes in minutes on a CPU; the same commands scale up through their configs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from galray.config import check, from_dict
from galray.data.galsim_survey import SimConfig
from galray.data.store import store_summary
from galray.stages.simulate import SimulateJob, simulate_survey
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, is_s3, join
from galray.tracking import TrackingConfig

if TYPE_CHECKING:
    from galray.train.launch import TrainSummary

STAGES = ("simulate", "vqvae", "embed", "sae", "prior", "generate")


@dataclass(frozen=True)
class DemoJob:
    """Settings of `galray demo`."""

    RENAMED: ClassVar[dict[str, str]] = {"out": "output"}  # keys of the previous release, still read

    output: str = "galray-demo"
    """Local folder that receives everything the demo writes (stores, runs, MLflow, figures)."""
    n: int = 500
    """Simulated galaxies."""
    size: int = 64
    """Cutout size in pixels."""
    seed: int = 0
    """Random seed."""
    steps: int = 150
    """Optimizer steps for each of the three trainings."""
    workers: int = 2
    """Ray Train workers per training."""
    stages: tuple[str, ...] = STAGES
    """Stages to run, in pipeline order; a prefix such as [simulate] stops early."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (unused for the local demo; kept for config symmetry)."""

    def __post_init__(self) -> None:
        check(self.n >= 50, "n", "must be at least 50")
        check(self.size >= 32 and self.size % 8 == 0, "size", "must be a multiple of 8, at least 32")
        check(self.steps >= 10, "steps", "must be at least 10")
        check(self.workers >= 1, "workers", "must be at least 1")
        check(not is_s3(self.output), "output", "the demo writes to a local folder")
        check(all(s in STAGES for s in self.stages), "stages", f"each must be one of {list(STAGES)}")


def _tracking(cfg: DemoJob) -> TrackingConfig:
    """Every demo run goes to OUT/mlflow.db, in one experiment."""
    return TrackingConfig(uri=f"sqlite:///{Path(cfg.output).resolve() / 'mlflow.db'}", experiment="galray-demo")


def _train(kind: str, data: str, name: str, cfg: DemoJob, section: dict[str, Any]) -> "TrainSummary":
    from galray.train.config import TrainJob
    from galray.train.launch import fit

    out = Path(cfg.output).resolve()
    job = from_dict(TrainJob, {
        "kind": kind, "input": data, "name": name, "storage_path": str(out / "runs"),
        "steps": cfg.steps, "batch_size": 32, "checkpoint_every": cfg.steps, "log_every": 10,
        "materialize": True, "seed": cfg.seed, kind: section,
        # Ray Data's read tasks need CPUs next to the workers on a small machine.
        "scaling": {"num_workers": cfg.workers, "use_gpu": False, "cpus_per_worker": 0.5},
        "tracking": dataclasses.asdict(_tracking(cfg)),
    })
    summary = fit(job)
    print(summary.format())
    return summary


@dataclass(frozen=True)
class DemoSummary(FieldsSummary):
    """What `galray demo` prints at the end (each stage prints its own summary as it finishes)."""

    paths: dict[str, str]
    """What the demo wrote: stores, checkpoints, figures, the MLflow store."""
    stages: tuple[str, ...]
    seconds: float

    def format(self) -> str:
        return (f"\ndone in {self.seconds:.0f} s. Look at {self.paths['preview']}"
                + (f" and {self.paths['generated']}" if "generate" in self.stages else "")
                + (f"; browse the runs with `mlflow ui --backend-store-uri {self.paths['mlflow']}`"
                   if {"vqvae", "sae", "prior"} & set(self.stages) else "") + ".")


def run_demo(cfg: DemoJob) -> DemoSummary:
    """Run the demo stages and print what each did; returns the paths it wrote."""
    t0 = time.perf_counter()
    out = str(Path(cfg.output).resolve())
    paths = {"store": join(out, "sim"), "preview": join(out, "sim_montage.png"),
             "embeddings": join(out, "embeddings"), "codes": join(out, "codes"),
             "generated": join(out, "generated.png"), "mlflow": f"sqlite:///{out}/mlflow.db"}
    total = len(cfg.stages)
    step = 0
    latent = 8 if cfg.size >= 64 else 4

    def stage(name: str, text: str) -> bool:
        nonlocal step
        if name not in cfg.stages:
            return False
        step += 1
        print(f"\n[{step}/{total}] {text}", flush=True)
        return True

    if stage("simulate", f"simulating {cfg.n} galaxies at {cfg.size} px -> {paths['store']}"):
        job = SimulateJob(output=paths["store"], n=cfg.n, shard_rows=max(cfg.n // 4, 50), preview=paths["preview"],
                          sim=SimConfig(size=cfg.size, seed=cfg.seed))
        print(simulate_survey(job).format())
        print(store_summary(paths["store"]).format())
    vq = None
    if stage("vqvae", "training a VQ-VAE on the cutouts (Ray Train)"):
        vq = _train("vqvae", paths["store"], "vqvae-demo", cfg, {
            "model": {"image_size": cfg.size, "latent_size": latent, "channels": [16, 32, 32], "code_dim": 32,
                      "codebook_size": 128, "factorized_dim": 8, "kmeans_iters": 5},
            "train": {"lr": 2e-3}})
        paths["vqvae"] = vq.checkpoint
    if stage("embed", "embedding every cutout with the VQ-VAE encoder (Ray Data actor pool)"):
        from galray.models.backbone_config import BackboneConfig
        from galray.stages.embed import EmbedJob, embed_store

        print(embed_store(EmbedJob(input=paths["store"], output=paths["embeddings"],
                                   backbone=BackboneConfig(name=f"vqvae:{paths['vqvae']}"), batch_size=64,
                                   tracking=_tracking(cfg))).format())
    if stage("sae", "training a Matryoshka BatchTopK sparse autoencoder on the embeddings"):
        sae = _train("sae", paths["embeddings"], "sae-demo", cfg, {
            "preset": "galray", "model": {"group_sizes": [8, 24], "k": 4, "dead_after_samples": 2048}, "train": {"lr": 2e-3}})
        paths["sae"] = sae.checkpoint
    if stage("prior", "encoding code grids and training the class-conditional prior"):
        from galray.stages.encode import EncodeJob, encode_store

        print(encode_store(EncodeJob(input=paths["store"], vqvae=paths["vqvae"], output=paths["codes"])).format())
        prior = _train("prior", paths["codes"], "prior-demo", cfg, {
            "model": {"vocab_size": 128, "seq_len": latent * latent, "num_classes": 10, "d_model": 64,
                      "n_layers": 2, "n_heads": 2},
            "train": {"lr": 2e-3, "warmup_steps": 5}})
        paths["prior"] = prior.checkpoint
    if stage("generate", "sampling new galaxies from the prior (classifier-free guidance 2)"):
        from galray.stages.generate import generate_grid

        generate_grid(paths["prior"], paths["vqvae"], paths["generated"], n=20, cfg_scale=2.0, top_p=0.95,
                      seed=cfg.seed)
        print(f"wrote {paths['generated']}")
    return DemoSummary(paths=paths, stages=cfg.stages, seconds=time.perf_counter() - t0)
