"""vae/data/device_data.py: splits held on the device, the validation split carved from the training set."""
import pytest
import torch

from vae.data.device_data import DeviceSplit, make_splits, validation_count
from vae.common.errors import UserError


def images(n, h=5, w=4, seed=0):
    return torch.randint(0, 256, (n, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def rows(split):
    return {tuple(r.tolist()) for r in split.images}


def test_no_validation_split_keeps_the_training_set_as_it_was():
    train, test, val = make_splits(images(50), images(10, seed=1), "cpu", "none", 0, val_size=0)
    assert val is None and torch.equal(train.images, images(50).reshape(50, -1))
    assert train.image_shape == (5, 4) and test.n == 10


@pytest.mark.parametrize("val_size, n_val", [(10, 10), (0.2, 10), (1, 1)])
def test_validation_images_are_drawn_from_training_images_and_leave_them(val_size, n_val):
    train, _, val = make_splits(images(50), images(10, seed=1), "cpu", "none", 0, val_size=val_size, split_seed=3)
    assert val.n == n_val and train.n == 50 - n_val
    assert rows(val) | rows(train) == rows(DeviceSplit(images(50), "cpu")) and not rows(val) & rows(train)
    again = make_splits(images(50), images(10, seed=1), "cpu", "none", 0, val_size=val_size, split_seed=3)[2]
    other = make_splits(images(50), images(10, seed=1), "cpu", "none", 0, val_size=val_size, split_seed=4)[2]
    assert torch.equal(again.images, val.images) and (n_val == 1 or not torch.equal(other.images, val.images))


def test_static_binarization_is_the_same_draw_whatever_the_validation_split():
    full_train, full_test, _ = make_splits(images(40), images(10, seed=1), "cpu", "static", 7, val_size=0)
    train, test, val = make_splits(images(40), images(10, seed=1), "cpu", "static", 7, val_size=8)
    assert torch.equal(test.images, full_test.images)
    assert rows(train) | rows(val) == rows(full_train)


@pytest.mark.parametrize("val_size", [50, 60, 0.999])
def test_a_validation_split_that_leaves_no_training_images_is_refused(val_size):
    with pytest.raises(UserError, match="data.val_size"):
        validation_count(val_size, 50)


def test_subset_keeps_labels_and_shape():
    split = DeviceSplit(images(6), "cpu", labels=torch.arange(6))
    part = split.subset(torch.tensor([1, 4]))
    assert part.labels.tolist() == [1, 4] and part.image_shape == (5, 4) and part.n == 2
    assert torch.equal(part.batch(torch.arange(2)), split.batch(torch.tensor([1, 4])))
