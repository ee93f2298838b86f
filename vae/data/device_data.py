"""Each dataset split lives once on the training device as uint8; batches are index gathers.

This replaces a per-sample DataLoader (the bottleneck of the usual ports): an MNIST epoch is 600 gathers of
100 rows from a 47 MB tensor, with conversion to float (and dynamic binarization) done on the device.
"""
from typing import Optional

import torch


class DeviceSplit:
    """One split (train or test) on `device`, with its binarization mode.

    binarize: "none" -> grayscale targets in [0, 1]; "dynamic" -> a fresh Bernoulli draw per batch (from the
    generator passed to `batch`); "static" -> one fixed Bernoulli draw of the whole split, made once on the
    CPU from `static_generator` so that every device and every run sees the same binary images.
    """

    def __init__(self, images: torch.Tensor, device, binarize: str = "none",
                 static_generator: Optional[torch.Generator] = None, labels: Optional[torch.Tensor] = None):
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if images.dim() == 3:  # [N, H, W]; flat [N, H*W] images are taken as MNIST's 28 x 28
            self.image_shape = tuple(images.shape[1:])
        else:
            self.image_shape = (28, 28)
        images = images.reshape(len(images), -1)
        self.labels = labels
        self.binarize = binarize
        if binarize == "static":
            if static_generator is None:
                raise ValueError("static binarization needs a seeded generator")
            probs = images.float().div_(255)
            images = torch.bernoulli(probs, generator=static_generator).to(torch.uint8)
            self.scale = 1.0
        else:
            self.scale = 1.0 / 255
        self.images = images.to(device)
        self.device = self.images.device
        self.n = self.images.shape[0]

    def subset(self, idx: torch.Tensor) -> "DeviceSplit":
        """The images at `idx` (a CPU index tensor) as a split of their own, binarized exactly as they are here
        (a static draw is not repeated)."""
        part = DeviceSplit.__new__(DeviceSplit)
        part.__dict__.update(self.__dict__)
        part.images = self.images[idx.to(self.device)]
        part.labels = None if self.labels is None else self.labels[idx]
        part.n = len(idx)
        return part

    def batch(self, idx: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Float images [len(idx), H*W] on the device."""
        x = self.images[idx].float().mul_(self.scale)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return x

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None):
        """Every image once, in order (for evaluation); the last batch may be short."""
        for start in range(0, self.n, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.n), device=self.device)
            yield self.batch(idx, generator)


def make_splits(train_images, test_images, device, binarize: str, binarize_seed: int, val_size: float = 0,
                split_seed: int = 0, train_labels=None, test_labels=None):
    """(train, test, validation or None). Static binarization draws train then test from one seeded CPU generator,
    before the validation images are taken out of the training set: the same binary images whatever val_size."""
    gen = torch.Generator().manual_seed(binarize_seed) if binarize == "static" else None
    train = DeviceSplit(train_images, device, binarize, gen, train_labels)
    test = DeviceSplit(test_images, device, binarize, gen, test_labels)
    n_val = validation_count(val_size, train.n)
    if n_val == 0:
        return train, test, None
    # A seeded draw of the training set (data.split_seed, like binarize_seed a property of the data); the rest keeps
    # its order, so that val_size=0 trains on exactly the images, in exactly the order, it always did.
    perm = torch.randperm(train.n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return train.subset(train_idx), test, train.subset(val_idx)


def validation_count(val_size: float, n_train: int) -> int:
    """data.val_size as a number of images: a fraction below 1, else a count (0 = no validation split)."""
    from vae.common.errors import UserError

    n_val = int(round(val_size * n_train)) if val_size < 1 else int(val_size)
    if val_size > 0 and not 1 <= n_val < n_train:
        raise UserError(f"data.val_size={val_size:g} leaves {'no validation' if n_val < 1 else 'no training'} images "
                        f"of the {n_train} in the training set; choose a fraction in (0, 1), a count below {n_train}, "
                        "or 0 for no validation split")
    return n_val


def load_device_splits(data_cfg, device):
    """(train, test, validation or None) of the dataset `data_cfg` describes, each held once on `device` as
    uint8."""
    from vae.data import load_splits

    (train_images, train_labels), (test_images, test_labels) = load_splits(data_cfg, ("train", "test"))
    return make_splits(train_images, test_images, device, data_cfg.binarize, data_cfg.binarize_seed,
                       getattr(data_cfg, "val_size", 0), getattr(data_cfg, "split_seed", 0), train_labels,
                       test_labels)


def scoring_test_split(data_cfg, device) -> DeviceSplit:
    """The test split as a model is scored on it (vae.evaluate, vae.sample, vae.api): one fixed binary draw for
    static and dynamic binarization, so that every metric and every checkpoint sees the same images."""
    from vae.data import load_splits

    if data_cfg.binarize == "static":
        # The same draw as in training: make_splits draws train, then test, from one seeded generator.
        (train_images, _), (test_images, test_labels) = load_splits(data_cfg, ("train", "test"))
        _, test, _ = make_splits(train_images, test_images, device, "static", data_cfg.binarize_seed,
                                 test_labels=test_labels)
        return test
    (test_images, test_labels), = load_splits(data_cfg, ("test",))
    if data_cfg.binarize == "dynamic":
        # All three metrics must score the same binary images, and checkpoints of different runs the same
        # ones too, so draw once, seeded by the dataset's binarize_seed. A {0, 255} uint8 image read as
        # grayscale ("none") is exactly 0.0 / 1.0.
        gen = torch.Generator().manual_seed(data_cfg.binarize_seed)
        binary = torch.bernoulli(test_images.float().div_(255), generator=gen).mul_(255).to(torch.uint8)
        return DeviceSplit(binary, device, "none", labels=test_labels)
    return DeviceSplit(test_images, device, data_cfg.binarize, labels=test_labels)
