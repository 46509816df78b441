"""The train/validation split every galray stage agrees on: by object, never by position.

An object is in the validation split when ``crc32(object_id) < fraction * 2**32``, so the same
galaxy is on the same side whatever the shard layout, the order of rows or the process that asks:
`galray train` holds it out, and `galray analyze` fits its PCA on the other side. Pure numpy.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np


def is_val(object_ids: Sequence[Any], fraction: float) -> np.ndarray:
    """(N,) bool: True for objects in the validation split, ``crc32(object_id) < fraction * 2**32``."""
    if fraction <= 0:
        return np.zeros(len(object_ids), dtype=bool)
    h = np.fromiter((zlib.crc32(str(i).encode()) for i in object_ids), dtype=np.uint64, count=len(object_ids))
    return h < np.uint64(int(fraction * 2**32))
