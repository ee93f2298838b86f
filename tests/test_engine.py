"""vae/training/engine.py: the training step: fast modes learn what eager mode learns.
On a CUDA GPU (skipped where none is visible; `pytest -m gpu` selects them), every TrainStep mode learns what the CPU
learns and CUDA-graph replays draw fresh noise."""
import pytest
import torch

from vae.core import metrics
from vae.core.gumbel import sample_gumbel
from vae.data.device_data import DeviceSplit
from vae.core.optim import make_optimizer, set_lr_
from vae.training.engine import TrainStep
from vae.estimators import make_estimator
from vae.core.model import CategoricalVAE

CPU = torch.device("cpu")


def train_tiny(compile: bool, steps: int = 30, batch_size: int = 20):
    torch.manual_seed(0)
    # 200 noisy copies of 5 binary prototypes: structure the model can learn within a few steps
    gen = torch.Generator().manual_seed(1)
    prototypes = torch.rand(5, 28, 28, generator=gen) < 0.3
    noisy = prototypes[torch.arange(200) % 5] ^ (torch.rand(200, 28, 28, generator=gen) < 0.05)
    images = noisy.to(torch.uint8) * 255
    split = DeviceSplit(images, CPU)
    model = CategoricalVAE(6, 4)
    optimizer = make_optimizer(model, 3e-3, CPU, cuda_graph=False)
    step = TrainStep(model, optimizer, split, batch_size=batch_size, estimator=make_estimator("gumbel", {}, "cpu"),
                     noise_generator=torch.Generator().manual_seed(2), binarize_generator=None, compile=compile)
    perm = torch.randperm(split.n, generator=torch.Generator().manual_seed(3))
    tau = torch.tensor(0.7)
    losses = []
    for i in range(steps):
        start = (i * batch_size) % split.n
        losses.append(step(perm[start:start + batch_size], tau)[0][0].item())
    test = metrics.evaluate_split(model, split, tau=0.7, hard=False, generator=torch.Generator().manual_seed(4),
                                  batch_size=100)
    return losses, test["loss"]


def test_compiled_training_agrees_with_eager_on_cpu():
    eager_losses, eager_test = train_tiny(compile=False)
    compiled_losses, compiled_test = train_tiny(compile=True)
    assert eager_losses[-1] < eager_losses[0] - 50.0  # it really trained
    # Fused kernels round differently and Adam carries the differences forward (for weights whose gradient is
    # rounding noise, Adam's normalised step can even flip sign), so the runs agree on the losses to float
    # tolerance, not bitwise; different noise or a wrong gradient would put them tens of nats apart.
    assert torch.allclose(torch.tensor(eager_losses), torch.tensor(compiled_losses), rtol=1e-3)
    assert abs(eager_test - compiled_test) < 1e-3 * abs(eager_test)


def test_the_rng_streams_are_named_once():
    """The checkpoint saves and checks the streams make_generators makes, by the one tuple of their names."""
    from vae.training import checkpoint
    from vae.training.engine import RNG_STREAMS, make_generators

    assert tuple(make_generators(0, CPU)) == RNG_STREAMS and checkpoint.RNG_STREAMS is RNG_STREAMS


# --- on a CUDA GPU ----------------------------------------------------------------------------------------------

N_IMAGES, BATCH, STEPS = 1000, 100, 300
LATENT, CATS = 30, 10
# Final loss (nats/image, on all images with fixed noise, on the CPU) after STEPS steps. On the CPU, five noise
# seeds gave 164.7 to 166.8 (untrained: 543); a step that trains on a stale batch gave 175.8, one that draws the
# same noise every step 190.4, one that never zeroes its gradients 469.8. Different random streams (CUDA's
# Philox vs the CPU's Mersenne Twister) and kernels move a correct mode by about the seed spread.
TOLERANCE = 4.0


def synthetic_images(n: int = N_IMAGES, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 28, 28]: ten random binary prototypes with 5% of the pixels flipped (learnable, unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 28 * 28, generator=g) < 0.3
    labels = torch.randint(10, (n,), generator=g)
    flips = torch.rand(n, 28 * 28, generator=g) < 0.05
    return ((prototypes[labels] ^ flips).to(torch.uint8) * 255).view(n, 28, 28)


IMAGES = synthetic_images()


def make_step(device, *, compile=False, cuda_graph=False, lr=1e-3, noise_seed=2):
    """Model, TrainStep and generators as train.py builds them (initial weights loaded in place afterwards)."""
    device = torch.device(device)
    split = DeviceSplit(IMAGES, device)
    torch.manual_seed(0)
    model = CategoricalVAE(LATENT, CATS).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, lr, device, cuda_graph, compile)
    gens = {"shuffle": torch.Generator(device=device).manual_seed(1),
            "noise": torch.Generator(device=device).manual_seed(noise_seed)}
    step = TrainStep(model, optimizer, split, batch_size=BATCH, estimator=make_estimator("gumbel", {}, "cpu"),
                     noise_generator=gens["noise"],
                     binarize_generator=None, compile=compile, cuda_graph=cuda_graph)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(initial[k])
    return model, step, split, gens


def train(device, **kw) -> CategoricalVAE:
    model, step, split, gens = make_step(device, **kw)
    tau = torch.tensor(1.0, device=split.device)
    per_epoch = split.n // BATCH
    for i in range(STEPS):
        if i % per_epoch == 0:
            perm = torch.randperm(split.n, generator=gens["shuffle"], device=split.device)
        j = i % per_epoch
        stats, _ = step(perm[j * BATCH:(j + 1) * BATCH], tau)
    assert torch.isfinite(stats).all()
    # A CPU copy: the original's parameters stay where a captured graph recorded them.
    copy = CategoricalVAE(LATENT, CATS)
    copy.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return copy


@torch.no_grad()
def final_loss(model: CategoricalVAE) -> float:
    """-ELBO of every image with one fixed noise draw, on the CPU: the same yardstick for every mode."""
    split = DeviceSplit(IMAGES, "cpu")
    x = split.batch(torch.arange(split.n))
    noise = sample_gumbel((split.n, LATENT, CATS), generator=torch.Generator().manual_seed(123))
    return make_estimator("gumbel", {}, "cpu").batch_loss(model, x, noise, torch.tensor(1.0))[1].item()


@pytest.fixture(scope="module")
def cpu_model() -> CategoricalVAE:
    return train("cpu")


@pytest.fixture(scope="module")
def cpu_loss(cpu_model) -> float:
    return final_loss(cpu_model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["eager", "compile", "cuda_graph", "compile+cuda_graph"])
def test_every_mode_learns_what_the_cpu_learns(mode, cpu_loss):
    model = train("cuda", compile="compile" in mode, cuda_graph="cuda_graph" in mode)
    loss = final_loss(model)
    assert loss < 0.5 * 543, f"{mode}: the loss hardly fell ({loss:.1f} nats)"
    assert abs(loss - cpu_loss) < TOLERANCE, f"{mode}: {loss:.2f} nats vs {cpu_loss:.2f} on the CPU"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_draw_fresh_noise(cpu_model):
    # lr=0: the weights cannot move, so only the noise can change the loss of the same batch. Trained weights
    # (loaded in place, as train.py does after the capture), because an untrained decoder hardly hears the noise.
    model, step, split, gens = make_step("cuda", cuda_graph=True, lr=0.0)
    assert step.graph is not None
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(cpu_model.state_dict()[k])
    idx = torch.arange(BATCH, device=split.device)
    tau = torch.tensor(1.0, device=split.device)
    weights = [p.detach().clone() for p in model.parameters()]
    start = gens["noise"].get_state()
    first, second = step(idx, tau)[0], step(idx, tau)[0]
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert abs(first[0].item() - second[0].item()) > 1e-3, "two replays drew the same Gumbel noise"
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    # The graph reads the generator's state at each replay: restoring it (as a resumed run does) replays the
    # same noise again.
    gens["noise"].set_state(start)
    assert torch.allclose(step(idx, tau)[0], first, rtol=1e-6, atol=0)
    # The learning rate is read at every replay as well: raised from 0, it moves the weights with no new capture.
    set_lr_(step.optimizer, 1e-3)
    step(idx, tau)
    assert not any(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
