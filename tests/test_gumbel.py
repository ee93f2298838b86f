"""The Gumbel-softmax sampler: distribution, straight-through gradients, temperature limits, finiteness."""
import torch
import torch.nn.functional as F

from vae.core.gumbel import gumbel_softmax, one_hot_argmax, sample_categorical, sample_gumbel

# Upper 0.1% point of the chi-square distribution with 4 degrees of freedom (K = 5 classes).
CHI2_4DF_999 = 18.467


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def argmax_counts(logits, n, tau, hard, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = gumbel_softmax(logits.expand(n, -1), tau, hard=hard, generator=gen)
    return torch.bincount(y.argmax(-1), minlength=logits.shape[-1]).double()


def test_argmax_frequencies_match_softmax():
    logits = torch.tensor([1.5, 0.2, -1.0, 0.7, -0.3])
    probs = F.softmax(logits.double(), -1)
    for hard in (False, True):
        stat = chi_square(argmax_counts(logits, 200_000, 0.7, hard), probs)
        assert stat < CHI2_4DF_999, stat
    # The same test rejects a sampler that is off by a factor in the logits: it has the power to fail.
    wrong = F.softmax(1.1 * logits.double(), -1)
    assert chi_square(argmax_counts(logits, 200_000, 0.7, False), wrong) > CHI2_4DF_999


def test_gumbel_max_samples_are_categorical():
    logits = torch.tensor([0.0, 1.0, 2.0, -2.0, 0.5])
    y = sample_categorical(logits.expand(200_000, -1), generator=torch.Generator().manual_seed(1))
    assert torch.all(y.sum(-1) == 1)
    stat = chi_square(y.sum(0).double(), F.softmax(logits.double(), -1))
    assert stat < CHI2_4DF_999, stat


def test_noise_is_always_finite_even_at_the_ends_of_uniform(monkeypatch):
    # torch.rand can return exactly 0; force both ends of [0, 1] through the sampler.
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.tensor([0.0, 1.0, 0.5]).expand(shape).clone())
    g = sample_gumbel((4, 3))
    assert torch.isfinite(g).all()
    y = gumbel_softmax(torch.zeros(4, 3), 0.1)
    assert torch.isfinite(y).all()


def test_hard_samples_are_exactly_one_hot_with_the_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(64, 30, 10)
    weights = torch.randn(30, 10)
    noise = sample_gumbel(logits.shape, generator=torch.Generator().manual_seed(3))

    soft_logits = logits.clone().requires_grad_()
    y_soft = gumbel_softmax(soft_logits, 0.5, noise=noise)
    (y_soft * weights).sum().backward()

    hard_logits = logits.clone().requires_grad_()
    y_hard = gumbel_softmax(hard_logits, 0.5, hard=True, noise=noise)
    (y_hard * weights).sum().backward()

    assert set(y_hard.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y_hard.sum(-1), torch.ones(64, 30))  # exactly, not up to rounding
    assert torch.equal(y_hard, one_hot_argmax(y_soft.detach()))
    assert torch.allclose(hard_logits.grad, soft_logits.grad)
    assert soft_logits.grad.abs().sum() > 0


def test_temperature_limits():
    logits = torch.randn(1000, 8, generator=torch.Generator().manual_seed(0))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    cold = gumbel_softmax(logits, 0.01, generator=gen())
    hot = gumbel_softmax(logits, 1000.0, generator=gen())
    assert cold.max(-1).values.mean() > 0.99          # nearly one-hot
    assert (hot - 1 / 8).abs().max() < 0.01           # nearly uniform
    # and the cold sample's argmax is the Gumbel-max sample with the same noise
    assert torch.equal(cold.argmax(-1), (logits + sample_gumbel(logits.shape, generator=gen())).argmax(-1))


def test_tensor_tau_equals_float_tau():
    logits = torch.randn(5, 4)
    noise = sample_gumbel(logits.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(gumbel_softmax(logits, 0.3, noise=noise), gumbel_softmax(logits, torch.tensor(0.3), noise=noise))
