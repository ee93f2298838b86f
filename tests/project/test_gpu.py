"""The CUDA paths across modules: train.py runs end to end on the GPU in every fast mode (compile, CUDA graphs), a
resume with a new lr reaches the captured step, the conv model and RAdam compile and capture, and a cosine learning
rate reaches the compiled and captured step. Skipped where no CUDA GPU is visible (`pytest -m gpu` selects only these
and the GPU tests in the modules' own files)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from support import run_train, tiny_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("extra", [[], ["cuda_graph=true", "compile=false"], ["cuda_graph=true", "compile=true"]],
                         ids=["default", "cuda_graph", "compile+cuda_graph"])
def test_train_script_on_cuda(tiny_data, tmp_path, extra):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "device=cuda", "epochs=1", *extra), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_seconds"] > 0 and math.isfinite(metrics["test_loss"])


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


@pytest.mark.parametrize("modes", [["compile=true", "cuda_graph=true"], ["compile=false", "cuda_graph=true"],
                                   ["compile=true", "cuda_graph=false"]], ids=["compile+graph", "graph", "compile"])
def test_a_cosine_lr_reaches_the_compiled_and_captured_step(tiny_data, tmp_path, modes):
    """lr_schedule=cosine moves a learning rate that a captured graph reads from its tensor and a compiled Adam holds
    in one (a float would be baked in, or recompiled at every step): every fast mode learns what eager CUDA learns."""
    from vae.core.schedule import lr_at

    def run(name, *args):
        proc = run_train(tiny_overrides(tiny_data, tmp_path / name, "device=cuda", "epochs=2", "lr=1e-2", *args))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "failed here" not in proc.stderr + proc.stdout
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        return json.loads((tmp_path / name / "metrics.json").read_text())["test_loss"], ckpt

    eager, _ = run("eager", "lr_schedule=cosine", "compile=false", "cuda_graph=false")
    constant, _ = run("constant", "compile=false", "cuda_graph=false")
    fast, ckpt = run("fast", "lr_schedule=cosine", *modes)
    assert abs(fast - eager) < 1.0 and abs(fast - eager) < abs(constant - eager)
    total = ckpt["step"]
    assert float(ckpt["optimizer"]["param_groups"][0]["lr"]) == pytest.approx(
        lr_at(total - 1, lr=1e-2, schedule="cosine", total_steps=total), abs=1e-9)
