"""Save and load models as ``config.json`` + ``model.safetensors``.

Pure torch: every galray model has a frozen dataclass config (``model.cfg``) and is rebuilt
from it before its weights are loaded. Weights never go through pickle, so a checkpoint from
an untrusted source cannot run code when loaded. :func:`load_model` reads a local folder, or the
two files' bytes (:class:`CheckpointBytes`) that a caller fetched from object storage or from
Ray's object store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

from galray.config import from_dict, to_dict

MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound=torch.nn.Module)


def save_model(model: torch.nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.cfg`` as config.json and the state dict (buffers included) as safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "cfg")
    payload = {"class": type(model).__name__, "config": to_dict(cfg), **(extra or {})}
    (directory / MODEL_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    # safetensors refuses shared or non-contiguous storage: tied weights are re-tied on load.
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MODEL_CONFIG_NAME).read_text())


class CheckpointBytes(NamedTuple):
    """A checkpoint folder's two files as bytes (fetched from S3, or passed through Ray's object store)."""

    config_json: bytes
    """config.json"""
    weights: bytes
    """model.safetensors"""


def load_model(model_cls: type[M], source: str | Path | CheckpointBytes,
               map_location: str | torch.device = "cpu") -> M:
    """Rebuild ``model_cls(cfg)`` from config.json and load the safetensors weights strictly.

    ``source`` is a checkpoint folder or its files' bytes. A checkpoint of another model class
    raises ValueError naming both.
    """
    if isinstance(source, CheckpointBytes):
        where, payload = "the checkpoint", json.loads(source.config_json)
    else:
        where, payload = str(source), read_config(source)
    if payload.get("class") not in (None, model_cls.__name__):
        raise ValueError(f"{where} holds a {payload['class']}, not a {model_cls.__name__}")
    cfg_cls = model_cls.config_class  # type: ignore[attr-defined]
    model = model_cls(from_dict(cfg_cls, payload["config"]))
    if isinstance(source, CheckpointBytes):
        state = load_safetensors(source.weights)
    else:
        state = load_file(str(Path(source) / WEIGHTS_NAME), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model
