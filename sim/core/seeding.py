"""One root seed, many independent streams.

Every consumer (an agent, the partitioner, the public-batch schedule) derives its own seed
from the root seed and a stable key, so results do not depend on how agents are grouped into
actors or in which order streams are first used.
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(root_seed: int, stream: str, index: int = 0) -> int:
    """A 63-bit seed for stream `stream` (e.g. "agent", "partition") and item `index`."""
    stream_key = zlib.crc32(stream.encode())
    state = np.random.SeedSequence([root_seed, stream_key, index]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def derive_rng(root_seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """A numpy Generator for the stream; see `derive_seed`."""
    return np.random.default_rng(derive_seed(root_seed, stream, index))
