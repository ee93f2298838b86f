"""The gradient estimators: each one's defining property, unbiasedness where it is claimed, settings, state, compile;
the registry, and a new estimator added by its class and one line."""
import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from omegaconf import OmegaConf

from vae.settings.config import Config, validate_ranges
from vae.common.errors import UserError
from vae.estimators import (ESTIMATORS, Estimator, check_settings, config_settings, default_samples, make_estimator,
                            register)
from vae.estimators import exact as exact_module
from vae.estimators.base import sample_codes
from vae.estimators.relaxed import conditional_gumbel
from vae.core.gumbel import gumbel_softmax, sample_gumbel, straight_through
from vae.core.loss import bce_per_image, kl_categorical, negative_elbo
from vae.core.model import CategoricalVAE

torch.set_num_threads(1)
NAMES = list(ESTIMATORS)  # the built-in ones: a test that registers another removes it again
ONE_HOT = [n for n in NAMES if n != "gumbel"]


def settings(name, samples=None, decay=0.9):
    """What the config's `estimator_samples` and `baseline_decay` give estimator `name`."""
    return config_settings(name, {"estimator_samples": samples, "baseline_decay": decay})


def estimator(name, samples=None, decay=0.9, device="cpu"):
    return make_estimator(name, settings(name, samples, decay), device)


def check(name, samples, latent_dim, categorical_dim, decay):
    """The config check of the estimator's settings, as vae.settings.config runs it."""
    return check_settings(name, settings(name, samples, decay), latent_dim, categorical_dim)


def noise_for(est, batch, n, k, seed=0):
    return sample_gumbel(est.noise_shape(batch, n, k), generator=torch.Generator().manual_seed(seed))


class TinyDecoder(nn.Module):
    """A small stand-in for the VAE's decoder: 8 pixels, so that 10^5 samples take a fraction of a second."""

    def __init__(self, n, k, pixels=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(n * k, 16), nn.Tanh(), nn.Linear(16, pixels))
        self.net[2].weight.data *= 3  # codes should matter: f varies by a few nats between them

    def forward(self, z):
        return self.net(z.flatten(-2))


class GivenLogits:
    """A model whose encoder output is a given tensor: the tests read the gradient w.r.t. each row's logits."""

    def __init__(self, logits, decoder, log_prior=None):
        self.logits, self.decoder = logits, decoder
        n, k = logits.shape[-2:]
        self.prior = torch.full((n, k), -torch.log(torch.tensor(float(k)))) if log_prior is None else log_prior
        self.seen = []

    def encode(self, x):
        return self.logits

    def decode(self, z):
        self.seen.append(z)
        return self.decoder(z)

    def log_prior(self):
        return self.prior


def logits_gradient(name, base_logits, x, decoder, replicates, seed, est=None, tau=0.7, samples=None):
    """Per-replicate gradients of one estimate (the batch-mean surrogate) w.r.t. the logits, [R, B, N, K]."""
    est = est or estimator(name, samples)
    B, N, K = base_logits.shape
    logits = base_logits.repeat(replicates, 1, 1).requires_grad_()
    surrogate, *_ = est.batch_loss(GivenLogits(logits, decoder), x.repeat(replicates, 1),
                                   noise_for(est, replicates * B, N, K, seed), torch.tensor(tau))
    surrogate.backward()
    # The surrogate averages over R*B images; one estimate averages over B.
    return logits.grad.view(replicates, B, N, K) * replicates


@pytest.fixture(scope="module")
def tiny():
    """N=2 variables of K=3 classes, 3 images of 8 pixels, logits far from uniform."""
    torch.manual_seed(1)
    logits = 1.5 * torch.randn(3, 2, 3)
    x = torch.rand(3, 8).round()
    return logits, x, TinyDecoder(2, 3)


def exact_logits_gradient(base_logits, x, decoder):
    return logits_gradient("exact", base_logits, x, decoder, 1, 0)[0]


# --- gumbel and st_gumbel are the trainer's original batch loss, bit for bit ---------------------------------------

@pytest.mark.parametrize("name, hard", [("gumbel", False), ("st_gumbel", True)])
def test_gumbel_and_st_gumbel_are_the_original_batch_loss_bitwise(name, hard):
    torch.manual_seed(0)
    x = torch.rand(6, 784)
    tau = torch.tensor(0.6)
    results = []
    for use_estimator in (False, True):
        torch.manual_seed(3)
        model = CategoricalVAE(3, 4, prior="learned")
        noise = sample_gumbel((6, 3, 4), generator=torch.Generator().manual_seed(5))
        if use_estimator:
            est = estimator(name)
            assert est.noise_shape(6, 3, 4) == (6, 3, 4)
            surrogate, loss, bce, kl = est.batch_loss(model, x, noise, tau)
            assert surrogate is loss
        else:  # the reference formula, as vae/training/engine.py's batch_loss had it
            logits = model.encode(x)
            z = gumbel_softmax(logits, tau, hard=hard, noise=noise)
            loss, bce, kl = negative_elbo(model.decode(z), x, logits, model.log_prior())
            loss, bce, kl = loss.mean(), bce.mean(), kl.mean()
        loss.backward()
        results.append([loss, bce, kl] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --- what the decoder sees and what the gradient is -----------------------------------------------------------------

@pytest.mark.parametrize("name", ONE_HOT)
def test_one_hot_estimators_decode_exact_samples_and_log_the_discrete_elbo(name, tiny):
    base, x, decoder = tiny
    est = estimator(name)
    noise = noise_for(est, 3, 2, 3, seed=4)
    model = GivenLogits(base.clone().requires_grad_(), decoder)
    surrogate, loss, bce, kl = est.batch_loss(model, x, noise, torch.tensor(0.5))
    assert torch.equal(surrogate.detach(), loss.detach()), "the surrogate's value is the logged loss"
    # muprop also decodes the mean-field code softmax(logits), for its control variate only.
    codes = model.seen[:1] if name == "muprop" else model.seen
    for z in codes:
        assert torch.all((z == 0) | (z == 1)) and torch.all(z.sum(-1) == 1)
    if name == "exact":
        assert len(torch.cat(codes).flatten(1).unique(dim=0)) == 3 ** 2  # every code (once per pass)
        return
    # The codes are Gumbel-max samples of q from the caller's noise: sample i of rloo from noise[i], gumbel_rao's
    # one sample from noise[0] (its other slices only shape the gradient).
    draws = noise[:1] if name == "gumbel_rao" else noise if noise.dim() == 4 else noise.unsqueeze(0)
    want = F.one_hot((base + draws).argmax(-1), 3).float()
    assert torch.equal(codes[0].reshape(want.shape), want)
    torch.testing.assert_close(bce, bce_per_image(decoder(want), x.expand(len(want), -1, -1)).mean())
    torch.testing.assert_close(kl, kl_categorical(base, model.prior).mean())


def decoder_gradient_and_logits_gradient(name, tau, tiny, est=None):
    """(d loss/d z at the sampled code, d surrogate/d logits minus the KL's part, z, logits), one image."""
    base, x, decoder = tiny
    logits = base[:1].clone().requires_grad_()
    model = GivenLogits(logits, decoder)
    seen_grad = []
    decode = model.decode
    model.decode = lambda z: (z.register_hook(seen_grad.append), decode(z))[1]
    est = est or estimator(name)
    surrogate, *_ = est.batch_loss(model, x[:1], noise_for(est, 1, 2, 3, seed=2), torch.tensor(tau))
    surrogate.backward()
    (kl_grad,) = torch.autograd.grad(kl_categorical(logits, model.prior).mean(), logits)
    return seen_grad[0], logits.grad - kl_grad, model.seen[0], logits.detach()


def softmax_jacobian_product(p, g):
    """J(p)^T g for J = diag(p) - p p^T, over the last dimension."""
    return p * (g - (p * g).sum(-1, keepdim=True))


def test_st_backward_is_the_softmax_jacobian(tiny):
    g, grad, z, logits = decoder_gradient_and_logits_gradient("st", 0.5, tiny)
    torch.testing.assert_close(grad, softmax_jacobian_product(F.softmax(logits, -1), g))
    # ... and not that of the tempered softmax: the test can tell them apart.
    assert not torch.allclose(grad, softmax_jacobian_product(F.softmax(logits / 0.5, -1), g) / 0.5)


def test_annealed_st_backward_is_the_jacobian_of_softmax_logits_over_tau(tiny):
    tau = 0.5
    g, grad, z, logits = decoder_gradient_and_logits_gradient("annealed_st", tau, tiny)
    torch.testing.assert_close(grad, softmax_jacobian_product(F.softmax(logits / tau, -1), g) / tau)


def test_reinmax_backward_matches_the_second_order_formula(tiny):
    """Liu et al. 2023: 2 J(pi_1) g - J(pi_0) g / 2, pi_1 = (D + softmax(logits / tau)) / 2, checked here in the
    form the authors' backward takes (two terms, then centred), computed independently in float64."""
    tau = 1.5
    g, grad, D, logits = decoder_gradient_and_logits_gradient("reinmax", tau, tiny)
    g, D, logits = g.double(), D.double(), logits.double()
    pi_0 = F.softmax(logits, -1)
    pi_1 = 0.5 * (F.softmax(logits / tau, -1) + D)
    term_1 = 2 * g * pi_1
    term_1 = term_1 - pi_1 * term_1.sum(-1, keepdim=True)
    term_0 = -0.5 * g * pi_0
    term_0 = term_0 - pi_0 * term_0.sum(-1, keepdim=True)
    want = term_0 + term_1
    want = want - want.mean(-1, keepdim=True)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(grad.double(), softmax_jacobian_product(pi_0, g), atol=1e-4)


# --- Gumbel-Rao ------------------------------------------------------------------------------------------------------

def test_conditional_gumbels_match_rejection_sampling():
    log_p = F.log_softmax(torch.tensor([1.0, 2.0, 0.5]), -1)
    D = F.one_hot(torch.tensor(0), 3).float()  # the least likely winner but one: a real conditioning
    gen = torch.Generator().manual_seed(0)
    v = conditional_gumbel(log_p, D, sample_gumbel((200_000, 3), generator=gen))
    assert torch.all(v.argmax(-1) == 0)
    free = log_p + sample_gumbel((800_000, 3), generator=gen)
    kept = free[free.argmax(-1) == 0]
    assert len(kept) > 100_000
    torch.testing.assert_close(v.mean(0), kept.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(v.std(0), kept.std(0), atol=0.02, rtol=0)


def test_gumbel_rao_with_one_sample_is_st_gumbel(tiny):
    base, x, decoder = tiny
    grads = []
    for name in ("st_gumbel", "gumbel_rao"):
        est = estimator(name, samples=1 if name == "gumbel_rao" else None)
        logits = base.clone().requires_grad_()
        noise = sample_gumbel((3, 2, 3), generator=torch.Generator().manual_seed(8))
        surrogate, *_ = est.batch_loss(GivenLogits(logits, decoder), x, noise.view(est.noise_shape(3, 2, 3)),
                                       torch.tensor(0.5))
        surrogate.backward()
        grads.append(logits.grad)
    assert torch.equal(*grads)


def test_gumbel_rao_has_st_gumbels_mean_and_less_variance(tiny):
    base, x, decoder = tiny
    st = logits_gradient("st_gumbel", base, x, decoder, 40_000, seed=1, tau=0.5)
    rao = logits_gradient("gumbel_rao", base, x, decoder, 40_000, seed=2, tau=0.5, samples=10)
    se = (st.var(0) / len(st) + rao.var(0) / len(rao)).sqrt()
    assert ((st.mean(0) - rao.mean(0)).abs() / se).max() < 4.5
    assert rao.var(0).sum() < 0.7 * st.var(0).sum()


# --- unbiasedness ---------------------------------------------------------------------------------------------------

def max_z_score(samples, target):
    """The largest |mean - target| / standard error over the coordinates (18 here: about N(0,1) each if unbiased)."""
    se = samples.std(0) / len(samples) ** 0.5
    return ((samples.mean(0) - target).abs() / se.clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("name", ["sf", "rloo", "muprop"])
def test_score_function_estimators_are_unbiased(name, tiny):
    base, x, decoder = tiny
    want = exact_logits_gradient(base, x, decoder)
    est = estimator(name)
    # The first batch uses the leave-one-out baseline, later ones the moving average: both must be unbiased.
    for seed in (11, 12):
        grads = logits_gradient(name, base, x, decoder, 30_000, seed=seed, est=est)
        assert max_z_score(grads, want) < 4.5, seed
    # The same check has the power to reject a biased estimator.
    assert max_z_score(logits_gradient("st", base, x, decoder, 30_000, seed=13), want) > 10


# --- exact ----------------------------------------------------------------------------------------------------------

def test_exact_is_the_sum_over_all_codes(tiny, monkeypatch):
    base, x, decoder = tiny
    decoder = copy.deepcopy(decoder).double()  # .double() converts in place: not the shared fixture's
    logits = base.double().requires_grad_()
    log_prior = F.log_softmax(torch.randn(2, 3, dtype=torch.float64), -1)
    # By hand: every code c in K^N, weight prod_n q(c_n|x), reconstruction term per image.
    q = F.softmax(logits, -1)
    want = kl_categorical(logits, log_prior)
    for c in itertools.product(range(3), repeat=2):
        z = F.one_hot(torch.tensor(c), 3).double()
        weight = q[:, 0, c[0]] * q[:, 1, c[1]]
        want = want + weight * bce_per_image(decoder(z).expand(3, -1), x.double())
    want = want.mean()
    want_grads = torch.autograd.grad(want, [logits, *decoder.parameters()])

    for chunk in (1024, 4):  # one chunk, and 9 codes in chunks of 4, 4 and 1
        monkeypatch.setattr(exact_module, "CHUNK", chunk)
        logits_c = logits.detach().clone().requires_grad_()
        surrogate, loss, bce, kl = estimator("exact").batch_loss(GivenLogits(logits_c, decoder, log_prior),
                                                                 x.double(), torch.empty(0), torch.tensor(1.0))
        torch.testing.assert_close(loss, want)
        got = torch.autograd.grad(surrogate, [logits_c, *decoder.parameters()])
        for a, b in zip(got, want_grads):
            torch.testing.assert_close(a, b)


def test_exact_refuses_more_than_65536_codes():
    check("exact", None, 16, 2, 0.9)   # 2^16 codes: allowed
    check("exact", 1, 8, 4, 0.9)       # 4^8 = 2^16
    with pytest.raises(UserError, match=r"estimator=exact enumerates K\^N = 10\^30 = 1e\+30 codes.*K\^N <= 65536"):
        check("exact", 1, 30, 10, 0.9)
    with pytest.raises(UserError, match=r"K\^N = 2\^17 = 131072"):
        check("exact", 1, 17, 2, 0.9)


# --- settings -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("gumble", 1, 4, 4, 0.9), r"estimator='gumble' is not allowed: one of gumbel, st_gumbel, st, .*exact"),
    (("rloo", 1, 4, 4, 0.9), r"estimator_samples=1 is not allowed with estimator=rloo: .*>= 2"),
    (("sf", 0, 4, 4, 0.9), r"estimator_samples=0 is not allowed: must be an integer >= 1"),
    (("gumbel_rao", -3, 4, 4, 0.9), r"estimator_samples=-3 is not allowed"),
    (("st", 4, 4, 4, 0.9), r"estimator_samples=4 is not allowed with estimator=st: .*ignore it; set estimator_sam"),
    (("sf", 1, 4, 4, 1.0), r"baseline_decay=1.0 is not allowed: must be a number in \[0, 1\)"),
    (("sf", 1, 4, 4, -0.1), r"baseline_decay=-0.1"),
    (("sf", 1, 4, 4, float("nan")), r"baseline_decay=nan"),
    (("gumbel", None, 4, 4, 1.5), r"baseline_decay=1.5 is not allowed"),  # a key the estimator does not use, too
])
def test_check_settings_errors_are_one_line(args, message):
    with pytest.raises(UserError, match=message) as info:
        check(*args)
    assert "\n" not in str(info.value)


def test_defaults_and_accepted_settings():
    assert {n: default_samples(n) for n in NAMES} == {**{n: 1 for n in NAMES}, "rloo": 2, "gumbel_rao": 10}
    for name in NAMES:
        check(name, None, 4, 4, 0.0)
        check(name, default_samples(name), 4, 4, 0.99)
    check("rloo", 8, 30, 10, 0.5)


@pytest.mark.parametrize("name", NAMES)
def test_noise_shapes(name):
    est = estimator(name, samples=3 if name in ("rloo", "gumbel_rao") else None)
    want = {"exact": (0,), "rloo": (3, 5, 4, 6), "gumbel_rao": (3, 5, 4, 6)}.get(name, (5, 4, 6))
    assert est.noise_shape(5, 4, 6) == want


def config_with(**values):
    """The schema's defaults with `values` set: what validate_ranges sees for a composed config."""
    cfg = OmegaConf.structured(Config)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


@pytest.mark.parametrize("name, args, message", [
    ("rloo", {"k": 3}, r"^estimator_args\.k=3 is not allowed with estimator=rloo: it takes estimator_samples "
                       r"\(default 2\)$"),
    ("sf", {"decay": 0.5}, r"^estimator_args\.decay=0\.5 is not allowed with estimator=sf: it takes baseline_decay "
                           r"\(default 0\.9\)$"),
    ("st", {"scale": 2}, r"^estimator_args\.scale=2 is not allowed with estimator=st: it takes no settings of its "
                         r"own$"),
    ("rloo", {"samples": 4}, r"^estimator_args\.samples=4 is not allowed: samples has a key of its own, set "
                             r"estimator_samples=4 instead$"),
])
def test_estimator_args_refuses_what_the_estimator_does_not_take(name, args, message):
    with pytest.raises(UserError, match=message):
        validate_ranges(config_with(estimator=name, estimator_args=args, latent_dim=4, categorical_dim=4))


def test_the_registry_is_the_one_list_of_names():
    """The config's error message, the README's settings table and the registry name the same estimators."""
    from support import REPO

    with pytest.raises(UserError) as info:
        validate_ranges(config_with(estimator="gumble"))
    listed = re.search(r"one of (.*) \(set it", str(info.value)).group(1).split(", ")
    assert listed == NAMES
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `estimator` |"))
    assert [n for n in NAMES if f"`{n}`" not in row] == []


def test_register_refuses_a_name_taken_or_empty():
    class Nameless(Estimator):
        pass

    class Another(Estimator):
        name = "gumbel"

    for cls in (Nameless, Another):
        with pytest.raises(ValueError, match="needs a name of its own"):
            register(cls)
    assert register(ESTIMATORS["st"]) is ESTIMATORS["st"] and list(ESTIMATORS) == NAMES  # the same class again


# --- a new estimator: its class and one registry line ----------------------------------------------------------------

@pytest.fixture
def registry():
    """Estimators registered in a test are gone after it (the README lists the shipped ones only)."""
    before = dict(ESTIMATORS)
    yield
    ESTIMATORS.clear()
    ESTIMATORS.update(before)


class ScaledST(Estimator):
    """Straight-through with a scaled backward pass: forward a one-hot sample z ~ q, backward `scale` times the
    Jacobian of softmax(logits) (scale = 1 is st). Defined here, not in vae/estimators/: the test of the route."""

    name = "scaled_st"
    settings = {"scale": 1.0}
    made = []  # the instances, to see what make_estimator passed

    @classmethod
    def check_settings(cls, settings, latent_dim, categorical_dim):
        scale = settings["scale"]
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise UserError(f"estimator_args.scale={scale!r} is not allowed: must be a number > 0")

    def __init__(self, **settings):
        super().__init__(**settings)
        ScaledST.made.append(self)

    def batch_loss(self, model, x, noise, tau):
        logits = model.encode(x)
        z = straight_through(self.scale * F.softmax(logits, dim=-1), sample_codes(logits, noise))
        loss, bce, kl = negative_elbo(model.decode(z), x, logits, model.log_prior())
        return loss.mean(), loss.mean(), bce.mean(), kl.mean()


def test_a_new_estimator_is_its_class_and_one_registry_line(registry, tiny, tiny_data, tmp_path):
    from support import train_in_process

    register(ScaledST)  # the registry line
    # Its setting reaches its gradient: scale 2 doubles st's (the KL's part aside).
    st = decoder_gradient_and_logits_gradient("st", 0.5, tiny)[1]
    doubled = make_estimator("scaled_st", {"scale": 2}, "cpu")
    scaled = decoder_gradient_and_logits_gradient("scaled_st", 0.5, tiny, doubled)[1]
    torch.testing.assert_close(scaled, 2 * st)
    # The config check asks the registry when it runs, refuses a bad value in one line and a misspelt name with
    # the ones it takes ...
    validate_ranges(config_with(estimator="scaled_st", estimator_args={"scale": 0.5}))
    with pytest.raises(UserError, match=r"^estimator_args\.scale=-1 is not allowed: must be a number > 0$"):
        validate_ranges(config_with(estimator="scaled_st", estimator_args={"scale": -1}))
    with pytest.raises(UserError, match=r"^estimator_args\.scael=0\.5 is not allowed with estimator=scaled_st: it "
                                        r"takes estimator_args\.scale \(default 1\.0\)$"):
        validate_ranges(config_with(estimator="scaled_st", estimator_args={"scael": 0.5}))
    # ... and train.py trains it, with the setting given on its command line.
    metrics = train_in_process(tiny_data, tmp_path / "run", "estimator=scaled_st", "+estimator_args.scale=0.5")
    assert ScaledST.made[-1].scale == 0.5 and math.isfinite(metrics["test_loss"])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert saved["estimator"] == "scaled_st" and saved["estimator_args"] == {"scale": 0.5}


def test_the_documented_example_is_an_unbiased_estimator(registry, tiny):
    """docs/estimators.md's "Write your own estimator" example, as printed there: registered with one line, its
    setting passed, and its gradient unbiased against the exact one."""
    from support import REPO

    docs = (REPO / "docs" / "estimators.md").read_text().split("## Write your own estimator")[1]
    code = re.search(r"```python\n(.*?)```", docs, re.S).group(1)
    namespace = {}
    exec(compile(code, "docs/estimators.md", "exec"), namespace)
    register(namespace["Reinforce"])
    base, x, decoder = tiny
    want = exact_logits_gradient(base, x, decoder)
    est = make_estimator("reinforce", {"baseline": 5.0}, "cpu")
    assert est.baseline == 5.0
    assert max_z_score(logits_gradient("reinforce", base, x, decoder, 30_000, seed=14, est=est), want) < 4.5
    with pytest.raises(UserError, match=r"^estimator_args\.baseline=nan is not allowed"):
        check_settings("reinforce", {"baseline": float("nan")}, 4, 4)


# --- state ----------------------------------------------------------------------------------------------------------

def test_sf_state_round_trips_in_place(tiny, tmp_path):
    base, x, decoder = tiny
    a = estimator("sf")
    assert a.state_dict() == {"baseline": torch.tensor(0.0), "initialised": torch.tensor(False)}
    for seed in range(3):
        a.batch_loss(GivenLogits(base, decoder), x, noise_for(a, 3, 2, 3, seed), torch.tensor(1.0))
    torch.save(a.state_dict(), tmp_path / "state.pt")
    b = estimator("sf")
    address = b.baseline.value.data_ptr()
    b.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert b.baseline.value.data_ptr() == address, "a captured CUDA graph holds the old address"
    assert b.state_dict()["initialised"].item() and torch.equal(b.state_dict()["baseline"], a.state_dict()["baseline"])
    grads = [logits_gradient("sf", base, x, decoder, 1, seed=7, est=est) for est in (a, b)]
    assert torch.equal(*grads) and torch.equal(a.baseline.value, b.baseline.value)
    fresh = logits_gradient("sf", base, x, decoder, 1, seed=7)
    assert not torch.equal(fresh, grads[0]), "the restored baseline changes the gradient"


@pytest.mark.parametrize("name", NAMES)
def test_only_the_baselined_estimators_keep_state(name, tiny):
    """And a run resumed with another estimator: a stateless one ignores a baseline, a baselined one given no state
    starts afresh (in place)."""
    base, x, decoder = tiny
    est = estimator(name)
    assert bool(est.state_dict()) == (name in ("sf", "muprop"))
    est.batch_loss(GivenLogits(base, decoder), x, noise_for(est, 3, 2, 3), torch.tensor(1.0))
    est.load_state_dict({} if name in ("sf", "muprop") else estimator("sf").state_dict())
    if name in ("sf", "muprop"):
        assert est.state_dict() == {"baseline": torch.tensor(0.0), "initialised": torch.tensor(False)}


# --- torch.compile ---------------------------------------------------------------------------------------------------

def compiled_matches_eager(name, backend):
    """Two compiled batches on the real model against eager mode: values and every gradient (the second batch also
    exercises the state that the first one left)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CategoricalVAE(2, 3, prior="learned")
    x = torch.rand(4, 784)
    results = []
    for compiled in (False, True):
        est = estimator(name)
        # sf and muprop break the graph on purpose (their baseline runs eagerly, see MovingAverageBaseline);
        # muprop also for the decoder's gradient at the mean-field code.
        loss_fn = (torch.compile(est.batch_loss, backend=backend, dynamic=False,
                                 fullgraph=name not in ("sf", "muprop")) if compiled else est.batch_loss)
        for seed in (1, 2):
            model.zero_grad()
            out = loss_fn(model, x, noise_for(est, 4, 2, 3, seed=seed), torch.tensor(0.8))
            out[0].backward()
            results.append([*out, *(p.grad for p in model.parameters())])
    # Fused kernels round differently, and a REINFORCE signal f(z) - b is a difference of two ~540-nat numbers:
    # its float32 rounding shows at about 1e-4 of a gradient. A stale baseline (MovingAverageBaseline) made 20%.
    for eager, compiled in zip(results[:2], results[2:]):
        for a, b in zip(eager, compiled):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_each_estimator_runs_under_torch_compile(name):
    """Dynamo and AOTAutograd (the aot_eager backend: seconds, not the minutes of C++ code generation on a CPU)."""
    compiled_matches_eager(name, "aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_each_estimator_runs_under_inductor(name):
    """The trainer's backend (5 to 35 s per estimator on 2 shared CPU cores)."""
    compiled_matches_eager(name, "inductor")


# --- the trainer's CUDA path: compiled and captured as one CUDA graph ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", NAMES)
def test_each_estimator_in_a_compiled_captured_train_step_matches_eager(name):
    """TrainStep with compile=True and cuda_graph=True (the default on CUDA) against eager TrainStep: the same
    losses step by step, the same weights and estimator state after them. A host sync inside batch_loss would make
    the capture fail; an estimator state read at a stale address would make the replays drift."""
    from vae.data.device_data import DeviceSplit
    from vae.core.optim import make_optimizer
    from vae.training.engine import TrainStep

    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    images = (torch.rand(400, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.3).to(torch.uint8) * 255
    runs = []
    for fast in (False, True):
        split = DeviceSplit(images, device)
        torch.manual_seed(0)
        model = CategoricalVAE(4, 4).to(device)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        est = estimator(name, device=device)
        step = TrainStep(model, make_optimizer(model, 1e-3, device, fast, fast), split, batch_size=100,
                         estimator=est, noise_generator=torch.Generator(device=device).manual_seed(2),
                         binarize_generator=None, compile=fast, cuda_graph=fast)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(initial[k])
        order = torch.randperm(400, generator=torch.Generator().manual_seed(1)).to(device)
        losses = [step(order[i * 100:(i + 1) * 100], torch.tensor(0.9, device=device))[0] for i in range(4)]
        runs.append((torch.stack(losses).cpu(), {k: v.cpu() for k, v in model.state_dict().items()},
                     {k: v.cpu() for k, v in est.state_dict().items()}))
    (eager_losses, eager_weights, eager_state), (fast_losses, fast_weights, fast_state) = runs
    torch.testing.assert_close(fast_losses, eager_losses, rtol=1e-4, atol=1e-3)
    for k in eager_weights:
        torch.testing.assert_close(fast_weights[k], eager_weights[k], rtol=1e-3, atol=1e-4)
    assert eager_state.keys() == fast_state.keys()
    for k in eager_state:
        torch.testing.assert_close(fast_state[k], eager_state[k], rtol=1e-4, atol=1e-3)
