"""Each dataset split lives once on the training device as uint8; batches are index gathers.

This replaces a per-sample DataLoader (the bottleneck of the usual ports): an MNIST epoch is 600 gathers of
100 rows from a 47 MB tensor, with conversion to float (and dynamic binarization) done on the device.
"""
from typing import Optional

import torch

from vae.model import IMAGE_PIXELS


class DeviceSplit:
    """One split (train or test) on `device`, with its binarization mode.

    binarize: "none" -> grayscale targets in [0, 1]; "dynamic" -> a fresh Bernoulli draw per batch (from the
    generator passed to `batch`); "static" -> one fixed Bernoulli draw of the whole split, made once on the
    CPU from `static_generator` so that every device and every run sees the same binary images.
    """

    def __init__(self, images: torch.Tensor, device, binarize: str = "none",
                 static_generator: Optional[torch.Generator] = None):
        images = images.reshape(-1, IMAGE_PIXELS)
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
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

    def batch(self, idx: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Float images [len(idx), 784] on the device."""
        x = self.images[idx].float().mul_(self.scale)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x, generator=generator)
        return x

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None):
        """Every image once, in order (for evaluation); the last batch may be short."""
        for start in range(0, self.n, batch_size):
            idx = torch.arange(start, min(start + batch_size, self.n), device=self.device)
            yield self.batch(idx, generator)


def make_splits(train_images, test_images, device, binarize: str, binarize_seed: int):
    """Train and test splits; static binarization draws train then test from one seeded CPU generator."""
    gen = torch.Generator().manual_seed(binarize_seed) if binarize == "static" else None
    return (DeviceSplit(train_images, device, binarize, gen),
            DeviceSplit(test_images, device, binarize, gen))


def load_device_splits(data_cfg, device):
    """Train and test splits of the dataset `data_cfg` describes, each held once on `device` as uint8."""
    from vae.data import load_splits

    (train_images, _), (test_images, _) = load_splits(data_cfg, ("train", "test"))
    return make_splits(train_images, test_images, device, data_cfg.binarize, data_cfg.binarize_seed)
