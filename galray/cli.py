"""`galray <verb>`: the command line, built from the job configs.

Each verb is one :class:`Verb` in ``VERBS``: the stage module holding its job config and the one
function it runs (``job -> summary``), its help, and its flags. A :class:`Flag` maps to one config
field by its dotted name; its type, choices and the ``[default: ...]`` in its help are read from
the dataclass, so help and config cannot drift. Adding a verb: its function and job config beside
its command (``galray/stages/<verb>.py``) and one entry here.

Every verb takes ``--config FILE`` (YAML), ``--set a.b=c`` (repeatable; wins over flags, which win
over the file) and ``--print-config`` (the resolved config, secrets redacted); verbs that print a
summary take ``--json``. Values are read as a person types them (``--set sae.train.lr=1e-3``).
Spellings of the previous release (``--out``, ``--data``, flat config keys) still work with a
deprecation warning naming the new one. Only the chosen verb's stage module is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import textwrap
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from galray import __version__
from galray.config import ConfigDeprecationWarning, ConfigError, dumps, field_spec, load

if typing.TYPE_CHECKING:
    from galray.stages.summary import Summary

EPILOG_S3 = textwrap.dedent("""\
    Storage: URIs may be local paths, file:// or s3://bucket/prefix. S3 settings come from
    --set storage.endpoint_url=... etc., or the standard variables AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.""")


@dataclass(frozen=True)
class Flag:
    """One command-line option (``--name``) or positional argument (a name without dashes)."""

    name: str
    field: str
    """The config field it sets, dotted (``sim.size``)."""
    help: str
    default: str | None = None
    """Words for the help's default where the dataclass holds a None that means something."""
    const: bool | None = None
    """A switch: the flag takes no value and sets the field to this."""
    old: tuple[str, ...] = ()
    """Spellings of the previous release, still accepted with a deprecation warning."""
    metavar: str | None = None


@dataclass(frozen=True)
class Verb:
    """One ``galray <verb>``: ``module.run(module.job)`` with ``flags``."""

    name: str
    module: str
    """The stage module holding the job config and the function."""
    job: str
    """The job config class."""
    run: str
    """The function: job -> summary (``format()`` and ``to_json()``)."""
    help: str
    description: str
    flags: tuple[Flag, ...]
    storage: bool = True
    """Reads or writes URIs (local, file://, s3://): the help ends with the S3 settings."""
    errors_output: bool = False
    """Prints where its errored rows went (row-reading stages)."""
    json: bool = True
    """Its summary can be printed as JSON (``--json``); the demo prints as it goes instead."""

    def load(self) -> tuple[type, typing.Callable[[Any], "Summary"]]:
        module = importlib.import_module(self.module)
        return getattr(module, self.job), getattr(module, self.run)


def _d(text: str) -> str:
    return textwrap.dedent(text).strip()


EXIT_TOO_MANY_ERRORS = 3  # the job ran to the end, but more rows errored than --max-error-fraction allows
MAX_ERROR_FRACTION = Flag("--max-error-fraction", "max_error_fraction",
                          "exit with status 3 (after writing everything) when more than this fraction of the rows "
                          "errored")
OVERWRITE = Flag("--overwrite", "overwrite", "replace the output entirely (default: resume it if it was made with the "
                 "same settings; refuse, naming the field, if not)", const=True)
TRACKING_URI = Flag("--tracking-uri", "tracking.uri", "MLflow tracking URI",
                    default="MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")

VERBS: dict[str, Verb] = {v.name: v for v in (
    Verb("simulate", "galray.stages.simulate", "SimulateJob", "simulate_survey",
         "render a simulated survey (GalSim) into a cutout store", _d("""
        Render 3-band (g, r, z) colour galaxies with GalSim, with a PSF, sky noise, random
        background stars and faint neighbours, into a sharded Parquet cutout store. Families:
        smooth round, cigar, edge-on disk with/without bulge, spiral (2-4 arms), barred spiral,
        ring, merger, disturbed/clumpy and star. Every row carries its ground truth (class,
        bulge fraction, Sersic index, size, axis ratio, angle, arms, pitch, bar, flux, colour,
        redshift). The same seed gives byte-identical output; existing shards are skipped, so
        an interrupted run resumes."""), (
        Flag("--n", "n", "number of galaxies"),
        Flag("--size", "sim.size", "cutout size in pixels"),
        Flag("--seed", "sim.seed", "random seed; fixes the output byte for byte"),
        Flag("--output", "output", "output store URI (folder, file:// or s3://bucket/prefix)", old=("--out",)),
        Flag("--shard-rows", "shard_rows", "rows per Parquet shard"),
        Flag("--preview", "preview", "also write a montage PNG with one row per class", metavar="PNG"),
        OVERWRITE)),
    Verb("sample", "galray.stages.sample", "SampleJob", "write_sample",
         "write a store of real galaxies from a bundled image (no download)", _d("""
        xdf: the Hubble eXtreme Deep Field colour image that scikit-image ships. Sources are
        detected with SEP (background-subtracted, deblended), each is cut out in a box scaled
        to its half-light radius (edge-padded at the border) and resized to --size. Rows keep
        SEP's measurements: x, y, a, b, axis ratio, position angle, half-light radius, flux,
        peak, S/N, area, box size and the fraction of the box outside the image."""), (
        Flag("source", "source", "which real image to cut"),
        Flag("--output", "output", "output store URI", old=("--out",)),
        Flag("--size", "xdf.size", "cutout size in pixels"),
        OVERWRITE)),
    Verb("ingest", "galray.stages.ingest", "IngestJob", "ingest",
         "read survey cutouts (image folders, Galaxy10 HDF5, Galaxy Zoo Parquet, FITS) into a cutout store", _d("""
        Stream survey cutouts, as they ship, into a sharded Parquet cutout store with Ray Data:
          images       a folder/prefix of PNG/JPEG (sub-folders too); object id = file stem
          galaxy10-h5  the Galaxy10 DECaLS file: images, ans (-> label, class_name), ra, dec,
                       redshift, pxscale; object id = row index
          gz-parquet   Galaxy Zoo's Hugging Face layout: image struct {bytes}, id_str, label columns
          fits         one file per cutout: one image extension per band, or a (C, H, W) cube
        Colour inputs are stored as uint8 HWC; FITS as float32 CHW flux (--fits-mode flux) or an
        arcsinh/percentile uint8 rendering (--fits-mode rgb; see fits.stretch.* for its settings).
        Every cutout is checked (decodable, not truncated, not all NaN or blank, aspect within
        cutout.max_aspect, unique id: the first in sorted order wins), centre-cropped to a square,
        cut to --crop-fraction and resized to --size (default: the native size of the first
        readable input, so same-sized inputs are stored unresampled). Rows that fail go to
        OUTPUT/_errors/ with object_id, stage, reason and source_file; valid + errored = input, and
        the job still finishes (exit 0). Shards are deterministic: a rerun skips finished ones."""), (
        Flag("input", "input", "input: a folder, file or s3:// prefix", metavar="INPUT"),
        Flag("--format", "format", "input format (required unless the --config file sets it)"),
        Flag("--output", "output", "output store URI", old=("--out",)),
        Flag("--catalog", "catalog", "CSV/TSV/Parquet catalog joined on the object id; its columns are carried "
                                     "into the store", metavar="FILE"),
        Flag("--id-column", "id_column", "id column of the catalog and of gz-parquet input",
             default="object_id for catalogs, id_str for gz-parquet", metavar="NAME"),
        Flag("--size", "cutout.size", "output side in pixels", default="native size of the first input"),
        Flag("--crop-fraction", "cutout.crop_fraction", "central fraction of each side kept before resizing"),
        Flag("--fits-mode", "fits.mode", "FITS: float32 flux or uint8 arcsinh rendering"),
        Flag("--shard-rows", "shard_rows", "input rows per task and shard"),
        MAX_ERROR_FRACTION,
        OVERWRITE),
         errors_output=True),
    Verb("info", "galray.stages.info", "InfoJob", "info",
         "summarise a cutout store: rows, image shape, columns, labels, bytes", _d("""
        Print rows, shards, bytes, the image column's shape, dtype and layout, every column with
        its type, counts for label-like columns, and the number of rows in the errors output.
        Reads Parquet footers and label columns only."""), (
        Flag("input", "input", "store URI: folder, file:// or s3://bucket/prefix", metavar="URI"),)),
    Verb("neighbours", "galray.stages.neighbours", "NeighboursJob", "neighbours",
         "the galaxies most like one galaxy: nearest neighbours by cosine similarity of embeddings", _d("""
        Print the K galaxies of an embedding store (from `galray embed`) whose embeddings point
        most nearly the same way as the query galaxy's (cosine similarity), most similar first,
        the query itself left out. Exact: two streaming passes over the store, a batch at a time
        (memory stays flat whatever its size). Similarity search on a self-supervised encoder's
        embeddings is what Stein et al. 2021 built for the DESI Legacy Surveys."""), (
        Flag("--embeddings", "embeddings", "embedding store URI: folder, file:// or s3://bucket/prefix",
             metavar="URI"),
        Flag("--id", "id", "object_id of the query galaxy"),
        Flag("--k", "k", "neighbours to return"))),
    Verb("embed", "galray.stages.embed", "EmbedJob", "embed_store",
         "embed a cutout store with a backbone (timm, Zoobot, Euclid MAE, VQ-VAE)", _d("""
        Stream a cutout store through a fixed pool of model replicas (Ray Data) into an embedding
        store: one Parquet file per input shard (object_id, embedding as fixed-size float32 list,
        provenance in the file metadata), rows that fail to decode or preprocess under _errors/.
        Each replica loads the model once and takes whole shards: it reads one in blocks
        (--set block_rows=N, default 1024), decodes, stretches, crops and resizes (stored uint8
        tensors at the model's size pass through untouched), runs the model under inference_mode
        (bf16 autocast and channels_last on GPU) and writes the shard's file. Finished shards are
        skipped, so an interrupted run resumes, and no row is ever written twice.
        Models: any timm name (pretrained from the hub when online), hf_hub:owner/repo,
        local-dir:/path/to/hub_copy, Zoobot encoders (hf_hub:mwalmsley/zoobot-encoder-convnext_nano),
        the Euclid MAE ViT (mwalmsley/euclid_encoder_mae_zoobot_vit_small_patch8_224), or galray's
        VQ-VAE encoder (vqvae:/path/to/checkpoint_dir), galray's own encoder (encoder:/path/to/checkpoint_dir,
        from `galray train encoder`). --weights loads a local safetensors file or a
        tensor-only .pt; a pickle that would run code is refused.
        The run is recorded in MLflow (settings, rows done and rows/s as it goes, the summary);
        --no-tracking turns that off.
        Memory stays flat however large the store: a replica holds two blocks of pixels and one
        shard's embeddings. The summary line gives the start-up (workers, model load, compilation)
        apart from the steady rows/s.
        On a CPU-only machine the default is one single-threaded replica per CPU
        (e.g. --actors 2 --torch-threads 1 on 2 cores); add --compile for large stores."""), (
        Flag("--input", "input", "cutout store URI (folder, file:// or s3://bucket/prefix)"),
        Flag("--output", "output", "embedding store URI (folder, file:// or s3://bucket/prefix)"),
        Flag("--model", "backbone.name", "backbone name, e.g. convnext_nano or "
                                         "hf_hub:mwalmsley/zoobot-encoder-convnext_nano"),
        Flag("--weights", "backbone.weights", "local weights file (safetensors or tensor-only .pt)", metavar="FILE"),
        Flag("--random-init", "backbone.pretrained", "random weights instead of the hub's pretrained ones "
                                                     "(benchmarks, offline smoke tests)", const=False),
        Flag("--input-size", "backbone.input_size", "model input side in pixels", default="the model's native size"),
        Flag("--crop-fraction", "preprocess.crop_fraction", "keep this central fraction before resizing"),
        Flag("--batch-size", "batch_size", "images per forward pass"),
        Flag("--actors", "pool.actors", "model replicas; 0: one per GPU, or CPUs/2 on CPU"),
        Flag("--num-gpus", "pool.num_gpus", "GPUs per replica; fails at once if the cluster has none"),
        Flag("--compile", "compile", "torch.compile the model in each replica: faster forward passes after a "
                                     "one-off compile (tens of seconds per replica); worth it for large stores",
             const=True),
        Flag("--torch-threads", "torch_threads", "torch threads per replica on CPU", default="its CPUs"),
        MAX_ERROR_FRACTION,
        OVERWRITE,
        TRACKING_URI,
        Flag("--no-tracking", "tracking.enabled", "do not record the run in MLflow", const=False)),
         errors_output=True),
    Verb("encode", "galray.stages.encode", "EncodeJob", "encode_store",
         "turn a cutout store into VQ-VAE code sequences (the prior's data)", _d("""
        Encode every cutout with a trained VQ-VAE (a `galray train vqvae` checkpoint folder:
        config.json + model.safetensors) into a code store: one Parquet file per input shard,
        with object_id, codes (h*w int16 codes in raster order) and label (the input's label
        column, else -1); the grid and codebook size are in the file metadata. Images get the
        same preprocessing as in training (square crop, resize to the model's image size; flux
        is stretched to colour). A fixed pool of actors each holds the model once and takes
        whole shards. Rows that fail go to OUTPUT/_errors/; valid + errored = input. Finished
        shards are skipped, so a rerun resumes."""), (
        Flag("--input", "input", "cutout store URI"),
        Flag("--vqvae", "vqvae", "VQ-VAE checkpoint folder (local or s3://)", metavar="CKPT_DIR"),
        Flag("--output", "output", "code store URI"),
        Flag("--batch-size", "batch_size", "images per forward pass"),
        Flag("--actors", "pool.actors", "encoder actors; 0: GPUs / num_gpus, or CPUs / 2"),
        Flag("--num-gpus", "pool.num_gpus", "GPUs per actor"),
        Flag("--label-column", "label_column", "input column copied to `label`"),
        MAX_ERROR_FRACTION,
        OVERWRITE),
         errors_output=True),
    Verb("features", "galray.stages.features", "FeaturesJob", "features",
         "apply a trained SAE to an embedding store into a sparse feature store; or list a latent's top objects", _d("""
        Apply a trained sparse autoencoder (a `galray train sae` checkpoint) to every embedding with
        its batch-independent threshold inference, through a fixed pool of Ray Data actors, into a
        feature store: one Parquet file per embedding file with object_id, feature_indices and
        feature_values (the active latents, strongest first) and the catalog columns of the cutout
        store carried through (numbers, booleans, strings). Rows with non-finite embeddings go to
        OUTPUT/_errors/. Finished files are skipped, so a rerun resumes; none is written twice.
        With --top J it instead lists the --n objects where latent J is strongest in the feature
        store --input, reading only its sparse columns (never the embeddings):
          galray features --input FEATURES --top 12 --n 50"""), (
        Flag("--input", "input", "embedding store URI (with --top: a feature store)"),
        Flag("--sae", "sae", "SAE checkpoint folder (local or s3://)", metavar="CKPT_DIR"),
        Flag("--output", "output", "feature store URI"),
        Flag("--catalog", "catalog", "cutout store whose scalar columns are carried through",
             default="the store the embeddings were made from"),
        Flag("--top", "top", "list the objects where this latent is strongest instead", metavar="J"),
        Flag("--n", "n", "how many objects --top lists"),
        Flag("--batch-size", "batch_size", "embeddings per forward pass"),
        Flag("--actors", "pool.actors", "SAE actors; 0: GPUs / num_gpus, or CPUs / 2"),
        Flag("--num-gpus", "pool.num_gpus", "GPUs per actor"),
        Flag("--overwrite", "overwrite", "recompute files whose output exists", const=True),
        TRACKING_URI,
        Flag("--no-tracking", "tracking.enabled", "do not record the run in MLflow", const=False)),
         errors_output=True),
    Verb("analyze", "galray.stages.analyze", "AnalyzeJob", "analyze",
         "SAE vs PCA alignment with a shuffle null, galleries, families, codebook and generations", _d("""
        Analyse a feature store (`galray features`) on a sample of --max-rows objects: the Spearman
        rho of every SAE feature and of as many PCA components as k (fitted on the training split)
        with every label column (simulated ground truth, vote fractions, one-hot classes), against
        a label-shuffle null; the best feature per label for each method (ground-truth recovery);
        novel features (frequent, poorly explained by a linear model of the labels); galleries of
        the top-activating cutouts over the whole store and of PCA components at both extremes;
        feature families (the Matryoshka SAE's first group, or --narrow-sae, against the wide SAE).
        With --codes (and the VQ-VAE the embeddings came from, or --vqvae): codebook usage, decodes,
        heat maps and t-SNE; with --prior: labelled generations per class and sampling setting.
        The embedding store, SAE and cutout store come from the feature store's provenance.
        Writes OUTPUT/analysis.json, figures/*.png, *.parquet; recorded in MLflow with the folder as
        artifacts. Then: galray report --run OUTPUT"""), (
        Flag("--input", "input", "feature store URI"),
        Flag("--output", "output", "analysis folder (local or s3://)"),
        Flag("--embeddings", "embeddings", "embedding store for PCA", default="the feature store's source"),
        Flag("--cutouts", "cutouts", "cutout store for the galleries", default="the feature store's catalog"),
        Flag("--vqvae", "vqvae", "VQ-VAE checkpoint", default="the embeddings' encoder, when a VQ-VAE",
             metavar="CKPT_DIR"),
        Flag("--codes", "codes", "code store (`galray encode`) for the codebook section"),
        Flag("--prior", "prior", "prior checkpoint for the generations", metavar="CKPT_DIR"),
        Flag("--narrow-sae", "narrow_sae", "narrow SAE for feature families",
             default="the Matryoshka SAE's first group", metavar="CKPT_DIR"),
        Flag("--max-rows", "max_rows", "objects analysed"),
        Flag("--shuffles", "n_shuffles", "label shuffles of the null"),
        Flag("--seed", "seed", "random seed"),
        TRACKING_URI,
        Flag("--no-tracking", "tracking.enabled", "do not record the run in MLflow", const=False))),
    Verb("report", "galray.stages.report", "ReportJob", "report",
         "one self-contained HTML report of an analysis (pictures first), logged to MLflow", _d("""
        Render an analysis (`galray analyze`) as one HTML file with every figure and gallery
        thumbnail embedded (PNGs, lazy loading), pictures first: ground-truth recovery and the SAE
        vs PCA distributions, galleries, PCA extremes, novel features, families, codebook,
        generations, then tables and the run's settings and metrics. --run is the analysis folder
        or the MLflow run id of the analysis. The page is logged to that run as report/report.html."""), (
        Flag("--run", "run", "analysis folder (local or s3://) or MLflow run id", metavar="RUN_ID_OR_DIR"),
        Flag("--output", "output", "HTML file", old=("--out",),
             default="report.html in the analysis folder", metavar="HTML"),
        TRACKING_URI,
        Flag("--no-tracking", "tracking.enabled", "do not log the page to MLflow", const=False))),
    Verb("train", "galray.train.launch", "TrainJob", "fit",
         "train the SAE, VQ-VAE, prior or encoder data-parallel with Ray Train, tracked in MLflow", _d("""
        Data-parallel training (Ray Train TorchTrainer, DDP: gloo on CPU, NCCL on GPU) of
          sae    a Matryoshka BatchTopK SAE on an embedding store (`galray embed`)
          vqvae  a VQ-VAE on a cutout store
          prior  a class-conditional transformer prior on a code store (`galray encode`)
          encoder  galray's own encoder (a timm backbone) on a cutout store: self-supervised
                 (SimCLR, rotation/flip/blur/colour/noise views) or fine-tuned on a label or
                 vote columns (--set encoder.train.mode=finetune); presets convnext_nano,
                 vit_small, pico (--set encoder.preset=pico); embed with --model encoder:CKPT
        --batch-size is per worker: the global batch is batch_size x workers (the learning rate
        is scaled with it only with --set scale_lr=true). Objects go to the validation split by
        crc32(object_id) (--set val_fraction=0.05). Checkpoints (model, optimizer, step, config;
        the SAE's normalisation and threshold) go to STORAGE_PATH/NAME every --checkpoint-every
        steps and at the end; rerunning the same --name and --storage-path resumes from the
        latest one, and up to --max-failures worker failures are recovered from it. One MLflow
        run per training run (tracking URI: --tracking-uri, else MLFLOW_TRACKING_URI, else
        sqlite:///mlflow.db): flattened config as params, step metrics, the checkpoint,
        config.json and figures as artifacts; the model is registered as galray-KIND (or
        tracking.register_model). Model settings: --set sae.model.k=32, --set vqvae.model.codebook_size=512,
        --set prior.model.n_layers=8, ... (see jobs/configs/*.yaml). KIND may come from --config."""), (
        Flag("kind", "kind", "what to train"),
        Flag("--input", "input", "input store URI: embeddings (sae), cutouts (vqvae) or codes (prior)",
             old=("--data",)),
        Flag("--name", "name", "run name; the same name and storage path resume the run"),
        Flag("--storage-path", "storage_path", "where checkpoints go (folder or s3://bucket/prefix)"),
        Flag("--steps", "steps", "optimizer steps in total"),
        Flag("--batch-size", "batch_size", "rows per worker per step"),
        Flag("--checkpoint-every", "checkpoint_every", "steps between checkpoints"),
        Flag("--workers", "scaling.num_workers", "data-parallel workers"),
        Flag("--gpu", "scaling.use_gpu", "one GPU per worker (scaling.use_gpu)", const=True),
        Flag("--max-failures", "max_failures", "worker failures to recover from"),
        TRACKING_URI)),
    Verb("tune", "galray.stages.tune", "TuneJob", "tune",
         "hyperparameter campaign over a training config with Ray Tune (ASHA, Optuna), every trial in MLflow", _d("""
        Search a `galray train` config (the same --config file and --set keys) with Ray Tune. The
        search space is a YAML of dotted config keys, each with one distribution:
          sae.model.k: {choice: [8, 16, 32]}          sae.train.lr: {loguniform: [1.0e-4, 1.0e-2]}
          vqvae.model.beta: {uniform: [0.1, 0.5]}     sae.model.k: {randint: [4, 64]}  (ends included)
          steps: {grid: [500, 1000]}                  (every value, in a seeded random order)
        Every key is checked against the config before Ray starts (unknown key, a float range for an
        integer, out-of-range values, an empty grid fail naming the key); see jobs/configs/tune_*_space*.yaml.
        Objectives (--metric/--mode): sae: held-out FVU (val_fvu, min), with L0 (val_l0_mean) and dead
        fraction (val_dead_frac) beside it; vqvae: held-out reconstruction MSE (val_mse, min), with codebook
        utilisation and perplexity; prior: val_loss. Each trial evaluates on the same held-out rows every
        --set tune.report_every steps (default a tenth of steps) and writes a checkpoint there; ASHA
        (--scheduler asha, grace tune.grace_period, reduction factor tune.reduction_factor=3) stops the worse
        trials at those reports. --search optuna uses Optuna's sampler (pip install 'galray[tune]').
        Trials have one worker each (--workers 1) and run as many at once as the cluster holds (one GPU per
        trial with --gpu); multi-worker trials run Ray Train and only with --scheduler none. The data is read
        once, into Ray's object store, for all trials.
        Everything goes to STORAGE_PATH/NAME (a folder or s3://): Tune's state, trial checkpoints,
        results.csv (sorted by the objective, also printed), best_config.yaml (`galray train --config` takes
        it unchanged), tune_campaign.png (learning curves with early-stopped trials marked, the objective
        against each searched key). MLflow: one run for the campaign with one nested run per trial
        (params = the trial's values, metrics by step); the best checkpoint is registered as galray-KIND.
        Progress lines (started, finished, stopped early, errored, best so far) go to stderr.
        An interrupted campaign continues with the same command plus --resume STORAGE_PATH/NAME: finished
        trials are not run again, the others continue from their last checkpoint (only resume folders galray
        wrote: Tune's saved state is unpickled). A new campaign never overwrites an existing folder."""), (
        Flag("kind", "kind", "what to tune"),
        Flag("--space", "tune.space", "search space YAML (dotted training keys -> distributions)", metavar="SPACE.yaml"),
        Flag("--trials", "tune.trials", "trials in total", default="the grid's size"),
        Flag("--scheduler", "tune.scheduler", "asha stops worse trials early; none runs every trial to the end"),
        Flag("--search", "tune.search", "random (grid points shuffled, other keys drawn) or optuna (TPE)"),
        Flag("--metric", "tune.metric", "objective", default="val_fvu (sae), val_mse (vqvae), val_loss (prior)"),
        Flag("--mode", "tune.mode", "minimise or maximise the objective", default="min for the default objectives"),
        Flag("--max-concurrent", "tune.max_concurrent", "trials at once", default="as many as the cluster holds"),
        Flag("--resume", "tune.resume", "continue the interrupted campaign in this folder (STORAGE_PATH/NAME)",
             metavar="PATH"),
        Flag("--input", "input", "input store URI: embeddings (sae), cutouts (vqvae) or codes (prior)"),
        Flag("--name", "name", "campaign name: its folder is STORAGE_PATH/NAME"),
        Flag("--storage-path", "storage_path", "where campaigns go (folder or s3://bucket/prefix)"),
        Flag("--steps", "steps", "optimizer steps of each trial"),
        Flag("--batch-size", "batch_size", "rows per step"),
        Flag("--workers", "scaling.num_workers", "workers per trial; campaigns use 1"),
        Flag("--gpu", "scaling.use_gpu", "one GPU per worker: one GPU per trial", const=True),
        TRACKING_URI)),
    Verb("generate", "galray.stages.generate", "GenerateJob", "generate",
         "sample galaxy images from a trained prior and VQ-VAE into a PNG grid", _d("""
        Sample code grids from the class-conditional transformer prior (KV-cached: one step per
        token; the conditional and unconditional passes of classifier-free guidance run as one
        batch), decode them with the VQ-VAE and write one PNG grid. Checkpoint folders hold
        config.json + model.safetensors, as `galray train` writes them."""), (
        Flag("--prior", "prior", "prior checkpoint folder", metavar="DIR"),
        Flag("--vqvae", "vqvae", "VQ-VAE checkpoint folder (same codebook size)", metavar="DIR"),
        Flag("--output", "output", "output PNG path", old=("--out",), metavar="PNG"),
        Flag("--n", "n", "number of images"),
        Flag("--label", "label", "class index to generate; -1 for unconditional",
             default="cycle through the classes"),
        Flag("--cfg-scale", "sampling.cfg_scale", "classifier-free guidance scale: 1 is plain conditional, "
                                                  ">1 sharpens the class"),
        Flag("--temperature", "sampling.temperature", "softmax temperature; 0 is greedy"),
        Flag("--top-k", "sampling.top_k", "keep only the k most likely codes; 0 keeps all"),
        Flag("--top-p", "sampling.top_p", "nucleus sampling mass; 1 keeps all"),
        Flag("--seed", "seed", "random seed")), storage=False),
    Verb("export", "galray.stages.export", "ExportJob", "export",
         "write a trained model in another tool's format (SAELens, Hugging Face hub layout)", _d("""
        sae --format saelens: SAELens's JumpReLU folder (cfg.json, sae_weights.safetensors; with --input
        an embedding store, also sparsity.safetensors): the SAE's z-score normalisation folded into the
        weights and its threshold per latent, so SAELens's encode/decode equal galray's threshold mode.
        vqvae|encoder --format hf: a Hugging Face hub folder (config.json, model.safetensors, README.md
        model card with the training config, data and metrics of its MLflow run) that
        `galray embed --model local-dir:OUT` loads; an encoder is a timm weights file (--model names the
        architecture) and also loads with timm.create_model("local-dir:OUT", pretrained=True).
        Every trained model is also an MLflow model: mlflow.pyfunc.load_model("models:/galray-sae/1")."""), (
        Flag("kind", "kind", "what the checkpoint holds"),
        Flag("checkpoint", "checkpoint", "checkpoint folder (encoder: weights file)", metavar="CKPT"),
        Flag("--format", "format", "output format"),
        Flag("--output", "output", "output folder", old=("--out",), metavar="DIR"),
        Flag("--model", "model", "encoder: timm architecture of the weights file"),
        Flag("--input", "input", "sae: embedding store to measure the sparsity log on", metavar="URI"),
        TRACKING_URI)),
    Verb("demo", "galray.stages.demo", "DemoJob", "run_demo",
         "run the whole pipeline end to end on a small survey, offline", _d("""
        The quickstart, offline, on a CPU: simulate a survey with GalSim and cut real galaxies
        from the Hubble XDF; train a VQ-VAE with Ray Train, encode code grids and train the
        class-conditional prior; embed every cutout through the Ray Data actor pool; train a
        sparse autoencoder on the embeddings; sample new galaxies. Prints the headline figures
        at the end. Every run is in MLflow under OUTPUT (mlflow.db and mlartifacts/).
        Running it again in the same OUTPUT reuses the stages that finished;
        --set 'stages=[embed,sae]' runs any subset whose inputs an earlier run made."""), (
        Flag("--output", "output", "output folder", old=("--out",)),
        Flag("--n", "n", "number of simulated galaxies"),
        Flag("--size", "size", "cutout size in pixels"),
        Flag("--seed", "seed", "random seed"),
        Flag("--steps", "steps", "optimizer steps of each training"),
        Flag("--fast", "fast", "tiny sizes and few steps: checks the plumbing in a few minutes", const=True)),
        storage=False, json=False),
)}


# --- building the parser -----------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Renamed(argparse.Action):
    """A spelling of the previous release: sets the same field, with a deprecation warning naming the new one."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, const: Any = None, **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0 if const is not None else None, const=const, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release: use {self.new}",
                      ConfigDeprecationWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _choices(tp: Any) -> list[Any] | None:
    """The allowed values of a Literal field (also inside Optional)."""
    if typing.get_origin(tp) is typing.Literal:
        return list(typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is typing.Literal:
                return list(typing.get_args(arg))
    return None


def _add_flag(p: argparse.ArgumentParser, job_cls: type, flag: Flag) -> None:
    tp, default = field_spec(job_cls, flag.field)
    text = flag.help
    if flag.const is None:
        shown = flag.default if flag.default is not None else (
            None if default in (dataclasses.MISSING, None, "") else default)
        if shown is not None:
            text += f" [default: {shown}]"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
    if flag.const is not None:
        kwargs.update(action="store_const", const=flag.const)
    else:
        choices = _choices(tp)
        metavar = flag.metavar or (None if choices else flag.field.rsplit(".", 1)[-1].upper())
        kwargs.update(choices=choices, metavar=metavar)
    if flag.name.startswith("-"):
        p.add_argument(flag.name, dest=flag.field, **kwargs)
    else:  # optional positional, so that --config may give it instead
        p.add_argument(flag.field, nargs="?", **kwargs)
    for old in flag.old:
        p.add_argument(old, dest=flag.field, action=_Renamed, new=flag.name, const=flag.const, help=argparse.SUPPRESS)


def _add_verb(sub: argparse._SubParsersAction, verb: Verb, with_flags: bool) -> None:
    p = sub.add_parser(verb.name, help=verb.help, description=verb.description, formatter_class=_Formatter,
                       epilog=EPILOG_S3 if verb.storage else None)
    p.set_defaults(verb=verb)
    if not with_flags:  # only the help line: the verb's module is not imported
        return
    job_cls, _ = verb.load()
    for flag in verb.flags:
        _add_flag(p, job_cls, flag)
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", help="YAML file with the job's settings (flags and --set win over it)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting by its dotted name, e.g. --set storage.max_attempts=20 (repeatable)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    if verb.json:
        g.add_argument("--json", action="store_true", help="print the summary as JSON")


def build_parser(verbs: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every verb; only ``verbs`` (default: all) get their flags, which imports their modules."""
    parser = argparse.ArgumentParser(
        prog="galray",
        description="galray: galaxy survey cutouts to embeddings, sparse features and image tokens, on Ray.\n"
                    "Start with `galray demo`; every verb has --help.",
        formatter_class=_Formatter, epilog=EPILOG_S3)
    parser.add_argument("--version", action="version", version=f"galray {__version__}")
    sub = parser.add_subparsers(dest="verb_name", metavar="<verb>", required=True)
    for verb in VERBS.values():
        _add_verb(sub, verb, verbs is None or verb.name in verbs)
    return parser


# --- running a verb ----------------------------------------------------------------------------

def _flags(args: argparse.Namespace, verb: Verb) -> dict[str, Any]:
    """Nested dict of the flags that were given, e.g. ``{"sim": {"size": 32}}``."""
    out: dict[str, Any] = {}
    for flag in verb.flags:
        value = getattr(args, flag.field, None)
        if value is None:
            continue
        node = out
        *parents, last = flag.field.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def run(args: argparse.Namespace) -> int:
    verb: Verb = args.verb
    job_cls, func = verb.load()
    job = load(job_cls, args.config, args.overrides, base=_flags(args, verb))
    if args.print_config:
        print(dumps(job), end="")
        return 0
    summary = func(job)
    if getattr(args, "json", False):
        print(json.dumps(summary.to_json(), indent=2, default=str))
    else:
        print(summary.format())
        if verb.errors_output and getattr(summary, "rows_errored", 0):
            print(f"errored rows (object_id, stage, reason, source_file): {job.output.rstrip('/')}/_errors/")
    if getattr(summary, "too_many_errors", False):
        print(f"galray {verb.name}: error: {summary.error_line()}", file=sys.stderr)
        return EXIT_TOO_MANY_ERRORS
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in VERBS else None
    prefix = f"galray {name}" if name else "galray"

    with warnings.catch_warnings():
        original = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
            if issubclass(category, ConfigDeprecationWarning):  # one line, in the CLI's own voice
                print(f"{prefix}: warning: {message}", file=sys.stderr)
            else:
                original(message, category, *rest, **kw)

        warnings.simplefilter("default", ConfigDeprecationWarning)
        warnings.showwarning = show
        parser = build_parser([name] if name else [])
        args = parser.parse_args(argv)
        try:
            return run(args)
        except ConfigError as err:
            print(f"{prefix}: config error: {err}", file=sys.stderr)
            return 2
        except Exception as err:  # a clear one-line message for the errors people can fix
            from galray.data.arrow_safety import UnreadableParquetError, UnsafeParquetError
            from galray.storage import StorageError

            if isinstance(err, (StorageError, FileNotFoundError, UnsafeParquetError, UnreadableParquetError)):
                print(f"{prefix}: error: {err}", file=sys.stderr)
                return 1
            raise


if __name__ == "__main__":
    sys.exit(main())
