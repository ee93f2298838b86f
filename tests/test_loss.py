"""vae/core/loss.py: KL and the loss against a hand computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from vae.core.loss import bce_per_image, kl_categorical, negative_elbo


def uniform_log_prior(n, k):
    return torch.full((n, k), -math.log(k))


def test_kl_is_zero_for_uniform_q_and_n_log_k_for_one_hot_q():
    n, k = 30, 10
    assert kl_categorical(torch.zeros(2, n, k), uniform_log_prior(n, k)).abs().max() < 1e-5
    one_hot_logits = torch.full((2, n, k), -1e4)
    one_hot_logits[..., 3] = 0.0
    assert torch.allclose(kl_categorical(one_hot_logits, uniform_log_prior(n, k)), torch.full((2,), n * math.log(k)))


def test_kl_matches_a_hand_computation_for_a_learned_prior():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    p = torch.tensor([[0.2, 0.5, 0.3]])
    expected = sum(qi * math.log(qi / pi) for qi, pi in zip(q[0].tolist(), p[0].tolist()))
    got = kl_categorical(q.log().unsqueeze(0), p.log())
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_matches_a_hand_computation():
    x = torch.tensor([[0.0, 1.0, 0.25]])
    x_logits = torch.tensor([[-2.0, 3.0, 0.5]])
    sig = [1 / (1 + math.exp(-v)) for v in x_logits[0].tolist()]
    bce = -sum(t * math.log(s) + (1 - t) * math.log(1 - s) for t, s in zip(x[0].tolist(), sig))
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # two binary latents
    q0 = math.exp(2) / (math.exp(2) + 1)
    kl = (q0 * math.log(2 * q0) + (1 - q0) * math.log(2 * (1 - q0))) + 0.0
    loss, bce_t, kl_t = negative_elbo(x_logits, x, logits, uniform_log_prior(2, 2))
    assert bce_t.item() == pytest.approx(bce, rel=1e-5)
    assert kl_t.item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(bce + kl, rel=1e-5)
    assert torch.allclose(bce_per_image(x_logits, x), F.binary_cross_entropy(torch.sigmoid(x_logits), x, reduction="none").sum(-1))
