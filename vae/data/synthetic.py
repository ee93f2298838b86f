"""Tiny synthetic digits in MNIST's format, for `debug=tiny` on a machine with no dataset (`data.sources` =
[local, synthetic]): 300 training and 100 test images of 28 x 28, ten blocky glyphs shifted by up to two pixels
with a little noise, labelled by glyph. Seeded: every machine writes the same bytes. Not MNIST: a smoke test of
the whole pipeline, nothing to report numbers on."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from vae.data import IMAGE_SHAPE, NUM_CLASSES

SIZES = {"train": 300, "test": 100}
SEED = 20261206


def glyphs(seed: int = SEED) -> np.ndarray:
    """Ten 28 x 28 prototypes: a random 7 x 7 pattern of on/off blocks each, blown up to 4 x 4 pixel blocks."""
    blocks = np.random.default_rng(seed).random((NUM_CLASSES, 7, 7)) > 0.6
    return np.kron(blocks, np.ones((4, 4), dtype=bool)).astype(np.uint8) * 255


def images(split: str, seed: int = SEED) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 [n, 28, 28], uint8 labels [n]) of one split."""
    rng = np.random.default_rng([seed, list(SIZES).index(split)])
    n = SIZES[split]
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.uint8)
    protos = glyphs(seed)
    out = np.empty((n, *IMAGE_SHAPE), dtype=np.uint8)
    for i, (label, (dy, dx)) in enumerate(zip(labels, rng.integers(-2, 3, (n, 2)))):
        out[i] = np.roll(protos[label], (dy, dx), axis=(0, 1))
    noise = rng.random(out.shape) < 0.03
    out[noise] = 255 - out[noise]
    return out, labels
