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

from conftest import subprocess_env
from test_evaluate import write_checkpoint
from vae.config import CONFIG_DIR, REPO_DIR
from vae.errors import UserError
from vae.estimators import make_estimator
from vae.gradients import compare, encoder_gram, logits_gradients, run
from vae.model import CategoricalVAE

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
    est = make_estimator("st_gumbel", samples=None, baseline_decay=0.9, device="cpu")
    deltas = logits_gradients(model, x, est, torch.tensor(0.7), torch.Generator().manual_seed(1), 5)
    exact = logits_gradients(model, x, make_estimator("exact", samples=None, baseline_decay=0.9, device="cpu"),
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
    with pytest.raises(UserError, match=r"estimator=exact enumerates K\^N = 4\^9 = 262144 codes"):
        run(config(f"checkpoint={ckpt_big}", f"out={tmp_path / 'out'}"))


@pytest.mark.parametrize("overrides, message", [
    (["estimators=[gumble]"], r"estimators=\['gumble'\] is not allowed: a non-empty list drawn from gumbel, "),
    (["samples=1"], r"samples=1 is not allowed: must be an integer >= 2"),
    (["tau=0"], r"tau=0.0 is not allowed"),
    (["taus=[1.0,-1]"], r"taus=-1.0 is not allowed"),
    (["estimators=[rloo]", "estimator_samples=1"], r"estimator_samples=1 is not allowed with estimator=rloo"),
    (["baseline_decay=1.5"], r"baseline_decay=1.5 is not allowed"),
    (["latent_dim=9", "categorical_dim=4"], r"estimator=exact enumerates K\^N = 4\^9"),
    (["device=gpu"], r"device='gpu'"),
])
def test_bad_settings_are_one_line_user_errors(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as info:
        run(config(f"out={tmp_path / 'out'}", "data_root=/nonexistent", *overrides))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
