"""The training step: fast modes learn what eager mode learns; resolving modes never crashes."""
import torch

from vae.core import metrics
from vae.data.device_data import DeviceSplit
from vae.training.engine import TrainStep, make_optimizer, pick_modes, set_lr_
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


def test_modes_resolve_per_device_and_refuse_what_cannot_run():
    assert pick_modes(CPU, None, None) == (False, False)          # auto on a CPU: eager
    assert pick_modes(CPU, True, True) == (True, False)           # no CUDA graphs without CUDA: warned, not fatal
    cuda = torch.device("cuda")
    assert pick_modes(cuda, None, None) == (True, True)  # auto on CUDA, length unknown: compile + CUDA graph
    # Auto on CUDA compiles only a run long enough to repay the compilation; the CUDA graph is always worth it.
    assert pick_modes(cuda, None, None, steps=6000, compile_min_steps=100000) == (False, True)
    assert pick_modes(cuda, None, None, steps=100000, compile_min_steps=100000) == (True, True)
    assert pick_modes(cuda, True, None, steps=10, compile_min_steps=100000) == (True, True)   # asked for: honoured
    assert pick_modes(CPU, None, None, steps=10**9, compile_min_steps=0) == (False, False)    # never auto on a CPU


def test_set_lr_writes_a_tensor_learning_rate_in_place():
    # A captured CUDA graph reads the learning-rate tensor it was captured with: it must be changed in place. A float
    # (or a tensor on another device, as loaded from a GPU checkpoint into a CPU run) is replaced by value.
    model = torch.nn.Linear(2, 2)
    lr = torch.tensor(0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    set_lr_(optimizer, 0.5)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    set_lr_(optimizer, 0.2)
    assert optimizer.param_groups[0]["lr"] == 0.2


def test_the_rng_streams_are_named_once():
    """The checkpoint saves and checks the streams make_generators makes, by the one tuple of their names."""
    from vae.training import checkpoint
    from vae.training.engine import RNG_STREAMS, make_generators

    assert tuple(make_generators(0, CPU)) == RNG_STREAMS and checkpoint.RNG_STREAMS is RNG_STREAMS
