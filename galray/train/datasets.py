"""The training data of each kind, built on the driver as Ray Datasets, and what the driver learns from it.

:func:`build_datasets` reads the input store of ``job.kind`` (one builder per kind in
``BUILDERS``) into a train and a validation split, chosen by ``crc32(object_id)`` (:mod:`galray.data.split`:
the same object is always on the same side, whatever the shard layout), as the batch dicts the kind's loop takes:

- ``sae``: an embedding store -> ``{"x": (N, D) float32}``; the driver also fits the normalisation
  and the geometric-median ``b_pre`` once on the first training rows, so every rank starts identical;
- ``vqvae``: a cutout store -> ``{"pixels": (N, C, S, S)}``, the preprocessing of `galray embed` and
  `galray encode` (:mod:`galray.data.preprocess`) at the VQ-VAE's size;
- ``prior``: a code store -> ``{"codes": (N, T) int64, "label": (N,) int64}``, checked against the
  prior's sequence length, vocabulary and classes first;
- ``encoder``: a cutout store -> ``{"pixels": (N, C, S, S)}`` like the VQ-VAE's, plus ``"label"``
  (N,) int64 or ``"votes"`` (N, A) float32 when fine-tuning; the driver loads ``encoder.init_from``'s
  weights (where names and shapes match the model) as the state every rank starts from.

Rows a model cannot take are left out, and each is reported with its reason to the run's
:mod:`galray.train.skipped_rows` counter (``skipped``): an image that cannot be prepared, an embedding
with NaN or infinite values, codes outside the prior's vocabulary.

The batch functions that run in Ray Data tasks are in :mod:`galray.train.batches` (a light import for
Ray's worker processes); Ray is imported inside functions.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from galray.config import ConfigError
from galray.data.arrow_safety import read_schema, read_table
from galray.data.preprocess import ImagePlan, plan_for
from galray.data.shards import ID_COLUMN, read_metadata
from galray.data.stores import CODES_COLUMN, EMBEDDING_COLUMN, LABEL_COLUMN
from galray.models.encoder import EncoderConfig
from galray.models.prior import PriorConfig
from galray.models.sae import SAEConfig
from galray.models.vqvae import VQVAEConfig
from galray.storage import StorageConfig
from galray.train.config import TrainJob
from galray.train.batches import encoder_batch, prior_batch, sae_batch, vqvae_batch

if TYPE_CHECKING:
    import ray.data  # noqa: F401 (the Splits annotation)

ModelConfig = SAEConfig | VQVAEConfig | PriorConfig | EncoderConfig
Splits = dict[str, "ray.data.Dataset"]


class PreparedData(NamedTuple):
    """What :func:`build_datasets` gives the workers."""

    datasets: Splits
    """{"train": Dataset, "val": Dataset} of the kind's batch dicts."""
    model_config: ModelConfig
    """The model config as run (the SAE's d_in comes from the store)."""
    init_state: dict[str, np.ndarray]
    """Parameters and buffers every rank starts from (the SAE's normalisation and b_pre); {} for the others."""


# --- driver-side preparation per kind --------------------------------------------------------------

def _shards(job: TrainJob, storage: StorageConfig) -> tuple[pafs.FileSystem, list[str]]:
    from galray.data.store import shard_paths

    return shard_paths(job.input, storage)


def _schema(uri: str, storage: StorageConfig) -> pa.Schema:
    """The schema of a store's first shard."""
    from galray.data.store import shard_paths

    fs, paths = shard_paths(uri, storage)
    return read_schema(fs, paths[0])


def _read(job: TrainJob, storage: StorageConfig, columns: list[str]) -> "ray.data.Dataset":
    """``columns`` of ``job.input`` and every ``job.extra_inputs`` store, read as one Ray Dataset; a store
    whose column is missing or of another type than in ``input`` fails naming ``extra_inputs``."""
    from galray.data.store import read_store

    if job.extra_inputs:
        want = _schema(job.input, storage)
        for uri in job.extra_inputs:
            have = _schema(uri, storage)
            for c in columns:
                if c not in have.names or have.field(c).type != want.field(c).type:
                    found = have.field(c).type if c in have.names else "no such column"
                    raise ConfigError("extra_inputs", f"{uri}: column {c!r} is {found}, but {want.field(c).type} "
                                                      f"in {job.input}: the stores cannot be read as one")
    return read_store([job.input, *job.extra_inputs], storage, columns=columns)


def _sae_init(job: TrainJob, storage: StorageConfig) -> tuple[SAEConfig, dict[str, np.ndarray]]:
    """The SAE config (d_in from the store) and the normalisation + b_pre fitted on the first
    ``sae.norm_samples`` training rows."""
    import torch

    from galray.models.sae import SparseAutoencoder

    fs, paths = _shards(job, storage)
    field_type = read_schema(fs, paths[0]).field(EMBEDDING_COLUMN).type
    if not pa.types.is_fixed_size_list(field_type):
        raise ConfigError("input", f"{job.input}: column {EMBEDDING_COLUMN!r} is {field_type}, expected a fixed-size "
                                  f"list of float32 (an embedding store from `galray embed`)")
    d_in = field_type.list_size
    parts, n = [], 0
    for path in paths:
        table = read_table(fs, path, columns=[ID_COLUMN, EMBEDDING_COLUMN])
        x = sae_batch(table, "train", job.val_fraction)["x"]
        parts.append(x)
        n += len(x)
        if n >= job.sae.norm_samples:
            break
    if n < 2:
        raise ConfigError("input", f"{job.input} has fewer than 2 training rows")
    sample = torch.from_numpy(np.concatenate(parts)[: job.sae.norm_samples])
    cfg = job.sae.model_config(d_in)
    model = SparseAutoencoder(cfg)
    model.fit_normalization(sample)
    model.init_from_sample(sample)
    names = ("norm_mean_D", "norm_std_D", "norm_fitted", "b_pre_D")
    state = model.state_dict()
    return cfg, {k: state[k].numpy() for k in names}


def _image_plan(job: TrainJob, storage: StorageConfig, image_size: int, in_channels: int) -> ImagePlan:
    """The image plan of ``input``; every ``extra_inputs`` store must store its images the same way (the
    batch function applies one plan to all rows)."""
    plan = plan_for(_schema(job.input, storage), image_size, in_channels)
    for uri in job.extra_inputs:
        other = plan_for(_schema(uri, storage), image_size, in_channels)
        if other != plan:
            raise ConfigError("extra_inputs", f"{uri} stores its images otherwise ({other}) than {job.input} "
                                              f"({plan}): the stores cannot be read as one")
    return plan


def _check_codes(job: TrainJob, storage: StorageConfig) -> None:
    """The code store must match the prior: grid length, codebook size, labels in range."""
    fs, paths = _shards(job, storage)
    schema = read_schema(fs, paths[0])
    if CODES_COLUMN not in schema.names:
        raise ConfigError("input", f"{job.input} has no {CODES_COLUMN!r} column: make a code store with "
                                   "`galray encode`")
    meta = read_metadata(schema)
    m = job.prior.model
    length = schema.field(CODES_COLUMN).type.list_size
    if length != m.seq_len:
        raise ConfigError("prior.model.seq_len", f"is {m.seq_len} but the code store has {length} codes per object "
                                                 f"(grid {meta.get('grid')})")
    if "codebook_size" in meta and int(meta["codebook_size"]) != m.vocab_size:
        raise ConfigError("prior.model.vocab_size", f"is {m.vocab_size} but the codes come from a codebook of "
                                                    f"{meta['codebook_size']}")
    if LABEL_COLUMN in schema.names:
        from galray.data.store import shard_paths

        for uri in job.extra_inputs:  # their labels must fit the prior too
            paths = paths + shard_paths(uri, storage)[1]
        top = max((read_table(fs, p, columns=[LABEL_COLUMN]).column(LABEL_COLUMN).to_numpy().max(
            initial=-1) for p in paths), default=-1)
        if top >= m.num_classes:
            raise ConfigError("prior.model.num_classes", f"is {m.num_classes} but the store has label {top}")


@contextlib.contextmanager
def _quiet_data() -> Iterator[None]:
    """Datasets copy the current DataContext when created: these get no progress bars (their
    executions run inside the training workers, where bars would interleave with the logs), and keep
    their blocks in order, so a seeded run reads its rows in the same order every time (without it,
    blocks come in the order their read tasks finish, and two trials of one config in a Tune
    campaign trained on differently ordered data and ended up to 7% apart)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    ctx.execution_options.preserve_order = True
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order = saved


def _sae_data(job: TrainJob, storage: StorageConfig, skipped: Any
              ) -> tuple[Splits, ModelConfig, dict[str, np.ndarray]]:
    cfg, init_state = _sae_init(job, storage)
    ds = _read(job, storage, [ID_COLUMN, EMBEDDING_COLUMN])
    return ({split: ds.map_batches(sae_batch, fn_kwargs={"split": split, "val_fraction": job.val_fraction,
                                                         "skipped": skipped},
                                   batch_format="pyarrow", zero_copy_batch=True) for split in ("train", "val")},
            cfg, init_state)


def _prior_data(job: TrainJob, storage: StorageConfig, skipped: Any
                ) -> tuple[Splits, ModelConfig, dict[str, np.ndarray]]:
    _check_codes(job, storage)
    fs, paths = _shards(job, storage)
    cols = [ID_COLUMN, CODES_COLUMN] + ([LABEL_COLUMN] if LABEL_COLUMN in read_schema(
        fs, paths[0]).names else [])
    ds = _read(job, storage, cols)
    return ({split: ds.map_batches(prior_batch, fn_kwargs={
        "split": split, "val_fraction": job.val_fraction, "num_classes": job.prior.model.num_classes,
        "vocab_size": job.prior.model.vocab_size, "skipped": skipped},
        batch_format="pyarrow", zero_copy_batch=True) for split in ("train", "val")}, job.prior.model, {})


def _vqvae_data(job: TrainJob, storage: StorageConfig, skipped: Any
                ) -> tuple[Splits, ModelConfig, dict[str, np.ndarray]]:
    m = job.vqvae.model
    plan = _image_plan(job, storage, m.image_size, m.in_channels)
    ds = _read(job, storage, [ID_COLUMN, plan.column])
    return ({split: ds.map_batches(vqvae_batch, fn_kwargs={
        "split": split, "val_fraction": job.val_fraction, "plan": plan, "skipped": skipped}, batch_format="numpy")
        for split in ("train", "val")}, job.vqvae.model, {})


def _encoder_init(job: TrainJob, cfg: EncoderConfig, storage: StorageConfig) -> dict[str, np.ndarray]:
    """The weights of ``encoder.init_from`` whose names and shapes match the model ({} without one);
    a checkpoint sharing no backbone weight with the model fails naming the field."""
    if not job.encoder.init_from:
        return {}
    import torch
    from safetensors.torch import load as load_safetensors

    from galray.data.checkpoints import read_checkpoint
    from galray.models.encoder import SurveyEncoder

    uri = job.encoder.init_from
    state = load_safetensors(read_checkpoint(uri, storage, "an encoder checkpoint").weights)
    with torch.device("meta"):  # shapes only, no memory or init time
        wanted = SurveyEncoder(cfg).state_dict()
    keep = {k: v.numpy() for k, v in state.items() if k in wanted and tuple(v.shape) == tuple(wanted[k].shape)}
    if not any(k.startswith("backbone.") for k in keep):
        raise ConfigError("encoder.init_from", f"{uri} shares no backbone weight with a {cfg.backbone} encoder")
    return keep


def _encoder_data(job: TrainJob, storage: StorageConfig, skipped: Any
                  ) -> tuple[Splits, ModelConfig, dict[str, np.ndarray]]:
    cfg, section = job.encoder.model_config(), job.encoder
    plan = _image_plan(job, storage, cfg.image_size, cfg.in_channels)
    label_column = section.label_column if section.train.mode == "finetune" and cfg.num_classes else None
    vote_columns = tuple(section.vote_columns) if section.train.mode == "finetune" and cfg.vote_groups else ()
    fs, paths = _shards(job, storage)
    names = read_schema(fs, paths[0]).names
    for name, column in [("label_column", label_column)] + [("vote_columns", c) for c in vote_columns]:
        if column and column not in names:
            raise ConfigError(f"encoder.{name}", f"{job.input} has no column {column!r} (columns: {', '.join(names)})")
    ds = _read(job, storage, [ID_COLUMN, plan.column, *([label_column] if label_column else []), *vote_columns])
    return ({split: ds.map_batches(encoder_batch, fn_kwargs={
        "split": split, "val_fraction": job.val_fraction, "plan": plan, "label_column": label_column,
        "vote_columns": vote_columns, "skipped": skipped}, batch_format="numpy") for split in ("train", "val")},
        cfg, _encoder_init(job, cfg, storage))


BUILDERS: dict[str, Callable[[TrainJob, StorageConfig, Any], tuple[Splits, ModelConfig, dict[str, np.ndarray]]]] = {
    "sae": _sae_data, "vqvae": _vqvae_data, "prior": _prior_data, "encoder": _encoder_data}

# The job keys each kind's builder reads ("*": every kind): a hyperparameter campaign reads its data
# once for all trials, so these cannot be searched (galray.train.tune_space).
DATA_KEYS: dict[str, tuple[str, ...]] = {
    "*": ("input", "extra_inputs", "val_fraction", "materialize"),
    "sae": ("sae.norm_samples", "sae.model.d_in"),
    "vqvae": ("vqvae.model.image_size", "vqvae.model.in_channels"),
    "prior": ("prior.model.num_classes", "prior.model.seq_len", "prior.model.vocab_size"),
    "encoder": ("encoder.model.image_size", "encoder.model.in_channels", "encoder.train.mode", "encoder.label_column",
                "encoder.vote_columns", "encoder.init_from")}

# The model config of a job whose data is the same as that of the job whose builder returned ``built``
# (a campaign builds the data once, with the base job, and varies the model per trial).
MODEL_CONFIGS: dict[str, Callable[[TrainJob, ModelConfig], ModelConfig]] = {
    "sae": lambda job, built: job.sae.model_config(built.d_in),
    "vqvae": lambda job, built: job.vqvae.model,
    "prior": lambda job, built: job.prior.model,
    "encoder": lambda job, built: job.encoder.model_config()}
assert set(BUILDERS) == set(DATA_KEYS) - {"*"} == set(MODEL_CONFIGS), \
    "every kind has a builder, data keys and a model config"


def build_datasets(job: TrainJob, storage: StorageConfig, skipped: Any = None) -> PreparedData:
    """The kind's train and validation splits (materialised in the object store with ``job.materialize``;
    the training split in a seeded random block order), its model config and initial state. Rows the
    batch functions leave out are reported to ``skipped`` (:func:`galray.train.skipped_rows.skipped_rows_counter`;
    None: not counted)."""
    with _quiet_data():
        splits, model_config, init_state = BUILDERS[job.kind](job, storage, skipped)
        if job.materialize:
            splits = {k: v.materialize() for k, v in splits.items()}
        splits["train"] = splits["train"].randomize_block_order(seed=job.seed)
    return PreparedData(splits, model_config, init_state)
