"""`galray export`: a trained model in a format other tools load.

- ``sae --format saelens``: SAELens's JumpReLU folder (:mod:`galray.export.saelens`): the z-score
  normalisation folded into the weights, the scalar threshold as per-latent thresholds, and, when
  ``--input`` names an embedding store, SAELens's sparsity log measured on up to ``max_rows`` of it.
- ``vqvae --format hf``: galray's checkpoint files in the Hugging Face hub layout with a model card
  (:mod:`galray.export.hf`); ``galray embed --model local-dir:OUT`` loads it.
- ``encoder --format hf``: a timm encoder (a weights file that ``galray embed --model MODEL --weights FILE``
  loads, with ``--model`` naming the timm architecture) in timm's hub layout with a model card;
  ``galray embed --model local-dir:OUT`` and ``timm.create_model("local-dir:OUT", pretrained=True)`` load it.

The model card records the training run when the checkpoint names one (``train_state.pt``) and the
tracking store holds it: the config as run, the input stores with their row counts, the last metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from galray.config import ConfigError, check
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig
from galray.tracking import TrackingConfig

EXPORT_FORMATS = {"sae": ("saelens",), "vqvae": ("hf",), "encoder": ("hf",)}
"""kind -> the formats it exports to."""


@dataclass(frozen=True)
class ExportJob:
    """`galray export KIND CKPT --format FORMAT --output DIR`."""

    kind: Literal["sae", "vqvae", "encoder"] = "sae"
    """What the checkpoint holds."""
    checkpoint: str = ""
    """Checkpoint folder, local or s3:// (config.json + model.safetensors, as `galray train` writes); for an
    encoder, a local weights file (safetensors or tensor-only .pt) of the timm architecture ``model``."""
    format: Literal["saelens", "hf"] = "saelens"
    """saelens (sae) or hf (encoder, vqvae)."""
    output: str = ""
    """Output folder (local)."""
    model: str | None = None
    """encoder: the timm architecture of the weights file (e.g. convnext_nano)."""
    input: str | None = None
    """sae: an embedding store to measure SAELens's sparsity log (firing frequencies) on; none: no log."""
    max_rows: int = 100_000
    """sae: rows of ``input`` the sparsity log is measured on (the first shards, streamed)."""
    dtype: Literal["float32", "float64"] = "float32"
    """sae: dtype of the exported weights."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where to look up the training run for the model card."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings for ``checkpoint`` and ``input``."""

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "checkpoint", "a checkpoint folder is required")
        check(bool(self.output), "output", "an output folder is required")
        check(self.format in EXPORT_FORMATS[self.kind], "format",
              f"{self.kind} exports to {', '.join(EXPORT_FORMATS[self.kind])}, not {self.format}")
        check(self.kind != "encoder" or bool(self.model), "model",
              "an encoder weights file needs its timm architecture, e.g. --model convnext_nano")
        check(self.max_rows > 0, "max_rows", "must be positive")


@dataclass(frozen=True)
class ExportSummary(FieldsSummary):
    kind: str
    to: str
    """The format written."""
    output: str
    files: list[str]
    training_run: str | None
    """The MLflow run the model card describes (None: not found)."""
    sparsity_rows: int = 0
    """sae: rows the sparsity log was measured on (0: no log)."""

    def format(self) -> str:
        run = f"; model card from MLflow run {self.training_run}" if self.training_run else ""
        rows = f"; sparsity log from {self.sparsity_rows} rows" if self.sparsity_rows else ""
        return f"export {self.kind} -> {self.to}: {self.output} ({', '.join(self.files)}){run}{rows}"


def _training_record(job: ExportJob, folder: Path) -> dict[str, Any] | None:
    """What MLflow holds of the run that wrote the checkpoint, or None."""
    from galray.tracking import run_record
    from galray.train.checkpoint import STATE_NAME, load_train_state

    if not (folder / STATE_NAME).is_file() or not job.tracking.enabled:
        return None
    run_id = str(load_train_state(folder).get("mlflow_run_id") or "")
    return run_record(job.tracking.resolved(), run_id) if run_id else None


def _embedding_batches(job: ExportJob) -> Iterator[Any]:
    """Raw embeddings (B, D) float32 tensors from the first shards of ``job.input``, up to ``max_rows``."""
    import pyarrow.parquet as pq
    import torch

    from galray.data.resume import input_shards
    from galray.data.stores import EMBEDDING_COLUMN, list_column_values

    fs, _, shards = input_shards(str(job.input), job.storage)
    left = job.max_rows
    for shard in shards:
        for batch in pq.ParquetFile(shard.path, filesystem=fs).iter_batches(columns=[EMBEDDING_COLUMN]):
            x = list_column_values(batch.column(0))[:left]
            yield torch.from_numpy(x.astype("float32"))
            left -= len(x)
            if left <= 0:
                return


def _export_sae(job: ExportJob, out: Path) -> int:
    import torch

    from galray.data.checkpoints import read_checkpoint
    from galray.export.saelens import log10_firing_frequency, write_saelens
    from galray.models.checkpoint import load_model
    from galray.models.sae import SparseAutoencoder

    model = load_model(SparseAutoencoder, read_checkpoint(job.checkpoint, job.storage, "an SAE checkpoint")).eval()
    sparsity, rows = (log10_firing_frequency(model, _embedding_batches(job)) if job.input else (None, 0))
    write_saelens(model, out, dtype=getattr(torch, job.dtype), sparsity_F=sparsity,
                  metadata={"galray_checkpoint": job.checkpoint})
    return rows


def _export_encoder(job: ExportJob, out: Path, training: dict[str, Any] | None) -> None:
    from galray.export.hf import write_timm_encoder
    from galray.models.backbones import BackboneConfig, create_backbone

    backbone = create_backbone(BackboneConfig(str(job.model), weights=job.checkpoint, pretrained=False))
    write_timm_encoder(backbone.model, out, f"galray encoder ({job.model})", training)


def export(job: ExportJob) -> ExportSummary:
    """Write ``job.checkpoint`` in ``job.format`` to ``job.output``."""
    from galray.data.checkpoints import read_checkpoint
    from galray.export.hf import write_galray_checkpoint

    out = Path(job.output).expanduser()
    local = Path(job.checkpoint).expanduser()
    if "://" not in job.checkpoint and not local.exists():
        raise ConfigError("checkpoint", f"{local} does not exist")
    training = _training_record(job, local) if local.is_dir() else None
    rows = 0
    if job.kind == "sae":
        rows = _export_sae(job, out)
    elif job.kind == "vqvae":
        write_galray_checkpoint(read_checkpoint(job.checkpoint, job.storage, "a VQ-VAE checkpoint"), out,
                                f"galray VQ-VAE ({job.checkpoint.rstrip('/').rsplit('/', 1)[-1]})",
                                ["vqvae", "image-tokenizer"], training)
    else:
        _export_encoder(job, out, training)
    return ExportSummary(kind=job.kind, to=job.format, output=str(out),
                         files=sorted(p.name for p in out.iterdir()),
                         training_run=(training or {}).get("run_id"), sparsity_rows=rows)
