"""Class-conditional causal transformer prior over VQ-VAE code grids, with a KV cache.

Sequence layout (length ``seq_len + 1`` at most, codes in raster order of the h x w grid)::

    position:  0        1     2    3    ...  seq_len
    token:     class    SOS   c0   c1   ...  c_{seq_len-2}
    predicts:  -        c0    c1   c2   ...  c_{seq_len-1}

The class token comes from an embedding with ``num_classes + 1`` rows; the last row
(``cfg.null_class``) is the "no label" token that class dropout trains, which makes
classifier-free guidance possible (Ho & Salimans 2022). The last code is never an input,
so ``seq_len + 1`` learned positions suffice. The output head shares its weight with the
code-token embedding (Press & Wolf 2017), as in nanoGPT's ``model.py``.

Attention is ``torch.nn.functional.scaled_dot_product_attention``. Incremental decoding
writes keys/values into a per-layer preallocated ``(B, nh, T, hs)`` buffer (:class:`KVCache`),
so each new token costs one single-position forward. Sampling lives in ``sampling.py``.

Pure torch: imports nothing from galray outside ``galray.config``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from galray.config import check


@dataclass(frozen=True)
class PriorConfig:
    """Shape and regularisation of the prior."""

    vocab_size: int = 1024
    """Number of VQ codes (codebook size); the head predicts one of these."""
    num_classes: int = 10
    """Number of real class labels; label ``num_classes`` is the null/unconditional class."""
    seq_len: int = 256
    """Codes per image (h * w of the VQ grid, e.g. 16 x 16 = 256)."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block; must divide d_model."""
    mlp_ratio: int = 4
    """Hidden width of each MLP as a multiple of d_model."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    class_dropout: float = 0.1
    """Probability that a training label is replaced by the null class (enables CFG)."""
    tie_weights: bool = True
    """Share the code-token embedding with the output head."""

    def __post_init__(self) -> None:
        check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
        check(self.num_classes >= 1, "num_classes", "must be >= 1")
        check(self.seq_len >= 1, "seq_len", "must be >= 1")
        check(self.d_model >= 1, "d_model", "must be >= 1")
        check(self.n_layers >= 1, "n_layers", "must be >= 1")
        check(self.n_heads >= 1, "n_heads", "must be >= 1")
        check(self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model={self.d_model}")
        check(self.mlp_ratio >= 1, "mlp_ratio", "must be >= 1")
        check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        check(0.0 <= self.class_dropout <= 1.0, "class_dropout", "must be in [0, 1]")

    @property
    def null_class(self) -> int:
        """Label index of the unconditional ("no class") token."""
        return self.num_classes

    @property
    def max_positions(self) -> int:
        """Input positions: class, SOS and the first seq_len - 1 codes."""
        return self.seq_len + 1


class PriorOutput(NamedTuple):
    logits: Tensor  # (B, T, V): logits[:, t] is the distribution of code t
    loss: Tensor | None  # scalar mean cross-entropy over the T codes, None without targets


class KVCache:
    """Per-layer preallocated key/value buffers, each ``(B, nh, max_len, hs)``.

    ``length`` counts the positions already written; the model appends at ``length``.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, start: int, k_BHTC: Tensor, v_BHTC: Tensor) -> tuple[Tensor, Tensor]:
        """Write keys/values of positions [start, start+T) and return all keys/values so far."""
        end = start + k_BHTC.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        self.k[layer][:, :, start:end] = k_BHTC
        self.v[layer][:, :, start:end] = v_BHTC
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).split(D, dim=2)
        # (B, T, D) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, start, k, v)  # (B, nh, start+T, hs)
        s = k.shape[2]
        drop = self.dropout if self.training else 0.0
        if T == 1:
            # One new query sees every cached position: no mask needed.
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif s == T:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            # Chunk of T queries after s - T cached positions: query i sees keys <= s - T + i.
            mask_TS = torch.ones(T, s, dtype=torch.bool, device=x_BTD.device).tril(diagonal=s - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TS, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2)."""

    def __init__(self, cfg: PriorConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        x_BTD = x_BTD + self.attn(self.ln1(x_BTD), cache, start)
        return x_BTD + self.mlp(self.ln2(x_BTD))


class Prior(nn.Module):
    """Causal transformer over [class, SOS, codes] that predicts each code from those before it."""

    config_class = PriorConfig

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.d_model)  # last row = null class
        self.sos = nn.Parameter(torch.zeros(cfg.d_model))
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_positions, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        for p in (self.sos, self.pos_emb):
            nn.init.normal_(p, std=0.02)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layers) so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- building blocks ---------------------------------------------------------------------

    def _prefix_embeddings(self, labels_B: Tensor, codes_BT: Tensor) -> Tensor:
        """Embeddings of [class, SOS, codes_BT] at positions 0 .. T+1: (B, T+2, D)."""
        B, T = codes_BT.shape
        if T + 2 > self.cfg.max_positions:
            raise ValueError(f"{T} input codes exceed seq_len - 1 = {self.cfg.seq_len - 1}")
        cls_B1D = self.class_emb(labels_B)[:, None]
        sos_B1D = self.sos.expand(B, 1, -1)
        x = torch.cat([cls_B1D, sos_B1D, self.tok_emb(codes_BT)], dim=1)
        return x + self.pos_emb[: T + 2]

    def _trunk(self, x_BTD: Tensor, cache: KVCache | None = None, start: int = 0) -> Tensor:
        x_BTD = self.drop(x_BTD)
        for block in self.blocks:
            x_BTD = block(x_BTD, cache, start)
        return self.ln_f(x_BTD)

    # -- training ----------------------------------------------------------------------------

    def forward(self, codes_BT: Tensor, labels_B: Tensor) -> PriorOutput:
        """Teacher-forced logits for codes_BT (T <= seq_len, a prefix of the grid) and their loss.

        ``labels_B`` holds class ids in [0, num_classes]; ``num_classes`` is the null class.
        Class dropout is the caller's job (``galray.train.prior_loop.drop_labels``).
        """
        T = codes_BT.shape[1]
        x = self._prefix_embeddings(labels_B, codes_BT[:, : T - 1])  # (B, T+1, D)
        h = self._trunk(x)[:, 1:]  # outputs from SOS on: (B, T, D)
        logits_BTV = self.head(h)
        loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), codes_BT.reshape(-1))
        return PriorOutput(logits_BTV, loss)

    # -- sampling primitives (used by galray.models.sampling) --------------------------------

    @torch.no_grad()
    def next_logits_naive(self, labels_B: Tensor, codes_BT: Tensor) -> Tensor:
        """Logits (B, V) of code T given codes_BT, recomputing the whole sequence (no cache)."""
        h = self._trunk(self._prefix_embeddings(labels_B, codes_BT))
        return self.head(h[:, -1])

    def new_cache(self, batch: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows, on the parameters' device and dtype by default."""
        p = self.pos_emb
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_heads, self.cfg.max_positions,
                       self.cfg.d_model // self.cfg.n_heads, device or p.device, dtype or p.dtype)

    @torch.no_grad()
    def prefill(self, labels_B: Tensor, cache: KVCache) -> Tensor:
        """Run [class, SOS] into an empty cache; return the logits (B, V) of code 0."""
        if cache.length != 0:
            raise ValueError("prefill needs an empty cache")
        empty = torch.empty(labels_B.shape[0], 0, dtype=torch.long, device=labels_B.device)
        h = self._trunk(self._prefix_embeddings(labels_B, empty), cache, 0)
        cache.length = 2
        return self.head(h[:, -1])

    @torch.no_grad()
    def decode_step(self, codes_B: Tensor, cache: KVCache) -> Tensor:
        """Append one code per row at the cache's next position; return the logits (B, V) of the next code."""
        pos = cache.length
        if pos >= self.cfg.max_positions:
            raise ValueError(f"sequence is full ({self.cfg.seq_len} codes)")
        x_B1D = (self.tok_emb(codes_B) + self.pos_emb[pos])[:, None]
        h = self._trunk(x_B1D, cache, pos)
        cache.length = pos + 1
        return self.head(h[:, -1])
