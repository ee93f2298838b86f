"""Shared fixtures: a tiny generated dataset, a tiny trained checkpoint and a finished run to resume. The functions
that run the trainer are tests/support.py's, imported by the tests that use them."""
from __future__ import annotations

from pathlib import Path

import pytest

from idx import make_tiny_dataset
from support import train_in_process


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data root holding a tiny MNIST-format dataset (300 train, 100 test images)."""
    root = tmp_path_factory.mktemp("data")
    make_tiny_dataset(root, n_train=300, n_test=100, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """checkpoints/best.pt of a tiny run (a code of 8 variables x 4 classes, 5 epochs) on the synthetic glyphs that
    debug=tiny writes into an empty data root: images with structure, so that the model learns something and its
    bounds differ as bounds should (the random bytes of `tiny_data` teach nothing). For the tests of what reads a
    trained model (vae.api, vae.sample, vae.export); shared: a test that writes beside it or changes it copies it."""
    data_root, run_dir = tmp_path_factory.mktemp("glyphs"), tmp_path_factory.mktemp("tiny-run")
    train_in_process(data_root, run_dir, "latent_dim=8", "categorical_dim=4", "epochs=5")
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="session")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 1-epoch run on tiny data whose temperature has annealed (tau at the end != temperature). Tests
    that write into a run use a copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(tiny_data, run_dir, "anneal_rate=0.1", "anneal_interval=1", "temp_min=0.3")
    return run_dir
