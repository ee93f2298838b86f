"""Gradient estimators: how encoder logits become the code the decoder sees, and the loss whose gradient is used.

(Interim: Gumbel-softmax and its straight-through variant; the full set follows the same interface.)
"""
from __future__ import annotations

from typing import Optional

import torch

from vae.errors import UserError
from vae.gumbel import gumbel_softmax
from vae.loss import negative_elbo

NAMES = ("gumbel", "st_gumbel")


def default_samples(name: str) -> int:
    return 1


def check_settings(name: str, samples: Optional[int], latent_dim: int, categorical_dim: int,
                   baseline_decay: float) -> None:
    if name not in NAMES:
        raise UserError(f"estimator={name!r} is not available yet; use one of {', '.join(NAMES)}")


class GumbelSoftmax:
    """Jang, Gu & Poole (2017); Maddison et al. (2017). hard: straight-through (one-hot forward)."""

    def __init__(self, hard: bool):
        self.name = "st_gumbel" if hard else "gumbel"
        self.hard = self.one_hot = hard

    def noise_shape(self, batch_size: int, latent_dim: int, categorical_dim: int) -> tuple:
        return (batch_size, latent_dim, categorical_dim)

    def batch_loss(self, model, x, noise, tau):
        logits = model.encode(x)
        z = gumbel_softmax(logits, tau, hard=self.hard, noise=noise)
        loss, bce, kl = negative_elbo(model.decode(z), x, logits, model.log_prior())
        loss = loss.mean()
        return loss, loss, bce.mean(), kl.mean()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_estimator(name: str, *, samples: Optional[int] = None, baseline_decay: float = 0.99, device=None):
    return GumbelSoftmax(hard=name == "st_gumbel")
