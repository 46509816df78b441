"""A backbone made ready for batch inference: device, memory format, optional ``torch.compile``.

Used by each model replica of `galray embed` (and by the embedding benchmark, so its "model only"
limit runs exactly the forward pass the pipeline runs).

- On CUDA the model runs under bf16 autocast in ``channels_last``, which the tensor cores want.
  On CPU it stays float32 and contiguous: on CPUs without native bf16 (AVX-512 without the BF16
  extension, as here) bf16 autocast ran convnext_nano 2x *slower*, and channels_last 10% slower.
- ``compile=True`` wraps the model in ``torch.compile`` (inductor). Measured on convnext_nano at
  224 px, one CPU thread: 12.4 -> 16.0 img/s; compilation costs 15-35 s once per replica, 7 s when
  inductor's on-disk caches are warm, so it pays on large stores, not on tests.
  Weight freezing (inductor's documented inference setting: weights become constants it can fold)
  is used on CUDA only. On CPU it gave no speed (interleaved A/B on convnext_nano, one thread: 15.2
  vs 15.3 img/s) but cost 2.5-3 s more per replica start, because a frozen graph bypasses
  AOTAutograd's on-disk cache (warm-cache compile 9.1 s vs 6.8 s).
- A compiled model is specialised to one input shape. Batches are therefore run at the configured
  batch size: a long one is cut into chunks; a short one (the end of a shard) is padded with zeros,
  whose outputs are dropped, or, when under 3/4 full, run by the eager model instead. Rows are
  independent in an eval-mode backbone, so neither changes a real row's output beyond float
  rounding (the test holds compiled and eager to 1e-4).
- Pixels may come channels-last, ``(B, S, S, C)`` (``layout="NHWC"``: the stored tensors of a
  cutout store passed through without a copy, :func:`galray.data.preprocess.prepare_block`). The
  permuted view is made contiguous on the CPU before the float conversion (measured on the trivial
  backbone at 64 px: 32 vs 43 us a row converting the strided view); on CUDA it crosses as it is and
  already is the channels_last layout the model runs in.

Pure torch (ARCHITECTURE.md): no Ray here.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn

from galray.models.backbones import Preprocessing, to_model_input


class InferenceModel:
    """``(B, C, S, S)`` uint8 or [0, 1] float pixels -> ``(B, D)`` float32 embeddings, in fixed-size batches."""

    def __init__(self, model: nn.Module, prep: Preprocessing, batch_size: int, device: torch.device | str | None = None,
                 compile: bool = False):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.prep = prep
        self.batch_size = batch_size
        self.on_gpu = self.device.type == "cuda"
        model = model.eval().to(self.device)
        if self.on_gpu:
            model = model.to(memory_format=torch.channels_last)
        self.compiled = compile
        self.eager = model
        self.model: nn.Module = torch.compile(model, dynamic=False, options={"freezing": self.on_gpu}) \
            if compile else model
        if compile:
            self.warm_up()

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.on_gpu else nullcontext()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One forward pass on a blank batch: compiles now (at replica start), not on the first real batch."""
        p = self.prep
        self._forward(torch.zeros(self.batch_size, p.in_chans, p.input_size, p.input_size, dtype=torch.uint8))

    def _forward(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        n = pixels_BCHW.shape[0]
        model = self.model
        if self.compiled and n < self.batch_size:
            if 4 * n < 3 * self.batch_size:
                # A short remainder (the end of a shard) runs eagerly on its own rows: padding it to
                # the compiled shape would spend a whole batch's compute on a few rows (eager costs
                # ~1.3x compiled per row on CPU, so it is the cheaper path below 3/4 of a batch).
                model = self.eager
            else:
                pad = pixels_BCHW.new_zeros((self.batch_size - n, *pixels_BCHW.shape[1:]))
                pixels_BCHW = torch.cat([pixels_BCHW, pad])
        if not self.on_gpu:
            pixels_BCHW = pixels_BCHW.contiguous()  # a permuted NHWC view: one copy, before the float conversion
        # uint8 crosses to the device as is (a quarter of float32's bytes); scaling happens there.
        x = to_model_input(pixels_BCHW.to(self.device, non_blocking=True), self.prep)
        if self.on_gpu:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = model(x)
        return out[:n].float()

    @torch.inference_mode()
    def __call__(self, pixels_BCHW: torch.Tensor, layout: Literal["NCHW", "NHWC"] = "NCHW") -> torch.Tensor:
        """Embeddings on the CPU, float32, one row per input row; ``layout`` is the pixels' axis order."""
        if pixels_BCHW.shape[0] == 0:
            return torch.zeros(0, 0)
        if layout == "NHWC":
            pixels_BCHW = pixels_BCHW.permute(0, 3, 1, 2)
        chunks = pixels_BCHW.split(self.batch_size)
        return torch.cat([self._forward(c).cpu() for c in chunks])
