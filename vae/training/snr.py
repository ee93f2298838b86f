"""`train/grad_snr`: how much of the encoder's gradient estimate is signal, logged every `snr_interval` steps.

A trainer callback. Every `snr_interval` steps (0 = off, the default) it draws `snr_samples` (M) independent estimates
g_1..g_M of the run's estimator's gradient of the loss with respect to the encoder's parameters, all on one fixed
batch (the first `batch_size` training images) at the current weights and temperature, and logs

    train/grad_snr = |mean g| / sqrt(sum_i |g_i - mean g|^2 / (M - 1))

the norm of the mean over the root-mean-square spread of one estimate: the inverse of `vae.gradients`' rel_std.
Pure noise (E[g] = 0) still shows about 1/sqrt(M), the norm of a mean of M noisy estimates.

Training is untouched: the noise and any binarization come from a generator of its own (seeded by `seed` and the
step, so a resumed run logs the same values), the gradients from `torch.autograd.grad` (no `.grad` is written, the
optimizer never sees them), and a copy of the estimator carries its state (sf's and muprop's baselines), reset to the
trainer's before each estimate. Each measurement costs M forward and backward passes of one batch.
"""
from __future__ import annotations

import hashlib

import torch

from vae.settings.config import estimator_name
from vae.estimators import config_settings, make_estimator
from vae.core.gumbel import sample_gumbel

TAG = "train/grad_snr"


def stream_seed(seed: int, step: int) -> int:
    """A seed for step `step`'s estimates, apart from every training stream (those come from `seed` itself)."""
    digest = hashlib.blake2b(f"grad_snr {seed} {step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def encoder_snr(trainer, estimator, samples: int, generator: torch.Generator) -> float:
    """|mean g| / rms |g - mean g| over `samples` estimates of the encoder's gradient on the trainer's fixed batch, by
    `estimator`, a copy of the trainer's."""
    cfg, model, device = trainer.cfg, trainer.model, trainer.device
    state = {k: v.clone() for k, v in trainer.estimator.state_dict().items()}
    x = trainer.train_split.batch(torch.arange(cfg.batch_size, device=device), generator)
    tau = torch.tensor(trainer.state.tau, device=device)
    shape = estimator.noise_shape(len(x), model.latent_dim, model.categorical_dim)
    params = list(model.encoder.parameters())
    first = total = None
    square = torch.zeros((), dtype=torch.float64, device=device)
    for _ in range(samples):
        estimator.load_state_dict(state)
        noise = sample_gumbel(shape, generator=generator, device=device)
        surrogate = estimator.batch_loss(model, x, noise, tau)[0]
        g = torch.cat([p.flatten() for p in torch.autograd.grad(surrogate, params)]).double()
        if first is None:  # sums around the first estimate: no cancellation when the estimates are close
            first, total = g, torch.zeros_like(g)
        total += g - first
        square += (g - first).square().sum()
    shift = total / samples
    spread = (square - samples * shift.square().sum()).clamp_min(0) / (samples - 1)
    signal = (first + shift).norm()
    return (signal / spread.sqrt()).item() if spread > 0 else float("inf")


class GradientSNR:
    """Logs train/grad_snr every `cfg.snr_interval` steps through `log.add_scalar(tag, value, step)`."""

    def __init__(self, cfg, log):
        self.interval, self.samples, self.seed, self.log = cfg.snr_interval, cfg.snr_samples, cfg.seed, log
        self.estimator = None  # the copy, made on the trainer's device at the first measurement

    @classmethod
    def for_run(cls, cfg, log) -> list:
        """The callbacks a run's config asks for: this one, or none with snr_interval=0."""
        return [cls(cfg, log)] if cfg.snr_interval > 0 else []

    def on_step(self, trainer) -> None:
        step = trainer.state.step
        if step % self.interval == 0:
            cfg, device = trainer.cfg, trainer.device
            if self.estimator is None:
                self.estimator = make_estimator(estimator_name(cfg), config_settings(estimator_name(cfg), cfg), device)
            generator = torch.Generator(device=device).manual_seed(stream_seed(self.seed, step))
            self.log.add_scalar(TAG, encoder_snr(trainer, self.estimator, self.samples, generator), step)
