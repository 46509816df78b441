"""Backbones for `galray embed`: one name in, a headless model out, with its input conventions.

Names that :func:`create_backbone` understands:

- any timm model name (``convnext_nano``, ``vit_small_patch16_224``, ``test_convnext``), pretrained
  from the hub when online, randomly initialised with ``pretrained=False``, or loaded from a local
  ``weights`` file;
- ``hf_hub:owner/repo`` and ``local-dir:/path/to/hub_copy`` (timm's own sources: ``config.json`` +
  weights; a ``local-dir:`` folder written by `galray export vqvae --format hf` is galray's VQ-VAE),
  e.g. the Zoobot encoders ``hf_hub:mwalmsley/zoobot-encoder-convnext_nano`` (640-d);
- ``mwalmsley/euclid_encoder_mae_zoobot_vit_small_patch8_224``: the Euclid MAE ViT-S/8 (384-d). Its
  architecture, ``zoobot_vit_small_patch8_224``, is registered here so timm can build it
  (mean-pooled patch tokens, as in Walmsley's feature export scripts);
- ``vqvae:/path/to/checkpoint_dir``: galray's own VQ-VAE encoder, pooled latents (``VQVAE.embed``);
- ``encoder:/path/to/checkpoint_dir``: galray's own encoder (`galray train encoder`,
  :mod:`galray.models.encoder`): its D4-averaged backbone features, with its own per-image input
  normalisation (so the embed stage feeds it plain [0, 1] pixels).

Zoobot-family encoders (anything from ``mwalmsley/`` or a ``zoobot_`` architecture) take images in
[0, 1] with no ImageNet normalisation (Walmsley et al. 2023, Zoobot docs); other timm models use
their pretrained config's mean and std.

Weights files load through safetensors, or ``torch.load(weights_only=True)`` for ``.pt``/``.bin``
files: a pickle that would run code is refused with :class:`UnsafeWeightsError`.

Pure torch + timm (see ARCHITECTURE.md): no Ray here. :class:`BackboneConfig` lives in
:mod:`galray.models.backbone_config`, which imports neither, so a job config can hold one without
loading torch (`galray embed`'s preprocessing workers never import torch).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from galray.models.backbone_config import ENCODER_PREFIX, PICO_ARCH, VQVAE_PREFIX, BackboneConfig, BackboneError

__all__ = ["Backbone", "BackboneConfig", "BackboneError", "Preprocessing", "UnsafeWeightsError", "create_backbone",
           "embedding_dim", "file_sha256", "load_weights_file", "load_weights_into", "to_model_input"]

HF_PREFIXES = ("hf_hub:", "hf-hub:")
LOCAL_DIR_PREFIX = "local-dir:"
EUCLID_MAE_REPO = "mwalmsley/euclid_encoder_mae_zoobot_vit_small_patch8_224"
EUCLID_MAE_ARCH = "zoobot_vit_small_patch8_224"
# Checkpoint dicts often nest the state dict under one of these keys (Lightning, DeiT, timm train.py).
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema")
# Prefixes that wrappers add to parameter names (DDP, Lightning modules, torch.compile, Zoobot's encoder).
STRIP_PREFIXES = ("module.", "model.", "encoder.", "_orig_mod.")
RANDOM_INIT_SEED = 0


class UnsafeWeightsError(BackboneError):
    """A weights file is a pickle that would need arbitrary code to load; it is never unpickled."""


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone wants as input: the last steps of preprocessing follow from this."""

    input_size: int
    """Square side in pixels."""
    in_chans: int
    """Input channels (3 for colour backbones)."""
    mean: tuple[float, ...] | None
    """Per-channel mean subtracted after scaling to [0, 1]; None: no normalisation."""
    std: tuple[float, ...] | None
    """Per-channel std divided by after subtracting the mean."""

    def to_json(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "in_chans": self.in_chans,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None}


@dataclass
class Backbone:
    """A headless model mapping (B, C, S, S) inputs to (B, D) embeddings, and how to feed it."""

    model: nn.Module
    name: str
    preprocessing: Preprocessing
    weights_id: str
    """Provenance: ``sha256:<hex>`` of the weights file, ``timm-pretrained:<source>``, or ``random-init:seed0``."""


# --- the Euclid MAE ViT ---------------------------------------------------------------------------

# timm reads ``default_cfgs`` of the module that registers a model: the hub source of the MAE weights,
# and Zoobot's plain [0, 1] input (mean 0, std 1); galray's pico ConvNeXt has no hub weights and
# takes plain [0, 1] input too.
default_cfgs = generate_default_cfgs({
    f"{EUCLID_MAE_ARCH}.euclid_mae": dict(
        hf_hub_id=EUCLID_MAE_REPO, input_size=(3, 224, 224), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        num_classes=0, interpolation="bilinear", crop_pct=1.0, license="apache-2.0"),
    f"{PICO_ARCH}.untrained": dict(input_size=(3, 32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=0,
                                   crop_pct=1.0)})


def zoobot_vit_small_patch8_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S/8 at 224 px, mean-pooled patch tokens, headless: the Euclid MAE encoder's architecture.

    As in mwalmsley's feature-export scripts for ``euclid_encoder_mae_zoobot_vit_small_patch8_224``:
    patch 8, depth 12, 6 heads, width 384, MLP ratio 4, ``global_pool='avg'``. Its default pretrained
    config points at that hub repo, so ``pretrained=True`` fetches the MAE weights when online.
    """
    from timm.models.vision_transformer import _create_vision_transformer

    args = dict(img_size=224, patch_size=8, depth=12, num_heads=6, embed_dim=384, mlp_ratio=4,
                global_pool="avg", num_classes=0)
    return _create_vision_transformer(EUCLID_MAE_ARCH, pretrained=pretrained, **{**args, **kwargs})


def galray_convnext_pico(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ConvNeXt with depths (1, 1, 2, 1) and widths (32, 64, 128, 256): 1.2 M parameters, 256-d features.

    galray's CPU-sized encoder backbone (:mod:`galray.models.encoder`'s ``pico`` preset): small enough
    to train self-supervised on 2 CPU cores in minutes at 32 px (the demo's and the benchmark's
    encoder). Registered with timm so ``galray embed --model galray_convnext_pico --weights
    backbone.safetensors`` builds it by name. No pretrained weights exist.
    """
    from timm.models.convnext import _create_convnext

    args = dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256))
    return _create_convnext(PICO_ARCH, pretrained=pretrained, **{**args, **kwargs})


# Importing twice (or a user's own registration) must not clash.
if not timm.is_model(EUCLID_MAE_ARCH):
    register_model(zoobot_vit_small_patch8_224)
if not timm.is_model(PICO_ARCH):
    register_model(galray_convnext_pico)


# --- a backbone that costs nothing (benchmarks and the pipeline's fast-path tests) ------------------

POOL_LINEAR_ARCH = "galray_pool_linear"
POOL_LINEAR_DIM = 640  # convnext_nano's width: each row writes as many bytes as a real backbone's


class PoolLinear(nn.Module):
    """``galray_pool_linear``: (B, C, S, S) -> 8x8 average pool -> flatten -> Linear -> (B, 640).

    A test backbone, not a model of galaxies: about two multiply-adds per input pixel (~0.03 ms of
    CPU a row at 64 px, a hundredth of convnext_nano's), so a pipeline run with it measures the
    pipeline's own cost per row, as it would be on a GPU node where the model is fast
    (``bench/pipeline_ceiling.py``); the embed tests use it so the fast path is what they guard.
    Any input size; default 64 px; plain [0, 1] input (no normalisation).
    """

    def __init__(self, dim: int = POOL_LINEAR_DIM, in_chans: int = 3, grid: int = 8):
        super().__init__()
        self.grid = grid
        self.proj = nn.Linear(in_chans * grid * grid, dim)
        self.num_features = dim
        self.pretrained_cfg = {"architecture": POOL_LINEAR_ARCH, "input_size": (in_chans, 64, 64), "mean": None,
                               "std": None}

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool2d(x_BCHW, self.grid).flatten(1))


def galray_pool_linear(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm factory of :class:`PoolLinear` (random init only; timm's other arguments are ignored)."""
    if pretrained:
        raise BackboneError("model", f"{POOL_LINEAR_ARCH} is a test backbone with no pretrained weights: "
                            f"use --random-init or a weights file")
    return PoolLinear()


if not timm.is_model(POOL_LINEAR_ARCH):
    register_model(galray_pool_linear)


# --- safe weights ---------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with an 8-byte little-endian header length, then a JSON header '{'."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n < path.stat().st_size


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or a tensor-only pickle via ``torch.load(weights_only=True)``.

    Nothing is ever unpickled with arbitrary globals: a pickle that would import and call code
    (``os.system``, a custom class, ...) raises :class:`UnsafeWeightsError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message also suggests weights_only=False, which is exactly what must not happen: keep
        # only the line naming the offending global.
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        why = next((ln.rstrip(".") for ln in lines if "global" in ln.lower() and "weights_only" not in ln),
                   type(err).__name__)
        raise UnsafeWeightsError(
            "weights", f"refusing to load {path}: it is a pickle that needs code outside plain tensors to load "
            f"({why}). galray never unpickles such files, since they "
            f"can run arbitrary code. Save the weights as safetensors, or as a plain state dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise BackboneError("weights", f"cannot read weights file {path}: {err}") from None
    for key in STATE_DICT_KEYS:  # unwrap checkpoint dicts
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError("weights", f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ...) while that makes more keys match ``wanted``."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not (set(state) & wanted):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into a headless model: every model parameter must be present.

    Keys the headless model lacks are allowed only for the classifier head that ``num_classes=0`` drops.
    """
    wanted = set(model.state_dict())
    state = _strip_prefixes(load_weights_file(path), wanted)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches raise even with strict=False
        detail = str(err).strip().splitlines()[-1].strip()
        raise BackboneError("weights", f"{path} does not fit this model: {detail}") from None
    if missing:
        raise BackboneError("weights", f"{path} does not fit this model: {len(missing)} parameter(s) missing, e.g. "
                            f"{', '.join(missing[:4])}")
    head = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier") or "head"
    heads = tuple({*(head if isinstance(head, (list, tuple)) else (head,)), "head", "fc", "classifier"})
    extra = [k for k in unexpected if not k.startswith(heads)]
    if extra:
        raise BackboneError("weights", f"{path} does not fit this model: {len(extra)} unexpected parameter(s), e.g. "
                            f"{', '.join(extra[:4])}")


# --- the factory ----------------------------------------------------------------------------------

def _hub_id(name: str) -> str | None:
    """``owner/repo`` for hub names (with or without the hf_hub: prefix), else None."""
    for prefix in HF_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    if name.startswith("mwalmsley/"):  # the issue's and Zoobot docs' bare repo names
        return name
    return None


def _local_architecture(hub_id: str) -> str | None:
    """The timm architecture of a known hub repo, to build it offline when a weights file is given."""
    if hub_id.split("@")[0] == EUCLID_MAE_REPO:
        return EUCLID_MAE_ARCH
    repo = hub_id.split("/", 1)[-1].split("@")[0]
    for prefix in ("zoobot-encoder-", "baseline-encoder-"):
        if repo.startswith(prefix) and timm.is_model(repo[len(prefix):]):
            return repo[len(prefix):]
    return None


def _is_zoobot(name: str, model: nn.Module) -> bool:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    arch = str(cfg.get("architecture", ""))
    hub = str(cfg.get("hf_hub_id", "") or "")
    return "mwalmsley/" in name or "mwalmsley/" in hub or arch.startswith("zoobot") or "zoobot" in name


def _preprocessing(cfg: BackboneConfig, model: nn.Module) -> Preprocessing:
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    size = cfg.input_size or int((pcfg.get("input_size") or (3, 224, 224))[-1])
    in_chans = int((pcfg.get("input_size") or (3,))[0])
    mean, std = pcfg.get("mean"), pcfg.get("std")
    if cfg.normalization == "none" or (cfg.normalization == "auto" and _is_zoobot(cfg.name, model)):
        mean = std = None
    if mean is not None and std is not None:
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if all(m == 0 for m in mean) and all(s == 1 for s in std):
            mean = std = None
    return Preprocessing(input_size=size, in_chans=in_chans, mean=mean, std=std)


def _create_timm(cfg: BackboneConfig) -> Backbone:
    name = cfg.name
    hub = _hub_id(name)
    timm_name = f"hf_hub:{hub}" if hub else name
    from_local_dir = name.startswith(LOCAL_DIR_PREFIX)
    pretrained = cfg.weights is None and (cfg.pretrained or from_local_dir)
    if not pretrained and hub and _local_architecture(hub):
        timm_name = _local_architecture(hub)  # no download needed: build the known architecture here
    kwargs: dict[str, Any] = {"num_classes": 0}
    try:
        # Seeded, so randomly initialised replicas (tests, benchmarks) agree across processes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise BackboneError("model", f"unknown model {name!r}: use a timm model name (timm.list_models()), "
                                f"hf_hub:owner/repo, local-dir:/path or vqvae:/path") from None
        raise
    except (OSError, ValueError, ImportError) as err:
        if hub or pretrained:
            raise BackboneError(
                "model", f"cannot fetch {name!r} from the Hugging Face hub ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). Offline, pass a weights file (--weights FILE), "
                f"a local copy (local-dir:/path/to/repo), or pretrained=false for random weights.") from None
        raise
    if cfg.weights is not None:
        load_weights_into(model, cfg.weights)
        weights_id = f"sha256:{file_sha256(cfg.weights)}"
    elif from_local_dir:
        folder = Path(name[len(LOCAL_DIR_PREFIX):])
        files = [folder / f for f in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")]
        found = next((f for f in files if f.is_file()), None)
        weights_id = f"sha256:{file_sha256(found)}" if found else f"timm-pretrained:{name}"
    elif pretrained:
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        weights_id = f"timm-pretrained:{pcfg.get('hf_hub_id') or pcfg.get('url') or name}"
    else:
        weights_id = f"random-init:seed{RANDOM_INIT_SEED}"
    return Backbone(model=model, name=name, preprocessing=_preprocessing(cfg, model), weights_id=weights_id)


class PooledVQVAEEncoder(nn.Module):
    """galray's VQ-VAE as a backbone: (B, C, H, W) in [-1, 1] -> pooled quantized latents (B, D)."""

    def __init__(self, vqvae: nn.Module):
        super().__init__()
        self.vqvae = vqvae

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vqvae.embed(x_BCHW)  # type: ignore[operator]


def _galray_vqvae_folder(cfg: BackboneConfig) -> Path | None:
    """The checkpoint folder of ``vqvae:DIR``, or of ``local-dir:DIR`` when DIR is a galray VQ-VAE in the hub
    layout (`galray export vqvae --format hf`: its config.json names the class); else None (a timm folder)."""
    from galray.models.checkpoint import MODEL_CONFIG_NAME, read_config

    if cfg.name.startswith(VQVAE_PREFIX):
        return Path(cfg.name[len(VQVAE_PREFIX):]).expanduser()
    if cfg.name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(cfg.name[len(LOCAL_DIR_PREFIX):]).expanduser()
        if (folder / MODEL_CONFIG_NAME).is_file() and read_config(folder).get("class") == "VQVAE":
            return folder
    return None


def _create_vqvae(cfg: BackboneConfig, folder: Path) -> Backbone:
    from galray.models.checkpoint import WEIGHTS_NAME, load_model
    from galray.models.vqvae import VQVAE

    if not (folder / WEIGHTS_NAME).is_file():
        raise BackboneError("model", f"{folder} is not a VQ-VAE checkpoint folder (no {WEIGHTS_NAME})")
    vqvae = load_model(VQVAE, folder).eval()
    c = vqvae.cfg.in_channels
    # The VQ-VAE is trained on [-1, 1] inputs: (x - 0.5) / 0.5 from [0, 1].
    prep = Preprocessing(input_size=cfg.input_size or vqvae.cfg.image_size, in_chans=c,
                         mean=(0.5,) * c, std=(0.5,) * c)
    return Backbone(model=PooledVQVAEEncoder(vqvae), name=cfg.name, preprocessing=prep,
                    weights_id=f"sha256:{file_sha256(folder / WEIGHTS_NAME)}")


def _create_encoder(cfg: BackboneConfig) -> Backbone:
    from galray.models.checkpoint import WEIGHTS_NAME, load_model
    from galray.models.encoder import SurveyEncoder, SurveyEncoderEmbedder

    folder = Path(cfg.name[len(ENCODER_PREFIX):]).expanduser()
    if not (folder / WEIGHTS_NAME).is_file():
        raise BackboneError("model", f"{folder} is not an encoder checkpoint folder (no {WEIGHTS_NAME})")
    try:
        encoder = load_model(SurveyEncoder, folder).eval()
    except ValueError as err:
        raise BackboneError("model", str(err)) from None
    # The encoder normalises each image itself: it takes plain [0, 1] pixels.
    prep = Preprocessing(input_size=cfg.input_size or encoder.cfg.image_size, in_chans=encoder.cfg.in_channels,
                         mean=None, std=None)
    return Backbone(model=SurveyEncoderEmbedder(encoder), name=cfg.name, preprocessing=prep,
                    weights_id=f"sha256:{file_sha256(folder / WEIGHTS_NAME)}")


def create_backbone(cfg: BackboneConfig) -> Backbone:
    """Build the headless backbone named by ``cfg`` (in eval mode, on CPU)."""
    if cfg.name.startswith(ENCODER_PREFIX):
        backbone = _create_encoder(cfg)
    else:
        folder = _galray_vqvae_folder(cfg)
        backbone = _create_vqvae(cfg, folder) if folder is not None else _create_timm(cfg)
    backbone.model.eval()
    return backbone


# --- feeding it -----------------------------------------------------------------------------------

def to_model_input(pixels_BCHW: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Preprocessed pixels (uint8 0..255, or float in [0, 1]) -> the backbone's input scale.

    Runs where the model runs: uint8 crosses the object store and the PCIe bus at a quarter of
    float32's bytes, and the scaling is free on the accelerator.
    """
    x = pixels_BCHW.to(dtype)
    if pixels_BCHW.dtype == torch.uint8:
        x = x / 255.0
    if prep.mean is not None and prep.std is not None:
        mean = torch.tensor(prep.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(prep.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


@torch.inference_mode()
def embedding_dim(backbone: Backbone) -> int:
    """D of the (B, D) output, from one forward pass on a blank image (validates the input size too)."""
    p = backbone.preprocessing
    x = torch.zeros(1, p.in_chans, p.input_size, p.input_size)
    out = backbone.model(to_model_input(x, p))
    if out.ndim != 2:
        raise BackboneError("model", f"{backbone.name} returns shape {tuple(out.shape)}, not (B, D): it is not headless/pooled")
    return int(out.shape[1])
