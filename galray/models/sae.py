"""Matryoshka BatchTopK sparse autoencoder (SAE) for galaxy embeddings: model, config, presets, metrics.

The SAE turns dense embeddings ``x_BD`` into sparse, nameable latents ``codes_BF`` with a
unit-norm dictionary ``W_dec_FD``. Recipe sources:

- BatchTopK: Bussmann, Leask & Nanda 2024 (arXiv:2412.06410): keep the ``B*k`` largest ReLU
  activations of the whole batch in training; at inference use a threshold estimated in training.
- Matryoshka: Bussmann et al. 2025 / Nabeshima 2024: the reconstruction loss is averaged over
  prefixes of the dictionary, each prefix decoding with only its first ``m`` latents, so early
  latents learn general features and later ones refine them.
- AuxK, tied init, geometric-median pre-bias, unit-norm decoder with parallel-gradient removal:
  Gao et al. 2024, *Scaling and evaluating sparse autoencoders* (arXiv:2406.04093); EleutherAI sparsify.
- ``wu2025`` preset: Wu & Walmsley 2025, *Re-envisioning Euclid Galaxy Morphology* (arXiv:2510.23749),
  code github.com/jwuphysics/euclid-galaxy-morphology-saes (src/models/matryoshka_sae.py, config toml).

Contract: every method that takes raw embeddings (``encode``, ``forward``) normalises them with
statistics fitted on the training data (``fit_normalization``) and stored as buffers, so they survive
save/load. Losses and FVU are measured in that normalised space. ``encode`` in eval mode uses the
stored threshold by default, so a code never depends on the other rows of its batch.

Pure torch: imports nothing from galray outside galray.models and galray.config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from galray.config import check

InferenceMode = Literal["threshold", "batchtopk", "topk"]

PRESETS = ("galray", "wu2025")


@dataclass(frozen=True)
class SAEConfig:
    """Matryoshka BatchTopK SAE. Field defaults are the ``galray`` preset."""

    d_in: int
    """Embedding dimension D."""
    group_sizes: tuple[int, ...] = (64, 64, 128, 256, 512, 1024)
    """Matryoshka group sizes; prefix m_g = sum(group_sizes[:g+1]); the width F is their sum."""
    k: int = 64
    """Mean active latents per sample (BatchTopK keeps B*k per batch)."""
    l1_coeff: float = 0.0
    """Weight of the mean L1 norm of the active codes (wu2025: 1e-3; galray: 0, TopK already sets L0)."""
    k_aux: int | None = None
    """Dead latents used by the auxiliary loss per sample; None means d_in // 2 (Gao et al.)."""
    aux_coeff: float = 1.0 / 32.0
    """Weight of the auxiliary (dead-latent revival) loss."""
    aux_style: Literal["auxk", "wu2025"] = "auxk"
    """auxk: per-sample top-k_aux of dead latents, normalised MSE of the residual (Gao et al.);
    wu2025: batch top-(k_aux*B) of dead latents shifted by the cut value, MSE."""
    dead_after_samples: int = 65_536
    """A latent is dead when it has not fired in this many training samples (wu2025: 256 batches of 256)."""
    threshold_momentum: float = 0.99
    """EMA momentum of the inference threshold (running estimate of the smallest kept activation)."""
    inference: InferenceMode = "threshold"
    """How ``encode`` picks active latents in eval mode: threshold (batch independent), batchtopk, topk."""
    recon_loss: Literal["fvu", "mse"] = "fvu"
    """Per-prefix reconstruction loss: fvu (squared error / batch variance) or mse (mean over B*D)."""
    normalize: Literal["zscore", "none"] = "zscore"
    """Input normalisation, fitted on training data and stored with the model."""
    norm_eps: float = 1e-5
    """Added to the per-dimension std (wu2025 uses 1e-5)."""
    init_b_pre: Literal["geometric_median", "mean", "zero"] = "geometric_median"
    """Initial pre-encoder bias b_pre (also the decoder bias), from a training sample."""
    train_impl: Literal["gather", "dense"] = "gather"
    """Training forward/backward. dense: masked (B, F) matmuls, the reference (and wu2025's code).
    gather: one no-grad dense encoder pass picks the active latents, then only the B*k selected
    pre-activations are recomputed with gradient and decoded with embedding_bag, so everything but
    that pass costs O(B*k*D) instead of O(B*F*D). Same loss and gradients (tests hold this)."""
    seed: int = 0
    """Seed of the weight initialisation."""
    preset: str = "galray"
    """Name of the preset this config started from (a label; it changes nothing)."""

    def __post_init__(self) -> None:
        check(self.d_in > 0, "d_in", "must be positive")
        check(len(self.group_sizes) > 0, "group_sizes", "needs at least one group")
        check(all(g > 0 for g in self.group_sizes), "group_sizes", "every group must be positive")
        check(0 < self.k <= self.n_latents, "k", f"must be in 1..{self.n_latents} (the width)")
        check(self.l1_coeff >= 0, "l1_coeff", "must be >= 0")
        check(self.k_aux is None or self.k_aux > 0, "k_aux", "must be positive or null")
        check(self.aux_coeff >= 0, "aux_coeff", "must be >= 0")
        check(self.dead_after_samples > 0, "dead_after_samples", "must be positive")
        check(0.0 <= self.threshold_momentum < 1.0, "threshold_momentum", "must be in [0, 1)")
        check(self.norm_eps > 0, "norm_eps", "must be positive")

    @property
    def n_latents(self) -> int:
        return sum(self.group_sizes)

    @property
    def prefix_sizes(self) -> tuple[int, ...]:
        return tuple(int(m) for m in np.cumsum(self.group_sizes))

    @property
    def k_aux_resolved(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_in // 2)

    @classmethod
    def preset_config(cls, name: str, d_in: int, **overrides: Any) -> "SAEConfig":
        return sae_preset(name, d_in, **overrides)


def sae_preset(name: str, d_in: int, **overrides: Any) -> SAEConfig:
    """``galray`` (default) or ``wu2025``: Wu & Walmsley's recipe as closely as their code allows.

    wu2025 differences kept: L1 1e-3, AuxK of their form (k_aux = 16k over the batch, coefficient 0.03,
    dead after 256 batches of 256), BatchTopK at inference, zero pre-bias, MSE loss. Their encoder is
    initialised kaiming-uniform with W_dec its normalised transpose, here W_enc = W_dec^T (same
    directions, different column scale). Their test-set normalisation with its own statistics is a bug
    we do not reproduce: every preset normalises with training statistics.
    """
    if name == "galray":
        base = SAEConfig(d_in=d_in, preset="galray")
    elif name == "wu2025":
        base = SAEConfig(
            d_in=d_in, group_sizes=(64, 64, 128, 256, 512, 1024), k=64, l1_coeff=1e-3,
            k_aux=64 * 16, aux_coeff=0.03, aux_style="wu2025", dead_after_samples=256 * 256,
            inference="batchtopk", recon_loss="mse", normalize="zscore", norm_eps=1e-5,
            init_b_pre="zero", train_impl="dense", preset="wu2025",
        )
    else:
        raise ValueError(f"unknown SAE preset {name!r}; choose one of {PRESETS}")
    return replace(base, **overrides) if overrides else base


class SAEOutput(NamedTuple):
    x_hat: Tensor
    """(B, D) reconstruction from the full dictionary, in the raw input space."""
    codes: Tensor
    """(B, F) sparse codes (zeros where inactive)."""
    loss: Tensor
    """Scalar training loss: mean prefix reconstruction loss + L1 + aux_coeff * aux."""
    fvu: Tensor
    """Full-dictionary FVU of this batch, in normalised space (detached)."""
    recon_loss: Tensor
    """Mean over prefixes of the reconstruction loss (detached)."""
    l1: Tensor
    """Weighted L1 term (detached)."""
    aux_loss: Tensor
    """Unweighted auxiliary loss (detached; 0 when no latent is dead)."""
    l0: Tensor
    """Mean active latents per sample (detached)."""
    prefix_fvu: Tensor
    """(G,) FVU of each Matryoshka prefix on this batch (detached)."""
    dead_frac: Tensor
    """Fraction of latents dead by the training counter (before this batch's update)."""


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def geometric_median(x_ND: Tensor, iters: int = 30, eps: float = 1e-6) -> Tensor:
    """Weiszfeld iterations from the mean; robust centre used to initialise b_pre (Gao et al. 2024)."""
    x = x_ND.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-7 * (1.0 + y.norm()):
            y = y_new
            break
        y = y_new
    return y.to(x_ND.dtype)


def _flat_topk(flat: Tensor, n_keep: int, floor: float | None = None) -> tuple[Tensor, Tensor]:
    """``flat.topk(n_keep)`` (unsorted). On CPU, when a lower bound ``floor`` of the answer's cut is
    known (a fraction of the running threshold), topk runs over the entries above it only: the same
    set, 2-3x faster. Falls back to the full topk when fewer than n_keep entries pass."""
    if floor is not None and flat.device.type == "cpu":
        cand = (flat > floor).nonzero().squeeze(1)
        if cand.numel() >= n_keep:
            vals, i = flat[cand].topk(n_keep, sorted=False)
            return vals, cand[i]
    return flat.topk(n_keep, sorted=False)


def batch_topk(acts_BF: Tensor, k: int, floor: float | None = None) -> tuple[Tensor, Tensor]:
    """Keep the B*k largest entries of the whole batch (Bussmann et al. 2024).

    Returns (codes_BF, smallest kept positive value; +inf when nothing positive was kept).
    """
    flat = acts_BF.flatten()
    vals, idx = _flat_topk(flat, min(k * acts_BF.shape[0], flat.numel()), floor)
    smallest = torch.where(vals > 0, vals, torch.full_like(vals, math.inf)).min()
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts_BF), smallest


def per_example_topk(acts_BF: Tensor, k: int) -> Tensor:
    vals, idx = acts_BF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(acts_BF).scatter(-1, idx, vals)


def _bags(keys: Tensor, n_bags: int) -> tuple[Tensor, Tensor]:
    """Order that sorts ``keys`` and embedding_bag offsets of bags 0..n_bags-1 (empty bags allowed)."""
    counts = torch.bincount(keys, minlength=n_bags)
    return keys.argsort(), torch.cumsum(counts, 0) - counts


class _SelectedPreacts(torch.autograd.Function):
    """pre[n] = (x_n[rows[n]] - b_pre) . W_enc_FD[cols[n]] + b_enc[cols[n]] for the selected pairs.

    The forward value comes from the no-grad dense pass that chose the pairs (``pre_N``), so nothing
    is recomputed. The backward never builds (N, D) temporaries (N = B*k pairs): grad_W by an
    embedding_bag over the pairs grouped by latent, grad_b_enc by index_add, grad_b_pre as
    -(per-latent grad sums) @ W_enc, and grad_x (only if the input needs it) by an embedding_bag.
    """

    @staticmethod
    def forward(ctx: Any, pre_N: Tensor, x_n: Tensor, b_pre: Tensor, w_enc: Tensor, b_enc: Tensor,
                rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x_n, b_pre, w_enc, rows, cols)
        return pre_N.to(w_enc.dtype, copy=True)  # parameter dtype, also under bf16 autocast

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x_n, b_pre, w_enc, rows, cols = ctx.saved_tensors
        n_lat, batch = w_enc.shape[0], x_n.shape[0]
        grad_x = grad_bpre = grad_w = grad_b = None
        g_F = torch.zeros(n_lat, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        if ctx.needs_input_grad[1]:
            order, offsets = _bags(rows, batch)
            grad_x = F.embedding_bag(cols[order], w_enc, offsets, mode="sum", per_sample_weights=g[order])
        if ctx.needs_input_grad[2]:
            grad_bpre = -(g_F @ w_enc)
        if ctx.needs_input_grad[3]:
            order, offsets = _bags(cols, n_lat)
            grad_w = F.embedding_bag(rows[order], x_n, offsets, mode="sum", per_sample_weights=g[order])
            grad_w = grad_w - g_F[:, None] * b_pre
        if ctx.needs_input_grad[4]:
            grad_b = g_F
        return None, grad_x, grad_bpre, grad_w, grad_b, None, None


class SparseAutoencoder(nn.Module):
    """Matryoshka BatchTopK SAE. ``forward`` trains; ``encode``/``decode`` are for use.

    Parameters: ``W_enc_FD`` (encoder rows: pre = x @ W_enc_FD^T, so W_enc = W_enc_FD^T is initialised
    to W_dec^T), ``b_enc_F``, ``W_dec_FD`` (unit-norm rows), ``b_pre_D`` (subtracted
    before encoding and added after decoding). Buffers (saved with the weights): normalisation
    ``norm_mean_D``/``norm_std_D``/``norm_fitted``, inference ``threshold``/``threshold_updates``,
    and the dead-latent counter ``samples_since_fired_F``.
    """

    config_class = SAEConfig

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        n_f, d = cfg.n_latents, cfg.d_in
        gen = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(n_f, d, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec_FD = nn.Parameter(w_dec)
        self.W_enc_FD = nn.Parameter(w_dec.clone())  # encoder = decoder transpose (Gao et al.)
        self.b_enc_F = nn.Parameter(torch.zeros(n_f))
        self.b_pre_D = nn.Parameter(torch.zeros(d))
        self.register_buffer("norm_mean_D", torch.zeros(d))
        self.register_buffer("norm_std_D", torch.ones(d))
        self.register_buffer("norm_fitted", torch.tensor(False))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("samples_since_fired_F", torch.zeros(n_f, dtype=torch.long))

    # ----------------------------------------------------------------- normalisation and init
    @torch.no_grad()
    def fit_normalization(self, x_ND: Tensor) -> None:
        """Store the training data's per-dimension mean and std (float64 accumulation)."""
        dev = self.norm_mean_D.device
        if self.cfg.normalize == "zscore":
            x = x_ND.detach().to(dev, torch.float64)
            self.norm_mean_D.copy_(x.mean(0))
            self.norm_std_D.copy_(x.std(0) + self.cfg.norm_eps)
        else:
            self.norm_mean_D.zero_()
            self.norm_std_D.fill_(1.0)
        self.norm_fitted.fill_(True)

    def normalize(self, x_BD: Tensor) -> Tensor:
        return (x_BD - self.norm_mean_D) / self.norm_std_D

    def denormalize(self, x_n_BD: Tensor) -> Tensor:
        return x_n_BD * self.norm_std_D + self.norm_mean_D

    @torch.no_grad()
    def init_from_sample(self, x_ND: Tensor, max_samples: int = 8192) -> None:
        """Set b_pre from a (raw) training sample: geometric median, mean or zero (cfg.init_b_pre)."""
        x = self.normalize(x_ND[:max_samples].to(self.b_pre_D.device, self.b_pre_D.dtype))
        if self.cfg.init_b_pre == "geometric_median":
            self.b_pre_D.copy_(geometric_median(x))
        elif self.cfg.init_b_pre == "mean":
            self.b_pre_D.copy_(x.mean(0))
        else:
            self.b_pre_D.zero_()

    # ----------------------------------------------------------------- encode / decode
    def activations(self, x_n_BD: Tensor) -> Tensor:
        """(B, F) ReLU pre-activations of normalised inputs, before any sparsification."""
        return F.relu((x_n_BD - self.b_pre_D) @ self.W_enc_FD.T + self.b_enc_F)

    def sparsify(self, acts_BF: Tensor, mode: InferenceMode) -> Tensor:
        if mode == "batchtopk":
            return batch_topk(acts_BF, self.cfg.k)[0]
        if mode == "topk":
            return per_example_topk(acts_BF, self.cfg.k)
        if mode == "threshold":
            if int(self.threshold_updates) == 0:
                raise RuntimeError("threshold inference needs a trained threshold: train the model "
                                   "or call calibrate_threshold(x) first")
            return acts_BF * (acts_BF > self.threshold)
        raise ValueError(f"unknown inference mode {mode!r}")

    def _mode(self, mode: InferenceMode | None) -> InferenceMode:
        if mode is not None:
            return mode
        return "batchtopk" if self.training else self.cfg.inference

    def encode(self, x_BD: Tensor, mode: InferenceMode | None = None) -> Tensor:
        """Raw embeddings -> (B, F) sparse codes. Default mode: cfg.inference in eval, batchtopk in train."""
        return self.sparsify(self.activations(self.normalize(x_BD)), self._mode(mode))

    def decode_normalized(self, codes_BF: Tensor) -> Tensor:
        return codes_BF @ self.W_dec_FD + self.b_pre_D

    def decode(self, codes_BF: Tensor) -> Tensor:
        """(B, F) codes -> (B, D) reconstruction in the raw input space."""
        return self.denormalize(self.decode_normalized(codes_BF))

    def prefix_reconstructions(self, codes_BF: Tensor) -> list[Tensor]:
        """Normalised-space reconstructions using the first m_g latents, one per Matryoshka prefix.

        Built cumulatively group by group, so the cost is one full decode (Bussmann et al. 2025).
        """
        out, recon, start = [], self.b_pre_D.expand(codes_BF.shape[0], -1), 0
        for end in self.cfg.prefix_sizes:
            recon = recon + codes_BF[:, start:end] @ self.W_dec_FD[start:end]
            out.append(recon)
            start = end
        return out

    # ----------------------------------------------------------------- training forward
    @property
    def dead_mask(self) -> Tensor:
        return self.samples_since_fired_F >= self.cfg.dead_after_samples

    def forward(self, x_BD: Tensor) -> SAEOutput:
        """Training (BatchTopK) or evaluation (cfg.inference) pass with the Matryoshka loss."""
        cfg = self.cfg
        x_n = self.normalize(x_BD)
        # Sum of squares about the batch mean: the FVU denominator. Clamped for one-row batches.
        total_var = (x_n - x_n.mean(0)).pow(2).sum().clamp_min(1e-8)
        if self.training and cfg.train_impl == "gather":
            with torch.no_grad():
                acts = F.relu((x_n - self.b_pre_D) @ self.W_enc_FD.T + self.b_enc_F)  # (B, F), selection only
                flat_vals, flat_idx = _flat_topk(acts.flatten(), min(cfg.k * x_n.shape[0], acts.numel()),
                                                 self._topk_floor())
                smallest_kept = torch.where(flat_vals > 0, flat_vals, math.inf).min()
            rows, cols = flat_idx // cfg.n_latents, flat_idx % cfg.n_latents
            # (B*k,) selected activations; gradient flows to b_pre, W_enc, b_enc as in the dense path.
            vals = F.relu(_SelectedPreacts.apply(flat_vals, x_n, self.b_pre_D, self.W_enc_FD, self.b_enc_F,
                                                 rows, cols))
            codes = acts.new_zeros(acts.shape, dtype=vals.dtype).index_put_((rows, cols), vals.detach())
            recon_BGD = self._prefix_recon_sparse(rows, cols, vals, x_n.shape[0])
            sq_err = (x_n[:, None, :] - recon_BGD).pow(2).sum((0, 2))  # (G,)
            x_hat_n = recon_BGD[:, -1]
            l1_norm = vals.sum() / x_n.shape[0]
        else:
            acts = self.activations(x_n)
            if self.training:
                codes, smallest_kept = batch_topk(acts, cfg.k, self._topk_floor())
            else:
                codes = self.sparsify(acts, cfg.inference)
            recons = self.prefix_reconstructions(codes)
            sq_err = torch.stack([(x_n - r).pow(2).sum() for r in recons])  # (G,)
            x_hat_n = recons[-1]
            l1_norm = codes.abs().sum(-1).mean()

        prefix_fvu = sq_err / total_var
        recon_loss = prefix_fvu.mean() if cfg.recon_loss == "fvu" else (sq_err / x_n.numel()).mean()
        l1 = cfg.l1_coeff * l1_norm
        dead = self.dead_mask
        aux = x_n.new_zeros(())
        if self.training and cfg.aux_coeff > 0:
            dead_idx = dead.nonzero().squeeze(1)  # one host sync: the dead subset's size sets the aux shapes
            n_dead = dead_idx.numel()
            if n_dead > 0:
                # index_select, not boolean indexing: the latter is several times slower on CPU.
                if cfg.train_impl == "gather":
                    acts_dead = F.relu((x_n - self.b_pre_D) @ self.W_enc_FD.index_select(0, dead_idx).T
                                       + self.b_enc_F.index_select(0, dead_idx))
                else:
                    acts_dead = acts.index_select(1, dead_idx)
                aux = self._aux_loss((x_n - x_hat_n).detach(), acts_dead,
                                     self.W_dec_FD.index_select(0, dead_idx), n_dead)
        loss = recon_loss + l1 + cfg.aux_coeff * aux

        if self.training:
            self._update_statistics(codes, smallest_kept, x_BD.shape[0])
        return SAEOutput(
            x_hat=self.denormalize(x_hat_n), codes=codes, loss=loss,
            fvu=prefix_fvu[-1].detach(), recon_loss=recon_loss.detach(), l1=l1.detach(),
            aux_loss=aux.detach(), l0=(codes > 0).sum(-1).float().mean(),
            prefix_fvu=prefix_fvu.detach(), dead_frac=dead.float().mean(),
        )

    def _topk_floor(self) -> float | None:
        # Half the running threshold: BatchTopK's cut moves far less than 2x between steps, and a
        # wrong guess only costs the fallback. CPU only (reading the threshold would sync a GPU).
        if self.threshold.device.type != "cpu" or int(self.threshold_updates) == 0:
            return None
        return 0.5 * float(self.threshold)

    def _prefix_recon_sparse(self, rows: Tensor, cols: Tensor, vals: Tensor, batch: int) -> Tensor:
        """(B, G, D) prefix reconstructions from (row, latent, value) triples via one embedding_bag.

        Each triple goes to bag (row, group of latent); per-group sums are then cumulated over groups.
        """
        n_groups = len(self.cfg.group_sizes)
        ends = torch.tensor(self.cfg.prefix_sizes, device=cols.device)
        group = torch.bucketize(cols, ends, right=True)  # (N,) group index of each latent
        order, offsets = _bags(group * batch + rows, batch * n_groups)
        per_group = F.embedding_bag(cols[order], self.W_dec_FD, offsets, mode="sum",
                                    per_sample_weights=vals[order]).view(n_groups, batch, -1)  # (G, B, D)
        recon, out = self.b_pre_D.expand(batch, -1), []
        for g in range(n_groups):  # a Python cumsum over G contiguous slices beats cumsum's strided backward
            recon = recon + per_group[g]
            out.append(recon)
        return torch.stack(out, 1)

    def _aux_loss(self, residual_BD: Tensor, acts_dead: Tensor, w_dead: Tensor, n_dead: int) -> Tensor:
        """Dead latents learn to reconstruct the residual the live ones leave (AuxK, Gao et al. 2024)."""
        k_aux = self.cfg.k_aux_resolved
        if self.cfg.aux_style == "wu2025":
            # Their form: batch-level top-(k_aux*B) cut, activations shifted down by the cut value, MSE.
            n_keep = min(k_aux * residual_BD.shape[0], acts_dead.numel())
            cut = acts_dead.flatten().topk(n_keep, sorted=False).values.min()
            e_hat = F.relu(acts_dead - cut) @ w_dead
            return (e_hat - residual_BD).pow(2).mean()
        # Normalised MSE of the residual as in Gao et al. (no down-weighting when few latents are dead:
        # the last dead latents are the ones a < 1% dead target needs revived).
        e_hat = per_example_topk(acts_dead, min(k_aux, n_dead)) @ w_dead
        res_var = (residual_BD - residual_BD.mean(0)).pow(2).sum().clamp_min(1e-8)
        return (e_hat - residual_BD).pow(2).sum() / res_var

    @torch.no_grad()
    def _update_statistics(self, codes_BF: Tensor, smallest_kept: Tensor, batch_size: int) -> None:
        """Training-time bookkeeping: threshold EMA and dead-latent counter, all-reduced under DDP.

        Written without host syncs (torch.where instead of Python branches) so a GPU step never waits.
        """
        has = torch.isfinite(smallest_kept)
        stats = torch.stack([torch.where(has, smallest_kept, 0.0), has.float()]).float()
        fired = (codes_BF > 0).any(0).to(torch.int32)
        n = torch.tensor(batch_size, device=codes_BF.device, dtype=torch.long)
        if _dist_ready():
            torch.distributed.all_reduce(stats)  # sum of per-rank minima, number of ranks that had one
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(n)
        batch_min = (stats[0] / stats[1].clamp_min(1.0)).to(self.threshold.dtype)
        m = self.cfg.threshold_momentum
        ema = torch.where(self.threshold_updates > 0, m * self.threshold + (1.0 - m) * batch_min, batch_min)
        self.threshold.copy_(torch.where(stats[1] > 0, ema, self.threshold))
        self.threshold_updates.add_((stats[1] > 0).long())
        self.samples_since_fired_F.add_(n)
        self.samples_since_fired_F.masked_fill_(fired.bool(), 0)

    @torch.no_grad()
    def calibrate_threshold(self, x_ND: Tensor, target_l0: float | None = None, batch_size: int = 4096) -> float:
        """Set the threshold so that mean L0 on ``x_ND`` equals ``target_l0`` (default k).

        The running EMA of training lags the model while it still learns (bench/sae_quality.py measured
        threshold-mode L0 52.6 at k = 64 after 300 steps), so ``train`` ends with this calibration on recent
        training rows. Under ``torch.distributed`` every rank
        passes its own rows and all get the same threshold: the one for all ranks' rows together.
        Memory: the ``target_l0 * N`` largest activations and one chunk's, not all (N, F) of them.
        """
        target = float(self.cfg.k if target_l0 is None else target_l0)
        dev = self.W_dec_FD.device
        n = torch.tensor(x_ND.shape[0], device=dev)
        if _dist_ready():
            torch.distributed.all_reduce(n)
        n_keep = max(1, int(round(target * int(n))))
        top = torch.empty(0, device=dev)
        for i in range(0, x_ND.shape[0], batch_size):
            acts = self.activations(self.normalize(x_ND[i:i + batch_size].to(dev).float())).flatten()
            pool = torch.cat([top, acts])
            top = pool.topk(min(n_keep, pool.numel()), sorted=False).values
        if _dist_ready():  # every rank's n_keep largest (padded to equal shapes), the same union on every rank
            top = torch.cat([top, top.new_full((n_keep - top.numel(),), -math.inf)])
            parts = [torch.empty_like(top) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, top)
            top = torch.cat(parts)
        thr = top.topk(min(n_keep, top.numel()), sorted=False).values.min().clamp_min(torch.finfo(top.dtype).tiny)
        self.threshold.copy_(thr)
        self.threshold_updates.clamp_(min=1)  # counts the EMA's updates; >= 1 marks a usable threshold
        return float(thr)

    # ----------------------------------------------------------------- decoder geometry
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row (call before optimizer.step)."""
        g = self.W_dec_FD.grad
        if g is None:
            return
        w = self.W_dec_FD / self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (call after optimizer.step)."""
        self.W_dec_FD.div_(self.W_dec_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def decoder_directions_raw(self) -> Tensor:
        """(F, D) unit decoder directions mapped back to the raw input space (undo the z-score)."""
        w = self.W_dec_FD.detach() * self.norm_std_D
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------- metrics
def log10_density_histogram(density_F: np.ndarray, n_samples: int, bin_width: float = 0.25
                            ) -> tuple[list[int], list[float]]:
    """Histogram of log10 firing density of the latents that fired at least once."""
    lo = math.floor(math.log10(1.0 / max(n_samples, 1)) / bin_width) * bin_width
    edges = np.arange(lo, bin_width / 2, bin_width)
    if len(edges) < 2:
        edges = np.array([lo, 0.0])
    live = density_F[density_F > 0]
    counts, _ = np.histogram(np.log10(live), bins=edges)
    return counts.tolist(), [float(e) for e in edges]


@torch.no_grad()
def evaluate_sae(model: SparseAutoencoder, x_ND: Tensor, batch_size: int = 1024,
                 mode: InferenceMode | None = None) -> dict[str, Any]:
    """Held-out metrics, with inputs normalised by the model's (training) statistics.

    FVU = sum ||x - x_hat||^2 / sum ||x - x_bar||^2 in normalised space, overall and per prefix;
    L0 mean and 5/50/95 percentiles; dead fraction (latents that never fire on ``x_ND``) and the
    training counter's dead fraction; log10 feature-density histogram. ``batch_size`` matters only
    for mode ``batchtopk``.
    """
    was_training = model.training
    model.eval()
    mode = mode or model.cfg.inference
    dev = model.W_dec_FD.device
    n_groups = len(model.cfg.group_sizes)
    sq_err = torch.zeros(n_groups, dtype=torch.float64, device=dev)
    sum_x = torch.zeros(model.cfg.d_in, dtype=torch.float64, device=dev)
    sum_sq = torch.zeros((), dtype=torch.float64, device=dev)
    fires = torch.zeros(model.cfg.n_latents, dtype=torch.float64, device=dev)
    l0s = []
    n = x_ND.shape[0]
    for i in range(0, n, batch_size):
        x_n = model.normalize(x_ND[i:i + batch_size].to(dev, model.W_dec_FD.dtype))
        codes = model.sparsify(model.activations(x_n), mode)
        for g, r in enumerate(model.prefix_reconstructions(codes)):
            sq_err[g] += (x_n - r).double().pow(2).sum()
        sum_x += x_n.double().sum(0)
        sum_sq += x_n.double().pow(2).sum()
        active = codes > 0
        fires += active.sum(0).double()
        l0s.append(active.sum(-1).cpu())
    model.train(was_training)
    total_var = (sum_sq - sum_x.pow(2).sum() / n).clamp_min(1e-12)
    prefix_fvu = (sq_err / total_var).cpu().tolist()
    l0 = torch.cat(l0s).double().numpy()
    density = (fires / n).cpu().numpy()
    hist, edges = log10_density_histogram(density, n)
    return {
        "fvu": prefix_fvu[-1],
        "fvu_prefix": prefix_fvu,
        "prefix_sizes": list(model.cfg.prefix_sizes),
        "l0_mean": float(l0.mean()),
        "l0_p5": float(np.percentile(l0, 5)),
        "l0_p50": float(np.percentile(l0, 50)),
        "l0_p95": float(np.percentile(l0, 95)),
        "dead_frac": float((density == 0).mean()),
        "dead_frac_train": float(model.dead_mask.float().mean()),
        "density_log10_hist": hist,
        "density_log10_edges": edges,
        "mode": mode,
        "n_samples": n,
    }


# --------------------------------------------------------------------------------- planted data
def planted_dictionary(n_samples: int, d: int, n_features: int, k_active: int, noise: float = 0.01,
                       zipf: float = 0.0, zipf_offset: float = 1.0, seed: int = 0, offset: float = 1.0,
                       frame: Literal["bases", "gaussian"] = "bases") -> tuple[Tensor, Tensor]:
    """Synthetic embeddings with a known sparse dictionary, for tests and benchmarks.

    Returns (x_ND, features_MD): each sample sums ``k_active`` distinct unit-norm features, drawn
    without replacement with weight (rank + zipf_offset)^-zipf (rank from 0; Zipf-Mandelbrot, so an
    offset > 1 keeps the head from being present in every sample), with magnitudes U(0.5, 1.5), plus
    a random offset vector and Gaussian noise of std ``noise`` per dimension.

    ``frame``: "gaussian" draws i.i.d. random directions; "bases" stacks random orthonormal bases
    (a low-coherence frame: mean squared cosine at the Welch bound (M-d)/(d(M-1)) instead of 1/d).
    The interference of the other active features bounds what any linear-encoder SAE can reach, at
    roughly (k_active-1) * mean cos^2 of FVU even with the true support, so the frame sets the floor.
    """
    gen = torch.Generator().manual_seed(seed)
    if frame == "bases":
        blocks = [torch.linalg.qr(torch.randn(d, d, generator=gen))[0].T for _ in range(-(-n_features // d))]
        feats = torch.cat(blocks)[:n_features]
        feats = feats[torch.randperm(n_features, generator=gen)]
    else:
        feats = torch.randn(n_features, d, generator=gen)
    feats = feats / feats.norm(dim=1, keepdim=True)
    # Weighted sampling without replacement by the Gumbel-top-k trick, in row chunks to bound memory.
    log_p = -zipf * (torch.arange(n_features, dtype=torch.float32) + zipf_offset).log()
    x = torch.empty(n_samples, d)
    mean = offset * torch.randn(d, generator=gen) / math.sqrt(d)
    chunk = max(1, (1 << 22) // n_features)
    for i in range(0, n_samples, chunk):
        m = min(chunk, n_samples - i)
        u = torch.rand(m, n_features, generator=gen).clamp_(1e-12, 1.0)
        idx = (log_p - (-u.log()).log()).topk(k_active, dim=1).indices  # (m, k_active)
        mags = 0.5 + torch.rand(m, k_active, generator=gen)
        x[i:i + m] = torch.einsum("mk,mkd->md", mags, feats[idx])
    x += mean + noise * torch.randn(n_samples, d, generator=gen)
    return x, feats


@torch.no_grad()
def dictionary_recovery(model: SparseAutoencoder, features_MD: Tensor, min_cos: float = 0.9) -> dict[str, float]:
    """Fraction of planted features whose best decoder direction (raw space) has cosine >= min_cos."""
    dirs = model.decoder_directions_raw().to(features_MD.dtype).cpu()
    f = features_MD / features_MD.norm(dim=1, keepdim=True)
    best = (f @ dirs.T).max(dim=1).values
    return {"recovered_frac": float((best >= min_cos).float().mean()), "mean_best_cos": float(best.mean())}
