"""The image plan: how one stored image becomes a model's pixels, shared by embed, encode and training.

`galray embed` (any backbone), `galray encode` (the VQ-VAE) and `galray train vqvae` see a cutout
the same way, so a model trained on a store embeds or encodes that store exactly as it saw it:

1. :func:`plan_for` reads the store's declared image layout (Parquet metadata, see
   :mod:`galray.data.shards`) and the model's input side and channels once, on the driver, into a
   small frozen :class:`ImagePlan` that travels to the workers;
2. :func:`plan_images` takes a shard's image column as per-row images (an ndarray for tensor
   columns, bytes for PNG/JPEG);
3. :func:`prepare_image` turns one of them into ``(C, S, S)`` pixels: decode, (flux) asinh stretch,
   square centre crop, crop fraction, resize. uint8 stays uint8 (a quarter of float32's bytes in
   Ray's object store); n-band flux for an n-band model becomes float32 in [0, 1]. The model side
   scales them (:func:`galray.models.backbones.to_model_input`, :func:`galray.models.vqvae.pixels_to_model`).
4. :func:`prepare_block` does step 3 for a whole Arrow block of a shard. When every step would be a
   no-op (uint8 HWC tensors already at the model's size and channels, crop fraction 1) the block's
   pixels pass through untouched as a zero-copy ``(N, S, S, C)`` view of the Parquet read, and the
   model side permutes them (on the device, on a GPU): no Python and no copy per row. At 64 px that
   saves ~16 us of CPU a row (notes/ceiling.md, cut 3), a tenth of what the whole pipeline costs.

Pure numpy + pyarrow (tests/test_layering.py): no Ray, no torch. A bad image raises
:class:`~galray.data.cutouts.CutoutError`, which the stages turn into an errors row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galray.config import check
from galray.data.cutouts import (CropResizeConfig, CutoutError, StretchConfig, asinh_stretch, check_shape, crop_resize,
                                 decode_image, flux_to_rgb)
from galray.data.shards import IMAGE_COLUMN, ImageSpec, images_from_table, read_metadata, spec_from_schema
from galray.data.stores import tensor_view


@dataclass(frozen=True)
class PreprocessConfig:
    """What a stage may choose about preprocessing; the rest follows from the store and the model."""

    crop_fraction: float = 1.0
    """Keep this central fraction of each side before resizing (after a square centre crop)."""
    stretch: StretchConfig = field(default_factory=StretchConfig)
    """Flux -> display stretch for float (multi-band flux) stores; unused for uint8 colour images."""

    def __post_init__(self) -> None:
        check(0 < self.crop_fraction <= 1, "crop_fraction", "must be in (0, 1]")


@dataclass(frozen=True)
class ImagePlan:
    """How to turn one stored image into the model's pixels; derived from the store and the model."""

    column: str
    """Image column of the store."""
    encoding: Literal["tensor", "encoded"]
    """Fixed-shape tensor, or PNG/JPEG bytes."""
    layout: Literal["HWC", "CHW"]
    """Axis order of tensor images (encoded images decode to HWC)."""
    size: int
    """Output side in pixels (the model's input size)."""
    in_chans: int
    """Channels the model takes."""
    float_input: bool
    """Tensor images are float flux (stretched here) rather than uint8 display values."""
    crop_fraction: float = 1.0
    """Central fraction kept before resizing."""
    stretch: StretchConfig = field(default_factory=StretchConfig)
    """Flux stretch for float images."""
    shape: tuple[int, ...] | None = None
    """Declared shape of one stored tensor image (None for encoded images)."""

    @property
    def passes_through(self) -> bool:
        """Every step of :func:`prepare_image` is a no-op: the stored uint8 HWC tensors are already
        the model's size and channels and nothing is cropped."""
        return (self.encoding == "tensor" and not self.float_input and self.layout == "HWC"
                and self.crop_fraction == 1.0 and self.shape == (self.size, self.size, self.in_chans))

    @property
    def pixel_dtype(self) -> np.dtype:
        """uint8 whenever the image becomes a colour rendering; float32 [0, 1] for n-band flux models."""
        return np.dtype(np.float32) if self.float_input and self.in_chans != 3 else np.dtype(np.uint8)

    def batch_bytes(self, rows: int) -> int:
        """Bytes of ``rows`` images' output pixels (what a batch weighs in Ray's object store)."""
        return rows * self.in_chans * self.size * self.size * self.pixel_dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        steps = ["decode"] if self.encoding == "encoded" else []
        if self.float_input:
            steps.append(f"asinh stretch (percentiles {self.stretch.lower_percentile}-{self.stretch.upper_percentile}, "
                         f"Q={self.stretch.nonlinearity})" + (", bands -> RGB" if self.in_chans == 3 else ""))
        steps += ["square centre crop", f"centre crop {self.crop_fraction}", f"resize {self.size} (PIL bilinear, antialiased)"]
        return {"steps": steps, "size": self.size, "crop_fraction": self.crop_fraction, "in_chans": self.in_chans,
                "source_layout": self.layout, "source_encoding": self.encoding, "float_input": self.float_input}


def plan_for(schema: pa.Schema, size: int, in_chans: int, prep: PreprocessConfig = PreprocessConfig()) -> ImagePlan:
    """The :class:`ImagePlan` for a store with this shard schema and a model with this input."""
    meta = read_metadata(schema).get("image", {})
    column = meta.get("column", IMAGE_COLUMN)
    if column not in schema.names:
        raise ValueError(f"the store has no image column {column!r} (columns: {', '.join(schema.names)})")
    typ = schema.field(column).type
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or meta.get("encoding", "tensor") != "tensor":
        return ImagePlan(column, "encoded", "HWC", size, in_chans, False, prep.crop_fraction, prep.stretch)
    spec = ImageSpec.from_json(meta) if meta else spec_from_schema(schema)
    if spec.dtype == "uint8" and in_chans not in (spec.channels, 3) and spec.channels != 1:
        raise ValueError(f"the store's images have {spec.channels} channels but the backbone takes {in_chans}")
    return ImagePlan(column, "tensor", spec.layout, size, in_chans, spec.dtype != "uint8", prep.crop_fraction,
                     prep.stretch, tuple(spec.shape))


def plan_images(table: pa.Table, plan: ImagePlan) -> np.ndarray:
    """A shard's images, one per row: an (N, ...) ndarray for tensor columns, an object array of bytes
    for encoded ones. ``table`` carries the shard's schema metadata (the declared shape)."""
    if plan.encoding == "tensor":
        return images_from_table(table)
    return table.column(plan.column).to_numpy(zero_copy_only=False)


def _match_channels(image_HWC: np.ndarray, in_chans: int) -> np.ndarray:
    c = image_HWC.shape[2]
    if c == in_chans:
        return image_HWC
    if c == 1:
        return np.repeat(image_HWC, in_chans, axis=2)
    if c == 4 and in_chans == 3:  # RGBA: drop alpha
        return image_HWC[..., :3]
    raise CutoutError(f"image has {c} channels, the backbone takes {in_chans}")


def prepare_image(image: np.ndarray | bytes, plan: ImagePlan) -> np.ndarray:
    """One stored image -> (C, S, S) pixels: uint8 0..255 or float32 in [0, 1]. Raises CutoutError."""
    crop = CropResizeConfig(size=plan.size, crop_fraction=plan.crop_fraction)
    if plan.encoding == "encoded":
        img = decode_image(image)  # (H, W, 3) uint8
    else:
        img = np.asarray(image)
    if not plan.float_input:
        if plan.layout == "CHW" and plan.encoding == "tensor":
            img = np.moveaxis(img, 0, -1)
        check_shape(img, layout="HWC")
        img = crop_resize(_match_channels(img, plan.in_chans), crop, "HWC")
        return np.ascontiguousarray(img.transpose(2, 0, 1))
    flux = img if plan.layout == "CHW" else np.moveaxis(img, -1, 0)
    check_shape(flux, layout="CHW")
    if plan.in_chans == 3:  # colour model: the survey's usual colour rendering of the bands
        rgb = crop_resize(flux_to_rgb(flux, plan.stretch), crop, "HWC")
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    if flux.shape[0] != plan.in_chans:
        raise CutoutError(f"image has {flux.shape[0]} bands, the backbone takes {plan.in_chans}")
    return crop_resize(asinh_stretch(flux, plan.stretch), crop, "CHW").astype(np.float32)


class PreparedBlock(NamedTuple):
    """A block of a shard made ready for the model."""

    pixels: np.ndarray
    """``(N, C, S, S)``, or ``(N, S, S, C)`` when ``layout`` is NHWC; a failed row's pixels are zeros."""
    layout: Literal["NCHW", "NHWC"]
    """Axis order of ``pixels``: NHWC when the stored tensors pass through untouched."""
    errors: pa.Array
    """One string per row: the reason it failed, null where it is fine."""


NULL_IMAGE = "preprocess: the image is null"


def prepare_block(table: pa.Table, plan: ImagePlan) -> PreparedBlock:
    """A block of a shard (its image column; ``table`` carries the shard's schema metadata) -> the
    model's pixels and a reason for every row that failed, which keeps its place in the block."""
    n = table.num_rows
    if plan.passes_through:
        column = table.column(plan.column)
        errors = pa.nulls(n, pa.string()) if column.null_count == 0 else \
            pc.if_else(pc.is_null(column), pa.scalar(NULL_IMAGE), pa.scalar(None, pa.string()))
        return PreparedBlock(tensor_view(column, plan.shape), "NHWC", errors)
    images = plan_images(table, plan)
    pixels = np.zeros((n, plan.in_chans, plan.size, plan.size), plan.pixel_dtype)
    reasons: list[str | None] = [None] * n
    for i in range(n):
        try:
            pixels[i] = prepare_image(images[i], plan)
        except CutoutError as err:
            reasons[i] = f"preprocess: {err}"
    return PreparedBlock(pixels, "NCHW", pa.array(reasons, pa.string()))
