"""vae/core/model.py: the two networks, any image size, and the registry every command builds from."""
import pytest
import torch
import torch.nn as nn

from vae.core.model import MODELS, CategoricalVAE, ConvCategoricalVAE, build_model


def test_the_mlp_is_the_papers_network_with_the_same_initial_weights_as_before():
    """The default model must not change: the same layers, created in the same order from the same seed."""
    torch.manual_seed(0)
    model = CategoricalVAE(30, 10)
    torch.manual_seed(0)
    reference = [nn.Linear(784, 512), nn.Linear(512, 256), nn.Linear(256, 300),
                 nn.Linear(300, 256), nn.Linear(256, 512), nn.Linear(512, 784)]
    params = dict(model.named_parameters())
    for name, layer in zip(["encoder.0", "encoder.2", "encoder.4", "decoder.0", "decoder.2", "decoder.4"], reference):
        assert torch.equal(params[f"{name}.weight"], layer.weight) and torch.equal(params[f"{name}.bias"], layer.bias)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("shape", [(28, 28), (32, 32), (30, 27), (5, 7)])
def test_every_model_maps_flat_images_of_any_size_to_logits_of_that_size(name, shape):
    model = build_model({"latent_dim": 4, "categorical_dim": 3, "prior": "learned",
                         "model": {"name": name, "hidden": [16] if name == "conv" else [16, 8]}}, shape)
    x = torch.rand(5, shape[0] * shape[1])
    x_logits, logits = model(x, 1.0)
    assert x_logits.shape == x.shape and logits.shape == (5, 4, 3)
    assert model.decode(torch.rand(2, 3, 4, 3)).shape == (2, 3, shape[0] * shape[1])  # leading dims kept
    assert model.image_shape == shape
    x_logits.sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_build_model_without_a_model_group_is_the_mlp():
    model = build_model({"latent_dim": 2, "categorical_dim": 3})
    assert type(model) is CategoricalVAE and model.image_shape == (28, 28)
    assert isinstance(build_model({"latent_dim": 2, "categorical_dim": 3, "model": {"name": "conv", "hidden": [8]}}),
                      ConvCategoricalVAE)


def test_model_shapes_and_unconstrained_logits():
    model = CategoricalVAE(3, 4)
    with torch.no_grad():
        model.encoder[-1].bias.fill_(-5.0)  # a ReLU on the logits would turn these into 0
    logits = model.encode(torch.rand(2, 784))
    assert logits.shape == (2, 3, 4) and (logits < 0).any()
    assert model.decode(torch.zeros(5, 3, 4)).shape == (5, 784)
    assert not any(n == "prior_logits" for n, _ in model.named_parameters())
    assert any(n == "prior_logits" for n, _ in CategoricalVAE(3, 4, prior="learned").named_parameters())
