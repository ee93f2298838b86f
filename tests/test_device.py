"""vae/training/device.py: resolving the fast modes never crashes; what the device cannot do is refused with a
warning."""
import torch

from vae.training.device import pick_modes

CPU = torch.device("cpu")


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
