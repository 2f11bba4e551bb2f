"""The one seed derivation of the library: every seeded draw (fault maps, chips, training
shuffles and flips, Monte-Carlo estimators) gets its seed from here.

Seeds are 63-bit non-negative ints (usable by ``torch.Generator.manual_seed`` and numpy),
derived with numpy's ``SeedSequence`` so that different keys give independent streams::

    derive(seed, *key) = SeedSequence(seed, spawn_key=key).generate_state(1, uint64)[0] & (2^63 - 1)
    spawn(seed, n)     = SeedSequence(seed).generate_state(n, uint64) & (2^63 - 1)

``spawn`` gives the chips of a sweep (``spawn(seed, n_maps)[m]`` is chip ``m``) and the child
seeds of training; ``derive(chip, position)`` is the stream of the stored layer at ``position``
of that chip (``derive(chip, position, stream)`` its other stored tensors). Numpy only.
"""

from __future__ import annotations

import numpy as np

from bnn_tol.exceptions import require_int

__all__ = ["derive", "spawn", "MASK"]

#: Seeds are kept to 63 bits: non-negative in every integer type that holds them.
MASK = (1 << 63) - 1


def derive(seed: int, *key: int) -> int:
    """The seed of stream ``key`` of ``seed``: ``SeedSequence(seed, spawn_key=key)``, 63 bits.

    ``derive(seed)`` (no key) is ``SeedSequence(seed)``'s first word, ``spawn(seed, 1)[0]``.
    """
    seed = require_int(seed, "seed", minimum=0)
    key = tuple(int(k) for k in key)
    state = np.random.SeedSequence(seed, spawn_key=key).generate_state(1, dtype=np.uint64)
    return int(state[0]) & MASK


def spawn(seed: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds of ``seed``: ``SeedSequence(seed).generate_state(n)``."""
    seed = require_int(seed, "seed", minimum=0)
    n = require_int(n, "n", minimum=0)
    state = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint64)
    return [int(s) & MASK for s in state]
