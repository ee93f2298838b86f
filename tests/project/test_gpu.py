"""The CUDA paths: every TrainStep mode learns what the CPU learns, CUDA-graph replays draw fresh noise, and
train.py / vae.bench run end to end on the GPU. Skipped where no CUDA GPU is visible (`pytest -m gpu` selects
only these)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from support import run_script, run_train, tiny_overrides
from vae.data.device_data import DeviceSplit
from vae.training.engine import TrainStep, make_optimizer, set_lr_
from vae.estimators import make_estimator
from vae.core.gumbel import sample_gumbel
from vae.core.model import CategoricalVAE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

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


@pytest.mark.parametrize("mode", ["eager", "compile", "cuda_graph", "compile+cuda_graph"])
def test_every_mode_learns_what_the_cpu_learns(mode, cpu_loss):
    model = train("cuda", compile="compile" in mode, cuda_graph="cuda_graph" in mode)
    loss = final_loss(model)
    assert loss < 0.5 * 543, f"{mode}: the loss hardly fell ({loss:.1f} nats)"
    assert abs(loss - cpu_loss) < TOLERANCE, f"{mode}: {loss:.2f} nats vs {cpu_loss:.2f} on the CPU"


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


@pytest.mark.parametrize("extra", [[], ["cuda_graph=true", "compile=false"], ["cuda_graph=true", "compile=true"]],
                         ids=["default", "cuda_graph", "compile+cuda_graph"])
def test_train_script_on_cuda(tiny_data, tmp_path, extra):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "device=cuda", "epochs=1", *extra), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_seconds"] > 0 and math.isfinite(metrics["test_loss"])


def test_bench_runs_every_mode_on_cuda(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script([f"data.root={tiny_data}", "data.verify=false", "device=cuda", "steps=6", "warmup_steps=3",
                       "rounds=2", "modes=[eager,compile,cuda_graph,compile+cuda_graph]", f"out={out}"],
                      script="vae.bench", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"eager", "compile", "cuda_graph", "compile+cuda_graph", "baseline"}
    for mode, row in rows.items():
        assert row["status"] == "ok", (mode, row.get("reason"))
        assert row["images_per_s"] > 0 and row["s_per_epoch"] > 0


def test_resume_with_a_new_lr_on_cuda(tiny_data, tmp_path):
    # The captured step reads the learning-rate tensor it was built with; `resume=... lr=...` must reach it.
    run_dir = tmp_path / "run"
    first = run_train(tiny_overrides(tiny_data, run_dir, "device=cuda", "epochs=1"), timeout=600)
    assert first.returncode == 0, first.stderr
    last = run_dir / "checkpoints" / "last.pt"
    proc = run_train([f"resume={last}", "epochs=2", "lr=2e-3", f"hydra.run.dir={tmp_path / 'r2'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and float(ckpt["optimizer"]["param_groups"][0]["lr"]) == pytest.approx(2e-3)
    assert ckpt["config"]["lr"] == 2e-3


RADAM_REINMAX = ["optimizer=radam", "estimator=reinmax", "temperature=1.3", "temp_min=1.3", "lr=5e-4"]


@pytest.mark.parametrize("extra", [["model=conv"], RADAM_REINMAX], ids=["conv", "radam"])
@pytest.mark.parametrize("modes", [["compile=true", "cuda_graph=true"], ["compile=false", "cuda_graph=true"],
                                   ["compile=true", "cuda_graph=false"]], ids=["compile+graph", "graph", "compile"])
def test_the_conv_model_and_radam_compile_and_capture_on_the_gpu(tiny_data, tmp_path, extra, modes):
    """model=conv and optimizer=radam in every fast mode learn what eager CUDA learns, without falling back, and a
    captured run resumes to the same numbers as a straight one."""
    def run(name, *args):
        proc = run_train(tiny_overrides(tiny_data, tmp_path / name, "device=cuda", "epochs=2", *extra, *args))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "failed here" not in proc.stderr + proc.stdout  # no fallback to eager
        return json.loads((tmp_path / name / "metrics.json").read_text())

    eager = run("eager", "compile=false", "cuda_graph=false")
    fast = run("fast", *modes)
    assert abs(fast["test_loss"] - eager["test_loss"]) < 1.0
    proc = run_train(tiny_overrides(tiny_data, tmp_path / "half", "device=cuda", "epochs=1", *extra, *modes))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_train([f"resume={tmp_path / 'half' / 'checkpoints' / 'last.pt'}", "epochs=2", f"data.root={tiny_data}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((tmp_path / "half" / "metrics.json").read_text())
    assert resumed["epochs"] == 2 and abs(resumed["test_loss"] - fast["test_loss"]) < 1e-3
