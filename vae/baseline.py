"""The textbook port of this model, as the popular PyTorch ports write it: the reference for our speed figures.

`torchvision.datasets.MNIST(data.root, train=True, transform=ToTensor())` (FashionMNIST for data=fashion_mnist),
`DataLoader(batch_size, shuffle=True, num_workers=baseline_workers)`: every epoch each image becomes a PIL image,
then a float tensor, then a collated batch. Per batch: `x.to(device)`, `zero_grad`, the same encoder, Gumbel-softmax
(noise from the global RNG, tau a Python float on the same schedule), decoder and loss as ours, `.mean().backward()`,
a default `torch.optim.Adam(lr)` step and a `loss.item()` (the host sync of every port's progress print). A dynamic
binarization draws `torch.bernoulli(x)` on the device; a static one is not reproduced (grayscale targets, same cost).

    python -m vae.baseline epochs=10 threads=2     # the whole textbook loop as one process (docs/speed.md)

The benchmark (`python -m vae.bench`) times the same runner block by block beside our trainer.
"""
from __future__ import annotations

import logging
import statistics
import time
from typing import List

import hydra
import torch
from omegaconf import DictConfig

from vae.tools.bench_config import validate  # also registers the schema configs/bench.yaml composes
from vae.settings.config import CONFIG_DIR
from vae.common.errors import UserError, entry_point, memory_hint
from vae.core.schedule import tau_for

log = logging.getLogger("vae.baseline")


class BaselineRun:
    """The textbook port: DataLoader of ToTensor images, same model and loss; state carries across `run` calls."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        from vae.core.model import CategoricalVAE

        self.cfg, self.device = cfg, device
        cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[cfg.data.name]
        try:
            self.dataset = cls(str(cfg.data.root), train=True, download=False, transform=transforms.ToTensor())
        except RuntimeError as e:  # torchvision: "Dataset not found"
            raise UserError(f"baseline: torchvision cannot read {cfg.data.root} ({str(e).splitlines()[0]}); "
                            "run `python -m vae.data` first, or set baseline=false") from e
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True,
                                 num_workers=cfg.baseline_workers)
        self.steps_per_epoch = len(self.loader)
        self.images_per_epoch = len(self.dataset)
        torch.manual_seed(cfg.seed)
        self.model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim, cfg.prior).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.iterator = None
        self.step = 0
        self.epoch_losses: List[float] = []

    def _next_batch(self):
        if self.iterator is not None:
            batch = next(self.iterator, None)
            if batch is not None:
                return batch
        self.iterator = iter(self.loader)  # the first call, or the end of an epoch: a new shuffled epoch
        self.epoch_losses = []
        return next(self.iterator)

    def run(self, n: int) -> int:
        from vae.core.gumbel import gumbel_softmax
        from vae.core.loss import negative_elbo

        images = 0
        for _ in range(n):
            x, _ = self._next_batch()
            x = x.to(self.device).view(-1, 28 * 28)
            if self.cfg.data.binarize == "dynamic":
                x = torch.bernoulli(x)
            self.optimizer.zero_grad()
            logits = self.model.encode(x)
            z = gumbel_softmax(logits, tau_for(self.cfg, self.step), hard=self.cfg.hard)
            loss, _, _ = negative_elbo(self.model.decode(z), x, logits, self.model.log_prior())
            loss = loss.mean()
            loss.backward()
            self.optimizer.step()
            self.epoch_losses.append(loss.item())
            self.step += 1
            images += len(x)
        return images

    def loss(self) -> float:
        return statistics.fmean(self.epoch_losses) if self.epoch_losses else float("nan")


@hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    """Train the textbook port for `epochs` whole epochs (the bench settings), one line per epoch."""
    from vae.settings.checks import resolve_device
    from vae.training.device import configure_device

    validate(cfg)
    device = resolve_device(cfg.device)
    configure_device(device, cfg.tf32, cfg.threads, cfg.flush_denormal)
    with memory_hint("in the baseline", f"batch_size={cfg.batch_size} and the code, latent_dim x categorical_dim "
                     f"= {cfg.latent_dim} x {cfg.categorical_dim}"):
        runner = BaselineRun(cfg, device)
        for epoch in range(1, max(1, round(cfg.epochs)) + 1):
            t0 = time.perf_counter()
            runner.run(runner.steps_per_epoch)
            log.info("baseline epoch %d | train loss %.2f | %.2f s", epoch, runner.loss(), time.perf_counter() - t0)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
