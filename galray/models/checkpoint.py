"""Save and load models as ``config.json`` + ``model.safetensors``.

Pure torch: every galray model has a frozen dataclass config (``model.cfg``) and is rebuilt
from it before its weights are loaded. Weights never go through pickle, so a checkpoint from
an untrusted source cannot run code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from galray.config import from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound=torch.nn.Module)


def save_model(model: torch.nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.cfg`` as config.json and the state dict (buffers included) as safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model, "cfg")
    payload = {"class": type(model).__name__, "config": to_dict(cfg), **(extra or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    # safetensors refuses shared or non-contiguous storage: tied weights are re-tied on load.
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / CONFIG_NAME).read_text())


def load_model(model_cls: type[M], directory: str | Path, map_location: str | torch.device = "cpu") -> M:
    """Rebuild ``model_cls(cfg)`` from config.json and load the safetensors weights strictly."""
    directory = Path(directory)
    payload = read_config(directory)
    if payload.get("class") not in (None, model_cls.__name__):
        raise ValueError(f"{directory} holds a {payload['class']}, not a {model_cls.__name__}")
    cfg_cls = model_cls.config_class  # type: ignore[attr-defined]
    model = model_cls(from_dict(cfg_cls, payload["config"]))
    state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    model.load_state_dict(state, strict=True)
    return model
