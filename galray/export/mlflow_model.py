"""Log a galray checkpoint as an MLflow model (pyfunc flavour, models from code) with a signature and an
input example, and register it.

The model carries its own code: ``code_paths`` bundles the ``galray`` package, which MLflow puts first on
``sys.path`` at load, and ``python_model`` is :mod:`galray.export.pyfunc_entry`, which MLflow runs (no
cloudpickle of the model object). The weights travel as the ``checkpoint`` artifact: the checkpoint's
``config.json`` + ``model.safetensors`` only (no optimizer state). Requirements are listed explicitly
(MLflow's inference of them loads the model in a subprocess, ~12 s per model).

``mlflow.pyfunc.log_model`` is MLflow's fluent API: it is called inside the run (resumed by id) with the
run's tracking URI set for the duration, and the previous URI put back.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import galray
from galray.export.pyfunc import CHECKPOINT_ARTIFACT, PRIOR_PARAMS, PYFUNC_KINDS
from galray.models.checkpoint import MODEL_CONFIG_NAME, WEIGHTS_NAME, load_model

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
REQUIREMENTS = ("mlflow", "torch", "numpy", "safetensors", "einops")
EXAMPLE_ROWS = 2
TRACKING_ENV = "MLFLOW_TRACKING_URI"


def requirements() -> list[str]:
    """The packages the pyfunc imports, pinned to the versions installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def example_input(kind: str, model: torch.nn.Module) -> np.ndarray:
    """A small input in the model's own terms (seeded): embeddings around the SAE's training mean, [0, 1]
    cutouts at the VQ-VAE's or the encoder's size, the prior's first class and the unconditional label."""
    gen = torch.Generator().manual_seed(0)
    cfg = model.cfg  # type: ignore[attr-defined]
    if kind == "sae":
        z = torch.randn(EXAMPLE_ROWS, cfg.d_in, generator=gen)
        return (model.norm_mean_D + model.norm_std_D * z).numpy().astype(np.float32)  # type: ignore[operator]
    if kind in ("vqvae", "encoder"):
        return torch.rand(EXAMPLE_ROWS, cfg.in_channels, cfg.image_size, cfg.image_size,
                          generator=gen).numpy().astype(np.float32)
    return np.array([0, -1], dtype=np.int64)  # prior


@contextlib.contextmanager
def _in_run(tracking_uri: str, run_id: str) -> Iterator[None]:
    """The fluent API pointed at ``tracking_uri`` inside the resumed run; afterwards both the global URI and
    the MLFLOW_TRACKING_URI variable are as before (``set_tracking_uri`` writes the variable, and MLflow's
    own ``_use_tracking_uri`` unsets it on exit even when it was set before)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env_before = os.environ.get(TRACKING_ENV)
    global_before = tracking_utils._tracking_uri
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        mlflow.set_tracking_uri(global_before)
        if env_before is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = env_before


def log_galray_model(kind: str, checkpoint: str | Path, tracking_uri: str, run_id: str,
                     registered_name: str | None = None, name: str = "model") -> Any:
    """Log ``checkpoint`` (a local folder) as the run's MLflow model ``name``, registered under
    ``registered_name`` when given; returns MLflow's ModelInfo (``model_uri``, ``registered_model_version``)."""
    import mlflow
    from mlflow.models import infer_signature

    if kind not in PYFUNC_KINDS:
        raise ValueError(f"no MLflow model for kind {kind!r} (known: {', '.join(PYFUNC_KINDS)})")
    cls, predict = PYFUNC_KINDS[kind]
    model = load_model(cls, checkpoint).eval()
    x = example_input(kind, model)
    params = PRIOR_PARAMS if kind == "prior" else None
    signature = infer_signature(x, predict(model, x, params or {}), params=params)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / CHECKPOINT_ARTIFACT
        weights.mkdir()
        for f in (MODEL_CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(Path(checkpoint) / f, weights / f)
        with _in_run(tracking_uri, run_id):
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(ENTRY), code_paths=[str(Path(galray.__file__).parent)],
                artifacts={CHECKPOINT_ARTIFACT: str(weights)}, model_config={"kind": kind},
                signature=signature, input_example=x, pip_requirements=requirements(),
                registered_model_name=registered_name)
