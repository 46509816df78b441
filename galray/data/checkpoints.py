"""Checkpoint folders on storage: a model's ``config.json`` + ``model.safetensors`` read as bytes.

A stage reads a checkpoint named by URI (a local folder or ``s3://``) once on the driver and
passes the bytes to its actors (:class:`galray.models.checkpoint.CheckpointBytes`), so a local
checkpoint also works on a cluster and the model is rebuilt without pickle. No Ray, no torch
(the bytes are turned into a model by :func:`galray.models.checkpoint.load_model`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from galray.storage import StorageConfig, StorageError, arrow_filesystem, join

if TYPE_CHECKING:
    from galray.models.checkpoint import CheckpointBytes

# The names of galray.models.checkpoint (MODEL_CONFIG_NAME, WEIGHTS_NAME), read here without importing torch.
CHECKPOINT_FILES = ("config.json", "model.safetensors")


def read_checkpoint(uri: str, storage: StorageConfig | None = None, what: str = "a checkpoint") -> "CheckpointBytes":
    """(config.json, model.safetensors) bytes of a checkpoint folder, local or on S3; ``what`` names the
    expected model in the error (``"a VQ-VAE checkpoint"``)."""
    from galray.models.checkpoint import CheckpointBytes

    fs, root = arrow_filesystem(uri, storage)
    out = []
    for name in CHECKPOINT_FILES:
        try:
            with fs.open_input_stream(f"{root}/{name}") as f:
                out.append(f.read())
        except (FileNotFoundError, OSError) as err:
            raise StorageError(f"cannot read {join(uri, name)}: is {uri} {what} folder? ({err})") from None
    return CheckpointBytes(out[0], out[1])


def weights_hash(weights: bytes) -> str:
    """``sha256:<hex>`` of a checkpoint's weights: the provenance stores write."""
    return "sha256:" + hashlib.sha256(weights).hexdigest()
