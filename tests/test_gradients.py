"""`python -m vae.gradients`: the numbers it reports (against a parameter-space computation and known properties of the
estimators), its output files, the checkpoint route and its errors."""
import json
import math
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from support import subprocess_env, train_in_process
from test_evaluate import write_checkpoint
from vae import gradients
from vae.settings.config import CONFIG_DIR, REPO_DIR
from vae.common.errors import UserError
from vae.estimators import make_estimator
from vae.tools.gradient_stats import compare, encoder_gram, kl_logits_gradient, logits_gradients, reinmax, summarize
from vae.gradients import run
from vae.core.gumbel import gumbel_softmax, sample_gumbel
from vae.core.loss import bce_per_image
from vae.core.model import CategoricalVAE

torch.set_num_threads(1)


def config(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="gradients", overrides=["device=cpu", *overrides])


def tiny_overrides(tiny_data, tmp_path, *extra):
    return [f"data_root={tiny_data}", "data.verify=false", f"out={tmp_path / 'out'}", *extra]


def test_compare_equals_the_statistics_of_explicit_parameter_gradients():
    """The Gram-matrix shortcut against per-estimate encoder gradients formed by autograd, in parameter space."""
    torch.manual_seed(0)
    model, x = CategoricalVAE(2, 3), torch.rand(3, 784)
    params = list(model.encoder.parameters())
    est = make_estimator("st_gumbel", {}, "cpu")
    deltas = logits_gradients(model, x, est, torch.tensor(0.7), torch.Generator().manual_seed(1), 5)
    exact = logits_gradients(model, x, make_estimator("exact", {}, "cpu"),
                             torch.tensor(1.0), None, 1)[0]

    def flat(delta):  # J^T delta by autograd
        logits = model.encode(x)
        return torch.cat([g.flatten() for g in torch.autograd.grad(logits, params, delta.view_as(logits))]).double()

    g, g_star = torch.stack([flat(d) for d in deltas]), flat(exact)
    want_bias = (g.mean(0) - g_star).norm() / g_star.norm()
    want_std = ((g - g.mean(0)) ** 2).sum(1).mean().mul(5 / 4).sqrt() / g_star.norm()
    want_cos = torch.nn.functional.cosine_similarity(g, g_star[None]).mean()
    got = compare(deltas, exact, encoder_gram(model, x))
    assert got["bias"] == pytest.approx(want_bias.item(), rel=1e-4)
    assert got["std"] == pytest.approx(want_std.item(), rel=1e-4)
    assert got["cosine"] == pytest.approx(want_cos.item(), rel=1e-4)


def test_reinmax_definition_is_the_authors_computation():
    """ReinMax's numbers (Liu et al. 2023, mnist_vae `analyze_gradient`) written out as their code computes them: the
    gradient of the reconstruction term alone (no KL) with respect to the logits, the exact one from summing
    q(c|x) f(c) over every code; per-coordinate std over the estimates (divided by n); |E[g] - g*| / |g*|,
    |std| / |E[g]| and cos(E[g], g*)."""
    torch.manual_seed(0)
    model, x, tau, n = CategoricalVAE(2, 3), torch.rand(3, 784), torch.tensor(1.3), 50
    est = make_estimator("st_gumbel", {}, "cpu")
    deltas = logits_gradients(model, x, est, tau, torch.Generator().manual_seed(1), n)
    exact = logits_gradients(model, x, make_estimator("exact", {}, "cpu"),
                             torch.tensor(1.0), None, 1)[0]
    got = reinmax(summarize([deltas], None), exact.double(), kl_logits_gradient(model, x).double())

    def recon_grad(loss_of):  # d(batch-mean reconstruction term)/d(logits), flattened
        logits = model.encode(x).detach().requires_grad_()
        return torch.autograd.grad(loss_of(logits), logits)[0].flatten().double()

    def exact_recon(logits):
        q = logits.softmax(-1)
        total = 0
        for c0 in range(3):
            for c1 in range(3):
                z = torch.nn.functional.one_hot(torch.tensor([c0, c1]), 3).float()
                total = total + q[:, 0, c0] * q[:, 1, c1] * bce_per_image(model.decode(z).expand(3, -1), x)
        return total.mean()

    noise = sample_gumbel((n * 3, 2, 3), generator=torch.Generator().manual_seed(1))  # as logits_gradients draws it
    g = torch.stack([recon_grad(lambda l, i=i: bce_per_image(model.decode(
        gumbel_softmax(l, tau, hard=True, noise=noise[3 * i:3 * i + 3])), x).mean()) for i in range(n)])
    g_star = recon_grad(exact_recon)
    mean = g.mean(0)
    std = ((g ** 2).mean(0) - mean ** 2).abs().sqrt()
    assert got["reinmax_bias"] == pytest.approx(((g_star - mean).norm() / g_star.norm()).item(), rel=1e-4)
    assert got["reinmax_rel_std"] == pytest.approx((std.norm() / mean.norm()).item(), rel=1e-4)
    assert got["reinmax_cos"] == pytest.approx((g_star @ mean / (g_star.norm() * mean.norm())).item(), rel=1e-4)
    assert got["reinmax_noise"] == pytest.approx((std.norm() / math.sqrt(n - 1) / g_star.norm()).item(), rel=1e-4)


def test_both_definitions_under_their_own_keys(tiny_data, tmp_path):
    result = run(config(*tiny_overrides(tiny_data, tmp_path, "estimators=[exact,sf,st]", "samples=4000",
                                        "batch_size=2", "latent_dim=2", "categorical_dim=3", "definition=both")))
    assert set(result) == {"exact_norm", "reinmax_exact_norm", "definition", "estimators"}
    assert result["definition"] == "both" and result["reinmax_exact_norm"] > 0
    ours_keys, reinmax_keys = {"bias", "std", "cosine"}, {"reinmax_bias", "reinmax_noise", "reinmax_rel_std",
                                                          "reinmax_cos"}
    assert all(set(s) == ours_keys | reinmax_keys for s in result["estimators"].values())
    ex, sf, st = (result["estimators"][n] for n in ("exact", "sf", "st"))
    assert ex["reinmax_bias"] < 1e-5 and ex["reinmax_rel_std"] < 1e-4 and ex["reinmax_cos"] == pytest.approx(1)
    assert sf["reinmax_bias"] < 3 * sf["reinmax_noise"], "sf is unbiased"
    assert st["reinmax_bias"] > 5 * st["reinmax_noise"], "st is not"
    only = run(config(*tiny_overrides(tiny_data, tmp_path, "estimators=[st]", "samples=4000", "batch_size=2",
                                      "latent_dim=2", "categorical_dim=3", "definition=reinmax")))
    assert set(only) == {"reinmax_exact_norm", "definition", "estimators"}
    assert only["estimators"]["st"] == {k: st[k] for k in reinmax_keys}, "the same numbers without the Gram matrix"


def test_an_estimated_reference_agrees_with_the_exact_one_within_its_standard_error(tiny_data, tmp_path):
    """reference=rloo on a model small enough for the exact gradient: the exact estimator, measured against the
    estimate, is off by about the estimate's standard error, and the keys say that the reference is estimated."""
    common = ("estimators=[exact,rloo,gumbel]", "samples=500", "batch_size=2", "latent_dim=2", "categorical_dim=3",
              "definition=both")
    exact = run(config(*tiny_overrides(tiny_data, tmp_path, *common)))
    result = run(config(*tiny_overrides(tiny_data, tmp_path, *common, "reference=rloo", "reference_samples=4000")))
    ref = result["reference"]
    assert set(result) == {"reference", "definition", "estimators"}
    assert ref["estimated"] is True and ref["estimator"] == "rloo" and ref["estimates"] == 4000
    assert 0 < ref["rel_se"] < 0.2 and 0 < ref["reinmax_rel_se"] < 0.2
    est = result["estimators"]
    assert set(est["gumbel"]) == {"est_bias", "est_noise", "est_std", "est_cosine", "rel_std", "reinmax_est_bias",
                                  "reinmax_est_noise", "reinmax_rel_std", "reinmax_est_cos"}
    assert est["exact"]["est_bias"] < 4 * ref["rel_se"] and est["exact"]["reinmax_est_bias"] < 4 * ref["reinmax_rel_se"]
    assert est["exact"]["est_bias"] > 0.1 * ref["rel_se"], "the reference's own error shows"
    # The spread around the estimator's own mean needs no reference: the same numbers whichever reference.
    g_exact = exact["estimators"]["gumbel"]
    assert est["gumbel"]["reinmax_rel_std"] == pytest.approx(g_exact["reinmax_rel_std"], rel=1e-6)
    assert est["gumbel"]["est_std"] * ref["norm"] == pytest.approx(g_exact["std"] * exact["exact_norm"], rel=1e-6)
    # An estimator's agreement with the reference: gumbel is biased, at well above the noise.
    assert est["gumbel"]["est_bias"] > 3 * est["gumbel"]["est_noise"]


def test_exact_is_its_own_reference_sf_is_unbiased_and_gumbel_is_not(tiny_data, tmp_path):
    """One image of a fresh 3^2-code model: 20,000 estimates put sf's sampling error near 0.015 of |g*|."""
    result = run(config(*tiny_overrides(tiny_data, tmp_path, "estimators=[exact,sf,gumbel]", "samples=20000",
                                        "batch_size=1", "latent_dim=2", "categorical_dim=3", "tau=1.0")))
    est = result["estimators"]
    assert est["exact"]["bias"] < 1e-5 and est["exact"]["std"] < 1e-5
    assert est["exact"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert est["sf"]["bias"] < 0.05
    assert est["gumbel"]["bias"] > 0.2 and est["gumbel"]["bias"] > 5 * est["sf"]["bias"]
    saved = json.loads((tmp_path / "out" / "gradients.json").read_text())
    assert set(saved) == {"exact_norm", "estimators"} and saved["exact_norm"] > 0
    assert list(saved["estimators"]) == ["exact", "sf", "gumbel"]
    for stats in saved["estimators"].values():
        assert set(stats) == {"bias", "std", "cosine"} and all(math.isfinite(v) for v in stats.values())


def test_command_end_to_end_with_several_temperatures(tiny_data, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "vae.gradients", *tiny_overrides(tiny_data, tmp_path),
                           "device=cpu", "samples=20", "batch_size=4", "taus=[0.5,2.0]"],
                          cwd=cwd, env=subprocess_env(PYTHONPATH=str(REPO_DIR)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "encoder gradient vs exact" in proc.stdout and "gumbel_rao" in proc.stdout
    saved = json.loads((tmp_path / "out" / "gradients.json").read_text())
    names = ["gumbel", "st_gumbel", "st", "annealed_st", "sf", "rloo", "muprop", "gumbel_rao", "reinmax"]
    assert set(saved) == {"exact_norm", "estimators", "by_tau"} and list(saved["estimators"]) == names
    assert list(saved["by_tau"]) == ["0.5", "2"]
    assert saved["by_tau"]["0.5"]["estimators"] == saved["estimators"]
    by_tau = [saved["by_tau"][t]["estimators"] for t in ("0.5", "2")]
    assert by_tau[0]["sf"] == by_tau[1]["sf"], "an estimator without a temperature is measured once"
    assert by_tau[0]["gumbel"] != by_tau[1]["gumbel"]
    with Image.open(tmp_path / "out" / "gradients.png") as im:
        assert im.format == "PNG" and im.size[1] > 18 * 2 * len(names)
    assert list(cwd.iterdir()) == [], "the command wrote into the working directory"


def test_a_checkpoint_is_measured_on_its_own_test_set(tmp_path):
    ckpt = write_checkpoint(tmp_path)  # latent_dim=3, categorical_dim=4: 64 codes; tau 0.8
    result = run(config(f"checkpoint={ckpt}", f"out={tmp_path / 'out'}", "samples=10",
                        "estimators=[st,gumbel_rao]", "estimator_samples=3"))
    assert set(result["estimators"]) == {"st", "gumbel_rao"} and result["exact_norm"] > 0
    ckpt_big = write_checkpoint(tmp_path / "big", latent_dim=9, categorical_dim=4)
    with pytest.raises(UserError, match=r"reference=exact sums over K\^N = 4\^9 codes, more than 65536: use "
                                        r"reference=auto or reference=rloo"):
        run(config(f"checkpoint={ckpt_big}", f"out={tmp_path / 'out'}", "reference=exact"))
    with pytest.raises(UserError, match=r"estimator=exact enumerates K\^N = 4\^9 = 262144 codes"):
        run(config(f"checkpoint={ckpt_big}", f"out={tmp_path / 'out'}", "estimators=[exact,st]"))


@pytest.mark.parametrize("overrides, message", [
    (["estimators=[gumble]"], r"estimators=\['gumble'\] is not allowed: a non-empty list drawn from gumbel, "),
    (["samples=1"], r"samples=1 is not allowed: must be an integer >= 2"),
    (["tau=0"], r"tau=0.0 is not allowed"),
    (["taus=[1.0,-1]"], r"taus=\[1.0, -1.0\] is not allowed: every temperature must be a number > 0"),
    (["estimators=[rloo]", "estimator_samples=1"], r"estimator_samples=1 is not allowed with estimator=rloo"),
    (["baseline_decay=1.5"], r"baseline_decay=1.5 is not allowed"),
    (["estimators=[exact]", "latent_dim=9", "categorical_dim=4"], r"estimator=exact enumerates K\^N = 4\^9"),
    (["reference=exact", "latent_dim=9", "categorical_dim=4"], r"reference=exact sums over K\^N = 4\^9 codes"),
    (["definition=authors"], r"definition='authors' is not allowed: one of ours, reinmax, both"),
    (["reference=sf"], r"reference='sf' is not allowed: one of auto, exact, rloo"),
    (["reference_samples=1"], r"reference_samples=1 is not allowed: must be an integer >= 2"),
    (["latent_dim=2000", "categorical_dim=1000"], r"latent_dim=2000 x categorical_dim=1000 = 2000000 code units is too "
                                                  r"large: at most 1048576"),
    (["device=gpu"], r"device='gpu'"),
])
def test_bad_settings_are_one_line_user_errors(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as info:
        run(config(f"out={tmp_path / 'out'}", "data_root=/nonexistent", *overrides))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_trained_30x10_checkpoint_is_measured_against_an_estimated_reference(tiny_data, tmp_path):
    """train.py's default model (10^30 codes: no exact gradient), one tiny epoch: every number that needs no exact
    reference, against the mean of rloo estimates, labelled as estimated."""
    train_in_process(tiny_data, tmp_path / "run")
    result = run(config(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", f"data_root={tiny_data}",
                        f"out={tmp_path / 'out'}", "batch_size=4", "samples=40", "reference_samples=200",
                        "estimators=[st_gumbel,rloo]", "definition=both"))
    ref = result["reference"]
    assert ref["estimated"] and ref["estimates"] == 200 and 0 < ref["rel_se"] and 0 < ref["reinmax_rel_se"]
    for stats in result["estimators"].values():
        assert len(stats) == 9 and all(math.isfinite(v) for v in stats.values())
        assert stats["est_std"] > 0 and stats["rel_std"] > 0 and stats["reinmax_rel_std"] > 0
    saved = json.loads((tmp_path / "out" / "gradients.json").read_text())
    assert saved["reference"] == ref and "exact_norm" not in saved


@pytest.mark.parametrize("overrides, message", [
    (["estimators=[rloo]", "estimator_samples=10000000"],
     r"^vae.gradients would need about [\d.]+ GB on cpu but [\d.]+ GB is free, most of it for one call of rloo "
     r"\(1 x 16 images x 10000000 samples\): lower estimator_samples=10000000 and batch_size=16$"),
    (["estimators=[st]", "latent_dim=100", "categorical_dim=100", "batch_size=100"],
     r"most of it for the encoder's Gram matrix over the batch's 1000000 logits: lower batch_size=100 \(the matrix "
     r"grows with its square; definition=reinmax needs none\)$"),
])
def test_what_would_not_fit_is_refused_before_any_work(tiny_data, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as info:
        run(config(*tiny_overrides(tiny_data, tmp_path, *overrides)))
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_an_allocation_that_fails_anyway_is_one_line_naming_its_settings(tiny_data, tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                           "tried to allocate 102400000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(gradients, "encoder_gram", no_memory)
    with pytest.raises(UserError, match=r"^out of memory forming the encoder's Gram matrix \(an allocation of 102.4 "
                                        r"GB failed\); its size grows with batch_size=16 .*definition=reinmax needs "
                                        r"none: lower them$"):
        run(config(*tiny_overrides(tiny_data, tmp_path, "estimators=[st]")))

    def numpy_memory_error(model, x, estimator, *args):
        if estimator.name == "rloo":
            raise MemoryError()
        return logits_gradients(model, x, estimator, *args).split(7)

    monkeypatch.undo()
    monkeypatch.setattr(gradients, "logit_gradient_chunks", numpy_memory_error)
    with pytest.raises(UserError, match=r"^out of memory measuring rloo \(an allocation failed\); its size grows "
                                        r"with estimator_samples=5 and batch_size=16"):
        run(config(*tiny_overrides(tiny_data, tmp_path, "estimators=[st,rloo]", "estimator_samples=5",
                                   "samples=10")))


def test_the_command_refuses_in_one_line(tiny_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vae.gradients", *tiny_overrides(tiny_data, tmp_path), "device=cpu",
                           "estimators=[rloo]", "estimator_samples=10000000"], cwd=tmp_path,
                          env=subprocess_env(PYTHONPATH=str(REPO_DIR)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "vae.gradients would need" not in proc.stdout
    assert proc.stderr.startswith("error: vae.gradients would need about ") and proc.stderr.count("\n") == 1
