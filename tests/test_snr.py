"""train/grad_snr (vae/training/snr.py): logged where asked, the number it defines, and training left exactly as it was."""
import math
from types import SimpleNamespace

import pytest
import torch

from support import compose_train, train_in_process
from tb_events import steps_on_disk
from vae.settings.config import validate_ranges
from vae.common.errors import UserError
from vae.estimators import make_estimator
from vae.core.gumbel import sample_gumbel
from vae.core.model import CategoricalVAE
from vae.training.snr import TAG, encoder_snr


def final_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), where


@pytest.mark.parametrize("extra", [[], ["estimator=sf", "data.binarize=dynamic"]], ids=["default", "sf-dynamic"])
def test_logging_the_snr_leaves_training_bit_identical(tiny_data, tmp_path, extra):
    """sf keeps a baseline (estimator state) and dynamic binarization draws from a stream: neither may move."""
    with_snr = train_in_process(tiny_data, tmp_path / "snr", "snr_interval=2", "snr_samples=4", *extra)
    without = train_in_process(tiny_data, tmp_path / "plain", *extra)
    assert steps_on_disk(tmp_path / "snr", TAG) == [2, 4, 6]  # 6 steps of 50 images
    assert steps_on_disk(tmp_path / "plain", TAG) == []
    a, b = final_state(tmp_path / "snr"), final_state(tmp_path / "plain")
    for key in ("model", "optimizer", "rng", "estimator", "epoch_sums", "interval_sums", "step", "tau"):
        assert_same(a[key], b[key], key)
    timing = {"train_seconds", "build_seconds", "overrides"}
    assert {k: v for k, v in with_snr.items() if k not in timing} == {k: v for k, v in without.items()
                                                                      if k not in timing}


def test_the_snr_is_the_norm_of_the_mean_over_the_rms_spread():
    torch.manual_seed(0)
    model = CategoricalVAE(3, 4)
    images = torch.rand(20, 784)
    cfg = SimpleNamespace(batch_size=5, estimator="st_gumbel")
    trainer = SimpleNamespace(cfg=cfg, model=model, device=torch.device("cpu"), state=SimpleNamespace(tau=0.7),
                              estimator=make_estimator("st_gumbel", {}, "cpu"),
                              train_split=SimpleNamespace(batch=lambda idx, generator: images[idx]))
    est = make_estimator("st_gumbel", {}, "cpu")
    got = encoder_snr(trainer, est, 6, torch.Generator().manual_seed(3))

    gen, params = torch.Generator().manual_seed(3), list(model.encoder.parameters())
    g = []
    for _ in range(6):
        surrogate = est.batch_loss(model, images[:5], sample_gumbel((5, 3, 4), generator=gen), torch.tensor(0.7))[0]
        g.append(torch.cat([p.flatten() for p in torch.autograd.grad(surrogate, params)]).double())
    g = torch.stack(g)
    want = g.mean(0).norm() / ((g - g.mean(0)) ** 2).sum(1).sum().div(5).sqrt()
    assert got == pytest.approx(want.item(), rel=1e-9)
    assert all(p.grad is None for p in model.parameters()), "no .grad written"


@pytest.mark.parametrize("override", ["snr_interval=-1", "snr_samples=1"])
def test_bad_values_are_one_line(override):
    cfg = compose_train(override)
    with pytest.raises(UserError, match=rf"^{override.split('=')[0]}=-?1 is not allowed: must be an integer"):
        validate_ranges(cfg)
