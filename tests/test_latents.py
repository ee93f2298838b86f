"""Code usage and TensorBoard tags of vae/pictures/latents.py against numbers worked out by hand (the pictures drawn from
them: tests/test_pictures.py).

The encoder is one Linear layer with hand-set weights and images that each light one pixel, so image i's
posterior logits are exactly the weight column i: every q(z|x) below is chosen, not learned.
"""
import math
import re
import warnings

import pytest
import torch
import torch.nn as nn

from vae.data.device_data import DeviceSplit
from vae.pictures.latents import code_usage, custom_scalars_layout, log_latents
from vae.core.model import IMAGE_PIXELS, CategoricalVAE

N, K = 4, 3
SURE = 100.0  # a logit margin that makes q one-hot to float32 precision (e^-100 ~ 4e-44)
LOG_P = torch.log(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))  # prior logits of p = (1/6, 2/6, 3/6)


def image_logits(i: int) -> torch.Tensor:
    """q(z|x_i) logits [N, K] for image i (i = 0, 1, 2), one variable per case:
    0: q = p (collapsed onto a non-uniform prior)   1: one class for every image
    2: uniform q (against a non-uniform prior)      3: one-hot per image, class i: the aggregate is uniform
    """
    one_hot_i = torch.zeros(K, dtype=torch.float64)
    one_hot_i[i] = SURE
    return torch.stack([LOG_P, torch.tensor([SURE, 0, 0], dtype=torch.float64),
                        torch.zeros(K, dtype=torch.float64), one_hot_i])


def hand_set_model() -> CategoricalVAE:
    torch.manual_seed(0)
    model = CategoricalVAE(N, K, prior="learned")
    model.encoder = nn.Linear(IMAGE_PIXELS, N * K)
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.zero_()
        for i in range(K):
            model.encoder.weight[:, i] = image_logits(i).flatten()
        uniform = torch.zeros(K, dtype=torch.float64)
        model.prior_logits.copy_(torch.stack([LOG_P, uniform, LOG_P, uniform]))
    return model


def one_pixel_images() -> torch.Tensor:
    """K images; image i has pixel i white (read as 1.0 by DeviceSplit "none"), every other pixel black."""
    images = torch.zeros(K, IMAGE_PIXELS, dtype=torch.uint8)
    images[torch.arange(K), torch.arange(K)] = 255
    return images


@pytest.fixture(scope="module")
def model():
    return hand_set_model()


@pytest.fixture(scope="module")
def split():
    return DeviceSplit(one_pixel_images(), "cpu", "none")


def test_encoder_gives_the_chosen_posteriors(model, split):
    x = next(split.batches(K))
    torch.testing.assert_close(model.encode(x), torch.stack([image_logits(i) for i in range(K)]).float())


@pytest.mark.parametrize("batch_size", [1, 2, K])  # 2: a short last batch must count its images once
def test_code_usage_by_hand(model, split, batch_size):
    stats = code_usage(model, split, batch_size=batch_size)
    p = torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    entropy_p = -(p * p.log()).sum().item()
    kl_uniform_vs_p = (1 / K * (math.log(1 / K) - p.log())).sum().item()  # = (2/3) log 6 - log 3 ~ 0.0959
    torch.testing.assert_close(stats["perplexity"], torch.tensor(
        [math.exp(entropy_p),  # 0: q = p for every image, so q̄ = p
         1.0,                  # 1: one class: no choice at all
         K,                    # 2: uniform q
         K],                   # 3: one-hot per image, each class once: q̄ uniform
        dtype=torch.float64))
    torch.testing.assert_close(stats["kl_per_variable"], torch.tensor(
        [0.0,                  # 0: collapsed, q == p
         math.log(K),          # 1: one-hot q against a uniform prior: -log(1/K)
         kl_uniform_vs_p,      # 2
         math.log(K)],         # 3: one-hot again: confident per image, whatever the aggregate
        dtype=torch.float64))
    assert stats["perplexity_mean"] == pytest.approx((math.exp(entropy_p) + 1 + K + K) / N)
    assert stats["active"] == 3  # all but the collapsed variable 0
    # max_k q per variable: 3/6 (q = p), 1, 1/K, 1; the same for every image.
    assert stats["confidence"] == pytest.approx((0.5 + 1 + 1 / K + 1) / N)
    assert isinstance(stats["active"], int) and isinstance(stats["confidence"], float)
    # The usage map is q̄ itself.
    third = torch.full((K,), 1 / K, dtype=torch.float64)
    torch.testing.assert_close(stats["usage"], torch.stack([p, torch.tensor([1.0, 0, 0], dtype=torch.float64),
                                                            third, third]))
    # Argmax codes (ties go to the first class): variable 0 picks class 2 (p's largest) for every image,
    # variables 1 and 2 class 0, variable 3 class i for image i.
    torch.testing.assert_close(stats["class_counts"], torch.tensor([[0, 0, 3], [3, 0, 0], [3, 0, 0], [1, 1, 1]]))
    every_image = torch.zeros(IMAGE_PIXELS)
    every_image[:K] = 1 / K                            # the mean of the K one-pixel images
    want = torch.zeros(N, K, IMAGE_PIXELS)
    want[0, 2] = want[1, 0] = want[2, 0] = every_image
    want[3] = torch.eye(K, IMAGE_PIXELS)               # class i: image i alone
    torch.testing.assert_close(stats["class_means"], want)  # 0 where no image has the class


def test_active_threshold_is_a_parameter(model, split):
    # Variable 2 carries 0.0959 nats: active at the default 0.01, not at 0.1.
    assert code_usage(model, split, batch_size=K, threshold=0.1)["active"] == 2


def test_custom_scalars_layout_names_the_tags_and_serialises():
    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard.summary import custom_scalars

    layout = custom_scalars_layout()
    charts = {title: spec for category in layout.values() for title, spec in category.items()}
    want = {"loss": ["train/loss", "test/loss"], "bounds": ["test/loss", "test/elbo_discrete", "test/iw_bound"],
            "perplexity": ["latents/perplexity"], "active": ["latents/active"],
            "confidence": ["latents/confidence"], "grad_norm": ["train/grad_norm"]}
    assert set(charts) == set(want) and set(layout) == {"losses", "latents"}
    for title, tags in want.items():
        kind, patterns = charts[title]
        assert kind == "Multiline" and len(patterns) == len(tags)
        for pattern, tag in zip(patterns, tags):
            # TensorBoard keeps the tags a pattern re.match-es: exactly this one, not its longer namesakes.
            assert re.match(pattern, tag) and not re.match(pattern, tag + "_per_variable"), (pattern, tag)

    value = custom_scalars(layout).value[0]
    parsed = layout_pb2.Layout.FromString(value.tensor.string_val[0])
    assert [c.title for c in parsed.category] == list(layout)
    assert value.metadata.plugin_data.plugin_name == "custom_scalars"


def test_log_latents_writes_each_tag_under_one_plugin(model, split, tmp_path):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from vae.pictures import latent_pictures

    stats = code_usage(model, split, batch_size=K)
    drawn = latent_pictures(model, next(split.batches(1)).squeeze(0), stats)
    with SummaryWriter(str(tmp_path)) as writer:
        log_latents(writer, stats, drawn, step=7)
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert acc.PluginTagToContent("scalars").keys() == {"latents/perplexity", "latents/active", "latents/confidence"}
    assert acc.PluginTagToContent("histograms").keys() == {"latents/perplexity_per_variable",
                                                           "latents/kl_per_variable"}
    assert acc.PluginTagToContent("images").keys() == {"latents/traversal", "latents/usage", "latents/class_means"}

    def scalar(tag):
        (event,) = acc.Tensors(tag)
        return event.step, float(event.tensor_proto.float_val[0])

    assert scalar("latents/active") == (7, 3.0)
    assert scalar("latents/perplexity")[1] == pytest.approx(stats["perplexity_mean"], rel=1e-6)
    assert scalar("latents/confidence")[1] == pytest.approx(stats["confidence"], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_code_usage_on_cuda_matches_the_cpu_and_syncs_once(model, split):
    cpu = code_usage(model, split, batch_size=2)
    cuda_model = hand_set_model().cuda()
    cuda_split = DeviceSplit(one_pixel_images(), "cuda", "none")
    torch.cuda.synchronize()
    # Every synchronizing CUDA call it detects becomes a warning (a prototype: it may miss some, never invents one).
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gpu = code_usage(cuda_model, cuda_split, batch_size=2)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    assert gpu["perplexity"].device.type == "cpu" and gpu["active"] == cpu["active"]
    torch.testing.assert_close(gpu["perplexity"], cpu["perplexity"])
    torch.testing.assert_close(gpu["kl_per_variable"], cpu["kl_per_variable"], atol=1e-5, rtol=1e-5)
    assert gpu["confidence"] == pytest.approx(cpu["confidence"], rel=1e-6)
    torch.testing.assert_close(gpu["usage"], cpu["usage"])
    assert torch.equal(gpu["class_counts"], cpu["class_counts"])
    torch.testing.assert_close(gpu["class_means"], cpu["class_means"])
    from vae.pictures import latent_pictures

    x = next(split.batches(K))[1]
    for name, picture in latent_pictures(cuda_model, x.cuda(), gpu).items():
        torch.testing.assert_close(picture, latent_pictures(model, x, cpu)[name], atol=1e-5, rtol=1e-5, msg=name)
