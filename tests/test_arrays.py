"""vae/data/arrays.py: your own images as .npy/.npz arrays or folders of image files, and every bad input named."""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vae.settings.config import DataConfig
from vae.data import DataError, dataset_title, load_splits
from vae.data.arrays import load


def cfg(name, path, **kw):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": name, "path": str(path), **kw})


def test_npy_of_floats_is_split_into_train_and_test_with_its_own_name(tmp_path):
    x = np.random.default_rng(0).random((50, 32, 32)).astype(np.float32)
    np.save(tmp_path / "faces.npy", x)
    (train, train_labels), (test, _) = load(cfg("array", tmp_path / "faces.npy", test_size=0.2))
    assert train.shape == (40, 32, 32) and test.shape == (10, 32, 32) and train.dtype == torch.uint8
    assert (train_labels == -1).all()
    # Every image lands in exactly one split, as its nearest grey level.
    together = torch.cat([train, test]).long().sum().item()
    assert together == int(np.rint(x.astype(np.float64) * 255).sum())
    assert dataset_title(cfg("array", tmp_path / "faces.npy")) == "faces"
    assert dataset_title(cfg("array", tmp_path / "faces.npy", title="My faces")) == "My faces"


def test_the_test_draw_is_seeded_and_keeps_the_file_order(tmp_path):
    x = np.arange(20, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)
    np.save(tmp_path / "a.npy", x)
    a = load(cfg("array", tmp_path / "a.npy", test_size=5, split_seed=3))
    b = load(cfg("array", tmp_path / "a.npy", test_size=5, split_seed=3))
    c = load(cfg("array", tmp_path / "a.npy", test_size=5, split_seed=4))
    assert torch.equal(a[1][0], b[1][0]) and not torch.equal(a[1][0], c[1][0])
    order = a[0][0][:, 0, 0]
    assert torch.equal(order, order.sort().values) and len(a[1][0]) == 5


def test_npz_with_train_test_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", train=rng.integers(0, 256, (30, 9, 7), dtype=np.uint8),
             test=rng.integers(0, 256, (6, 9, 7), dtype=np.uint8), train_labels=np.arange(30) % 3,
             test_labels=np.arange(6) % 3)
    (train, labels), (test, test_labels) = load_splits(cfg("array", tmp_path / "d.npz"))
    assert train.shape == (30, 9, 7) and test.shape == (6, 9, 7) and labels.tolist()[:4] == [0, 1, 2, 0]


def test_npz_in_keras_layout_and_bool_images(tmp_path):
    np.savez(tmp_path / "k.npz", x_train=np.ones((8, 5, 5), bool), x_test=np.zeros((2, 5, 5), bool))
    (train, _), (test, _) = load(cfg("array", tmp_path / "k.npz"))
    assert train.unique().tolist() == [255] and test.unique().tolist() == [0]


def test_folder_with_class_subfolders_is_labelled_and_split(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "c0" / "rgb.jpg")
    (train, labels), (test, test_labels) = load(cfg("folder", tmp_path / "imgs", test_size=0.25))
    assert train.shape[1:] == (12, 10) and len(train) + len(test) == 21
    assert set(torch.cat([labels, test_labels]).tolist()) == {0, 1}


def test_folder_with_train_and_test_subfolders(tmp_path):
    for split, n in (("train", 5), ("test", 3)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.fromarray(np.full((6, 6), i * 40, np.uint8)).save(tmp_path / split / f"{i}.png")
    (train, labels), (test, _) = load(cfg("folder", tmp_path))
    assert len(train) == 5 and len(test) == 3 and (labels == -1).all()


@pytest.mark.parametrize("array, message", [
    (np.zeros((10, 28 * 28), np.uint8), "N x H x W"),
    (np.full((10, 4, 4), 1.5, np.float32), "values in [0, 1]"),
    (np.full((10, 4, 4), np.nan, np.float32), "values in [0, 1]"),
    (np.full((10, 4, 4), 300, np.int32), "grey levels in [0, 255]"),
    (np.zeros((10, 4, 4), np.complex64), "dtype complex64"),
    (np.zeros((10, 1, 4), np.uint8), "1 x 4 pixels"),
])
def test_bad_arrays_are_refused_in_one_line(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(cfg("array", tmp_path / "bad.npy"))


def test_bad_paths_are_refused_in_one_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(cfg("array", tmp_path / "missing.npy"))
    with pytest.raises(DataError, match="use data=folder"):
        load(cfg("array", tmp_path))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(DataError, match=".npy or .npz"):
        load(cfg("array", tmp_path / "x.csv"))
    os.mkfifo(tmp_path / "fifo.npy")  # never opened: reading a FIFO would hang
    with pytest.raises(DataError, match="not a regular file"):
        load(cfg("array", tmp_path / "fifo.npy"))
    with pytest.raises(DataError, match="not a folder"):
        load(cfg("folder", tmp_path / "x.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load(cfg("folder", tmp_path / "empty"))


def test_images_of_different_sizes_and_unreadable_files_are_named(tmp_path):
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((7, 6), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="b.png: 6 x 7 pixels"):
        load(cfg("folder", tmp_path))
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="b.png: not a readable image"):
        load(cfg("folder", tmp_path))


def test_a_test_size_that_leaves_nothing_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 3), np.uint8))
    with pytest.raises(DataError, match="test_size"):
        load(cfg("array", tmp_path / "a.npy", test_size=4))
