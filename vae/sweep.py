"""One table for a whole sweep: each job's overrides next to its final test metrics, best first, and the mean ± std over
seeds of each setting that was run with several seeds.

Jobs are ranked by a number comparable across estimators: the importance-weighted bound (`test_iw_bound`) when every
finished job has one, else the discrete negative ELBO (`test_elbo_discrete`). Never by `test_loss`: for `gumbel` it
is the relaxed loss, which depends on the temperature and is not comparable with the other estimators'
(docs/evaluation.md). Jobs that differ only in `seed` form a group, reported as mean ± sample standard deviation
(n = its finished jobs), in `summary.md` and `summary_groups.csv`.

`python train.py -m ...` ends with Hydra calling `SweepSummary.on_multirun_end` (registered in configs/config.yaml),
which prints the tables and writes `summary.csv` (one row per job), `summary_groups.csv` (one row per group of
seeds, when there are any) and `summary.md` into the sweep directory. It reads the
`metrics.json` that every job writes into its own directory rather than the jobs' return values, so it works the
same for every launcher (basic, joblib, submitit) and sweeper (Optuna), and for jobs that ran on other machines.

A job that fails writes its one-line error as `{"error": ...}` into its metrics.json (`SweepSummary.on_job_end`), and
the summary files are rewritten after every job: Hydra's basic sweeper ends a sweep with a failed job by raising its
error once all the jobs have run, and never calls `on_multirun_end` then. Jobs without a metrics.json (killed, or
still queued on a cluster) are listed as `missing`. For such a sweep, summarise again once its jobs are done:

    python -m vae.sweep outputs/multirun/<date>/<time>
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae.common.atomic import atomic_write_text
from vae.tools.stats import fmt_mean_std, mean_std

log = logging.getLogger(__name__)

METRICS = ("test_loss", "test_elbo_discrete", "test_iw_bound")  # test_iw_bound only when eval.iw_samples > 0
RUN_FACTS = ("epochs", "step", "tau")
# What ranks jobs, in order of preference: the first that every finished job has (see the module docstring).
RANK_METRICS = ("test_iw_bound", "test_elbo_discrete")
DESCRIBED = {"test_iw_bound": "the importance-weighted bound on -log p(x)",
             "test_elbo_discrete": "the discrete negative ELBO"}
SEED = "seed"
GROUPS_CSV = "summary_groups.csv"


@dataclass
class Job:
    num: Optional[int]
    dir: Path
    overrides: List[str]
    metrics: Optional[dict]  # None: the job wrote no metrics.json
    params: Dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.metrics is None:
            return "missing"
        return "failed" if "error" in self.metrics else "stopped" if "stopped" in self.metrics else "done"

    @property
    def error(self) -> str:
        return str((self.metrics or {}).get("error") or "")

    @property
    def loss(self) -> float:
        return self.value("test_loss")

    def value(self, metric: str) -> float:
        """The metric, or inf when the job has no finite value of it (failed, missing, diverged)."""
        value = (self.metrics or {}).get(metric)
        return float(value) if _finite(value) else math.inf


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _split(override: str) -> tuple:
    """`lr=0.001` -> ("lr", "0.001"); `+x=1` keeps its `+`; a deletion `~x` has no value."""
    key, sep, value = override.partition("=")
    return key, value if sep else ""


def _job_number(job_dir: Path, sweep_dir: Path) -> Optional[int]:
    # Hydra's own record first; the `<num>_...` directory name (our hydra.sweep.subdir) as a fallback.
    try:
        num = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.num
        if isinstance(num, int):
            return num
    except Exception:
        pass
    m = re.match(r"(\d+)(_|$)", job_dir.relative_to(sweep_dir).parts[0])
    return int(m.group(1)) if m else None


def _read_metrics(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut short by a killed job: not a result
    return data if isinstance(data, dict) else None


def find_jobs(sweep_dir) -> List[Job]:
    """Every job directory under `sweep_dir` (one with `.hydra/overrides.yaml`), with its metrics if it finished.

    The search is recursive: an override value holding a `/` (e.g. `data.root=/scratch/data`) puts a job's
    directory several levels down, since `hydra.sweep.subdir` contains the overrides.
    """
    sweep_dir = Path(sweep_dir)
    jobs = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        if job_dir == sweep_dir:
            continue
        metrics = _read_metrics(job_dir / "metrics.json")
        if metrics is not None and isinstance(metrics.get("overrides"), list):
            overrides = [str(o) for o in metrics["overrides"]]
        else:
            try:
                overrides = [str(o) for o in (OmegaConf.load(overrides_file) or [])]
            except Exception:
                overrides = []
        jobs.append(Job(_job_number(job_dir, sweep_dir), job_dir, overrides, metrics,
                        params=dict(_split(o) for o in overrides)))
    return jobs


def varying_keys(jobs: List[Job]) -> List[str]:
    """Override keys whose value differs between jobs (or that some jobs lack), in first-seen order."""
    keys: List[str] = []
    for job in jobs:
        keys += [k for k in job.params if k not in keys]
    return [k for k in keys if len({job.params.get(k) for job in jobs}) > 1]


def common_overrides(jobs: List[Job]) -> List[str]:
    vary = set(varying_keys(jobs))
    return [o for o in (jobs[0].overrides if jobs else []) if _split(o)[0] not in vary]


def rank_metric(jobs: List[Job]) -> str:
    """test_iw_bound if every finished job has one, else test_elbo_discrete."""
    done = [j for j in jobs if j.status == "done"]
    for metric in RANK_METRICS[:-1]:
        if done and all(metric in j.metrics for j in done):
            return metric
    return RANK_METRICS[-1]


def ranked(jobs: List[Job], metric: Optional[str] = None) -> List[Job]:
    """Best (lowest `metric`, by default rank_metric's) first; failed or diverged jobs last, in job order."""
    metric = metric or rank_metric(jobs)
    return sorted(jobs, key=lambda j: (j.value(metric), j.num if j.num is not None else math.inf, str(j.dir)))


@dataclass
class Group:
    """The jobs of a sweep that differ only in `seed`."""

    params: Dict[str, Optional[str]]  # the other varying keys' values
    jobs: List[Job]

    def values(self, metric: str) -> List[float]:
        return [j.value(metric) for j in self.jobs if j.status == "done" and math.isfinite(j.value(metric))]

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return mean_std(values)[0] if values else math.inf

    @property
    def seeds(self) -> List[str]:
        return [str(j.params.get(SEED)) for j in self.jobs]


def seed_groups(jobs: List[Job]) -> List[Group]:
    """The jobs grouped by every varying key but `seed`; empty unless `seed` varies and some group has several."""
    vary = varying_keys(jobs)
    if SEED not in vary:
        return []
    others = [k for k in vary if k != SEED]
    groups: Dict[tuple, Group] = {}
    for job in jobs:
        key = tuple(job.params.get(k) for k in others)
        groups.setdefault(key, Group(dict(zip(others, key)), [])).jobs.append(job)
    if all(len(g.jobs) == 1 for g in groups.values()):
        return []  # the seed changed with the other settings (e.g. an Optuna search over it): nothing to average
    return list(groups.values())


def ranked_groups(groups: List[Group], metric: str) -> List[Group]:
    return sorted(groups, key=lambda g: g.mean(metric))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else str(value)
    return str(value)


def _fmt_param(value: Optional[str]) -> str:
    """An override value for reading: Optuna's `lr=0.0012520653814999472` as 0.001252 (the CSV keeps it whole)."""
    if value is None:
        return ""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if re.fullmatch(r"[+-]?\d+", value) or not math.isfinite(number) else f"{number:.4g}"


def _columns(jobs: List[Job]) -> List[str]:
    metrics = [m for m in METRICS if any(m in (j.metrics or {}) for j in jobs)]
    return ["job", "status", *varying_keys(jobs), *metrics, *RUN_FACTS]


def _row(job: Job, columns: List[str]) -> Dict[str, Any]:
    row = {"job": job.num, "status": job.status}
    for col in columns[2:]:
        row[col] = (job.metrics or {}).get(col) if col in METRICS or col in RUN_FACTS else job.params.get(col)
    return row


def write_csv(jobs: List[Job], path: Path, sweep_dir: Path) -> None:
    columns = _columns(jobs)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*columns, "error", "overrides", "dir"])
    for job in ranked(jobs):
        row = _row(job, columns)
        writer.writerow([*("" if row[c] is None else row[c] for c in columns), job.error,
                         " ".join(job.overrides), str(job.dir.relative_to(sweep_dir))])
    atomic_write_text(path, text.getvalue())


def markdown(columns: List[str], rows: List[List[str]], numeric: List[bool]) -> str:
    """A Markdown table that reads as plain text too: columns padded, numbers right-aligned."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def line(cells):
        return "| " + " | ".join(s.rjust(w) if n else s.ljust(w) for s, w, n in zip(cells, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric)) + "|"
    return "\n".join([line(columns), rule, *(line(r) for r in rows)])


def table(jobs: List[Job], metric: Optional[str] = None) -> str:
    """One row per job, best first."""
    columns = _columns(jobs)
    params = set(varying_keys(jobs))
    rows = [[(_fmt_param if c in params else _fmt)(_row(j, columns)[c]) for c in columns]
            for j in ranked(jobs, metric)]
    return markdown(columns, rows, [c in METRICS or c in RUN_FACTS or c == "job" for c in columns])


def _group_metrics(jobs: List[Job], metric: str) -> List[str]:
    """The ranking metric first, then the other metrics some job has."""
    present = [m for m in METRICS if any(m in (j.metrics or {}) for j in jobs)]
    return [metric, *(m for m in present if m != metric)]


def group_table(groups: List[Group], jobs: List[Job], metric: str) -> str:
    """One row per group of seeds, best mean first: mean ± std (n) of each metric."""
    keys = list(groups[0].params)
    metrics = _group_metrics(jobs, metric)
    columns = [*keys, "jobs", *metrics, SEED + "s"]
    rows = [[*(_fmt_param(g.params[k]) for k in keys), str(len(g.jobs)),
             *(fmt_mean_std(g.values(m)) if g.values(m) else "" for m in metrics), ",".join(g.seeds)]
            for g in ranked_groups(groups, metric)]
    return markdown(columns, rows, [False] * len(keys) + [True] * (1 + len(metrics)) + [False])


def write_groups_csv(groups: List[Group], jobs: List[Job], path: Path) -> None:
    metrics = _group_metrics(jobs, rank_metric(jobs))
    keys = list(groups[0].params)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow([*keys, "jobs", *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")), "seeds"])
    for g in ranked_groups(groups, metrics[0]):
        stats = []
        for m in metrics:
            values = g.values(m)
            stats += [*mean_std(values), len(values)] if values else ["", "", 0]
        writer.writerow([*("" if g.params[k] is None else g.params[k] for k in keys), len(g.jobs), *stats,
                         " ".join(g.seeds)])
    atomic_write_text(path, text.getvalue())


def _settings(params: Dict[str, Optional[str]], keys: List[str]) -> str:
    return " ".join(f"{k}={_fmt_param(params.get(k))}" for k in keys) or "no overrides"


def summarize(sweep_dir, echo: bool = True) -> List[Job]:
    """Write `summary.csv`, `summary.md` (and `summary_groups.csv` when seeds can be grouped) into `sweep_dir`;
    print the tables when `echo`. Returns the jobs."""
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    if not jobs:
        return jobs
    metric = rank_metric(jobs)
    vary = varying_keys(jobs)
    groups = seed_groups(jobs)
    lines = [f"# Sweep {sweep_dir}", "",
             f"Best first by {metric} ({DESCRIBED[metric]}, nats/image), which compares across estimators "
             "(test_loss does not: for gumbel it is the relaxed loss).", ""]
    if groups:
        lines += ["## Over seeds", "", "Mean ± sample standard deviation over the seeds (n = finished jobs).", "",
                  group_table(groups, jobs, metric), ""]
        best_group = ranked_groups(groups, metric)[0]
        if math.isfinite(best_group.mean(metric)):
            lines += [f"Best over seeds: `{_settings(best_group.params, list(best_group.params))}`, {metric} "
                      f"{fmt_mean_std(best_group.values(metric))}", ""]
        lines += ["## Jobs", ""]
    lines += [table(jobs, metric), ""]
    common = common_overrides(jobs)
    if common:
        lines.append(f"Same in every job: `{' '.join(common)}`")
    done = [j for j in jobs if j.metrics is not None]
    best = ranked(jobs, metric)[0]
    if best.status == "done" and math.isfinite(best.value(metric)):
        lines.append(f"Best: job {best.num} (`{_settings(best.params, vary)}`), {metric} {best.value(metric):.3f} "
                     f"nats/image, in {best.dir.relative_to(sweep_dir)}")
    for job in (j for j in ranked(jobs, metric) if j.status == "failed"):
        lines.append(f"Job {job.num} (`{' '.join(f'{k}={job.params.get(k)}' for k in vary) or 'no overrides'}`) "
                     f"failed: {job.error}")
    if len(done) < len(jobs):
        lines.append(f"{len(jobs) - len(done)} of {len(jobs)} jobs have no metrics.json (killed or not "
                     f"finished yet): run `python -m vae.sweep {sweep_dir}` again once they are done.")
    lines.append(f"Compare the runs: tensorboard --logdir {sweep_dir}")
    text = "\n".join(lines) + "\n"
    write_csv(jobs, sweep_dir / "summary.csv", sweep_dir)
    written = "summary.md"
    if groups:
        write_groups_csv(groups, jobs, sweep_dir / GROUPS_CSV)
        written = f"{GROUPS_CSV} and {written}"
    else:
        with contextlib.suppress(FileNotFoundError):  # a summary of an earlier state of this sweep
            (sweep_dir / GROUPS_CSV).unlink()
    atomic_write_text(sweep_dir / "summary.md", text)
    if echo:
        print("\n" + text + f"Written: {sweep_dir / 'summary.csv'}, {written}", flush=True)
    return jobs


def record_failure(job_dir: Path, error: BaseException, overrides: List[str]) -> None:
    """Write a failed job's one-line error into its metrics.json (never over a finished job's results)."""
    from vae.common.errors import JobFailed, describe

    path = Path(job_dir) / "metrics.json"
    previous = _read_metrics(path)
    if previous is not None and "error" not in previous:
        return
    message = str(error.__cause__) if isinstance(error, JobFailed) and error.__cause__ else describe(error, 500)
    atomic_write_text(path, json.dumps({"error": message, "overrides": overrides}, indent=2) + "\n")


class SweepSummary(Callback):
    """Hydra callback: record each failed job's error, rewrite the summary after every job, and print it once all
    the jobs have returned (see the module docstring)."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            if job_return.status == JobStatus.FAILED:
                # (`job_return.return_value` would raise the error; the sweeper does that itself, later)
                record_failure(Path(config.hydra.runtime.output_dir), job_return._return_value,
                               [str(o) for o in config.hydra.overrides.task])
            summarize(sweep_dir, echo=False)
        except Exception as e:  # a summary problem must not turn into the job's failure
            log.warning("sweep summary failed (%s: %s); retry with: python -m vae.sweep %s",
                        type(e).__name__, e, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            if not summarize(sweep_dir):
                log.warning("sweep summary: no job directories under %s", sweep_dir)
        except Exception as e:  # the jobs' results are on disk already: a summary problem must not hide them
            log.warning("sweep summary failed (%s: %s); retry with: python -m vae.sweep %s",
                        type(e).__name__, e, sweep_dir)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vae.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep directory, e.g. outputs/multirun/<date>/<time>")
    parser.add_argument("-q", "--quiet", action="store_true", help="write the files without printing the table")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a directory; pass a sweep directory, e.g. "
              f"outputs/multirun/<date>/<time>", file=sys.stderr)
        return 2
    if not summarize(args.sweep_dir, echo=not args.quiet):
        print(f"error: no job directories (with .hydra/overrides.yaml) under {args.sweep_dir}; is it the "
              f"directory of a `python train.py -m ...` sweep?", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
