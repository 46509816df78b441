"""galray's models as one MLflow ``pyfunc`` flavour: load from the checkpoint artifact, predict on numpy.

What each kind's ``predict`` maps (the signature MLflow records says the same):

- ``sae``: raw embeddings (N, D) float32 -> sparse codes (N, F) float32: ``model.encode`` in eval mode
  (the stored threshold by default, so a code never depends on the other rows);
- ``vqvae``: preprocessed cutouts (N, C, S, S) float32 in [0, 1] (what `galray encode` feeds the model)
  -> code grids (N, h, w) int64: ``model.encode_indices(pixels_to_model(x))``;
- ``encoder``: cutouts (N, C, S, S) float32 in [0, 1] at the encoder's size -> embeddings (N, D) float32:
  ``model.embed`` (what `galray embed --model encoder:CKPT` computes, D4-averaged when the encoder is invariant);
- ``prior``: class labels (N,) int64 (-1 or ``num_classes``: unconditional) -> code sequences
  (N, seq_len) int64 in raster order of the VQ grid, drawn by ``galray.models.sampling.sample`` with
  the params ``seed``, ``temperature``, ``top_k``, ``top_p``, ``cfg_scale`` (a fixed seed gives the
  same codes as `galray generate` with that seed).

This module imports only torch, numpy, MLflow's pyfunc base class and ``galray.models``: a model loads and
predicts with galray's code bundled in the MLflow model (``code_paths``) and no Ray or training code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow.pyfunc
import numpy as np
import torch
from torch import nn

from galray.models.checkpoint import load_model
from galray.models.encoder import SurveyEncoder
from galray.models.prior import Prior
from galray.models.sae import SparseAutoencoder
from galray.models.sampling import SamplingConfig, sample
from galray.models.vqvae import VQVAE, pixels_to_model

CHECKPOINT_ARTIFACT = "checkpoint"
"""Name of the artifact (a folder: config.json + model.safetensors) the model is loaded from."""

PRIOR_PARAMS: dict[str, Any] = {"seed": 0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 1.0}
"""The prior's predict params and their defaults (SamplingConfig's, plus the seed)."""


@torch.inference_mode()
def predict_sae(model: SparseAutoencoder, x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return model.encode(torch.as_tensor(np.asarray(x, np.float32))).numpy()


@torch.inference_mode()
def predict_vqvae(model: VQVAE, x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return model.encode_indices(pixels_to_model(torch.as_tensor(np.asarray(x, np.float32)))).numpy()


@torch.inference_mode()
def predict_encoder(model: SurveyEncoder, x: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return model.embed(torch.as_tensor(np.asarray(x, np.float32))).numpy()


@torch.inference_mode()
def predict_prior(model: Prior, labels: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    p = {**PRIOR_PARAMS, **{k: v for k, v in params.items() if v is not None}}
    labels_B = torch.as_tensor(np.asarray(labels, np.int64).reshape(-1))
    labels_B = torch.where(labels_B < 0, model.cfg.null_class, labels_B)
    cfg = SamplingConfig(cfg_scale=float(p["cfg_scale"]), temperature=float(p["temperature"]),
                         top_k=int(p["top_k"]), top_p=float(p["top_p"]))
    gen = torch.Generator().manual_seed(int(p["seed"]))
    return sample(model, labels_B, cfg, generator=gen).numpy().astype(np.int64)


PYFUNC_KINDS: dict[str, tuple[type[nn.Module], Callable[[Any, np.ndarray, Mapping[str, Any]], np.ndarray]]] = {
    "sae": (SparseAutoencoder, predict_sae),
    "vqvae": (VQVAE, predict_vqvae),
    "prior": (Prior, predict_prior),
    "encoder": (SurveyEncoder, predict_encoder),
}
"""kind -> (model class, predict function)."""


class GalrayModel(mlflow.pyfunc.PythonModel):
    """The pyfunc of every kind: ``model_config={"kind": ...}`` picks the class and the predict function."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.kind = str(context.model_config["kind"])
        cls, self._predict = PYFUNC_KINDS[self.kind]
        self.model = load_model(cls, Path(context.artifacts[CHECKPOINT_ARTIFACT])).eval()

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> np.ndarray:
        return self._predict(self.model, np.asarray(model_input), params or {})
