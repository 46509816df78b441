"""galray's own encoder: a timm backbone trained on the survey itself (`galray train encoder`).

**Self-supervised** (SimCLR: Chen et al. 2020, ICML; on galaxies Hayat et al. 2021, ApJL 911 L33,
where fine-tuning the SimCLR encoder on SDSS matched a supervised model with 2-4x fewer labels):
two random views of every cutout (:mod:`galray.models.augment`: rotation, flip, zoom, shift, PSF-like
blur, extinction-like colour jitter, noise) go through the backbone and a projector MLP, and the
NT-Xent loss (:mod:`galray.models.encoder_losses`) pulls the two views of a galaxy together and
pushes the other galaxies of the batch away. Stein et al. 2021 (arXiv:2110.13151) trained MoCo v2,
the same contrastive objective with a queue of negatives, on 42 million DESI Legacy Survey galaxies
for similarity search; Walmsley et al. 2022 (MNRAS 513 1581) combined BYOL with Zoobot's
Dirichlet loss. In galray's experiments (simulated survey + Hubble XDF cutouts, 32 px, a few hundred
steps on CPU) SimCLR gave the best linear probes of the four (SimCLR, MoCo v2, BYOL, VICReg).

**Supervised fine-tuning** (as Zoobot offers it, Walmsley et al. 2023, JOSS 8 5312): a linear head on
the pooled features, trained with cross-entropy on classes (``num_classes``) or with the
Dirichlet-multinomial likelihood of Galaxy Zoo vote counts (``vote_groups``: answers per
question), with the backbone frozen (``finetune_blocks=0``), its last blocks free
(``finetune_blocks=k``, timm's coarse parameter groups counted from the end) or all free (-1).

**Input.** Pixels on the [0, 1] scale (what `galray embed`'s preprocessing gives, uint8 / 255); the
model normalises each image itself (:func:`normalize_images`), so training and inference see the same
scale whoever calls it. By default (``normalization: asinh``) each image, minus its sky, is read in
units of its own sky noise and asinh-stretched (Lupton et al. 1999): a survey's depth and gain drop
out, while a galaxy's signal-to-noise and its faint outskirts, where sizes and shapes are measured,
stay. The first release divided each image by its peak (``peak``), which hid them: on the real XDF
cutouts the axis-ratio probe rose from R^2 0.007 (peak) to 0.19 (asinh), same training otherwise.

**Embedding.** :meth:`SurveyEncoder.embed` is the backbone's pooled features (with ``pool: stages``,
also the spatial mean of every stage's output: multi-scale, so size and fine structure survive the
last stage's pooling), averaged over the eight rotations and flips of the square (the dihedral
group D4) when ``invariant``: exactly invariant to them, as galaxy morphology is. It costs 8
forward passes and measurably helps real galaxies (the XDF axis-ratio probe rose from R^2 0.02 to
0.24 in galray's first experiments).

Pure torch + timm (no Ray). Saved as config.json + model.safetensors (:mod:`galray.models.checkpoint`);
:func:`save_backbone_weights` also writes the bare timm backbone, which
``galray embed --model NAME --weights FILE`` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from galray.config import ConfigError, check
from galray.models.augment import sky_sigma
from galray.models.backbone_config import PICO_ARCH

BACKBONE_WEIGHTS_NAME = "backbone.safetensors"


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the encoder (the optimisation is :class:`galray.train.encoder_loop.EncoderTrainConfig`)."""

    backbone: str = "convnext_nano"
    """Any ``timm.create_model`` name (randomly initialised: galray trains it), e.g. convnext_nano,
    vit_small_patch16_224, galray_convnext_pico."""
    backbone_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments, e.g. {img_size: 64, patch_size: 8} for a ViT."""
    image_size: int = 64
    """Input side in pixels: cutouts are resized to it (the same preprocessing as `galray embed`)."""
    in_channels: int = 3
    """Input channels (3 for colour cutouts)."""
    proj_hidden: int = 512
    """Hidden width of the projector MLP (SimCLR's g)."""
    proj_dim: int = 128
    """Output width of the projector, where the contrastive loss is computed; 0: no projector
    (fine-tuning, where every trained parameter must get a gradient)."""
    num_classes: int = 0
    """Fine-tuning on classes: width of the linear head (0: none)."""
    vote_groups: tuple[int, ...] = ()
    """Fine-tuning on Galaxy Zoo votes: answers per question, in the order of the vote columns
    (Zoobot's Dirichlet-multinomial head); empty: none."""
    finetune_blocks: int = -1
    """Backbone blocks trained: -1 all; 0 none (frozen backbone, a linear probe); k the last k of
    timm's coarse parameter groups (Zoobot's n_blocks)."""
    invariant: bool = True
    """Embeddings averaged over the 8 rotations/flips of the square (exactly rotation-invariant; 8x the compute)."""
    normalization: Literal["asinh", "peak"] = "asinh"
    """How :meth:`SurveyEncoder.normalize` scales each image: ``asinh``, in units of its own sky noise
    and asinh-stretched (keeps signal-to-noise, faint isophotes and brightness); ``peak``, divided by
    its robust peak (galray's first encoder)."""
    pool: Literal["last", "stages"] = "stages"
    """What :meth:`SurveyEncoder.embed` returns: ``last``, the backbone's pooled output (what the
    projector and head read); ``stages``, that concatenated with the spatial mean of every stage's
    output (timm's ``forward_intermediates``): the early stages keep size and shape detail at a
    resolution that the last stage (1x1 for the pico at 32 px) has pooled away."""

    def __post_init__(self) -> None:
        check(bool(self.backbone), "backbone", "a timm model name is required, e.g. convnext_nano")
        check(self.image_size >= 16, "image_size", "must be at least 16 pixels")
        check(self.in_channels >= 1, "in_channels", "must be at least 1")
        check(self.proj_hidden >= 1, "proj_hidden", "must be positive")
        check(self.proj_dim >= 0, "proj_dim", "must be positive, or 0 for no projector")
        check(self.num_classes == 0 or self.num_classes >= 2, "num_classes", "must be 0 (no head) or at least 2")
        check(all(g >= 2 for g in self.vote_groups), "vote_groups", "every question needs at least 2 answers")
        check(not (self.num_classes and self.vote_groups), "vote_groups",
              "a head for classes or for votes, not both (set num_classes to 0)")
        check(self.finetune_blocks >= -1, "finetune_blocks", "must be -1 (all), 0 (frozen) or a block count")
        check(self.normalization in ("asinh", "peak"), "normalization", "must be asinh or peak")
        check(self.pool in ("last", "stages"), "pool", "must be last or stages")

    @property
    def head_outputs(self) -> int:
        return self.num_classes or sum(self.vote_groups)


ENCODER_PRESETS: dict[str, EncoderConfig] = {
    # Zoobot's default backbone (Walmsley et al. 2023); at 64 px its last stage is 2x2.
    "convnext_nano": EncoderConfig(backbone="convnext_nano", image_size=64),
    # ViT-S with 8-pixel patches at 64 px: 64 tokens, mean-pooled (as the Euclid MAE encoder pools).
    "vit_small": EncoderConfig(backbone="vit_small_patch16_224", image_size=64,
                               backbone_args={"img_size": 64, "patch_size": 8, "global_pool": "avg"}),
    # A CPU-sized ConvNeXt at 32 px: the demo's and the benchmark's encoder.
    "pico": EncoderConfig(backbone=PICO_ARCH, image_size=32),
}


def encoder_preset(name: str) -> EncoderConfig:
    if name not in ENCODER_PRESETS:
        raise ConfigError("preset", f"unknown encoder preset {name!r}: one of {', '.join(ENCODER_PRESETS)}")
    return ENCODER_PRESETS[name]


class EncoderOutput(NamedTuple):
    """What :meth:`SurveyEncoder.forward` returns."""

    features_BD: Tensor
    """Pooled backbone features of the (single) view given: the embedding before D4 averaging."""
    projection_BP: Tensor | None
    """The projector's output, where the contrastive loss is computed; None without a projector."""
    head_BK: Tensor | None
    """Class logits (num_classes) or Dirichlet concentrations > 1 (vote_groups); None without a head."""


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """SimCLR's projector g: Linear-BN-ReLU-Linear (Chen et al. 2020)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


ASINH_SOFTENING = 2.0
"""The asinh stretch is linear up to this many sky sigmas and logarithmic beyond (Lupton et al. 1999's softening)."""
SKY_FLOOR = 1.0 / 255
"""Smallest sky noise used (one 8-bit step): flat or compressed skies (JPEG) measure a MAD near 0."""


def normalize_images(x_BCHW: Tensor, mode: str = "asinh") -> Tensor:
    """(B, C, H, W) images on the [0, 1] scale -> the backbone's input, per image, minus each channel's
    median (the sky), then

    - ``asinh``: divided by ASINH_SOFTENING times the image's sky noise (1.4826 MAD of its outer
      frame, one value for all channels so colours keep their ratios) and asinh-stretched, as
      Lupton et al. 1999 (AJ 118 1406) and Lupton et al. 2004 (PASP 116 133) render survey images.
      Pixels are read in units of the image's own noise, so a survey's depth and gain drop out while
      a galaxy's signal-to-noise, faint outskirts (where shapes and sizes are measured) and
      brightness stay; the stretch keeps bright cores from swamping them.
    - ``peak``: divided by the image's 99.5th percentile over all channels (its robust peak),
      clipped to [-1, 3], times 2: every galaxy is scaled to the same peak, so its brightness and
      signal-to-noise are lost (galray's first encoder).
    """
    x = x_BCHW.float()
    b = x.shape[0]
    y = x - x.flatten(2).median(dim=2).values[:, :, None, None]
    if mode == "asinh":
        noise = sky_sigma(y).mean(1, keepdim=True).clamp_min(SKY_FLOOR)
        return torch.asinh(y / (ASINH_SOFTENING * noise))
    peak = torch.quantile(y.reshape(b, -1), 0.995, dim=1).clamp_min(1e-2)[:, None, None, None]
    return (y / peak).clamp(-1.0, 3.0) * 2.0


def d4_views(x_BCHW: Tensor) -> list[Tensor]:
    """The 8 images of the dihedral group D4 acting on a square image: 4 rotations, each mirrored or not."""
    rotations = [torch.rot90(x_BCHW, k, (2, 3)) for k in range(4)]
    return rotations + [torch.flip(r, (3,)) for r in rotations]


class SurveyEncoder(nn.Module):
    """Backbone (timm, headless) + projector (self-supervised) + optional head (fine-tuning)."""

    config_class = EncoderConfig

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        # timm (and galray's own architectures, registered by galray.models.backbones) only when a model is
        # built: this module is imported wherever an encoder config is read, e.g. by every Ray Train worker
        # and data task of any kind, where importing timm cost about 3 s a process.
        import timm

        import galray.models.backbones  # noqa: F401 (registers galray's timm architectures)

        try:
            self.backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, in_chans=cfg.in_channels,
                                              **cfg.backbone_args)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ConfigError("backbone", f"unknown timm model {cfg.backbone!r}") from None
            raise
        except TypeError as err:
            raise ConfigError("backbone_args", f"{cfg.backbone} does not take {cfg.backbone_args}: {err}") from None
        d = int(self.backbone.num_features)
        self.dim = d
        self.projector = _mlp(d, cfg.proj_hidden, cfg.proj_dim) if cfg.proj_dim else None
        self.head = nn.Linear(d, cfg.head_outputs) if cfg.head_outputs else None
        self._freeze(cfg.finetune_blocks)

    def _freeze(self, blocks: int) -> None:
        """Train only the last ``blocks`` coarse parameter groups of the backbone (-1: all)."""
        if blocks < 0:
            return
        from timm.models import group_parameters

        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        ordered = [groups[k] for k in sorted(groups)]
        frozen = {name for g in (ordered[: len(ordered) - blocks] if blocks else ordered) for name in g}
        for name, p in self.backbone.named_parameters():
            if name in frozen:
                p.requires_grad_(False)

    def normalize(self, x_BCHW: Tensor) -> Tensor:
        """Images on the [0, 1] scale -> the backbone's input (:func:`normalize_images`, the config's mode)."""
        return normalize_images(x_BCHW, self.cfg.normalization)

    def features(self, x_BCHW: Tensor) -> Tensor:
        """(B, C, S, S) images on the [0, 1] scale -> (B, D) pooled backbone features of that one view."""
        return self.backbone(self.normalize(x_BCHW))

    def forward(self, x_BCHW: Tensor) -> EncoderOutput:
        h = self.features(x_BCHW)
        head = None
        if self.head is not None:
            head = self.head(h)
            if self.cfg.vote_groups:  # Zoobot's concentrations in (1, 100): 1 + 99 sigmoid
                head = 1.0 + 99.0 * torch.sigmoid(head)
        return EncoderOutput(h, self.projector(h) if self.projector is not None else None, head)

    def pooled(self, x_BCHW: Tensor) -> Tensor:
        """(B, C, S, S) images on the [0, 1] scale -> (B, E) the embedding of that one view (``pool``)."""
        if self.cfg.pool == "last":
            return self.features(x_BCHW)
        final, stages = self.backbone.forward_intermediates(self.normalize(x_BCHW))
        return torch.cat([t.float().mean((2, 3)) for t in stages] + [self.backbone.forward_head(final)], 1)

    def embed(self, x_BCHW: Tensor) -> Tensor:
        """(B, C, S, S) images on the [0, 1] scale -> (B, E) embeddings (D4-averaged when ``invariant``)."""
        if not self.cfg.invariant:
            return self.pooled(x_BCHW)
        views = d4_views(x_BCHW)
        out = self.pooled(torch.cat(views)).view(len(views), x_BCHW.shape[0], -1)
        return out.mean(0)


class SurveyEncoderEmbedder(nn.Module):
    """A :class:`SurveyEncoder` as `galray embed`'s backbone: (B, C, S, S) in [0, 1] -> :meth:`SurveyEncoder.embed`."""

    def __init__(self, encoder: SurveyEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.encoder.embed(x_BCHW)


def save_backbone_weights(encoder: SurveyEncoder, directory: str | Path) -> Path:
    """The bare timm backbone's state dict as ``backbone.safetensors`` (timm's own parameter names):
    ``timm.create_model(cfg.backbone, num_classes=0, **cfg.backbone_args)`` loads it, and so does
    ``galray embed --model NAME --weights FILE`` for backbones without extra arguments. That route
    feeds the backbone with the embed stage's normalisation, not the encoder's own, and without
    D4 averaging: ``galray embed --model encoder:CKPT`` gives the encoder's embeddings exactly."""
    path = Path(directory) / BACKBONE_WEIGHTS_NAME
    save_file({k: v.detach().contiguous().cpu() for k, v in encoder.backbone.state_dict().items()}, str(path))
    return path

