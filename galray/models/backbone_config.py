"""Which backbone `galray embed` runs: its config and errors, with no torch or timm import.

:mod:`galray.models.backbones` builds the model; this module only names it, so ``EmbedJob`` (and the
CLI that reads it) can hold a :class:`BackboneConfig` without importing torch in every Ray worker
that unpickles the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from galray.config import ConfigError, check

PICO_ARCH = "galray_convnext_pico"
"""timm name of galray's own tiny ConvNeXt (registered by :mod:`galray.models.backbones`); here so that
model configs can name it without importing timm."""

VQVAE_PREFIX = "vqvae:"
ENCODER_PREFIX = "encoder:"


class BackboneError(ConfigError):
    """The backbone cannot be built or its weights do not fit it; names the field (model or weights) to fix."""


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone to embed with, and where its weights come from."""

    name: str = ""
    """timm model name, ``hf_hub:owner/repo``, ``local-dir:/path``, a Zoobot/Euclid hub repo, ``vqvae:/dir``
    or ``encoder:/dir`` (a `galray train encoder` checkpoint folder)."""
    weights: str | None = None
    """Local weights file (safetensors, or a tensor-only .pt/.bin); overrides ``pretrained``."""
    pretrained: bool = True
    """Download the pretrained weights from the hub when no ``weights`` file is given (False: random init)."""
    input_size: int | None = None
    """Input side in pixels; default: the model's native size (pretrained config, else 224)."""
    normalization: Literal["auto", "model", "none"] = "auto"
    """auto: Zoobot models get plain [0, 1], others their pretrained mean/std; model: always mean/std; none: [0, 1]."""

    def __post_init__(self) -> None:
        check(bool(self.name.strip()), "name", "a backbone name is required, e.g. convnext_nano")
        check(self.input_size is None or self.input_size >= 8, "input_size", "must be at least 8 pixels")
        for prefix in (VQVAE_PREFIX, ENCODER_PREFIX):
            if self.name.startswith(prefix):
                check(len(self.name) > len(prefix), "name", f"{prefix} needs a checkpoint folder, {prefix}/path/to/dir")
