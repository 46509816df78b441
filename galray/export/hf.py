"""An encoder or a VQ-VAE as a folder in the Hugging Face hub layout: ``config.json``, ``model.safetensors``,
and a model card ``README.md`` (YAML front matter, then the model, training config, data and metrics).

- A timm encoder is written by timm itself (``timm.models.save_for_hf``, safetensors only): its
  ``config.json`` names the architecture and the pretrained config (input size, mean, std), so
  ``timm.create_model("local-dir:DIR", pretrained=True)``, ``timm.create_model(ARCH, pretrained=True,
  pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))``, the hub after an upload, and
  ``galray embed --model local-dir:DIR`` all load it (the way Zoobot shares its encoders).
- A VQ-VAE keeps galray's checkpoint files (read from a local folder or S3), which are already this
  layout (``config.json`` naming the class and its config, ``model.safetensors``):
  ``galray embed --model local-dir:DIR`` and ``galray.models.checkpoint.load_model(VQVAE, DIR)`` load it.

Pure torch + timm: the card's training facts come in as a dict (the stage reads them from MLflow).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from galray import __version__
from galray.models.checkpoint import MODEL_CONFIG_NAME, WEIGHTS_NAME, CheckpointBytes, read_config

CARD_NAME = "README.md"


def _table(rows: Mapping[str, Any]) -> str:
    if not rows:
        return "(none recorded)\n"
    lines = ["| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {str(v).replace('|', '&#124;')} |" for k, v in sorted(rows.items())]
    return "\n".join(lines) + "\n"


def model_card(title: str, library: str, tags: list[str], how_to_load: str, model_config: Mapping[str, Any],
               training: Mapping[str, Any] | None) -> str:
    """The README.md text: hub front matter, how to load, the model config, and what MLflow recorded of the
    training (``training``: ``run_id``, ``params``, ``metrics``, ``inputs`` as [{name, source, num_rows}])."""
    front = "\n".join(["---", f"library_name: {library}", "tags:", *[f"- {t}" for t in tags], "---", ""])
    parts = [front, f"# {title}\n", f"Exported by galray {__version__}.\n", "## How to load\n",
             f"```python\n{how_to_load.strip()}\n```\n", "## Model\n",
             f"```json\n{json.dumps(model_config, indent=2, default=str)}\n```\n"]
    if not training:
        parts.append("## Training\n\nNo MLflow run was found for this checkpoint, so its training config, data "
                     "and metrics are not recorded here.\n")
    else:
        parts.append(f"## Training\n\nMLflow run `{training.get('run_id')}`.\n\n### Config\n\n"
                     + _table(training.get("params") or {}))
        inputs = training.get("inputs") or []
        parts.append("\n### Data\n\n" + ("".join(f"- {d.get('name')}: `{d.get('source')}`, "
                                               f"{d.get('num_rows', '?')} rows\n" for d in inputs)
                                       or "(no input stores recorded)\n"))
        parts.append("\n### Metrics (last value)\n\n" + _table(training.get("metrics") or {}))
    return "\n".join(parts)


def write_timm_encoder(model: nn.Module, out: str | Path, title: str,
                       training: Mapping[str, Any] | None = None) -> Path:
    """A headless timm model (``num_classes=0``) in timm's hub layout, plus the model card."""
    from timm.models import save_for_hf

    out = Path(out)
    save_for_hf(model, str(out), safe_serialization=True)
    arch = model.pretrained_cfg.get("architecture") or type(model).__name__
    how = (f'import timm\nmodel = timm.create_model("local-dir:{out}", pretrained=True, num_classes=0)\n'
           f"# or: galray embed --model local-dir:{out} ...")
    (out / CARD_NAME).write_text(model_card(title, "timm", ["galray", "image-feature-extraction", "astronomy",
                                                            "galaxies", arch],
                                            how, read_config(out), training))
    return out


def write_galray_checkpoint(checkpoint: CheckpointBytes, out: str | Path, title: str, tags: list[str],
                            training: Mapping[str, Any] | None = None) -> Path:
    """A galray checkpoint (config.json + model.safetensors, as bytes) as a hub folder, plus the model card.
    Training state (optimizer) is left out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**json.loads(checkpoint.config_json), "library_name": "galray", "galray_version": __version__}
    (out / MODEL_CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    (out / WEIGHTS_NAME).write_bytes(checkpoint.weights)
    cls = payload.get("class", "model")
    how = (f"from galray.models.checkpoint import load_model\nfrom galray.models.vqvae import {cls}\n"
           f'model = load_model({cls}, "{out}").eval()\n# or: galray embed --model local-dir:{out} ...')
    (out / CARD_NAME).write_text(model_card(title, "galray", ["galray", "astronomy", "galaxies", *tags], how,
                                            payload.get("config", {}), training))
    return out
