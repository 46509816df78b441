"""A vector quantizer that does not collapse: EMA codebook, k-means init, dead-code restarts.

Sources for the methods combined here:
- EMA codebook updates: van den Oord et al. 2017 (VQ-VAE, appendix), Razavi et al. 2019 (VQ-VAE-2).
- k-means initialisation from the first batch and dead-code restarts from encoder outputs:
  Dhariwal et al. 2020 (Jukebox), as in lucidrains/vector-quantize-pytorch.
- l2-normalised low-dimensional ("factorised") lookup: Yu et al. 2021 (ViT-VQGAN, sec. 3.2).

Distributed data parallel: every rank must hold the same codebook. The decision to synchronise
is taken at *call* time (``torch.distributed.is_available() and is_initialized()``), never at
construction, so a quantizer built before ``init_process_group`` still syncs. EMA statistics are
all-reduced; k-means initialisation and dead-code restarts gather candidates from every rank and
rank 0's result is broadcast, so randomness can never make the ranks diverge.

Pure torch (see ARCHITECTURE.md): imports only torch, einops and galray.config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from galray.config import check


@dataclass(frozen=True)
class QuantizerConfig:
    """Vector quantizer settings."""

    dim: int = 256
    """Dimension of the encoder vectors that come in and of the quantized vectors that go out."""
    codebook_size: int = 1024
    """Number of codes K."""
    factorized_dim: int | None = None
    """If set, look codes up in an l2-normalised space of this dimension (ViT-VQGAN factorised
    codes): linear projections map ``dim`` -> ``factorized_dim`` and back."""
    beta: float = 0.25
    """Commitment weight: loss = beta * ||z - sg(q)||^2 (the codebook itself learns by EMA)."""
    decay: float = 0.99
    """EMA decay of the per-code counts and sums."""
    eps: float = 1e-5
    """Laplace smoothing of the EMA counts."""
    kmeans_init: bool = True
    """Initialise the codebook with k-means on the first training batch's encoder outputs."""
    kmeans_iters: int = 10
    """Lloyd iterations for the k-means initialisation."""
    kmeans_max_samples: int = 65536
    """Cap on the vectors (over all ranks) used for k-means, to bound its cost."""
    dead_code_fraction: float = 0.5
    """A code is dead when its EMA share of assignments falls below this fraction of the
    uniform share 1/K; dead codes are restarted from recent encoder outputs. 0 disables restarts.
    Relative, so the setting does not depend on batch size or world size."""
    restart_every: int = 1
    """Check for dead codes every this many training steps."""
    restart_sampling: Literal["uniform", "error"] = "uniform"
    """How restart candidates are drawn from the batch: uniformly (candidates follow the data
    density, so restarts split the heaviest clusters and even out code usage: the higher
    perplexity in bench/vq_codebook.py), or in proportion to their quantization error
    (k-means++-like: new codes go where the codebook fits worst; slightly lower MSE there)."""
    seed: int = 0
    """Seed for the random choices of k-means init and restarts (rank 0's choice is broadcast)."""

    def __post_init__(self) -> None:
        check(self.dim > 0, "dim", "must be positive")
        check(self.codebook_size > 1, "codebook_size", "must be at least 2")
        check(self.factorized_dim is None or self.factorized_dim > 0, "factorized_dim", "must be positive or null")
        check(self.beta >= 0, "beta", "must be non-negative")
        check(0.0 <= self.decay < 1.0, "decay", "must be in [0, 1)")
        check(self.eps > 0, "eps", "must be positive")
        check(self.kmeans_iters >= 0, "kmeans_iters", "must be non-negative")
        check(self.kmeans_max_samples >= self.codebook_size, "kmeans_max_samples", "must be >= codebook_size")
        check(0.0 <= self.dead_code_fraction < 1.0, "dead_code_fraction", "must be in [0, 1)")
        check(self.restart_every >= 1, "restart_every", "must be >= 1")
        check(self.restart_sampling in ("uniform", "error"), "restart_sampling", "must be 'uniform' or 'error'")


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor
    """Quantized vectors, same shape as the input; straight-through gradients when training."""
    indices: torch.Tensor
    """Code indices, long, the input shape without the channel dimension."""
    loss: torch.Tensor
    """The quantizer's loss to add to the model's: beta * commit_loss."""
    commit_loss: torch.Tensor
    """||z - sg(q)||^2, mean over elements, in the lookup space."""
    perplexity: torch.Tensor
    """exp(entropy) of this batch's code usage (local to this rank)."""
    utilisation: torch.Tensor
    """Share of codes used at least once in this batch (local to this rank)."""


def distributed_world() -> int:
    """World size if a process group is live *now*, else 1. Called at every use, on purpose."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if distributed_world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (identity without a group)."""
    world = distributed_world()
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def _broadcast_(*tensors: torch.Tensor) -> None:
    if distributed_world() > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


def _sample_rows(x_ND: torch.Tensor, n: int, gen: torch.Generator, weights_N: torch.Tensor | None = None) -> torch.Tensor:
    """``n`` rows of ``x_ND``: without replacement where possible, weighted if ``weights_N`` given."""
    N = x_ND.shape[0]
    if weights_N is None:
        weights_N = torch.ones(N, device=x_ND.device)
    weights_N = weights_N.float().clamp_min(0) + 1e-12
    idx = torch.multinomial(weights_N.cpu(), n, replacement=n > N, generator=gen).to(x_ND.device)
    return x_ND[idx]


def pairwise_sq_dist(x_ND: torch.Tensor, c_KD: torch.Tensor) -> torch.Tensor:
    """Squared euclidean distances (N, K), by the expansion |x|^2 - 2 x.c + |c|^2."""
    return (
        x_ND.pow(2).sum(1, keepdim=True)
        - 2.0 * x_ND @ c_KD.t()
        + c_KD.pow(2).sum(1)[None, :]
    ).clamp_min_(0.0)


def kmeans_plusplus(x_ND: torch.Tensor, k: int, gen: torch.Generator, max_points: int | None = None) -> torch.Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii 2007): each next seed drawn with probability
    proportional to the squared distance to the nearest seed so far. Seeds on at most
    ``max_points`` rows (default 16 k) to bound the sequential cost."""
    max_points = max_points or 16 * k
    if x_ND.shape[0] > max_points:
        x_ND = _sample_rows(x_ND, max_points, gen)
    N = x_ND.shape[0]
    # Uniform draws made up front (one generator call), each turned into a D^2-weighted pick by
    # inverse-CDF search: cheap per seed, unlike a multinomial call per seed.
    u_K = torch.rand(k, generator=gen, dtype=torch.float64).to(x_ND.device)
    chosen = torch.empty(k, dtype=torch.long, device=x_ND.device)
    chosen[0] = int(u_K[0] * N)
    x2_N = x_ND.pow(2).sum(1)

    def sq_dist_to(i: torch.Tensor) -> torch.Tensor:  # |x|^2 - 2 x.c + |c|^2 as one matrix-vector product
        return torch.addmv(x2_N, x_ND, x_ND[i], alpha=-2.0).add_(x2_N[i]).clamp_min_(0.0)

    d2_N = sq_dist_to(chosen[0])
    for i in range(1, k):
        cdf_N = torch.cumsum(d2_N.double(), 0)
        chosen[i] = torch.searchsorted(cdf_N, u_K[i : i + 1] * cdf_N[-1]).clamp_max(N - 1)[0]
        d2_N = torch.minimum(d2_N, sq_dist_to(chosen[i]))
    return x_ND[chosen].clone()


def kmeans(x_ND: torch.Tensor, k: int, iters: int, gen: torch.Generator, spherical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x_ND`` from k-means++ seeds: returns centroids (K, D) and counts (K,).
    Empty clusters are re-seeded with random points. ``spherical`` keeps centroids on the unit sphere."""
    c_KD = kmeans_plusplus(x_ND, k, gen)
    counts_K = torch.zeros(k, device=x_ND.device)
    for _ in range(max(iters, 1)):
        assign_N = pairwise_sq_dist(x_ND, c_KD).argmin(1)
        counts_K = torch.bincount(assign_N, minlength=k).float()
        sums_KD = torch.zeros_like(c_KD).index_add_(0, assign_N, x_ND)
        new_KD = sums_KD / counts_K.clamp_min(1.0)[:, None]
        empty_K = counts_K == 0
        if empty_K.any():
            new_KD[empty_K] = _sample_rows(x_ND, int(empty_K.sum()), gen)
        c_KD = F.normalize(new_KD, dim=-1) if spherical else new_KD
    return c_KD, counts_K


class VectorQuantizer(nn.Module):
    """EMA vector quantizer. ``forward`` takes (B, D, H, W) maps or (B, N, D) sequences.

    Buffers (saved with the model): ``embed`` (K, d) codebook in the lookup space, ``embed_avg``
    (K, d) and ``cluster_size`` (K,) EMA statistics, ``initted`` and ``step`` counters and
    ``restarts`` (total codes restarted so far, for monitoring).
    """

    config_class = QuantizerConfig

    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.factorized_dim or cfg.dim
        self.lookup_dim = d
        self.factorized = cfg.factorized_dim is not None
        if self.factorized:
            self.project_in = nn.Linear(cfg.dim, d)
            self.project_out = nn.Linear(d, cfg.dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        embed = torch.randn(cfg.codebook_size, d)
        if self.factorized:
            embed = F.normalize(embed, dim=-1)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        self.register_buffer("restarts", torch.tensor(0, dtype=torch.long))

    # ---- lookups -------------------------------------------------------------------------------
    def _to_lookup(self, z_ND: torch.Tensor) -> torch.Tensor:
        z = self.project_in(z_ND)
        return F.normalize(z, dim=-1) if self.factorized else z

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Output-space vectors (..., dim) of code ``indices`` (...)."""
        return self.project_out(self.embed[indices])

    def codebook(self) -> torch.Tensor:
        """The codes as output-space vectors (K, dim)."""
        return self.project_out(self.embed)

    @torch.no_grad()
    def nearest(self, z_ND: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (N,) for lookup-space vectors (N, d)."""
        # argmin_k |z|^2 - 2 z.e_k + |e_k|^2 = argmin_k |e_k|^2 - 2 z.e_k: one fused addmm.
        e_Kd = self.embed.float()
        return torch.addmm(e_Kd.pow(2).sum(1)[None, :], z_ND.float(), e_Kd.t(), alpha=-2.0).argmin(1)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor, update: bool | None = None) -> QuantizerOutput:
        """Quantize ``z`` (B, D, H, W) or (B, N, D). The codebook learns (EMA, init, restarts) when
        ``update`` is True; by default when the module is in training mode."""
        if z.ndim == 4:
            B, _, H, W = z.shape
            z_ND = rearrange(z, "b d h w -> (b h w) d")
        elif z.ndim == 3:
            B, N, _ = z.shape
            z_ND = rearrange(z, "b n d -> (b n) d")
        else:
            raise ValueError(f"expected (B, D, H, W) or (B, N, D), got shape {tuple(z.shape)}")
        update = self.training if update is None else update

        # Distances and EMA statistics in float32, whatever the autocast context.
        with torch.autocast(device_type=z.device.type, enabled=False):
            zl_Nd = self._to_lookup(z_ND.float())
            if update:
                self._maybe_init(zl_Nd.detach())
            idx_N = self.nearest(zl_Nd.detach())
            if update:
                self._ema_update(zl_Nd.detach(), idx_N)
            q_Nd = self.embed[idx_N]
            commit = F.mse_loss(zl_Nd, q_Nd.detach())
            if torch.is_grad_enabled() and zl_Nd.requires_grad:
                q_Nd = zl_Nd + (q_Nd - zl_Nd).detach()  # straight-through estimator
            out_ND = self.project_out(q_Nd)

        counts_K = torch.bincount(idx_N, minlength=self.cfg.codebook_size).float()
        probs_K = counts_K / counts_K.sum()
        perplexity = torch.exp(-(probs_K * torch.log(probs_K.clamp_min(1e-12))).sum())
        utilisation = (counts_K > 0).float().mean()

        out_ND = out_ND.to(z.dtype)
        if z.ndim == 4:
            quantized = rearrange(out_ND, "(b h w) d -> b d h w", b=B, h=H, w=W)
            indices = rearrange(idx_N, "(b h w) -> b h w", b=B, h=H, w=W)
        else:
            quantized = rearrange(out_ND, "(b n) d -> b n d", b=B, n=N)
            indices = rearrange(idx_N, "(b n) -> b n", b=B, n=N)
        return QuantizerOutput(quantized, indices, self.cfg.beta * commit, commit, perplexity, utilisation)

    # ---- codebook learning ---------------------------------------------------------------------
    def _generator(self, salt: int) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.cfg.seed * 1_000_003 + int(self.step) * 7919 + salt)
        return gen

    @torch.no_grad()
    def _maybe_init(self, z_Nd: torch.Tensor) -> None:
        """First training call: k-means on the gathered batch (rank 0's result wins), or at least
        rank 0's random codebook, so every rank starts from the same codebook."""
        if bool(self.initted):
            return
        cfg = self.cfg
        if cfg.kmeans_init:
            world = distributed_world()
            per_rank = max(cfg.kmeans_max_samples // world, 1)
            gen = self._generator(salt=1)
            local = _sample_rows(z_Nd, min(per_rank, z_Nd.shape[0]), gen) if z_Nd.shape[0] > per_rank else z_Nd
            # all_gather needs equal shapes: pad each rank to per_rank rows by resampling.
            if world > 1 and local.shape[0] < per_rank:
                local = torch.cat([local, _sample_rows(local, per_rank - local.shape[0], gen)])
            pool = _all_gather_cat(local)
            centroids, counts = kmeans(pool, cfg.codebook_size, cfg.kmeans_iters, gen, spherical=self.factorized)
            # Counts are on the scale of one (global) batch, like the EMA counts that follow.
            scale = z_Nd.shape[0] * world / pool.shape[0]
            counts = counts * scale
            self.embed.copy_(centroids)
            self.cluster_size.copy_(counts)
            self.embed_avg.copy_(centroids * counts[:, None])
        else:
            self.cluster_size.fill_(z_Nd.shape[0] * distributed_world() / cfg.codebook_size)
            self.embed_avg.copy_(self.embed * self.cluster_size[:, None])
        _broadcast_(self.embed, self.embed_avg, self.cluster_size)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z_Nd: torch.Tensor, idx_N: torch.Tensor) -> None:
        cfg = self.cfg
        K = cfg.codebook_size
        counts_K = torch.bincount(idx_N, minlength=K).float()
        sums_Kd = torch.zeros_like(self.embed).index_add_(0, idx_N, z_Nd)
        # One all-reduce of both statistics: the same EMA on every rank, so the same codebook.
        packed = _all_reduce_sum(torch.cat([counts_K[:, None], sums_Kd], dim=1))
        counts_K, sums_Kd = packed[:, 0], packed[:, 1:]
        self.cluster_size.mul_(cfg.decay).add_(counts_K, alpha=1 - cfg.decay)
        self.embed_avg.mul_(cfg.decay).add_(sums_Kd, alpha=1 - cfg.decay)
        n = self.cluster_size.sum()
        smoothed_K = (self.cluster_size + cfg.eps) / (n + K * cfg.eps) * n  # Laplace smoothing
        embed = self.embed_avg / smoothed_K[:, None]
        self.embed.copy_(F.normalize(embed, dim=-1) if self.factorized else embed)
        self.step.add_(1)
        if cfg.dead_code_fraction > 0 and int(self.step) % cfg.restart_every == 0:
            self._restart_dead(z_Nd, idx_N)

    @torch.no_grad()
    def _restart_dead(self, z_Nd: torch.Tensor, idx_N: torch.Tensor) -> None:
        """Replace codes whose EMA share is below ``dead_code_fraction / K`` by encoder outputs of
        this batch, gathered from all ranks. Whether to restart depends only on synced buffers, so
        every rank takes part in the same collectives; rank 0's choice is broadcast."""
        cfg = self.cfg
        K = cfg.codebook_size
        share_K = self.cluster_size / self.cluster_size.sum().clamp_min(1e-12)
        dead_K = share_K < cfg.dead_code_fraction / K
        n_dead = int(dead_K.sum())
        if n_dead == 0:
            return
        gen = self._generator(salt=2)
        weights = None
        if cfg.restart_sampling == "error":
            weights = (z_Nd - self.embed[idx_N]).pow(2).sum(1)
        # Each rank offers n_dead candidates (equal shapes for all_gather), with their weights.
        local = _sample_rows(z_Nd, n_dead, gen, weights)
        pool = _all_gather_cat(local)
        if pool.shape[0] > n_dead:
            w = None
            if weights is not None:
                w = pairwise_sq_dist(pool, self.embed).min(1).values
            pool = _sample_rows(pool, n_dead, gen, w)
        # A restarted code starts at twice the dead level: it must win assignments to survive.
        size = 2.0 * cfg.dead_code_fraction * self.cluster_size.sum() / K
        self.embed[dead_K] = pool
        self.embed_avg[dead_K] = pool * size
        self.cluster_size[dead_K] = size
        _broadcast_(self.embed, self.embed_avg, self.cluster_size)
        self.restarts.add_(n_dead)
