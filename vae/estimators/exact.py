"""The exact negative ELBO and its exact gradient, by summing over every one of the K^N codes.

    -ELBO(x) = sum_c q(c|x) f_x(c) + KL(q || p),   q(c|x) = prod_n q(c_n|x),   f_x(c) = -log p(x|c)

Feasible for small codes only (refused above MAX_CODES); it is the reference the estimators are measured against
(`python -m vae.gradients`) and an estimator in its own right on such models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vae.common.errors import UserError
from vae.estimators.base import Estimator
from vae.core.loss import kl_categorical

MAX_CODES = 2**16
# Codes decoded at once. Memory is one chunk's decoder activations and a [B, CHUNK] matrix at a time: each chunk is
# recomputed in the backward pass (activation checkpointing) instead of being kept. The codes themselves, one-hot
# [K^N, N, K], are at most 2^16 x N*K floats (8 MB for 4^8 or 2^16 codes).
CHUNK = 1024


def codes(start: int, stop: int, latent_dim: int, categorical_dim: int, like: torch.Tensor) -> torch.Tensor:
    """One-hot codes number start..stop-1 [C, N, K] (dtype and device of `like`), code c's class of variable n its
    n-th base-K digit."""
    c = torch.arange(start, stop, device=like.device)
    place = categorical_dim ** torch.arange(latent_dim - 1, -1, -1, device=like.device)
    return F.one_hot(c[:, None] // place % categorical_dim, categorical_dim).to(like.dtype)


def expected_reconstruction(model, log_probs: torch.Tensor, x: torch.Tensor, z: torch.Tensor,
                            level: torch.Tensor) -> torch.Tensor:
    """sum_c q(c|x) (f_x(c) - level) over the codes z [C, N, K], per image [B].

    Both factors are matrix products, so no [B, C, 784] tensor is formed: log q(c|x) = log_probs . c (one-hot), and
    for Bernoulli pixels BCE(x, l) = sum_pixels softplus(l) - x l. The weights are exp(log q(c|x)) as they are: over
    all codes they sum to 1, and each is at most 1, so no normalisation and no overflow.
    """
    x_logits = model.decode(z)                                                    # [C, 784]
    f = F.softplus(x_logits).sum(dim=-1) - x @ x_logits.T - level[:, None]        # [B, C]
    weights = torch.exp(log_probs.flatten(1) @ z.flatten(1).T)                    # [B, C]
    return (weights * f).sum(dim=-1)


class Exact(Estimator):
    """Exact: E_q[f(z)] + KL summed over all K^N codes, so autograd gives the exact gradient of the discrete
    negative ELBO for every parameter; the logged loss is the exact negative ELBO. Uses no noise: `noise_shape` is
    (0,), an empty draw that leaves the caller's generator where it was."""

    name = "exact"

    @classmethod
    def check_settings(cls, settings, latent_dim, categorical_dim):
        codes = categorical_dim ** latent_dim
        if codes > MAX_CODES:
            shown = str(codes) if codes < 10**12 else f"{codes:.3g}"
            raise UserError(f"estimator=exact enumerates K^N = {categorical_dim}^{latent_dim} = {shown} codes; "
                            f"that is more than {MAX_CODES} it will sum over: use latent_dim/categorical_dim with "
                            f"K^N <= {MAX_CODES} (e.g. latent_dim=4 categorical_dim=4) or another estimator")

    def noise_shape(self, batch_size, latent_dim, categorical_dim):
        return (0,)

    def batch_loss(self, model, x, noise, tau):
        logits = model.encode(x)
        kl = kl_categorical(logits, model.log_prior())
        log_probs = F.log_softmax(logits, dim=-1)
        n, k = logits.shape[-2:]
        chunks = [codes(start, min(start + CHUNK, k ** n), n, k, log_probs) for start in range(0, k ** n, CHUNK)]
        # Two passes. The gradient through the weights is sum_c grad q(c|x) f(c), where f is some 500 nats and the
        # gradient a fraction of one: in float32 the terms would cancel to about 1e-3 of the result. So the first
        # pass finds each image's E_q[f] (a constant here), and the second sums q(c|x) (f(c) - E_q[f]), whose
        # gradient is the same because sum_c q(c|x) = 1.
        with torch.no_grad():
            level = sum(expected_reconstruction(model, log_probs, x, z, torch.zeros_like(kl)) for z in chunks)
        centred = sum(checkpoint(expected_reconstruction, model, log_probs, x, z, level, use_reentrant=False,
                                 preserve_rng_state=False) for z in chunks)
        bce = level + centred
        loss = (bce + kl).mean()
        return loss, loss, bce.mean(), kl.mean()
