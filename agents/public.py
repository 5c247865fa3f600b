"""The public-batch schedule: which public samples every agent predicts on in each round.

A pure function of (seed, batch id), so every agent computes the same indices on its own and
the driver ships only a round number, never images.
"""

from __future__ import annotations

import numpy as np

from sim.core.seeding import derive_rng


def public_batch_indices(seed: int, batch_id: int, public_size: int, batch_size: int) -> np.ndarray:
    """Sorted indices into the public set for public batch `batch_id`, without replacement."""
    rng = derive_rng(seed, "public_batch", batch_id)
    return np.sort(rng.choice(public_size, size=min(batch_size, public_size), replace=False))
