"""A galray SAE as a SAELens JumpReLU SAE: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

At inference a BatchTopK SAE with a threshold *is* a JumpReLU SAE (Bussmann, Leask & Nanda 2024,
arXiv:2412.06410, sec. 3; SAELens exports its own BatchTopK and Matryoshka SAEs the same way), so
galray's threshold-mode ``encode``/``decode`` is written in SAELens's JumpReLU layout
(``sae_lens/saes/jumprelu_sae.py``, ``sae_lens/constants.py``, SAELens 6.x):

    SAELens:  hidden_pre = (x - b_dec) @ W_enc + b_enc;  codes = relu(hidden_pre) * (hidden_pre > threshold)
              recon = codes @ W_dec + b_dec
    galray:   pre = ((x - mu) / sigma - b_pre) @ W_enc_FD.T + b_enc_F;  codes = relu(pre) * (relu(pre) > thr)
              recon = (codes @ W_dec_FD + b_pre) * sigma + mu

so the z-score normalisation folds into the weights exactly:
``W_enc = W_enc_FD.T / sigma[:, None]``, ``W_dec = W_dec_FD * sigma[None, :]``, ``b_dec = mu + sigma * b_pre``,
``b_enc = b_enc_F``, ``threshold = max(thr, 0)`` for every latent (for thr >= 0, ``relu(p) > thr`` iff
``p > thr``; a negative thr keeps every positive activation, as thr = 0 does). SAELens then runs with
``normalize_activations="none"`` and ``apply_b_dec_to_input=True``.

The sparsity log is SAELens's ``sparsity.safetensors``: one tensor ``"sparsity"`` of shape (F,),
log10(firing frequency + 1e-10), measured on embeddings the caller passes (the checkpoint holds no
per-latent frequencies).

Pure torch + safetensors: SAELens itself is not needed to write the folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors.torch import save_file
from torch import Tensor

from galray.models.sae import SparseAutoencoder

SAE_CFG_NAME = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_WEIGHTS_NAME = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SPARSITY_NAME = "sparsity.safetensors"  # sae_lens.constants.SPARSITY_FILENAME
# The cfg.json format written here is SAELens 6's (the "metadata" block); naming the version keeps
# SAELens from running its pre-6.0 compatibility shim. Checked against SAELens 6.54.12.
SAELENS_FORMAT_VERSION = "6.54.12"
SPARSITY_EPS = 1e-10  # SAELens's log10(frequency + 1e-10)


@torch.no_grad()
def jumprelu_weights(model: SparseAutoencoder) -> dict[str, Tensor]:
    """SAELens JumpReLU weights (float64) equal to ``model``'s threshold-mode encode/decode on raw inputs."""
    if int(model.threshold_updates) == 0:
        raise ValueError("the SAE has no trained threshold: train it or call calibrate_threshold first")
    mu, sigma = model.norm_mean_D.double(), model.norm_std_D.double()
    n_f = model.cfg.n_latents
    return {
        "W_enc": model.W_enc_FD.double().T / sigma[:, None],  # (D, F)
        "W_dec": model.W_dec_FD.double() * sigma[None, :],  # (F, D)
        "b_enc": model.b_enc_F.double(),  # (F,)
        "b_dec": mu + sigma * model.b_pre_D.double(),  # (D,)
        "threshold": model.threshold.double().clamp_min(0.0).expand(n_f).clone(),  # (F,)
    }


@torch.no_grad()
def log10_firing_frequency(model: SparseAutoencoder, batches: Iterable[Tensor]) -> tuple[Tensor, int]:
    """(F,) log10(fraction of rows each latent fires on + 1e-10) in threshold mode, streamed over raw
    batches, and the number of rows."""
    was_training = model.training
    model.eval()
    fires = torch.zeros(model.cfg.n_latents, dtype=torch.float64)
    n = 0
    for x_BD in batches:
        fires += (model.encode(x_BD.to(model.W_enc_FD.dtype), mode="threshold") > 0).sum(0).double()
        n += x_BD.shape[0]
    model.train(was_training)
    if n == 0:
        raise ValueError("no rows to measure the firing frequency on")
    return torch.log10(fires / n + SPARSITY_EPS).float(), n


def write_saelens(model: SparseAutoencoder, out: str | Path, dtype: torch.dtype = torch.float32,
                  sparsity_F: Tensor | None = None, metadata: dict | None = None) -> Path:
    """Write the SAELens folder (``cfg.json``, ``sae_weights.safetensors``, and ``sparsity.safetensors`` when
    ``sparsity_F`` is given); ``SAE.load_from_disk(out)`` loads it as a JumpReLU SAE."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(dtype).contiguous() for k, v in jumprelu_weights(model).items()}
    save_file(weights, str(out / SAE_WEIGHTS_NAME))
    cfg = {
        "architecture": "jumprelu", "d_in": model.cfg.d_in, "d_sae": model.cfg.n_latents,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": "galray", "hook_name": "embedding",
            "training_architecture": "matryoshka_batchtopk", "matryoshka_widths": list(model.cfg.prefix_sizes),
            "k": model.cfg.k, "galray_preset": model.cfg.preset, **(metadata or {})},
    }
    (out / SAE_CFG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    if sparsity_F is not None:
        if sparsity_F.shape != (model.cfg.n_latents,):
            raise ValueError(f"sparsity has shape {tuple(sparsity_F.shape)}, expected ({model.cfg.n_latents},)")
        save_file({"sparsity": sparsity_F.float().contiguous()}, str(out / SPARSITY_NAME))
    return out
