"""Results kept between updates of the classical engine.

Most clicks after the first leave the first click's growth unchanged (same
seed, same smoothed region, same intensity limits); only the later clicks'
local growth, negative prompts and edges change. Growths are kept here under a
key made of the region, the seed, box and background masks and the intensity
limits, and reused when an update asks for the same growth again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

__all__ = ["GrowthCache", "mask_key"]


def mask_key(mask: np.ndarray | None) -> tuple | None:
    """A short hashable fingerprint of a bool array (its shape and bits)."""
    if mask is None:
        return None
    digest = hashlib.blake2b(np.packbits(mask).tobytes(), digest_size=16).hexdigest()
    return tuple(mask.shape), digest


class GrowthCache:
    """A small least-recently-used store of grown masks.

    Parameters
    ----------
    size : int
        Masks kept; the oldest is dropped first.
    """

    def __init__(self, size: int = 8):
        self.size = int(size)
        self._items: OrderedDict = OrderedDict()
        self.hits = 0

    def clear(self) -> None:
        """Forget everything (a new image)."""
        self._items.clear()

    def get(self, key) -> np.ndarray | None:
        """A copy of the mask stored under ``key``, or None."""
        if key is None or key not in self._items:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return self._items[key].copy()

    def put(self, key, mask: np.ndarray) -> None:
        """Store a copy of ``mask`` under ``key`` (None: nothing stored)."""
        if key is None:
            return
        self._items[key] = mask.copy()
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
