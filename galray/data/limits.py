"""Limits on what one untrusted input may cost, checked before it is decoded.

A 170 kB PNG can declare 150 megapixels (450 MB once decoded), a 10 kB gzip can hold 10 GB of
zeros, a FITS header can claim axes of a billion pixels. Every limit here is checked from what
the file declares (an image header, a FITS header, the bytes a stream has produced so far),
before the memory is spent, and a file over one becomes an errors row whose reason names the
limit (:class:`LimitError`; the decoders turn it into a :class:`~galray.data.cutouts.CutoutError`).

Every stage that decodes images takes a ``limits`` section (:class:`DecodeLimits`); the defaults
are far above any survey cutout (Galaxy Zoo: 424 x 424 px; Legacy Survey cutouts: up to a few
thousand pixels a side) and far below what would stress a worker.

Pure Python (zlib): no Ray, no numpy.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from galray.config import check

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20  # decompressed bytes produced per step: the most a bomb costs before it is stopped


class LimitError(ValueError):
    """An input over one of the :class:`DecodeLimits`; the message names the limit (``limits.<field>``)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one input file or image may cost; over a limit, it becomes an errors row naming the limit."""

    max_file_bytes: int = 256 << 20
    """Bytes of one input file read into memory (an image, a FITS file, one encoded image of a store)."""
    max_pixels: int = 50_000_000
    """Width x height of one image or band, read from its header before decoding (50 MP: 7,000 px a side)."""
    max_decoded_bytes: int = 1 << 30
    """Bytes of one decoded image (all bands), one decompressed file, or one row of a tensor column."""
    max_fits_axes: int = 3
    """Axes (NAXIS) of a FITS image: 2 for a band, 3 for a (C, H, W) cube."""
    max_compression_ratio: float = 100.0
    """Decompressed over compressed bytes of a .gz or tile-compressed (.fz) FITS file; survey images
    compress 1.5-10x, a decompression bomb 1,000x or more."""
    max_id_bytes: int = 1024
    """UTF-8 bytes of one object id (file stem or id column); longer ids go to the errors output."""

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_pixels", "max_decoded_bytes", "max_fits_axes", "max_id_bytes"):
            check(getattr(self, name) >= 1, name, "must be at least 1")
        check(self.max_compression_ratio >= 1, "max_compression_ratio", "must be at least 1")

    def check_file_bytes(self, n: int) -> None:
        if n > self.max_file_bytes:
            raise LimitError(f"file is {n:,} bytes, over limits.max_file_bytes ({self.max_file_bytes:,})")

    def check_image(self, width: int, height: int, decoded_bytes: int) -> None:
        """One image's declared size, before decoding it."""
        if width * height > self.max_pixels:
            raise LimitError(f"image declares {width} x {height} = {width * height:,} pixels, over "
                             f"limits.max_pixels ({self.max_pixels:,})")
        if decoded_bytes > self.max_decoded_bytes:
            raise LimitError(f"image would decode to {decoded_bytes:,} bytes, over limits.max_decoded_bytes "
                             f"({self.max_decoded_bytes:,})")

    def decompressed_cap(self, compressed_bytes: int) -> int:
        """The most bytes ``compressed_bytes`` may decompress to."""
        return min(self.max_decoded_bytes, int(self.max_compression_ratio * max(compressed_bytes, 1)))


def _over_cap(cap: int, limits: DecodeLimits) -> LimitError:
    which = ("limits.max_decoded_bytes" if cap == limits.max_decoded_bytes
             else f"limits.max_compression_ratio ({limits.max_compression_ratio:g}x the compressed size)")
    return LimitError(f"decompresses to more than {cap:,} bytes, over {which}")


def gunzip(data: bytes, limits: DecodeLimits) -> bytes:
    """Decompress gzip ``data`` (all members), stopping as soon as the output passes
    :meth:`DecodeLimits.decompressed_cap`: a bomb costs at most the cap plus 1 MB.
    Raises :class:`LimitError` over the cap, ValueError for a corrupt or truncated stream."""
    cap = limits.decompressed_cap(len(data))
    out = bytearray()
    rest = data
    while rest:
        d = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
        pending = rest
        while pending and not d.eof:
            try:
                out += d.decompress(pending, _CHUNK)
            except zlib.error as err:
                raise ValueError(f"corrupt gzip stream: {err}") from None
            if len(out) > cap:
                raise _over_cap(cap, limits)
            pending = d.unconsumed_tail
        if not d.eof:
            raise ValueError("truncated gzip stream")
        rest = d.unused_data.lstrip(b"\x00")  # members may be followed by zero padding
        if rest and not rest.startswith(GZIP_MAGIC):
            break
    return bytes(out)
