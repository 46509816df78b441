"""Training checkpoints: one folder per checkpoint, ``step-00000500``, written by rank 0.

Layout: ``config.json`` + ``model.safetensors`` (:mod:`galray.models.checkpoint`: weights and
every buffer, including the SAE's normalisation and threshold and the VQ codebook's EMA state;
an encoder's folder also holds its bare timm backbone, ``backbone.safetensors``)
and ``train_state.pt`` (optimizer state, step, kind, MLflow run id), loaded with
``torch.load(weights_only=True)``: nothing is unpickled. The learning rate needs no state: the
loops compute it from the step (``lr_at``). Checkpoints of earlier releases also hold a
``scheduler`` entry, which is ignored.

Pure torch: Ray Train moves the folders to storage (:mod:`galray.train.workers`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from galray.models.checkpoint import load_model, save_model
from galray.models.encoder import SurveyEncoder, save_backbone_weights

STATE_NAME = "train_state.pt"


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, step: int, kind: str,
                    run_id: str | None) -> None:
    save_model(model, directory, extra={"step": step, "kind": kind})
    if isinstance(model, SurveyEncoder):  # for `galray embed --model NAME --weights backbone.safetensors`
        save_backbone_weights(model, directory)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "mlflow_run_id": run_id or ""},
               directory / STATE_NAME)


def load_checkpoint_model(model: nn.Module, directory: Path) -> None:
    """Weights and buffers into the (not yet wrapped) model, strictly."""
    loaded = load_model(type(model), directory)
    model.load_state_dict(loaded.state_dict(), strict=True)


def load_train_state(directory: Path) -> dict[str, Any]:
    return torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
