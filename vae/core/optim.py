"""The optimizers a run can choose (`optimizer=adam|radam`), built in the fastest form the device and mode allow.

`OPTIMIZERS` is the one registry: the config's choices, its error message and the docs derive from it. Each
entry turns the `optimizer` config group (betas, eps, weight_decay) plus the run's `lr` into a torch optimizer.
Both keep Adam's state layout (`step`, `exp_avg`, `exp_avg_sq` per parameter), so checkpoints, the in-place
loading a captured CUDA graph needs, and the checkpoint checks treat them alike.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch


def _adam(params, lr, kw: dict, device: torch.device, cuda_graph: bool, compiled: bool):
    # Fused Adam: one kernel for all parameters instead of a handful per tensor (measured: docs/speed.md). On CUDA
    # the fused kernel cuts these 1.2 M parameters into chunks of 65,536, a handful of thread blocks on a big GPU:
    # so when the step is compiled, Adam is the foreach implementation compiled with it (TrainStep), which Inductor
    # turns into a few wide kernels. `capturable` keeps the step counter on the device so a captured graph advances it.
    if compiled:
        return torch.optim.Adam(params, lr=lr, **kw, foreach=True, capturable=True)
    extra = dict(fused=True)
    if device.type == "cuda":
        extra["capturable"] = cuda_graph
    return torch.optim.Adam(params, lr=lr, **kw, **extra)


def _radam(params, lr, kw: dict, device: torch.device, cuda_graph: bool, compiled: bool):
    # RAdam (Liu et al. 2020) has no fused kernel: foreach on CUDA (PyTorch's own default there), the for-loop on the
    # CPU (also PyTorch's default; for one small model it is as fast). `capturable` keeps its step counter and
    # rectification on the device for a captured graph, exactly as for Adam.
    on_cuda = device.type == "cuda"
    return torch.optim.RAdam(params, lr=lr, **kw, foreach=on_cuda,
                             capturable=on_cuda and (cuda_graph or compiled))


# name -> builder(params, lr, kwargs from the config group, device, cuda_graph, compiled)
OPTIMIZERS: Dict[str, Callable] = {"adam": _adam, "radam": _radam}


def compiles_optimizer(device: torch.device, compile: bool) -> bool:
    """Whether the compiled step also compiles the optimizer (CUDA only; see `make_optimizer`)."""
    return compile and device.type == "cuda"


def make_optimizer(model, lr: float, device: torch.device, cuda_graph: bool, compile: bool = False,
                   spec: Optional[dict] = None, lr_moves: bool = False):
    """The optimizer of `spec` (the `optimizer` config group: name, betas, eps, weight_decay; None = Adam with
    PyTorch's defaults, as before the group existed) for `model`'s parameters.

    For a captured step the learning rate is a 0-d device tensor, like tau: every replay reads it, so `set_lr_`
    changes it without a new capture (a float would be baked into the graph). So it is for a compiled step whose
    learning rate moves (`lr_moves`, a schedule): Dynamo guards on a float and would recompile at every change."""
    spec = dict(spec or {"name": "adam"})
    build = OPTIMIZERS[spec.pop("name")]
    kw = {k: (tuple(v) if k == "betas" else v) for k, v in spec.items()}
    compiled = compiles_optimizer(device, compile)
    if device.type == "cuda" and (cuda_graph or (compiled and lr_moves)):  # both capturable: a tensor lr is allowed
        lr = torch.tensor(lr, device=device)
    return build(model.parameters(), lr, kw, device, cuda_graph, compiled)


def set_lr_(optimizer, lr: float) -> None:
    """Set every group's learning rate; in place where it is a tensor on the parameters' device (a captured graph
    reads that tensor). Anything else, such as a CUDA tensor loaded from a checkpoint into a CPU run, is replaced."""
    for group in optimizer.param_groups:
        current = group["lr"]
        if torch.is_tensor(current) and current.device == group["params"][0].device:
            with torch.no_grad():
                current.fill_(lr)
        else:
            group["lr"] = lr


def reset_optimizer_state_(optimizer) -> None:
    """Zero the moments and step counters in place (a fresh optimizer, at the same addresses)."""
    with torch.no_grad():
        for state in optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    v.zero_()


def load_optimizer_state_(optimizer, saved: dict) -> None:
    """Load a saved optimizer state. With a captured graph the state tensors must keep their addresses, so when
    they already exist the values are copied in place; otherwise the ordinary `load_state_dict` is used."""
    if not optimizer.state:
        optimizer.load_state_dict(saved)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    with torch.no_grad():
        for i, p in enumerate(params):
            for k, v in saved["state"].get(i, {}).items():
                target = optimizer.state[p][k]
                if torch.is_tensor(target):
                    target.copy_(v)
                else:
                    optimizer.state[p][k] = v
