"""vae/api.py: the notebook of docs/api.md runs as printed, and each promise of the API holds: shapes, inputs as
uint8 or floats (and bad ones refused), seeded draws, scores equal to vae.evaluate's, bounds ordered as bounds are,
the discrete interpolation path, and the weights-only export."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from support import REPO, run_train
from vae.api import load, path_codes
from vae.common.errors import UserError

NOTEBOOK_PLACEHOLDER = '"outputs/<date>/<time>/checkpoints/best.pt"'


@pytest.fixture(scope="module")
def m(tiny_checkpoint):
    return load(tiny_checkpoint)


def notebook() -> str:
    """The python block of docs/api.md's section "A notebook"."""
    text = (REPO / "docs" / "api.md").read_text()
    section = text[text.index("## A notebook"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_notebook_in_docs_api_runs_as_printed(tiny_checkpoint, tmp_path, monkeypatch):
    code = notebook()
    assert code.count(NOTEBOOK_PLACEHOLDER) == 1
    monkeypatch.chdir(tmp_path)  # it writes its pictures, arrays and export into the working directory
    exec(compile(code.replace(NOTEBOOK_PLACEHOLDER, repr(str(tiny_checkpoint))), "docs/api.md", "exec"), {})
    assert {p.name for p in tmp_path.iterdir()} == {"reconstructions.png", "samples.png", "samples.npy", "model.pt"}
    assert np.load(tmp_path / "samples.npy").shape == (64, 28, 28)


def test_shapes(m):
    assert (m.latent_dim, m.categorical_dim, m.image_shape, m.estimator) == (8, 4, (28, 28), "gumbel")
    assert "8 x 4 code, 28x28 images, gumbel, epoch" in repr(m)
    x = m.test_images(5)
    assert x.dtype == torch.uint8 and x.shape == (5, 28, 28)
    assert m.encode(x).shape == (5, 8, 4) and m.argmax_code(x).shape == (5, 8)
    for out in (m.decode(m.argmax_code(x)), m.reconstruct(x), m.sample(3)[:0].new_zeros(5, 28, 28)):
        assert out.shape == (5, 28, 28)
    samples = m.sample(3)
    assert samples.shape == (3, 28, 28) and 0 <= samples.min() and samples.max() <= 1
    assert m.elbo(x).shape == (5,) and m.iw_bound(x, k=10).shape == (5,)
    assert m.interpolate(x[0], x[1], steps=6).shape == (6, 28, 28)
    assert len(m.test_images()) == 100  # the whole test set by default


def test_uint8_floats_numpy_flat_and_single_images_are_the_same_input(m):
    x = m.test_images(8)
    logits = m.encode(x)
    floats = x.float() * (1.0 / 255)
    for same in (x.numpy(), floats, floats.reshape(8, -1), floats.numpy()):
        assert torch.equal(m.encode(same), logits)
    assert torch.allclose(m.encode(x.float() / 255), logits, atol=1e-5)  # the usual division: a rounding apart
    assert torch.allclose(m.encode(x[3]), logits[3:4], atol=1e-6)  # one image: another matmul kernel
    assert torch.equal(m.encode(x.bool()), m.encode((x > 0).to(torch.uint8) * 255))


def test_images_in_are_exactly_what_the_trainer_feeds_the_model(m):
    """uint8 images become the very floats DeviceSplit.batch gives the model in training and in vae.evaluate."""
    from vae.data.device_data import DeviceSplit

    x = (torch.arange(20 * 28 * 28) % 256).to(torch.uint8).reshape(20, 28, 28)  # every grey level, not only 0 and 255
    split = DeviceSplit(x, "cpu")
    with torch.no_grad():
        expected = m.model.encode(split.batch(torch.arange(20)))
    assert torch.equal(m.encode(x), expected)


def test_test_images_are_the_runs_test_set(m):
    from vae.data import load_splits

    (images, _), = load_splits(OmegaConf.create(m.config["data"]), ("test",))
    assert torch.equal(m.test_images(10), images[:10])


@pytest.mark.parametrize("bad, message", [
    (torch.rand(49, 32, 32), "do not fit this model's 28 x 28"),   # as many pixels as 64 images of 28 x 28
    (torch.rand(3, 28 * 28 + 1), "do not fit"),
    (torch.rand(4, 28, 28) * 255, "values in [0, 1]"),              # grey levels passed as floats
    (torch.full((2, 28, 28), float("nan")), "values in [0, 1]"),
    (torch.zeros(2, 28, 28, dtype=torch.int64), "uint8 grey levels"),
])
def test_bad_images_are_refused(m, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        m.encode(bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        m.elbo(bad)


def test_bad_codes_and_arguments_are_refused(m):
    x = m.test_images(4)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 3\]"):
        m.decode(torch.full((2, 8), 4))
    with pytest.raises(ValueError, match=r"pass classes as integers \[B, 8\]"):
        m.decode(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="single images"):
        m.interpolate(x[:2], x[2])
    with pytest.raises(ValueError, match="steps must be >= 2"):
        m.interpolate(x[0], x[1], steps=1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        m.sample(-1)


def test_decode_takes_classes_or_one_hot_codes(m):
    codes = m.argmax_code(m.test_images(4))
    one_hot = torch.nn.functional.one_hot(codes, 4).float()
    assert torch.equal(m.decode(codes), m.decode(one_hot))
    assert torch.equal(m.decode(codes.numpy()), m.decode(codes))


def test_every_draw_is_seeded(m):
    x = m.test_images(10)
    assert torch.equal(m.sample(16, seed=3), m.sample(16, seed=3))
    assert not torch.equal(m.sample(16, seed=3), m.sample(16, seed=4))
    assert torch.equal(m.elbo(x, seed=1), m.elbo(x, seed=1)) and not torch.equal(m.elbo(x, seed=1), m.elbo(x, seed=2))
    assert torch.equal(m.iw_bound(x, k=30, seed=1), m.iw_bound(x, k=30, seed=1))
    assert not torch.equal(m.iw_bound(x, k=30, seed=1), m.iw_bound(x, k=30, seed=2))
    assert not m.elbo(x).requires_grad and not m.iw_bound(x, k=5).requires_grad


def test_bounds_are_ordered_on_average(m):
    """E[IW bound, k] falls as k grows (Burda et al. 2016) and the k = 1 bound is the -ELBO in expectation. For one
    image and seed either may be lower; over the 100 test images and a few seeds the order is clear (gaps of about
    a nat on this model, and fixed seeds make the numbers the same on every run)."""
    x = m.test_images()
    mean = lambda f: torch.stack([f(s).mean() for s in range(10)]).mean().item()  # noqa: E731
    elbo = mean(lambda s: m.elbo(x, seed=s))
    k1 = mean(lambda s: m.iw_bound(x, k=1, seed=s))
    k10 = mean(lambda s: m.iw_bound(x, k=10, seed=s))
    k500 = m.iw_bound(x, k=500, seed=0).mean().item()
    assert k500 < k10 < k1 and k10 < elbo, (elbo, k1, k10, k500)
    assert k1 == pytest.approx(elbo, abs=0.5)


def test_scores_are_those_of_vae_evaluate(m, tiny_checkpoint, tmp_path):
    """The API's per-image scores, averaged over the test set with evaluate's seed, chunk and one batch, are the
    numbers `python -m vae.evaluate` reports (evaluate sums in float64: a rounding apart), for the checkpoint and its
    export alike."""
    from vae.evaluate import EvaluateConfig, evaluate

    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_checkpoint, ckpt)  # evaluate writes its results beside the checkpoint
    export = m.export(tmp_path / "export.pt")
    x = m.test_images()
    results = []
    for path in (ckpt, export):
        results.append(evaluate(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
            "checkpoint": str(path), "iw_samples": 20, "iw_chunk": 10, "batch_size": 100, "seed": 0,
            "device": "cpu", "threads": 1}))["metrics"])
    assert results[0] == results[1]
    assert m.elbo(x, seed=0).mean().item() == pytest.approx(results[0]["elbo_discrete"], rel=1e-6)
    assert m.iw_bound(x, k=20, seed=0, chunk=10).mean().item() == pytest.approx(results[0]["iw_bound"], rel=1e-6)


def test_path_codes_walk_from_one_code_to_the_other():
    za = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    zb = torch.tensor([3, 1, 0, 3, 2, 2, 1, 0])  # differs in 6 variables
    for steps in (2, 4, 7):
        path = path_codes(za, zb, steps)
        assert path.shape == (steps, 8)
        assert torch.equal(path[0], za) and torch.equal(path[-1], zb)
        for a, b in zip(path[:-1], path[1:]):
            changed = (a != b).nonzero().flatten()
            assert len(changed) >= 1  # steps - 1 <= 6 differing variables: every step moves
            assert torch.equal(b[changed], zb[changed])  # a variable only ever switches to zb's class
        assert all(((p == za) | (p == zb)).all() for p in path)
    longer = path_codes(za, zb, 10)  # more steps than differing variables: some repeat, none goes back
    assert torch.equal(longer[0], za) and torch.equal(longer[-1], zb)
    switched = (longer != za).sum(1)
    assert torch.equal(switched, switched.sort().values)
    assert torch.equal(path_codes(za, za, 3), za.repeat(3, 1))
    with pytest.raises(ValueError, match="steps must be >= 2"):
        path_codes(za, zb, 1)
    with pytest.raises(ValueError, match="one shape"):
        path_codes(za, zb[:4], 3)


def test_interpolation_ends_at_the_two_reconstructions(m):
    x = m.test_images(2)
    path = m.interpolate(x[0], x[1], steps=5)
    ends = m.decode(m.argmax_code(x))  # decoded as one batch of two: another matmul kernel, a rounding apart
    assert torch.allclose(path[[0, -1]], ends, atol=1e-6)


def test_export_is_smaller_and_the_same_model(m, tiny_checkpoint, tmp_path):
    path = m.export(tmp_path / "new" / "dir" / "model.pt")  # missing folders are made
    assert path.stat().st_size < tiny_checkpoint.stat().st_size / 2
    e = load(path)
    x = m.test_images(10)
    assert torch.equal(e.encode(x), m.encode(x)) and torch.equal(e.sample(5, seed=2), m.sample(5, seed=2))
    assert (e.tau, e.epoch, e.step, e.config, e.image_shape) == (m.tau, m.epoch, m.step, m.config, m.image_shape)
    again = load(e.export(tmp_path / "again.pt"))  # an export of an export is the same file's content
    assert torch.equal(again.encode(x), m.encode(x))
    saved = torch.load(path, weights_only=True)
    assert "optimizer" not in saved and "rng" not in saved


def test_train_refuses_to_resume_from_an_export(m, tmp_path):
    export = m.export(tmp_path / "model.pt")
    proc = run_train([f"resume={export}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "weights-only export" in proc.stderr and "last.pt" in proc.stderr
    assert not (tmp_path / "resumed").exists()


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "missing.pt", "no such file"), (tmp_path / "junk.pt", "not a gumbel-vae checkpoint"),
                          (tmp_path, "is a directory")):
        with pytest.raises(UserError, match=message):
            load(path)
    with pytest.raises(UserError, match=r"^checkpoint="):
        load(tmp_path / "missing.pt", key="checkpoint")
