"""What a sweep (`python train.py -m ...`) will run, checked before its first job starts.

Hydra composes a sweep's config without the swept values: the defaults stand in for them. Checking that config
would refuse valid sweeps (`estimator=rloo,gumbel_rao estimator_samples=4`: the default estimator takes one sample)
and pass invalid ones. So `check_sweep` (run by the `CheckSweep` callback, configs/config.yaml) checks the jobs:

- Hydra's basic sweeper: the combinations are counted first (more than MAX_JOBS are refused before any is built),
  then expanded as the sweeper expands them; each job's config is composed as the launcher will compose it and
  checked like a single run's. A sweep of which no job can run is refused with one line. Otherwise the jobs that
  cannot run are named in a warning before the first job starts; each fails at its own start with its one-line
  error, and the others run (docs/sweeps.md).
- A sweeper that picks values as it goes (Optuna): its search space must be one it can build, and the fixed
  settings must run with some value of each searched key; each trial's own values are checked when it starts.
- Launcher and sweeper settings that the plugins would turn into tracebacks (joblib's n_jobs=0, an Optuna range
  whose low end is above its high end) are refused with one line.

It also claims the sweep directory: `${new_dir:...}` gives each sweep its own (two sweeps started in the same
second would otherwise share `outputs/multirun/<date>/<time>`), and a lock on `<sweep dir>/.lock` keeps a second
sweep out of one that is running, as single runs' locks do (vae/training/rundir.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae.common.errors import UserError, describe, exit_on_failure

log = logging.getLogger(__name__)

MAX_JOBS = 10_000  # combinations a basic sweep may have: each is composed and checked here (about 0.1 s each)
MAX_SEARCH_TRIES = 12  # value combinations tried to show that a search's fixed settings can run at all
NAMED_IN_MESSAGES = 5  # impossible combinations named one by one; the rest are counted
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
LOCK_NAME = ".lock"
# What shows that a directory already holds a sweep (besides its jobs' `.hydra/` directories).
SWEEP_FILES = ("multirun.yaml", "summary.csv", "summary.md", "optimization_results.yaml")


# --- the sweep directory ------------------------------------------------------------------------------------------

_NEW_DIRS = set()  # the names new_dir handed out in this process


def new_dir(path: str) -> str:
    """`${new_dir:<path>}`: `<path>` if nothing is there yet, else `<path>_2`, `<path>_3`, ...

    Resolved once per sweep: OmegaConf caches the value, and Hydra gives every job a copy of the sweep's cache (as it
    does for `${now:}`). `claim_sweep_dir` creates the directory straight after, so a sweep started in the same
    second finds it taken and gets the next name.
    """
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}_{n}"
    _NEW_DIRS.add(candidate)
    return candidate


OmegaConf.register_new_resolver("new_dir", new_dir, use_cache=True, replace=True)


def holds_sweep(sweep_dir: Path) -> Optional[str]:
    """What shows that `sweep_dir` already holds a sweep, or None: a summary, Hydra's or Optuna's sweep files, or a
    job directory."""
    for name in SWEEP_FILES:
        if (sweep_dir / name).exists():
            return name
    job = next(sweep_dir.glob("*/.hydra/overrides.yaml"), None)
    return f"the job {job.parent.parent.name}" if job is not None else None


_held_locks: Dict[Path, int] = {}  # the kernel drops these locks when this process ends, however it ends


def claim_sweep_dir(sweep_dir: Path) -> List[Path]:
    """Create `sweep_dir` (a name from new_dir must not exist yet) and lock it for this process; refuse one that
    another sweep is using or has used. Returns the directories created, for `release` to remove after a refusal."""
    from vae.settings.checks import check_writable

    sweep_dir = Path(sweep_dir)
    check_writable(sweep_dir, "hydra.sweep.dir")
    created = [p for p in (sweep_dir, *sweep_dir.parents) if not p.exists()]
    try:
        sweep_dir.mkdir(parents=True, exist_ok=str(sweep_dir) not in _NEW_DIRS)
        fd = os.open(sweep_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except FileExistsError:
        raise UserError(f"another sweep took {sweep_dir} a moment ago; start this one again (it gets the next name)") \
            from None
    except OSError as e:
        raise UserError(f"cannot use hydra.sweep.dir={str(sweep_dir)!r}: {e.strerror or e}; choose another "
                        "hydra.sweep.dir or fix its permissions") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"hydra.sweep.dir={str(sweep_dir)!r} is in use by another sweep (pid {other}); choose another "
                        "hydra.sweep.dir, or leave it out (each sweep then gets its own)") from None
    _held_locks[sweep_dir] = fd
    with contextlib.suppress(OSError):  # the pid is for the message above only; the lock is the flock
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    found = holds_sweep(sweep_dir)
    if found:
        release(sweep_dir, created)
        raise UserError(f"hydra.sweep.dir={str(sweep_dir)!r} already holds a sweep ({found}); choose another "
                        f"hydra.sweep.dir, or leave it out (each sweep then gets its own)")
    return created


def release(sweep_dir: Path, created: List[Path]) -> None:
    """After a refusal: remove the lock file, and the directories `claim_sweep_dir` created if they are empty."""
    with contextlib.suppress(OSError):
        os.unlink(Path(sweep_dir) / LOCK_NAME)
        os.close(_held_locks.pop(Path(sweep_dir)))
    for path in created:  # deepest first
        try:
            path.rmdir()
        except OSError:
            break


# --- what the sweep will run --------------------------------------------------------------------------------------

def sweep_arguments(config: DictConfig) -> List[str]:
    """The overrides a sweeper expands, as Hydra's sweepers collect them: `hydra.sweeper.params`, then the command
    line's (a command-line key replaces the same key of `params`)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]


def parse(arguments: List[str], loader) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    except Exception as e:  # hydra.sweeper.params are parsed here first (the command line was parsed before)
        raise UserError(f"hydra.sweeper.params cannot be read: {one_line(e)}") from None


def one_line(e: BaseException) -> str:
    """An exception (and its cause: Hydra's "Error merging override x" says why only there) as one line."""
    text = describe(e)
    if e.__cause__ is not None:
        text += f" ({describe(e.__cause__)})"
    return text


def count_values(override, limit: int) -> int:
    """How many values a sweep override lists, counted without building them: at most `limit` + 1."""
    from hydra.core.override_parser.types import RangeSweep

    if not override.is_sweep_override():
        return 1
    value = override.value()
    if not isinstance(value, RangeSweep) and not override.is_discrete_sweep():
        raise UserError(f"{override.input_line}: Hydra's basic sweeper runs lists, ranges and globs of values, not "
                        f"{override.value_type.name.lower().replace('_', ' ')}s; search an interval with "
                        "hparams_search=optuna")
    try:
        if isinstance(value, RangeSweep) and isinstance(value.range(), range):
            return min(len(value.range()), limit + 1)
        return sum(1 for _ in itertools.islice(override.sweep_string_iterator(), limit + 1))
    except Exception as e:  # e.g. range(0,4,0)
        raise UserError(f"{override.input_line} cannot be expanded: {one_line(e)}") from None


def check_size(overrides: list, limit: int = MAX_JOBS) -> int:
    """The number of jobs (the product of the values per key: a key given twice counts once, as the sweeper does);
    a sweep of more than `limit` jobs is refused before any combination is built."""
    counts: Dict[str, int] = {}
    for o in overrides:
        counts[o.get_key_element()] = count_values(o, limit)
    total = math.prod(counts.values())
    if total > limit:
        sizes = " x ".join(f"{n if n <= limit else f'over {limit:,}'} {k}" for k, n in counts.items() if n > 1)
        raise UserError(f"this sweep would run {'over ' if max(counts.values()) > limit else ''}{total:,} jobs "
                        f"({sizes}); at most {limit:,} are allowed: sweep fewer values, or split it into sweeps")
    return total


def swept_keys(overrides: list) -> List[str]:
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]


def describe_job(job: List[str], swept: List[str]) -> str:
    """A combination by its swept values alone: `estimator=gumbel estimator_samples=4`."""
    shown = [o for o in job if o.partition("=")[0] in swept]
    return " ".join(shown or job) or "no overrides"


def task_config(job_cfg: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(job_cfg, [k for k in job_cfg.keys() if k != "hydra"])


def compose_job(config: DictConfig, job: List[str], loader) -> DictConfig:
    """The job's own settings, composed as the launcher will compose them (hydra's ConfigLoader.load_sweep_config)."""
    return task_config(loader.load_sweep_config(config, list(job)))


def check_job(task_cfg: DictConfig, job: List[str], checked_resumes: set) -> Optional[str]:
    """A job's one-line error, or None if it can run: the checks of a single run (a `resume=` checkpoint is read once
    per sweep)."""
    from vae.training.plan import check_run

    try:
        check_run(task_cfg, list(job), check_resume=task_cfg.resume not in checked_resumes)
    except UserError as e:
        return str(e)
    checked_resumes.add(task_cfg.resume)
    return None


def configure_process(task_cfg: DictConfig) -> None:
    """The math settings of the job that runs first, before any check may start PyTorch's thread pool (worker threads
    copy the subnormal flush flag only from the thread that starts them; vae.training.device.configure_device)."""
    from vae.settings.checks import resolve_device
    from vae.training.device import configure_device

    try:
        device = resolve_device(task_cfg.device)
    except UserError:
        return  # the job's check names it
    configure_device(device, task_cfg.tf32, task_cfg.threads, task_cfg.flush_denormal)


def check_combinations(config: DictConfig, overrides: list, loader) -> List[Tuple[str, str]]:
    """Every job of a basic sweep, composed and checked: the (combination, error) of those that cannot run.
    Raises a UserError when none can (or one cannot be composed, which Hydra would refuse anyway)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    total = check_size(overrides)
    if total > 100:
        log.info("checking the %d jobs of this sweep before the first starts", total)
    jobs = BasicSweeper.split_arguments(overrides, None)[0]
    swept = swept_keys(overrides)
    bad: List[Tuple[str, str]] = []
    checked_resumes: set = set()
    for i, job in enumerate(jobs):
        try:
            task_cfg = compose_job(config, job, loader)
        except Exception as e:
            raise UserError(f"the combination {describe_job(job, swept)} cannot be composed: {one_line(e)}") from None
        if i == 0:
            configure_process(task_cfg)
        error = check_job(task_cfg, job, checked_resumes)
        if error is not None:
            bad.append((describe_job(job, swept), error))
    if len(bad) == len(jobs):
        if len({error for _, error in bad}) == 1:
            raise UserError(bad[0][1])  # a setting every job shares: its own message, as for a single run
        raise UserError(f"no job of this sweep can run: {name_all(bad)}")
    return bad


def name_all(bad: List[Tuple[str, str]]) -> str:
    named = "; ".join(f"{name}: {error}" for name, error in bad[:NAMED_IN_MESSAGES])
    return named + (f"; and {len(bad) - NAMED_IN_MESSAGES} more" if len(bad) > NAMED_IN_MESSAGES else "")


# --- sweepers that choose values as they go (Optuna) --------------------------------------------------------------

def candidates(override) -> List[str]:
    """Values worth trying for a searched key: its first listed values, or an interval's ends and middle."""
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    if override.is_interval_sweep():
        value = override.value()
        lo, hi = value.start, value.end
        mid = math.sqrt(lo * hi) if "log" in value.tags and lo > 0 and hi > 0 else (lo + hi) / 2
        if isinstance(lo, int) and isinstance(hi, int):
            mid = int(mid)
        return [str(v) for v in (lo, mid, hi)]
    return list(itertools.islice(override.sweep_string_iterator(), 10))


def check_search(config: DictConfig, overrides: list, loader) -> None:
    """A search's fixed settings must run with some value of the searched keys: the defaults first (what Hydra
    composed), then up to MAX_SEARCH_TRIES combinations of candidate values. Refuses only when none can run."""
    task_cfg = task_config(config)
    configure_process(task_cfg)
    error = check_job(task_cfg, [str(o) for o in config.hydra.overrides.task], set())
    if error is None:
        return
    values: Dict[str, List[str]] = {}
    for o in overrides:
        values[o.get_key_element()] = [f"{o.get_key_element()}={v}" for v in candidates(o)]
    swept = swept_keys(overrides)
    if not swept:
        raise UserError(error)
    tried: List[Tuple[str, str]] = []
    for job in search_samples(list(values.values())):
        try:
            task_cfg = compose_job(config, job, loader)
        except Exception as e:
            raise UserError(f"the values {describe_job(job, swept)} cannot be composed: {one_line(e)}") from None
        job_error = check_job(task_cfg, job, set())
        if job_error is None:
            return
        tried.append((describe_job(job, swept), job_error))
    if len({e for _, e in tried}) == 1:
        raise UserError(tried[0][1])  # the fixed settings alone
    # The diagonal's last: every searched key at its high end (or last listed value).
    example = tried[min(len(tried), max(len(v) for v in values.values())) - 1]
    raise UserError(f"no trial of this search can run: {len(tried)} combinations of the searched values "
                    f"({', '.join(swept)}: their ends and middles) were tried, e.g. {example[0]}: {example[1]}")


def search_samples(lists: List[List[str]], tries: int = MAX_SEARCH_TRIES) -> List[List[str]]:
    """Up to `tries` combinations, one value from each list: first the diagonal (every key at its first values,
    then its second...: each key's whole range is tried), then seeded random ones."""
    import random

    longest = max((len(values) for values in lists), default=0)
    jobs = [[values[min(i, len(values) - 1)] for values in lists] for i in range(longest)]
    rng = random.Random(0)
    total = math.prod(len(values) for values in lists)
    while len(jobs) < min(tries, total):
        job = [rng.choice(values) for values in lists]
        if job not in jobs:
            jobs.append(job)
    return jobs[:tries]


def check_optuna(config: DictConfig, overrides: list) -> None:
    """The Optuna sweeper's settings and search space, as one line each instead of its tracebacks."""
    sweeper = config.hydra.sweeper
    if not isinstance(sweeper.n_trials, int) or sweeper.n_trials < 1:
        raise UserError(f"hydra.sweeper.n_trials={sweeper.n_trials!r} is not allowed: the number of trials, >= 1")
    if not isinstance(sweeper.n_jobs, int) or sweeper.n_jobs < 1:
        raise UserError(f"hydra.sweeper.n_jobs={sweeper.n_jobs!r} is not allowed: trials handed to the launcher at "
                        "once, >= 1")
    rate = sweeper.max_failure_rate
    if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise UserError(f"hydra.sweeper.max_failure_rate={rate!r} is not allowed: a fraction of a batch's trials, "
                        "in [0, 1]")
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    grid = str(OmegaConf.select(config, "hydra.sweeper.sampler._target_") or "").endswith("GridSampler")
    for o in overrides:
        if not o.is_sweep_override():
            continue
        if grid and o.is_interval_sweep():
            raise UserError(f"{o.input_line}: the grid sampler needs a list or a range of values, not an interval")
        try:
            with warnings.catch_warnings():  # Optuna's deprecation warnings for the distribution classes
                warnings.simplefilter("ignore")
                create_optuna_distribution_from_override(o)
        except Exception as e:
            raise UserError(f"{o.input_line} is not a search range Optuna accepts: {one_line(e)}") from None


def check_launcher(config: DictConfig) -> None:
    launcher = config.hydra.launcher
    if str(launcher.get("_target_", "")).endswith("JoblibLauncher") and launcher.get("n_jobs") == 0:
        raise UserError("hydra.launcher.n_jobs=0 is not allowed: the jobs run at once, >= 1 (or -1: one per CPU, "
                        "-2: all CPUs but one)")


# --- the whole check ----------------------------------------------------------------------------------------------

def check_sweep(config: DictConfig) -> List[Tuple[str, str]]:
    """Claim the sweep directory and check what the sweep will run (see the module docstring). Returns the
    combinations that cannot run, with their errors; raises a UserError to refuse the sweep (after removing what the
    claim created)."""
    from hydra.core.global_hydra import GlobalHydra

    sweep_dir = Path(str(config.hydra.sweep.dir))
    created = claim_sweep_dir(sweep_dir)
    try:
        check_launcher(config)
        loader = GlobalHydra.instance().config_loader()
        overrides = parse(sweep_arguments(config), loader)
        sweeper = str(config.hydra.sweeper.get("_target_", ""))
        if sweeper == BASIC_SWEEPER:
            return check_combinations(config, overrides, loader)
        if "optuna" in sweeper.lower():
            check_optuna(config, overrides)
        check_search(config, overrides, loader)
        return []
    except BaseException:
        release(sweep_dir, created)
        raise


def warn_impossible(bad: List[Tuple[str, str]]) -> None:
    """Name, before the first job starts, the combinations that will fail at their start."""
    if bad:
        log.warning("%d combination%s of this sweep cannot run and will fail at %s start (the others run): %s",
                    len(bad), "s" if len(bad) > 1 else "", "their" if len(bad) > 1 else "its", name_all(bad))


class CheckSweep(Callback):
    """Hydra callback: `check_sweep` when a sweep starts, before its first job. A refusal ends the command with one
    line and a non-zero status, whatever went wrong (Hydra would only warn about an exception here and go on)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        with exit_on_failure("the sweep could not be checked"):
            warn_impossible(check_sweep(config))
