"""Tiny IDX datasets for tests: files in the exact layout and format of the real ones, a few KB each.

Generated files don't match the official MD5s: load them with `data.verify=false`, or pass
`checksums=md5_sums(raw_dir)` to `vae.data.prepare`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict

import numpy as np

from vae.data import DATASETS, FILE_NAMES, SPLITS, idx_header


def write_idx(path, array) -> Path:
    """Any uint8 array (numpy or torch) as an unsigned-byte IDX file. No shape checks: tests write bad ones."""
    arr = np.ascontiguousarray(array.numpy() if hasattr(array, "numpy") else array)
    if arr.dtype != np.uint8:
        raise TypeError(f"IDX files here hold uint8, got {arr.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(idx_header(arr.shape) + arr.tobytes())
    return path


def write_idx_images(path, images) -> Path:
    """uint8 [N, H, W] (the loader accepts only [N, 28, 28])."""
    if np.ndim(images) != 3:
        raise ValueError(f"images must be [N, H, W], got shape {tuple(np.shape(images))}")
    return write_idx(path, images)


def write_idx_labels(path, labels) -> Path:
    """uint8 [N] with values 0..9."""
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be [N], got shape {tuple(np.shape(labels))}")
    return write_idx(path, labels)


def make_tiny_dataset(root, name: str = "mnist", n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Write the four IDX files under `<root>/MNIST/raw/` (or `FashionMNIST`) and return that directory.

    Images are random bytes, labels random digits; `seed` makes them reproducible.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / DATASETS[name].dirname / "raw"
    for split, n in (("train", n_train), ("test", n_test)):
        images_name, labels_name = SPLITS[split]
        write_idx_images(raw / images_name, rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        write_idx_labels(raw / labels_name, rng.integers(0, 10, size=n, dtype=np.uint8))
    return raw


def md5_sums(raw_dir) -> Dict[str, str]:
    """MD5 of each of the four files: the `checksums=` that makes `prepare()` verify generated files."""
    return {name: hashlib.md5((Path(raw_dir) / name).read_bytes()).hexdigest() for name in FILE_NAMES}
