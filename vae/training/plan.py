"""One plan per run: every start-up question of `python train.py` answered once, before any work.

    plan = make_plan(cfg, output_dir, overrides)   # raises a one-line UserError for anything wrong

Is each setting allowed (vae/settings/config.py's checks, on the run's final config: for `resume=`, the checkpoint's settings
plus this command line's), which device and how many threads (configured here, once, before the first parallel
op), the checkpoint to resume (read and checked here, once: structure, weights against the model its config
describes, the optimizer's state against those weights), where the run writes (a resume of a run's last.pt
continues in that run's own directory, logs and `.hydra/` included; anything else in the new directory Hydra is
about to create) and whether that directory may be used. The answer is a frozen `RunPlan` that train.py and the
Hydra start-up callback share: the callback makes it before Hydra creates the run directory (so a bad setting
leaves nothing behind) and train.py takes it; a run started without the callback (a test calling train.train, a
sweep job) makes its own.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from vae.common.errors import exit_on_failure

log = logging.getLogger("train")


@dataclass(frozen=True)
class RunPlan:
    cfg: DictConfig                 # the run's settings, read-only
    device: object                  # torch.device
    run_dir: Optional[Path]         # where the run writes (None: only checked, see check_run)
    resumed: Optional[dict]         # the checkpoint to continue (read and checked), or None for a new run
    in_place: bool                  # a resume that continues in the checkpoint's own run directory
    overrides: Tuple[str, ...]      # the command line's overrides (metrics.json records them)

    def modes(self, steps: int) -> Tuple[bool, bool]:
        """(compile, cuda_graph) for a run of `steps` steps: the device's policy (vae.training.device.pick_modes) applied to
        the settings; the number of steps is known once the data is loaded."""
        from vae.training.device import pick_modes

        c = self.cfg
        return pick_modes(self.device, c.compile, c.cuda_graph, steps, c.compile_min_steps)


def make_plan(cfg: DictConfig, output_dir, overrides: Sequence[str] = (), *, configure: bool = True,
              check_resume: bool = True) -> RunPlan:
    """Decide the run. `cfg` is the composed config (without Hydra's node), `output_dir` the run directory Hydra
    made or is about to make (None: no directory yet, e.g. a sweep's job), `overrides` the command line's (with
    `resume=`, they decide which settings may differ from the checkpoint's). `configure=False` asks without
    changing anything (the device's settings, `cfg`): a sweep checks each job so before the first starts, and
    `check_resume=False` skips a checkpoint it has already read."""
    from vae.settings import checks
    from vae.training.checkpoint import load_checkpoint, resume_config
    from vae.settings.config import check_device_name, validate_ranges
    from vae.training.device import configure_device
    from vae.training.rundir import run_dir_of

    if not configure:
        cfg = copy.deepcopy(cfg)
    overrides = tuple(str(o) for o in overrides)
    resumed, in_place, run_dir = None, False, None if output_dir is None else Path(output_dir)
    if cfg.resume is not None and check_resume:
        check_device_name(cfg.device)  # before the checkpoint is read onto it
        resumed = load_checkpoint(cfg.resume, key="resume")
        cfg = resume_config(cfg, resumed, overrides)
        here, why = run_dir_of(cfg.resume)
        if here is not None:
            run_dir, in_place = here, True
        elif configure:
            log.info("resume: %s, so this run writes into its new run directory %s", why, run_dir)
    if cfg.data.get("path") and not OmegaConf.is_missing(cfg.data, "path"):
        # Your own data is recorded by its absolute path: evaluate, sample and the API find it from anywhere.
        cfg.data.path = str(Path(str(cfg.data.path)).expanduser().absolute())
    validate_ranges(cfg)  # the run's final settings, once
    checks.check_threads(cfg.threads)
    device = checks.resolve_device(cfg.device)
    if configure:
        # Threads and the subnormal flush before the first parallel op: worker threads copy the flush flag only
        # from the thread that starts them (docs/denormals.md).
        configure_device(device, cfg.tf32, cfg.threads, cfg.flush_denormal)
    checks.check_environment(cfg, device)
    if output_dir is not None:
        checks.check_writable(run_dir, "hydra.run.dir")
    if resumed is not None:
        checks.check_resumable(cfg, resumed)
    if output_dir is not None and not in_place:  # a new run, or a resume into a new directory: not over another run
        checks.check_new_run_dir(run_dir)
    OmegaConf.set_readonly(cfg, True)
    return RunPlan(cfg, device, run_dir, resumed, in_place, overrides)


def check_run(cfg: DictConfig, overrides: Sequence[str] = (), check_resume: bool = True) -> None:
    """Everything `make_plan` checks, with nothing configured and no directory chosen: one line if the run cannot
    start."""
    make_plan(cfg, None, overrides, configure=False, check_resume=check_resume)


# The plan the start-up callback made for this process's run, waiting for train.py to take it.
_pending: Optional[RunPlan] = None


def hand_over(plan: RunPlan) -> None:
    global _pending
    _pending = plan


def take(cfg: DictConfig, output_dir, overrides: Sequence[str] = ()) -> RunPlan:
    """The callback's plan for this run (the one for `output_dir`) if there is one, else a plan made now (tests,
    sweep jobs)."""
    global _pending
    plan, _pending = _pending, None
    if plan is not None and plan.run_dir.resolve() == Path(output_dir).resolve():
        return plan
    return make_plan(cfg, output_dir, overrides)


class ValidateOnStart(Callback):
    """Hydra calls this before it creates the run directory, so a bad setting leaves nothing behind.

    Any exception, not only a `UserError`, ends the command here with one line and a non-zero status: Hydra would
    turn it into a warning and go on to create the run directory.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Make the run's plan (vae/training/plan.py) and hand it to train.py. A resume that continues a run in its own
        directory moves Hydra's run directory there too, so the log goes on in the run's own train.log and this
        command's .hydra/ files go to .hydra/resumes/<time>/ beside the run's original ones."""
        from vae.settings.checks import check_hydra_settings

        with exit_on_failure("the settings could not be checked"):
            task_cfg = copy.deepcopy(config)  # as Hydra hands it to the task: typed, so that unknown keys show
            with open_dict(task_cfg):
                del task_cfg["hydra"]
            check_hydra_settings(config.hydra, config.hydra.run.dir, new_run=True)
            plan = make_plan(task_cfg, config.hydra.run.dir, list(config.hydra.overrides.task))
        if plan.in_place:
            import time

            with open_dict(config.hydra):
                config.hydra.run.dir = str(plan.run_dir)
                if config.hydra.output_subdir is not None:
                    config.hydra.output_subdir = f"{config.hydra.output_subdir}/resumes/" \
                                                 f"{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        hand_over(plan)

    # No on_multirun_start: a sweep's config lacks the swept values; vae.tools.sweep_plan.CheckSweep checks every job.
