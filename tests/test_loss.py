"""KL, the loss against a hand computation, and the temperature schedule."""
import math

import pytest
import torch
import torch.nn.functional as F

from vae.core.loss import bce_per_image, kl_categorical, negative_elbo
from vae.core.model import CategoricalVAE
from vae.core.schedule import temperature_at


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


def test_model_shapes_and_unconstrained_logits():
    model = CategoricalVAE(3, 4)
    with torch.no_grad():
        model.encoder[-1].bias.fill_(-5.0)  # a ReLU on the logits would turn these into 0
    logits = model.encode(torch.rand(2, 784))
    assert logits.shape == (2, 3, 4) and (logits < 0).any()
    assert model.decode(torch.zeros(5, 3, 4)).shape == (5, 784)
    assert not any(n == "prior_logits" for n, _ in model.named_parameters())
    assert any(n == "prior_logits" for n, _ in CategoricalVAE(3, 4, prior="learned").named_parameters())


SCHEDULE = dict(temperature=1.0, temp_min=0.5, anneal_rate=3e-5, anneal_interval=100)


def test_schedule_values_at_chosen_steps():
    assert temperature_at(0, **SCHEDULE) == 1.0
    assert temperature_at(99, **SCHEDULE) == 1.0                       # updated every 100 steps only
    assert temperature_at(100, **SCHEDULE) == pytest.approx(math.exp(-3e-5 * 100))
    assert temperature_at(6123, **SCHEDULE) == pytest.approx(math.exp(-3e-5 * 6100))
    assert temperature_at(30_000, **SCHEDULE) == pytest.approx(max(0.5, math.exp(-0.9)))


def test_schedule_floor_and_no_reset_across_epochs():
    assert temperature_at(10**7, **SCHEDULE) == 0.5
    # 600 steps per epoch: the first step of epoch 3 continues from epoch 2's last, it does not restart at 1.0
    taus = [temperature_at(s, **SCHEDULE) for s in range(0, 6000, 100)]
    assert all(a >= b for a, b in zip(taus, taus[1:])) and taus[-1] < taus[0]
    assert temperature_at(1200, **SCHEDULE) < temperature_at(599, **SCHEDULE)
    # the paper's form max(0.5, exp(-r t)) with r = 1e-4, N = 1000
    assert temperature_at(2500, temperature=1.0, temp_min=0.5, anneal_rate=1e-4, anneal_interval=1000) == \
        pytest.approx(math.exp(-1e-4 * 2000))
