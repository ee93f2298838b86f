"""The device's settings for a run: which fast modes it can use (`pick_modes`), and the process-wide math
settings (threads, TF32, the subnormal flush) made once before the first parallel op (`configure_device`)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)


def pick_modes(device: torch.device, compile: Optional[bool], cuda_graph: Optional[bool],
               steps: Optional[int] = None, compile_min_steps: int = 0):
    """Resolve `null` (auto) for a run of `steps` training steps, and refuse, with a warning rather than a crash,
    what the device cannot do.

    Auto on CUDA: capture the whole step as one CUDA graph (this tiny model is bound by kernel launches there), and
    compile it too only when the run is long enough to repay the compilation: `compile_min_steps` or more steps
    (docs/speed.md has the measured times this default comes from: whole process time is what a user waits for).
    On a CPU neither: the compile time (tens of seconds on two cores) is not repaid by a default-length run.
    """
    on_cuda = device.type == "cuda"
    if compile is None:
        compile = on_cuda and (steps is None or steps >= compile_min_steps)
    cuda_graph = on_cuda if cuda_graph is None else cuda_graph
    if cuda_graph and not on_cuda:
        log.warning("cuda_graph=true needs a CUDA device; running on %s without it", device)
        cuda_graph = False
    if compile:
        try:
            import torch._dynamo  # noqa: F401  (absent in some minimal builds)
        except Exception as e:  # pragma: no cover
            log.warning("compile=true is not available here (%s); running eagerly", e)
            compile = False
    return compile, cuda_graph


def configure_device(device: torch.device, tf32: bool, threads=None, flush_denormal=None) -> None:
    """Process-wide math settings. (Kept out of train.py: launchers that pickle its functions by value cannot pickle
    the `torch.backends.cudnn` module object those functions would then reference.)

    flush_denormal (null = on for a CPU run): subnormal floats, which build up in Adam's moments as training goes
    on, take x86 CPUs' slow microcode path; flushing them to zero keeps every epoch as fast as the first
    (docs/speed.md says what it changes numerically)."""
    # The flag is per thread, and worker threads copy it from the thread that starts them: set it before any
    # parallel op starts the intra-op pool (train.py's start-up hook does; docs/denormals.md, "Threads").
    if flush_denormal is None:
        flush_denormal = device.type == "cpu"
    torch.set_flush_denormal(bool(flush_denormal))
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
