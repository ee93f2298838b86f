"""Evaluation math against exact answers: a latent space of 2 variables x 3 classes has 9 codes, so
log p(x) = logsumexp_z [log p(x|z) + log p(z)] and the discrete ELBO E_q[log p(x,z) - log q(z|x)] can be
summed exactly (float64) and the Monte Carlo estimators compared with them.

The model keeps CategoricalVAE's interface (encode / decode / log_prior) with one-layer encoder and decoder:
the metrics see nothing else, and the tests run in seconds. The importance-weighted bound stops between chunks when
asked to.
"""
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from support import StopAfter
from vae.core import metrics
from vae.data.device_data import DeviceSplit
from vae.core.model import IMAGE_PIXELS, CategoricalVAE

N, K = 2, 3
N_IMAGES = 5


def tiny_model(dtype=torch.float64, seed=0) -> CategoricalVAE:
    """Weights scaled so that q(z|x) is far from uniform and from the posterior, and p(x|z) differs between
    codes by nats: the ELBO gap (about 1 nat) and the bound's dependence on k are then visible."""
    torch.manual_seed(seed)
    model = CategoricalVAE(N, K, prior="learned")
    model.encoder = nn.Linear(IMAGE_PIXELS, N * K)
    model.decoder = nn.Linear(N * K, IMAGE_PIXELS)
    with torch.no_grad():
        model.encoder.weight.mul_(2)
        model.decoder.weight.mul_(0.3)
        model.prior_logits.copy_(torch.randn(N, K))  # non-uniform: a dropped log p(z) term shows
    return model.to(dtype)


def tiny_images(n=N_IMAGES, seed=0) -> torch.Tensor:
    """Binary uint8 {0, 255} images: as DeviceSplit(..., "none") reads them they are exactly 0.0 / 1.0."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 28, 28, generator=gen) < 0.3).to(torch.uint8) * 255


def all_codes(dtype=torch.float64) -> torch.Tensor:
    """The K**N one-hot codes, [9, N, K]."""
    return torch.stack([F.one_hot(torch.tensor(c), K) for c in itertools.product(range(K), repeat=N)]).to(dtype)


@torch.no_grad()
def exact_terms(model, x):
    """(log p(x,z) - log q(z|x) [9, B], q(z|x) [9, B], log p(x) [B], discrete -ELBO [B]), by enumeration.

    Written from the formulas, not from vae.core.loss: log p(x|z) = sum_pixels x l - softplus(l) for logits l.
    """
    codes = all_codes(x.dtype)
    x_logits = model.decode(codes)[:, None, :]                              # [9, 1, 784]
    log_px_z = (x * x_logits - F.softplus(x_logits)).sum(-1)                # [9, B]
    log_pz = (codes * model.log_prior()).sum((-2, -1))[:, None]             # [9, 1]
    log_qz = torch.einsum("cnk,bnk->cb", codes, F.log_softmax(model.encode(x), -1))
    log_w = log_px_z + log_pz - log_qz
    q = log_qz.exp()
    return log_w, q, torch.logsumexp(log_px_z + log_pz, 0), -(q * log_w).sum(0)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model()
    x = tiny_images().view(N_IMAGES, -1).double() / 255
    log_w, q, log_px, nelbo = exact_terms(model, x)
    # Sanity of the test itself: the ELBO gap must be large enough for the checks below to mean something.
    assert (nelbo - (-log_px)).min() > 0.3
    return model, x, log_w, q, log_px, nelbo


def test_log_weights_are_exact_for_the_sampled_code_and_codes_follow_q(tiny):
    """Each log w is exactly log p(x,z) - log q(z|x) of one of the 9 codes, and codes occur with frequency q."""
    model, x, exact_log_w, q, _, _ = tiny
    k = 4000
    log_w = metrics.log_weights(model, x, k, generator=torch.Generator().manual_seed(0))   # [k, B]
    assert log_w.shape == (k, N_IMAGES)
    distance = (log_w[:, None, :] - exact_log_w[None]).abs()                  # [k, 9, B]
    assert distance.min(1).values.max() < 1e-9, "a log-weight matches no code: a term is missing or wrong"
    freq = F.one_hot(distance.argmin(1), 9).double().mean(0).T               # [9, B]
    # Binomial s.e. <= 0.5 / sqrt(k) = 0.008; sampling from the prior instead of q would be off by ~0.2.
    assert (freq - q).abs().max() < 0.04


def repeated_bounds(model, x, k, reps, seed):
    """[reps, B] independent k-sample bounds per image: each row of a batch draws its own samples, so a batch
    of `reps` copies is `reps` seeds at once. Chunks keep the [chunk, rows, 784] tensors near 20k rows."""
    chunk = max(1, 20_000 // (reps * x.shape[0]))
    return metrics.iw_bound_batch(model, x.repeat(reps, 1), k=k, chunk=chunk,
                                  generator=torch.Generator().manual_seed(seed)).view(reps, x.shape[0])


def test_k1_bound_equals_discrete_elbo_in_expectation(tiny):
    """E[-log w] = E_q[-log p(x|z)] + KL(q||p): the 1-sample IW bound is the discrete -ELBO on average."""
    model, x, _, _, _, nelbo = tiny
    bound = repeated_bounds(model, x, k=1, reps=4000, seed=1)
    mean, se = bound.mean(0), bound.std(0) / math.sqrt(bound.shape[0])
    # s.e. is about 0.03; the entropy of q a missing log q term would drop is about 2 nats.
    assert se.max() < 0.05
    assert torch.all((mean - nelbo).abs() < 5 * se), (mean, nelbo, se)


def test_bound_converges_to_log_px(tiny):
    model, x, _, _, log_px, nelbo = tiny
    bound = metrics.iw_bound_batch(model, x, k=5000, chunk=1000, generator=torch.Generator().manual_seed(2))
    # Here the k=5000 estimate has s.e. <= 0.03 (relative variance of the weights <= 5); a wrong log k would be
    # off by log(5000) = 8.5, a missing log q term by a nat or more.
    assert torch.all((bound - (-log_px)).abs() < 0.15), (bound, -log_px)
    assert torch.all(nelbo > -log_px + 1.0)  # and the discrete ELBO is looser by a clear margin


def test_bound_tightens_with_k(tiny):
    """E[bound_k] decreases in k towards -log p(x) (Burda et al. 2016, theorem 1). Here E[bound_k] + log p(x)
    is about relvar / 2k per image: 0.7-2.4 nats at k=1, 0.07-0.24 at k=10, 0.01-0.02 at k=100. Per image the
    k=1 -> 10 step is > 10 s.e.; the later, smaller steps are checked on the mean over images (s.e. ~0.01)."""
    log_px = tiny[4]
    # float32, as in use (and twice as fast as float64): rounding is far below the margins.
    model, x = tiny_model(torch.float32), tiny[1].float()
    means = {k: repeated_bounds(model, x, k, reps, seed=3 + k).double().mean(0)
             for k, reps in ((1, 1000), (10, 1000), (100, 100))}
    assert torch.all(means[1] > means[10] + 0.3), means
    assert means[10].mean() > means[100].mean() + 0.08, means
    assert means[100].mean() > -log_px.mean() - 0.05, (means[100], -log_px)


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunking_does_not_change_the_bound(tiny, chunk):
    """Noise is drawn sample-major, so chunks read the CPU random stream in the same order as one big draw."""
    model, x = tiny[:2]
    k = 50
    whole = metrics.iw_bound_batch(model, x, k=k, chunk=k, generator=torch.Generator().manual_seed(4))
    chunked = metrics.iw_bound_batch(model, x, k=k, chunk=chunk, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-10)
    other_seed = metrics.iw_bound_batch(model, x, k=k, chunk=chunk, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(other_seed, whole, rtol=0, atol=1e-6)  # the comparison can fail


def test_iw_bound_over_a_split_is_the_mean_per_image():
    """Batches of 3 over 5 images: the split value averages images (not batches) and reports progress."""
    model = tiny_model(torch.float32)
    split = DeviceSplit(tiny_images(), "cpu", "none")
    done = []
    value = metrics.iw_bound(model, split, k=20, chunk=6, batch_size=3,
                             generator=torch.Generator().manual_seed(6), progress=done.append)
    gen = torch.Generator().manual_seed(6)
    per_image = torch.cat([metrics.iw_bound_batch(model, x, k=20, chunk=6, generator=gen)
                           for x in split.batches(3)])
    assert done == [3, 2]
    assert value == pytest.approx(per_image.double().mean().item(), rel=1e-6)


def hand_relaxed_terms(model, x, logits, u, tau, hard):
    """The relaxed -ELBO of one batch from uniform noise u, from the formulas:
    y = softmax((logits + g) / tau), g = -log(-log u)  (Jang et al. 2017, eq. 2);  KL = sum q (log q - log p)."""
    g = -torch.log(-torch.log(u))
    y = F.softmax((logits + g) / tau, -1)
    if hard:
        y = F.one_hot(y.argmax(-1), K).to(y.dtype)
    x_logits = model.decode(y)
    bce = (F.softplus(x_logits) - x * x_logits).sum(-1)
    log_q = F.log_softmax(logits, -1)
    kl = (log_q.exp() * (log_q - model.log_prior())).sum((-2, -1))
    return bce, kl


@pytest.mark.parametrize("hard", [False, True])
@torch.no_grad()
def test_evaluate_split_matches_hand_computation(hard):
    model = tiny_model(torch.float32)
    split = DeviceSplit(tiny_images(), "cpu", "none")
    tau = 0.7
    got = metrics.evaluate_split(model, split, tau=tau, hard=hard, generator=torch.Generator().manual_seed(7),
                                 batch_size=3)
    # Re-seed and replay: per batch, the relaxed sample's noise, then the exact sample's noise.
    gen = torch.Generator().manual_seed(7)
    sums = dict.fromkeys(("bce", "kl", "elbo_discrete"), 0.0)
    for x in split.batches(3):
        logits = model.encode(x)
        bce, kl = hand_relaxed_terms(model, x, logits, torch.rand(logits.shape, generator=gen), tau, hard)
        g = -torch.log(-torch.log(torch.rand(logits.shape, generator=gen)))
        z = F.one_hot((logits + g).argmax(-1), K).float()
        x_logits = model.decode(z)
        sums["bce"] += bce.sum().item()
        sums["kl"] += kl.sum().item()
        sums["elbo_discrete"] += ((F.softplus(x_logits) - x * x_logits).sum(-1) + kl).sum().item()
    want = {name: s / split.n for name, s in sums.items()}
    want["loss"] = want["bce"] + want["kl"]
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    if hard:  # the straight-through forward pass is a one-hot sample: the relaxed loss is a discrete one
        assert got["loss"] != pytest.approx(got["elbo_discrete"], rel=1e-6)  # ... but from other noise


def test_evaluate_split_discrete_elbo_is_unbiased(tiny):
    """Over many copies of the images, elbo_discrete averages to the exact discrete -ELBO."""
    model = tiny_model(torch.float32)
    reps = 2000
    split = DeviceSplit(tiny_images().repeat(reps, 1, 1), "cpu", "none")
    got = metrics.evaluate_split(model, split, tau=0.5, hard=False, generator=torch.Generator().manual_seed(8),
                                 batch_size=5000)
    nelbo = tiny[5]
    # s.e. of the mean over 10^4 one-sample estimates is about 0.02; replacing the one-hot z by the relaxed
    # sample or dropping the KL moves it by far more.
    assert got["elbo_discrete"] == pytest.approx(nelbo.mean().item(), abs=0.08)
    assert got["loss"] == pytest.approx(got["bce"] + got["kl"], rel=1e-6)


def test_iw_bound_stops_between_chunks():
    from vae.core import metrics
    from vae.data.device_data import DeviceSplit
    from vae.core.model import CategoricalVAE

    split = DeviceSplit(torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8), torch.device("cpu"), "none")
    model = CategoricalVAE(3, 4)
    stop = StopAfter(3)
    assert metrics.iw_bound(model, split, k=1000, chunk=10, batch_size=10, generator=torch.Generator(),
                            should_stop=stop) is None
    assert stop.asked == 3  # two chunks done, then stopped: not the 200 chunks of the whole split
    full = metrics.iw_bound(model, split, k=20, chunk=10, batch_size=10, generator=torch.Generator().manual_seed(0))
    assert full == metrics.iw_bound(model, split, k=20, chunk=10, batch_size=10,
                                    generator=torch.Generator().manual_seed(0), should_stop=lambda: False)
