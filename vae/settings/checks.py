"""Start-up checks that look beyond the values: the file system, the devices, a checkpoint to resume.

vae/training/plan.py calls them, once per run, from the Hydra start-up callback (before Hydra creates the run
directory, so a bad setting leaves nothing behind); the values' own rules are declared beside the settings
(vae/settings/config.py, vae/settings/rules.py).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from vae.common.errors import UserError, describe

THREADS_PER_CPU = 4  # threads beyond this many per CPU only slow a run down (and 10^5 of them crash PyTorch)
IMAGE_FLOATS = 784


def check_writable(path: Path, key: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory: we will create the rest. Whatever the
    file system says while we look (a name too long, a loop of links) is one line too."""
    p = Path(path).absolute()
    try:
        while not p.exists():
            if p.parent == p:
                break
            p = p.parent
        check_name_lengths(Path(path), p, key)
    except OSError as e:
        raise UserError(f"{key}={str(path)!r} cannot be used ({e.strerror or e}); choose another with "
                        f"{key}=<dir>") from None
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}={str(path)!r} is not writable ({p} is a file, not a directory); choose a directory "
                        f"with {key}=<dir>")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}={str(path)!r} is not writable ({p} is not a writable directory); "
                        f"choose another with {key}=<dir> or fix its permissions")


def check_name_lengths(path: Path, existing: Path, key: str) -> None:
    """The names we would create below `existing` must fit its file system (often 255 bytes a name, 4096 a path):
    Hydra creates the run directory before the run starts, and would fail with a traceback."""
    name_max = os.pathconf(existing, "PC_NAME_MAX") if existing.is_dir() else 255
    path_max = os.pathconf(existing, "PC_PATH_MAX") if existing.is_dir() else 4096
    longest = max(len(os.fsencode(part)) for part in path.absolute().parts)
    if longest > name_max:
        raise UserError(f"{key}={str(path)!r} holds a name of {longest} bytes, more than the {name_max} this file "
                        f"system allows; choose a shorter {key}")
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise UserError(f"{key}={str(path)!r} is {len(os.fsencode(str(path.absolute())))} bytes long, more than the "
                        f"{path_max - 1} this file system allows; choose a shorter {key}")


def check_output_file(path: Path, key: str, fix: str = "") -> None:
    """A file a command writes at its end (`out=`): refuse, before any work, one that is not a regular file (the
    atomic write would replace it) or that cannot be written. Creates its directory and writes (and removes) a
    temporary file there: access() misses read-only file systems that it does not know, and knows nothing for root.
    `fix`: what to do instead (default: choose another `key`)."""
    import tempfile

    from vae.common.atomic import TMP_PREFIX, not_a_regular_file

    path = Path(path)
    try:
        kind = not_a_regular_file(path)
        if kind:
            raise UserError(f"{key}: {path} is {kind}, not a file, and writing the results would replace it; "
                            f"{fix or 'choose a file path'}")
        existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"{key}: {path} cannot be written ({existing} is a file, not a directory); "
                            f"{fix or f'choose another {key}'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(prefix=TMP_PREFIX, dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"{key}: {path} cannot be written ({e.strerror or e}); {fix or f'choose another {key}'}") \
            from None


def resolve_device(name: str):
    """`auto` picks CUDA when present. Asking for CUDA on a machine without one is an error, not a fallback:
    silently training on the CPU would turn minutes into hours."""
    import torch

    from vae.settings.config import check_device_name

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"device={name!r} is not a device name PyTorch knows ({describe(e, 100)}); "
                        "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name!r} but no CUDA GPU is visible to PyTorch; use device=cpu or device=auto "
                            "(or check the driver / `docker run --gpus all`)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                            f"use device=cuda:0..{torch.cuda.device_count() - 1}")
    return device


def check_threads(threads: Optional[int]) -> None:
    cpus = os.cpu_count() or 1
    if threads is not None and threads > THREADS_PER_CPU * cpus:
        raise UserError(f"threads={threads} is not allowed here: this machine has {cpus} CPUs, use at most "
                        f"{THREADS_PER_CPU * cpus} (or threads=null: one per CPU)")


def memory_bytes(device) -> Optional[int]:
    """All the memory of `device` (the GPU's, or the machine's RAM for the CPU); None if unknown."""
    import torch

    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AssertionError):
        return None


def iw_batch_bytes(chunk: int, batch_size: int, code: int) -> int:
    """About the memory of one chunk of the IW bound (vae.core.metrics.log_weights): per sample and image, the one-hot code,
    its gathers, the decoder's activations and the per-pixel BCE, in float32. An underestimate, so that a check on
    it refuses only settings that cannot fit."""
    return 4 * chunk * batch_size * (2 * code + 256 + 512 + 3 * IMAGE_FLOATS)


def check_iw_memory(device, *, iw_samples: int, iw_chunk: int, batch_size: int, code: int,
                    keys=("eval.iw_chunk", "eval.batch_size"), test_images: int = 10_000) -> None:
    """Refuse, before minutes of training, an IW bound whose chunks cannot fit in the device's memory at all."""
    if iw_samples <= 0:
        return
    need = iw_batch_bytes(min(iw_chunk, iw_samples), min(batch_size, test_images), code)
    have = memory_bytes(device)
    if have is not None and need > have:
        where = "RAM" if device.type == "cpu" else str(device)
        raise UserError(f"the importance-weighted bound would need about {need / 2**30:.0f} GiB at once ({keys[0]}="
                        f"{iw_chunk} samples x {keys[1]}={batch_size} images), more than the {have / 2**30:.0f} GiB "
                        f"of {where}: lower {keys[0]} (the bound is the same for any chunk) or {keys[1]}")


def check_environment(cfg: DictConfig, device) -> None:
    """What the settings ask of this machine: memory for the IW bound, the data where the data layer will look."""
    check_iw_memory(device, iw_samples=cfg.eval.iw_samples, iw_chunk=cfg.eval.iw_chunk,
                    batch_size=cfg.eval.batch_size, code=cfg.latent_dim * cfg.categorical_dim)
    root = Path(cfg.data.root).expanduser()
    if root.exists() and not root.is_dir():
        check_writable(root, "data.root")  # a file where the data should be: one line that says so
    from vae.data import check_source  # a read-only data.root is fine when it holds every file: the data layer decides
    from vae.training.tracking import check_tracker  # tracker=mlflow: installed?

    check_source(cfg.data)
    check_tracker(cfg.tracker)


def check_resumable(cfg: DictConfig, ckpt: dict) -> None:
    """The checkpoint's weights fit the model its (resumed) config describes, and its optimizer state those
    weights."""
    from vae.training.checkpoint import check_model_state, check_optimizer_state, image_shape_of
    from vae.core.model import build_model

    model = build_model(cfg, image_shape_of(ckpt))
    check_model_state(ckpt, model.state_dict(), cfg.resume)
    check_optimizer_state(ckpt, model, cfg.resume)


def check_new_run_dir(run_dir: Path) -> None:
    """A new run (or a resume that cannot continue in its own directory) must not write over another run."""
    from vae.training.rundir import holds_run, override

    found = holds_run(run_dir)
    if found:
        last = Path(run_dir) / "checkpoints" / "last.pt"
        raise UserError(f"hydra.run.dir={str(run_dir)!r} already holds a run ({found}); choose another "
                        f"hydra.run.dir, or continue that run with {override('resume', last)}")


def check_hydra_settings(hydra_cfg: DictConfig, output_dir: str, new_run: bool) -> None:
    """Hydra settings that would make a run write where it should not, or read other files than were checked."""
    if new_run and not str(output_dir).strip():
        raise UserError("hydra.run.dir is empty (an unset shell variable?): the run would write into the current "
                        "directory; give it a directory, or leave it out for outputs/<date>/<time>")
    if hydra_cfg.job.chdir:
        raise UserError("hydra.job.chdir=true is not supported: the checks read relative paths (data.root, resume) "
                        "from the directory you start in, and the run must too; drop it")

