"""The negative ELBO in nats per image, computed from logits for numerical safety.

    -ELBO(x) = E_q(z|x)[-log p(x|z)] + KL(q(z|x) || p(z))
             ~ sum_pixels BCE(x, decoder(z)) + sum_latents sum_k q_k (log q_k - log p_k)

The reconstruction term is a one-sample estimate with a (relaxed) sample z; the KL is analytic.
"""
import torch
import torch.nn.functional as F


def kl_categorical(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per image, summed over latent variables. logits [B, N, K]; log_prior [N, K] (or broadcastable).

    For the uniform prior log p_k = -log K, giving KL = sum q log q + N log K: 0 for uniform q, N log K for
    one-hot q.
    """
    log_q = F.log_softmax(logits, dim=-1)
    return (log_q.exp() * (log_q - log_prior)).sum(dim=(-2, -1))


def bce_per_image(x_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) for Bernoulli pixels (grayscale targets give the usual continuous BCE), summed over pixels."""
    return F.binary_cross_entropy_with_logits(x_logits, x, reduction="none").sum(dim=-1)


def negative_elbo(x_logits, x, logits, log_prior):
    """Per-image (loss, bce, kl); the trainer averages over the batch."""
    bce = bce_per_image(x_logits, x)
    kl = kl_categorical(logits, log_prior)
    return bce + kl, bce, kl
