"""`galray train` settings: one frozen :class:`TrainJob` for the SAE, the VQ-VAE and the prior.

**Kinds.** ``KINDS`` maps each kind to its loop module (the face of :mod:`galray.train.loop`);
the job has one section per kind, named like it, with the kind's model and optimisation
settings and a ``train_config()``. Adding a kind: a ``train/<kind>_loop.py``, a section here
(a field of :class:`TrainJob` and an entry in ``KINDS``) and a dataset builder in
:mod:`galray.train.datasets`. Only the section named by ``kind`` is used; the others keep
their defaults and are ignored. The optimisation step count, per-worker batch size and logging
interval live at the top level and override the loop configs' own fields, so one set of keys
means the same thing for every kind (and for the hyperparameter campaigns that sweep them).

**Global batch.** ``batch_size`` is per worker: each optimizer step sees
``batch_size * scaling.num_workers`` rows (DDP averages the gradients). The learning rate is
scaled linearly with the number of workers (Goyal et al. 2017) only when ``scale_lr`` is true.

No Ray import here (config only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_type_hints

# _convert: from_dict's per-value conversion. Presets are dataclass instances, and a preset plus
# overrides is built by replacing fields; a round trip through a dict would convert every field.
from galray.config import ConfigError, T, _convert, check
from galray.models.encoder import ENCODER_PRESETS
from galray.models.encoder import EncoderConfig, encoder_preset
from galray.models.prior import PriorConfig
from galray.models.sae import PRESETS as SAE_PRESETS
from galray.models.sae import SAEConfig, sae_preset
from galray.models.vqvae import VQVAEConfig
from galray.storage import StorageConfig, is_s3
from galray.tracking import TrackingConfig
from galray.train import encoder_loop, prior_loop, sae_loop, vqvae_loop
from galray.train.encoder_loop import EncoderTrainConfig
from galray.train.loop import Loop
from galray.train.prior_loop import PriorTrainConfig
from galray.train.sae_loop import SAETrainConfig, sae_train_preset
from galray.train.vqvae_loop import VQVAETrainConfig

Kind = Literal["sae", "vqvae", "prior", "encoder"]
KINDS: dict[str, Loop] = {"sae": sae_loop, "vqvae": vqvae_loop, "prior": prior_loop, "encoder": encoder_loop}
assert set(KINDS) == set(get_args(Kind)), "every kind has a loop module and a TrainJob section"
EncoderPreset = Literal["convnext_nano", "vit_small", "pico"]
assert set(get_args(EncoderPreset)) == set(ENCODER_PRESETS), "the section offers every encoder preset"


@dataclass(frozen=True)
class ScalingSection:
    """How many Ray Train workers, and what each one reserves."""

    num_workers: int = 2
    """Data-parallel workers (one process each; DDP over gloo on CPU, NCCL on GPU)."""
    use_gpu: bool = False
    """One (or gpus_per_worker) GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker. Leave spare CPUs in the cluster: Ray Data's read and
    preprocessing tasks need some, and on a 2-CPU laptop 2 x 1.0 would starve them."""
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu is true."""
    wait_s: float = 900.0
    """Seconds to wait for an autoscaler to add the GPUs the workers need (a progress line every 10 s)."""
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    """Ray's placement of the workers: PACK fills a node first; SPREAD puts them on different nodes where it
    can (and still on one node when only one is left, e.g. after a node loss)."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", "must be at least 1")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        check(self.gpus_per_worker > 0, "gpus_per_worker", "must be positive")
        check(self.wait_s >= 0, "wait_s", "must be >= 0")

    def resources_per_worker(self) -> dict[str, float]:
        out = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            out["GPU"] = self.gpus_per_worker
        return out


@dataclass(frozen=True)
class SAESection:
    """The SAE: a preset plus overrides. ``d_in`` comes from the embedding store."""

    preset: Literal["galray", "wu2025"] = "galray"
    """Starting point of both the model and the optimisation (galray.models.sae.sae_preset)."""
    model: dict[str, Any] = field(default_factory=dict)
    """SAEConfig fields overriding the preset, e.g. {group_sizes: [16, 48], k: 8}."""
    train: dict[str, Any] = field(default_factory=dict)
    """SAETrainConfig fields overriding the preset, e.g. {lr: 1e-3}; steps, batch_size and
    log_every come from the job's top level."""
    norm_samples: int = 8192
    """Training rows (the first ones of the store, in shard order) used to fit the z-score
    normalisation and the geometric-median b_pre on the driver; every rank gets the same values."""

    def __post_init__(self) -> None:
        check(self.preset in SAE_PRESETS, "preset", f"must be one of {SAE_PRESETS}")
        check(self.norm_samples >= 2, "norm_samples", "must be at least 2")
        # Unknown keys or bad values fail now; the overrides keep their converted values (1e-3 -> 0.001).
        object.__setattr__(self, "model", _convert_fields(SAEConfig, self.model, "model"))
        object.__setattr__(self, "train", _convert_fields(SAETrainConfig, self.train, "train"))
        self.model_config(int(self.model.get("d_in", 1)))
        self.train_config()

    def model_config(self, d_in: int) -> SAEConfig:
        model = dict(self.model)
        if "d_in" in model and model["d_in"] != d_in:
            raise ConfigError("model.d_in", f"is {model['d_in']} but the embeddings have {d_in} dimensions")
        return _override(sae_preset(self.preset, d_in), model, "model")

    def train_config(self) -> SAETrainConfig:
        return _override(sae_train_preset(self.preset), self.train, "train")


@dataclass(frozen=True)
class VQVAESection:
    """The VQ-VAE's architecture and optimisation."""

    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    """Architecture; image_size is what the cutouts are resized to (same preprocessing as `galray encode`)."""
    train: VQVAETrainConfig = field(default_factory=VQVAETrainConfig)
    """Optimisation; steps and log_every come from the job's top level."""

    def train_config(self) -> VQVAETrainConfig:
        return self.train


@dataclass(frozen=True)
class PriorSection:
    """The prior's architecture and optimisation."""

    model: PriorConfig = field(default_factory=PriorConfig)
    """Architecture; vocab_size and seq_len must match the code store (checked before training)."""
    train: PriorTrainConfig = field(default_factory=PriorTrainConfig)
    """Optimisation; steps and batch_size come from the job's top level."""

    def train_config(self) -> PriorTrainConfig:
        return self.train


@dataclass(frozen=True)
class EncoderSection:
    """galray's own encoder (galray.models.encoder): a preset plus overrides, self-supervised or fine-tuned."""

    preset: EncoderPreset = "convnext_nano"
    """Starting architecture: convnext_nano (64 px), vit_small (ViT-S/8 at 64 px) or pico (a 1.4 M-parameter
    ConvNeXt at 32 px, for CPUs)."""
    model: dict[str, Any] = field(default_factory=dict)
    """EncoderConfig fields overriding the preset, e.g. {backbone: resnet18, image_size: 48}. Fine-tuning
    drops the projector (proj_dim 0) unless proj_dim is given."""
    train: EncoderTrainConfig = field(default_factory=EncoderTrainConfig)
    """Optimisation: mode (selfsup or finetune), lr, temperature, augment, ...; steps and log_every
    come from the job's top level."""
    init_from: str | None = None
    """Checkpoint folder (local or s3://) whose weights start the run where names and shapes match,
    e.g. a self-supervised encoder to fine-tune; null: random initialisation."""
    label_column: str = "label"
    """Fine-tuning on classes: the cutout store's integer class column (-1: unlabelled, ignored)."""
    vote_columns: tuple[str, ...] = ()
    """Fine-tuning on votes: the store's vote-count columns, question by question in the order of
    model.vote_groups (answers per question)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", _convert_fields(EncoderConfig, self.model, "model"))
        self.model_config()

    def model_config(self) -> EncoderConfig:
        model = dict(self.model)
        finetune = self.train.mode == "finetune"
        if finetune:
            model.setdefault("proj_dim", 0)
        cfg = _override(encoder_preset(self.preset), model, "model")
        if finetune:
            check(cfg.head_outputs > 0, "model.num_classes", "fine-tuning needs a head: set model.num_classes "
                                                              "(classes) or model.vote_groups (votes)")
            check(cfg.proj_dim == 0, "model.proj_dim", "must be 0 when fine-tuning (the projector would get no "
                                                       "gradient)")
            check(not cfg.vote_groups or len(self.vote_columns) == sum(cfg.vote_groups), "vote_columns",
                  f"needs one column per answer: {sum(cfg.vote_groups)} for vote_groups {list(cfg.vote_groups)}")
        else:
            check(cfg.head_outputs == 0, "model.num_classes", "self-supervised training has no head: set it to 0 "
                                                              "(or train.mode to finetune)")
            check(cfg.proj_dim > 0, "model.proj_dim", "self-supervised training needs a projector")
        return cfg

    def train_config(self) -> EncoderTrainConfig:
        return self.train


@dataclass(frozen=True)
class TrainJob:
    """One training run: what to train, on which data, where its checkpoints and records go."""

    RENAMED: ClassVar[dict[str, str]] = {"data": "input"}  # keys of the previous release, still read

    kind: Kind
    """sae (on an embedding store), vqvae or encoder (on a cutout store) or prior (on a code store from
    `galray encode`)."""
    input: str
    """Input store URI: local folder, file:// or s3://bucket/prefix."""
    name: str
    """Run name. The same name and storage_path resume the run from its latest checkpoint."""
    extra_inputs: tuple[str, ...] = ()
    """More stores read with ``input`` as one training set (e.g. real cutouts beside simulated ones, for a
    self-supervised encoder), on the same filesystem: the columns the kind reads must have the same types
    (and images the same layout) as in ``input``; other columns are ignored."""
    storage_path: str = "galray-runs"
    """Where checkpoints go (local folder or s3://bucket/prefix); the run lives in <storage_path>/<name>."""
    steps: int = 1000
    """Optimizer steps in total (counted across restarts)."""
    batch_size: int = 256
    """Rows per worker per step; the global batch is batch_size * scaling.num_workers."""
    scale_lr: bool = False
    """Multiply the learning rate by num_workers (linear scaling rule); off by default."""
    val_fraction: float = 0.05
    """Share of objects held out for validation, chosen by crc32(object_id): stable across runs and stores."""
    checkpoint_every: int = 500
    """Steps between checkpoints; the last step always writes one. Checkpoints are also the steps that
    report to Ray Train (a report waits up to the controller's 2 s poll), and the SAE's inference
    threshold is calibrated before each."""
    keep_checkpoints: int | None = None
    """Keep only the newest this many checkpoints in storage (null keeps all)."""
    log_every: int = 50
    """Steps between metric records (all-reduced over the ranks, logged to MLflow by rank 0)."""
    max_failures: int = 0
    """Worker-group failures Ray Train recovers from (from the latest checkpoint); -1: no limit."""
    materialize: bool = False
    """Hold the preprocessed splits in Ray's object store (read and preprocessed once, on the
    driver's first pass) instead of streaming them from storage every epoch. For data that fits in
    the cluster's object store (it spills to disk beyond that); it saves the per-epoch read."""
    eval_max_rows: int = 65_536
    """Validation rows read at the end for the final metrics and figures."""
    seed: int = 0
    """Seed of the data order of each epoch (the models carry their own init seeds)."""
    register: bool = True
    """Register the final checkpoint in MLflow's model registry, under tracking.register_model
    (default: galray-<kind>)."""
    sae: SAESection = field(default_factory=SAESection)
    """Used when kind is sae."""
    vqvae: VQVAESection = field(default_factory=VQVAESection)
    """Used when kind is vqvae."""
    prior: PriorSection = field(default_factory=PriorSection)
    """Used when kind is prior."""
    encoder: EncoderSection = field(default_factory=EncoderSection)
    """Used when kind is encoder."""
    scaling: ScalingSection = field(default_factory=ScalingSection)
    """Workers and their resources."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow: one run per training run (run name default: the job's name)."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for the data and the checkpoints (default: the standard AWS variables)."""

    def __post_init__(self) -> None:
        check(bool(self.input), "input", "an input store URI is required")
        check(all(bool(u) and is_s3(u) == is_s3(self.input) for u in self.extra_inputs), "extra_inputs",
              "each must be a store URI on the same filesystem as input (all local, or all s3://)")
        check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        check(bool(self.storage_path), "storage_path", "must not be empty")
        check(self.steps >= 1, "steps", "must be at least 1")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        check(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
        check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "keep_checkpoints",
              "must be at least 1 or null")
        check(self.log_every >= 1, "log_every", "must be at least 1")
        check(self.max_failures >= -1, "max_failures", "must be >= 0, or -1 for no limit")
        check(self.eval_max_rows >= 0, "eval_max_rows", "must be >= 0")

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.scaling.num_workers

    @property
    def lr_scale(self) -> float:
        return float(self.scaling.num_workers) if self.scale_lr else 1.0

    @property
    def run_key(self) -> str:
        """Identity of the run across restarts: the MLflow run is found again by this tag."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    @property
    def loop(self) -> Loop:
        """The loop module of this kind (galray.train.loop's face)."""
        return KINDS[self.kind]

    def train_config(self) -> SAETrainConfig | VQVAETrainConfig | PriorTrainConfig | EncoderTrainConfig:
        """The kind's loop config as the workers use it: the job's steps, per-worker batch size and
        logging interval where the loop config has such fields, and the learning rate scaled."""
        cfg = getattr(self, self.kind).train_config()
        top = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every,
               "lr": cfg.lr * self.lr_scale}
        names = {f.name for f in dataclasses.fields(cfg)}
        return dataclasses.replace(cfg, **{k: v for k, v in top.items() if k in names})


def _convert_fields(cls: type, overrides: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``overrides`` of fields of ``cls`` converted and checked one by one, as from_dict would;
    errors name ``<prefix>.<field>``."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key (valid keys of {cls.__name__}: "
                                                    f"{', '.join(sorted(names))})")
    try:
        return {k: _convert(v, hints[k], k) for k, v in overrides.items()}
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err.field}" if err.field else prefix, str(err).split(": ", 1)[-1]) from None


def _override(base: T, overrides: dict[str, Any], prefix: str) -> T:
    """``base`` (a preset) with ``overrides`` converted and checked field by field, then validated as
    a whole; errors name ``<prefix>.<field>``."""
    values = _convert_fields(type(base), overrides, prefix)
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err.field}" if err.field else prefix, str(err).split(": ", 1)[-1]) from None
