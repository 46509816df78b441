"""`galray demo`: the whole pipeline on embedded defaults, end to end on a laptop, offline.

Each stage is a library call that the matching command also makes; the demo chains them:

- ``simulate``: a GalSim survey with ground truth (+ a montage with one row per class);
- ``xdf``: real galaxies cut from the Hubble XDF (`galray sample xdf`): no ground truth, but
  training data for the self-supervised encoder, and embedded and featurised beside the simulated
  ones so that the report's galleries show which real galaxies each SAE feature picks;
- ``vqvae``: a VQ-VAE on the simulated cutouts with Ray Train (2 workers);
- ``codes``: every cutout encoded to a code grid (`galray encode`);
- ``prior``: the class-conditional transformer prior on the code grids;
- ``embed``: every cutout, simulated and XDF, embedded with the VQ-VAE encoder through the Ray Data actor pool;
- ``sae``: a Matryoshka BatchTopK sparse autoencoder on the embeddings;
- ``generate``: new galaxies sampled from the prior with classifier-free guidance.

Everything goes under ``--output``: the stores, the Ray Train runs, the MLflow store *and* its
artifacts. A stage that finished is recorded (:mod:`galray.data.stage_records`); running the demo
again in the same folder reuses it and says so, and ``--set 'stages=[...]'`` runs any subset whose
inputs a previous run made. No download is needed: every model is trained here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from galray.config import ConfigError, check, from_dict
from galray.data.stage_records import StageRecord, StageRecords, fingerprint
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, is_s3
from galray.tracking import TrackingConfig

if TYPE_CHECKING:
    from galray.train.launch import TrainSummary


@dataclass(frozen=True)
class DemoJob:
    """Settings of `galray demo`."""

    RENAMED: ClassVar[dict[str, str]] = {"out": "output"}  # keys of the previous release, still read

    output: str = "galray-demo"
    """Local folder that receives everything the demo writes (stores, runs, MLflow and its artifacts, figures)."""
    n: int = 2000
    """Simulated galaxies (with --fast: at most 300)."""
    size: int = 64
    """Cutout size in pixels."""
    seed: int = 0
    """Random seed."""
    steps: int = 300
    """Optimizer steps for each training (with --fast: at most 40)."""
    workers: int = 2
    """Ray Train workers per training."""
    fast: bool = False
    """Tiny sizes and few steps: checks that every stage works end to end; the figures mean little."""
    stages: tuple[str, ...] = ()
    """Stages to run (default: all, in pipeline order). Any subset runs if earlier runs made its inputs."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings (unused for the local demo; kept for config symmetry)."""

    def __post_init__(self) -> None:
        check(self.n >= 50, "n", "must be at least 50")
        check(self.size >= 32 and self.size % 8 == 0, "size", "must be a multiple of 8, at least 32")
        check(self.steps >= 10, "steps", "must be at least 10")
        check(self.workers >= 1, "workers", "must be at least 1")
        check(not is_s3(self.output), "output", "the demo writes to a local folder")
        names = [s.name for s in STAGES]
        check(all(s in names for s in self.stages), "stages", f"each must be one of {names}")

    @property
    def rows(self) -> int:
        return min(self.n, 300) if self.fast else self.n

    @property
    def train_steps(self) -> int:
        return min(self.steps, 40) if self.fast else self.steps

    @property
    def root(self) -> Path:
        return Path(self.output).resolve()

    def tracking(self) -> TrackingConfig:
        """Every demo run goes to OUT/mlflow.db, in one experiment whose artifacts are under OUT/mlartifacts."""
        return TrackingConfig(uri=f"sqlite:///{self.root / 'mlflow.db'}", experiment="galray-demo",
                              artifact_location=str(self.root / "mlartifacts"))


Paths = dict[str, str]
RHO_SAE, RHO_PCA = "analyze.best_rho_sae[", "analyze.best_rho_pca["
Figures = dict[str, float]


@dataclass(frozen=True)
class Stage:
    """One demo stage: what it reads and writes (path names) and the function that runs it."""

    name: str
    text: str
    needs: tuple[str, ...]
    makes: tuple[str, ...]
    run: Callable[[DemoJob, Paths], tuple[Paths, Figures]]


def _train(kind: str, data: str, name: str, cfg: DemoJob, section: dict[str, Any],
           **job: Any) -> "TrainSummary":
    from galray.train.config import TrainJob
    from galray.train.launch import fit

    spec = {
        "kind": kind, "input": data, "name": name, "storage_path": str(cfg.root / "runs"),
        "steps": cfg.train_steps, "batch_size": 32, "checkpoint_every": cfg.train_steps, "log_every": 10,
        "materialize": True, "seed": cfg.seed, kind: section,
        # enough held-out rows that dead-latent and codebook figures mean something
        "val_fraction": 0.2,
        # Ray Data's read tasks need CPUs next to the workers on a small machine.
        "scaling": {"num_workers": cfg.workers, "use_gpu": False, "cpus_per_worker": 0.5},
        "tracking": dataclasses.asdict(cfg.tracking()),
    }
    summary = fit(from_dict(TrainJob, {**spec, **job}))
    print(summary.format())
    return summary


def _latent(cfg: DemoJob) -> int:
    return 8 if cfg.size >= 64 else 4


def _simulate(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.data.galsim_survey import SimConfig
    from galray.data.store import store_summary
    from galray.stages.simulate import SimulateJob, simulate_survey

    out = {"store": str(cfg.root / "sim"), "preview": str(cfg.root / "sim_montage.png")}
    job = SimulateJob(output=out["store"], n=cfg.rows, shard_rows=max(cfg.rows // 4, 50), preview=out["preview"],
                      sim=SimConfig(size=cfg.size, seed=cfg.seed))
    print(simulate_survey(job).format())
    print(store_summary(out["store"]).format())
    return out, {"simulated_rows": float(cfg.rows)}


def _xdf(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.data.xdf import XDFConfig
    from galray.stages.sample import SampleJob, write_sample

    out = {"xdf": str(cfg.root / "xdf")}
    summary = write_sample(SampleJob(output=out["xdf"], xdf=XDFConfig(size=cfg.size)))
    print(summary.format())
    return out, {"xdf_rows": float(summary.rows)}


def _vqvae(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    vq = _train("vqvae", paths["store"], "vqvae-demo", cfg, {
        "model": {"image_size": cfg.size, "latent_size": _latent(cfg), "channels": [16, 32, 32], "code_dim": 32,
                  "codebook_size": 128, "factorized_dim": 8, "kmeans_iters": 5},
        "train": {"lr": 2e-3}})
    figures = {k: vq.eval[k] for k in ("val_utilisation", "val_perplexity", "val_mse") if k in vq.eval}
    return {"vqvae": str(vq.checkpoint)}, figures


def _encoder(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    enc = _train("encoder", paths["store"], "encoder-demo", cfg, {
        # the pico ConvNeXt (1.4 M parameters) at 32 px: galray's encoder sized for a CPU
        "preset": "pico", "train": {"lr": 2e-3, "warmup_steps": 5}},
        # self-supervised needs no labels: the real XDF galaxies train it beside the simulated ones
        extra_inputs=[paths["xdf"]])
    return {"encoder": str(enc.checkpoint)}, {k: v for k, v in enc.eval.items() if k.startswith("val_")}


def _embed_with(cfg: DemoJob, paths: Paths, backbone: str, out_key: str, in_key: str = "store"
                ) -> tuple[Paths, Figures]:
    """Embed every cutout of ``paths[in_key]`` with ``backbone`` (a `galray embed --model` name) into OUT/<out_key>."""
    from galray.models.backbone_config import BackboneConfig
    from galray.stages.embed import EmbedJob, embed_store

    out = {out_key: str(cfg.root / out_key)}
    summary = embed_store(EmbedJob(input=paths[in_key], output=out[out_key], backbone=BackboneConfig(name=backbone),
                                   batch_size=64, tracking=cfg.tracking()))
    print(summary.format())
    return out, {"embedded_rows": float(summary.rows_out)}


def _embed_encoder(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    return _embed_with(cfg, paths, f"encoder:{paths['encoder']}", "encoder_embeddings")


def _codes(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.stages.encode import EncodeJob, encode_store

    out = {"codes": str(cfg.root / "codes")}
    summary = encode_store(EncodeJob(input=paths["store"], vqvae=paths["vqvae"], output=out["codes"]))
    print(summary.format())
    return out, {"encoded_rows": float(summary.rows_out)}


def _prior(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    latent = _latent(cfg)
    prior = _train("prior", paths["codes"], "prior-demo", cfg, {
        "model": {"vocab_size": 128, "seq_len": latent * latent, "num_classes": 10, "d_model": 64,
                  "n_layers": 2, "n_heads": 2},
        "train": {"lr": 2e-3, "warmup_steps": 5}})
    return {"prior": str(prior.checkpoint)}, {k: prior.eval[k] for k in ("val_loss", "val_acc") if k in prior.eval}


def _embed(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    made, figures = _embed_with(cfg, paths, f"vqvae:{paths['vqvae']}", "embeddings")
    # the real XDF galaxies too: the SAE's features of them join the galleries (they have no ground truth)
    more, more_figures = _embed_with(cfg, paths, f"vqvae:{paths['vqvae']}", "xdf_embeddings", "xdf")
    return {**made, **more}, {**figures, "xdf_embedded_rows": more_figures["embedded_rows"]}


def _sae(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.stages.tune import TuneJob, tune_then_train

    job = from_dict(TuneJob, {
        "kind": "sae", "input": paths["embeddings"], "name": "sae-demo", "storage_path": str(cfg.root / "runs"),
        "steps": cfg.train_steps, "batch_size": 64, "seed": cfg.seed, "val_fraction": 0.2,
        "sae": {"preset": "galray", "model": {"group_sizes": [8, 24], "k": 4, "dead_after_samples": 2048},
                "train": {"lr": 2e-3}},
        "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1},
        "tracking": dataclasses.asdict(cfg.tracking()),
        # four ASHA trials over the sparsity k and the dictionary width (its Matryoshka groups)
        "tune": {"space": {"sae.model.k": {"grid": [4, 8]},
                           "sae.model.group_sizes": {"grid": [[8, 24], [16, 48]]}},
                 "trials": 4, "scheduler": "asha", "report_every": max(cfg.train_steps // 4, 1)}})
    campaign, sae = tune_then_train(job)
    print(campaign.format())
    print(sae.format())
    figures = {k: sae.eval[k] for k in ("val_fvu", "val_l0_mean", "val_dead_frac") if k in sae.eval}
    figures["tune_trials_stopped_early"] = float(campaign.stopped)
    return {"sae": str(sae.checkpoint), "campaign": campaign.campaign}, figures


def _generate(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.stages.generate import generate_grid

    out = {"generated": str(cfg.root / "generated.png")}
    generate_grid(paths["prior"], paths["vqvae"], out["generated"], n=20, cfg_scale=2.0, top_p=0.95, seed=cfg.seed)
    print(f"wrote {out['generated']}")
    return out, {}


def _features(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.stages.features import FeaturesJob, apply_sae

    out = {"features": str(cfg.root / "features"), "xdf_features": str(cfg.root / "xdf_features")}
    summary = apply_sae(FeaturesJob(input=paths["embeddings"], sae=paths["sae"], output=out["features"],
                                    tracking=cfg.tracking()))
    print(summary.format())
    xdf = apply_sae(FeaturesJob(input=paths["xdf_embeddings"], sae=paths["sae"], output=out["xdf_features"],
                                tracking=cfg.tracking()))
    print(xdf.format())
    return out, {"l0_mean": summary.l0_mean, "k": float(summary.k), "latents": float(summary.n_latents),
                 "xdf_l0_mean": xdf.l0_mean}


def _analyze(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.stages.analyze import AnalyzeJob, analyze

    out = {"analysis": str(cfg.root / "analysis")}
    summary = analyze(AnalyzeJob(input=paths["features"], output=out["analysis"], vqvae=paths["vqvae"],
                                 codes=paths["codes"], prior=paths["prior"], val_fraction=0.2, seed=cfg.seed,
                                 gallery_inputs={"XDF": paths["xdf_features"]}, tracking=cfg.tracking()))
    print(summary.format())
    figures: Figures = {}
    for label, row in summary.recovery.items():
        figures[f"best_rho_sae[{label}]"] = row["sae"]
        figures[f"best_rho_pca[{label}]"] = row["pca"]
    return out, figures


def _report(cfg: DemoJob, paths: Paths) -> tuple[Paths, Figures]:
    from galray.stages.report import ReportJob, report

    out = {"report": str(cfg.root / "report.html")}
    summary = report(ReportJob(run=paths["analysis"], output=out["report"], tracking=cfg.tracking()))
    print(summary.format())
    return out, {"report_images": float(summary.images)}


STAGES: tuple[Stage, ...] = (
    Stage("simulate", "simulating a survey with GalSim", (), ("store", "preview"), _simulate),
    Stage("xdf", "cutting real galaxies from the Hubble XDF", (), ("xdf",), _xdf),
    Stage("vqvae", "training a VQ-VAE on the cutouts (Ray Train)", ("store",), ("vqvae",), _vqvae),
    Stage("encoder", "training galray's own encoder self-supervised (SimCLR, Ray Train) on the simulated and the "
                     "XDF cutouts", ("store", "xdf"), ("encoder",), _encoder),
    Stage("embed_encoder", "embedding every cutout with that encoder (Ray Data actor pool)", ("store", "encoder"),
          ("encoder_embeddings",), _embed_encoder),
    Stage("codes", "encoding every cutout to a code grid (Ray actor pool)", ("store", "vqvae"), ("codes",), _codes),
    Stage("prior", "training the class-conditional prior on the code grids", ("codes",), ("prior",), _prior),
    Stage("embed", "embedding every simulated and XDF cutout with the VQ-VAE encoder (Ray Data actor pool)",
          ("store", "xdf", "vqvae"), ("embeddings", "xdf_embeddings"), _embed),
    Stage("sae", "a Ray Tune campaign (4 trials, ASHA) over a Matryoshka BatchTopK sparse autoencoder's k and "
                 "width on the embeddings, then the SAE at the best setting", ("embeddings",), ("sae", "campaign"), _sae),
    Stage("generate", "sampling new galaxies from the prior (classifier-free guidance 2)", ("prior", "vqvae"),
          ("generated",), _generate),
    Stage("features", "sparse features of every embedding, simulated and XDF (the SAE's threshold inference)",
          ("embeddings", "xdf_embeddings", "sae"), ("features", "xdf_features"), _features),
    Stage("analyze", "SAE features and PCA against the simulator's ground truth (with a shuffle null), "
                     "galleries over the simulated and XDF galaxies, feature families, the codebook and generations",
          ("features", "xdf_features", "vqvae", "codes", "prior"), ("analysis",), _analyze),
    Stage("report", "the HTML report", ("analysis",), ("report",), _report),
)


@dataclass(frozen=True)
class DemoSummary(FieldsSummary):
    """What `galray demo` prints at the end (each stage prints its own summary as it finishes)."""

    output: str
    paths: dict[str, str]
    """What the demo wrote: stores, checkpoints, figures, the MLflow store."""
    figures: dict[str, float]
    """Headline figures of every stage, by name."""
    ran: tuple[str, ...]
    reused: tuple[str, ...]
    stage_seconds: dict[str, float]
    """Wall seconds of each stage that ran now."""
    seconds: float

    def format(self) -> str:
        lines = [f"\ndone in {self.seconds:.0f} s ({len(self.ran)} stages ran"
                 + (f", {len(self.reused)} reused" if self.reused else "") + ")."]
        rho = {k[len(RHO_SAE):-1]: (v, self.figures.get(f"{RHO_PCA}{k[len(RHO_SAE):]}", float("nan")))
               for k, v in self.figures.items() if k.startswith(RHO_SAE)}
        plain = {k: v for k, v in self.figures.items() if not k.startswith((RHO_SAE, RHO_PCA))}
        if plain:
            lines.append("headline figures:")
            lines += [f"  {k:<32} {v:.4g}" for k, v in plain.items()]
        if rho:
            lines.append(f"  {'best |rho| with the ground truth':<32} {'SAE':>6} {'PCA':>6}")
            lines += [f"    {k:<30} {a:>6.3f} {b:>6.3f}" for k, (a, b) in rho.items()]
        shown = [k for k in ("preview", "generated", "report") if k in self.paths]
        if shown:
            lines.append("look at: " + ", ".join(self.paths[k] for k in shown))
        lines.append(f"browse the runs: mlflow ui --backend-store-uri sqlite:///{self.output}/mlflow.db")
        return "\n".join(lines)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_demo(cfg: DemoJob) -> DemoSummary:
    """Run the asked stages in pipeline order (reusing recorded ones); print progress; return what was made."""
    t0 = time.perf_counter()
    records = StageRecords(cfg.root)
    wanted = [s for s in STAGES if not cfg.stages or s.name in cfg.stages]
    maker = {key: s.name for s in STAGES for key in s.makes}
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("stages", "output", "storage")}
    names = {s.name for s in wanted}
    for stage in wanted:  # fail at start, not after an hour, when an input was never made
        missing = [up for up in sorted({maker[k] for k in stage.needs} - names) if records.get(up) is None]
        if missing:
            order = [s.name for s in STAGES if s.name in {*missing, stage.name}]
            raise ConfigError("stages", f"stage {stage.name} needs what {', '.join(missing)} make(s), which has not "
                                        f"run in {cfg.root}: add it, e.g. --set 'stages=[{','.join(order)}]'")
    cfg.root.mkdir(parents=True, exist_ok=True)
    paths: Paths = {}
    figures: Figures = {}
    done: dict[str, StageRecord] = {}
    ran: list[str] = []
    reused: list[str] = []
    stage_seconds: dict[str, float] = {}
    for i, stage in enumerate(wanted, 1):
        upstream = sorted({maker[k] for k in stage.needs})
        for up in upstream:
            rec = done.get(up) or records.get(up)
            assert rec is not None, up  # checked above; a stage before this one recorded it
            done[up] = rec
            paths.update(rec.paths)
        # A stage's fingerprint covers the settings and the exact upstream records it read, so an
        # upstream stage that ran again makes every stage after it run again too.
        key = fingerprint({"settings": settings, "stage": (stage.name, stage.text, stage.makes),
                           "upstream": {u: (done[u].fingerprint, done[u].finished_at) for u in upstream}})
        head = f"\n[{i}/{len(wanted)}] {stage.name}: {stage.text}"
        rec = records.get(stage.name)
        if rec is not None and rec.fingerprint == key and all(Path(p).exists() for p in rec.paths.values()):
            print(f"{head}\n  reusing the result of an earlier run ({rec.seconds:.0f} s, finished "
                  f"{time.strftime('%H:%M', time.localtime(rec.finished_at))}); delete "
                  f"{records.dir / (stage.name + '.json')} to redo it", flush=True)
            reused.append(stage.name)
        else:
            print(head, flush=True)
            records.forget(stage.name)
            s0 = time.perf_counter()
            made, figs = stage.run(cfg, paths)
            seconds = time.perf_counter() - s0
            rec = StageRecord(stage=stage.name, fingerprint=key, paths=made, figures=figs,
                              seconds=round(seconds, 1), finished_at=records.now())
            records.put(rec)
            ran.append(stage.name)
            stage_seconds[stage.name] = round(seconds, 1)
            print(f"  {stage.name} done in {seconds:.0f} s (elapsed {_clock(time.perf_counter() - t0)})", flush=True)
        done[stage.name] = rec
        paths.update(rec.paths)
        figures.update({f"{stage.name}.{k}": v for k, v in rec.figures.items()})
    return DemoSummary(output=str(cfg.root), paths=paths, figures=figures, ran=tuple(ran), reused=tuple(reused),
                       stage_seconds=stage_seconds, seconds=round(time.perf_counter() - t0, 1))
