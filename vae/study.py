"""A study: one grid of runs (estimators x seeds x shapes over a preset) that can be built over several sittings.

    python -m vae.study preset=reinmax "shapes=[10x30]" "estimators=[reinmax,st_gumbel,gumbel_rao]" \
        "seeds=[0,1,2]" dir=studies/reinmax threads=1
    python -m vae.study ... action=aggregate      # only the tables, from whatever cells are finished
    python -m vae.study ... action=list           # each cell's state and the command that (re)starts it

Each cell has one stable run directory, `<dir>/<preset>[-<shape>]/<estimator>/seed<k>`. Run again, the study
skips finished cells (their metrics.json reports every epoch), resumes unfinished ones from their
`checkpoints/last.pt` (train.py resumes bit-exactly) and starts the rest: kill it at any moment, start it again,
and the grid finishes without retraining anything. Every cell's settings are composed and checked before the
first one starts. Each cell is its own `python train.py` process; `action=list` prints those commands, so the
same grid can be spread over machines or a cluster's job array (the cell directories are the only shared state).

At the end (and with `action=aggregate`) it writes `<dir>/results.json`, `<dir>/results.md` (per protocol: mean,
standard deviation and n over seeds, the published number beside it) and `<dir>/<protocol>.png` (test curves,
mean over seeds with a band of +-1 standard deviation).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from vae.common.atomic import atomic_write, atomic_write_text
from vae.settings.config import CONFIG_DIR, REPO_DIR, validate_ranges
from vae.common.errors import UserError, entry_point
from vae.settings.rules import THREADS, check_schema, integer, one_of, setting
from vae.tools.stats import mean_std, published_for

log = logging.getLogger("study")
ACTIONS = ("run", "aggregate", "list")
CURVE_TAGS = ("test/elbo_discrete", "test/loss")


@dataclass
class StudyConfig:
    preset: str = "reinmax"           # a preset of configs/experiment/ (`experiment=` of train.py)
    shapes: List[str] = field(default_factory=list)  # configs/shape/ names (experiment=reinmax); [] = the preset's
    estimators: List[str] = field(default_factory=lambda: ["reinmax"])
    seeds: List[int] = field(default_factory=lambda: [0])
    extra: List[str] = field(default_factory=list)  # more train.py overrides for every cell, e.g. ["epochs=20"]
    dir: str = "${repo_dir:}/outputs/studies/${preset}"
    threads: Optional[int] = setting(1, THREADS)  # per cell: one thread per run is the fastest use of a small CPU
    jobs: int = setting(1, integer(1, note="cells trained at once"))  # cells trained at once on this machine
    action: str = setting("run", one_of(ACTIONS))  # run | aggregate | list


ConfigStore.instance().store(name="study_schema", node=StudyConfig)


@dataclass
class Cell:
    experiment: str
    shape: Optional[str]
    estimator: str
    seed: int
    dir: Path
    overrides: List[str]
    epochs: int = 0

    @property
    def protocol(self) -> str:
        return f"{self.experiment}-{self.shape}" if self.shape else self.experiment

    @property
    def metrics(self) -> Optional[dict]:
        try:
            data = json.loads((self.dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def state(self) -> str:
        """done (every epoch trained and reported), partial (a checkpoint to resume), failed, or new."""
        m = self.metrics
        if m is not None and m.get("epochs") == self.epochs and "stopped" not in m and "error" not in m:
            return "done"
        if (self.dir / "checkpoints" / "last.pt").is_file():
            return "partial"
        return "failed" if m is not None and "error" in m else "new"

    def command(self) -> List[str]:
        cmd = [sys.executable, str(REPO_DIR / "train.py"), *self.overrides, f"hydra.run.dir={self.dir}"]
        if self.state == "partial":
            cmd.append(f"resume={self.dir / 'checkpoints' / 'last.pt'}")
        return cmd


def make_cells(cfg: DictConfig) -> List[Cell]:
    """Every cell of the grid, its settings composed exactly as train.py will compose them and checked."""
    import contextlib

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    known = {p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")}
    if cfg.preset not in known:
        raise UserError(f"preset={cfg.preset!r} is not a preset: one of {', '.join(sorted(known))}")
    shapes = list(cfg.shapes) or [None]
    known_shapes = {p.stem for p in (CONFIG_DIR / "shape").glob("*.yaml")}
    bad = [s for s in shapes if s is not None and s not in known_shapes]
    if bad:
        raise UserError(f"shapes={bad} are not shapes: choose from {', '.join(sorted(known_shapes))}")
    if not cfg.estimators or not cfg.seeds:
        raise UserError("estimators= and seeds= must each name at least one value, e.g. seeds=[0,1,2]")
    threads = [] if cfg.threads is None else [f"threads={cfg.threads}"]
    cells = []
    # Inside `python -m vae.study` Hydra already searches configs/; called from Python, it is set up here.
    with contextlib.nullcontext() if GlobalHydra.instance().is_initialized() else \
            initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        # Seed-major order: a grid cut short still has every estimator at the first seeds.
        for shape in shapes:
            for seed in cfg.seeds:
                for estimator in cfg.estimators:
                    overrides = [f"experiment={cfg.preset}", *([f"shape={shape}"] if shape else []),
                                 f"estimator={estimator}", f"seed={seed}", *threads, *cfg.extra]
                    try:
                        run_cfg = compose("config", overrides=overrides)
                    except Exception as e:  # an unknown key or a bad value in `extra`
                        raise UserError(f"study cell {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
                    try:
                        validate_ranges(run_cfg)
                    except UserError as e:
                        raise UserError(f"study cell {' '.join(overrides)}: {e}") from None
                    cell_dir = Path(cfg.dir) / (f"{cfg.preset}-{shape}" if shape else cfg.preset) / \
                        estimator / f"seed{seed}"
                    cells.append(Cell(cfg.preset, shape, estimator, int(seed), cell_dir, overrides,
                                      epochs=int(run_cfg.epochs)))
    return cells


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
    """A cell's train.py gets SIGTERM (it saves and exits) if the study runner dies, even by kill -9."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_cells(cells: List[Cell], jobs: int) -> Dict[str, int]:
    """Train every unfinished cell, `jobs` at a time; returns {cell dir: exit status} of those that failed."""
    todo = [c for c in cells if c.state != "done"]
    log.info("%d cells: %d done, %d to resume, %d to start", len(cells), len(cells) - len(todo),
             sum(c.state == "partial" for c in todo), sum(c.state != "partial" for c in todo))
    failed: Dict[str, int] = {}
    running: Dict[subprocess.Popen, Cell] = {}
    stopping = []

    def stop(signum, frame):  # pass Ctrl-C / SIGTERM on: each cell saves its checkpoint and exits
        stopping.append(signum)
        for p in running:
            p.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while (todo and not stopping) or running:
            while todo and len(running) < jobs and not stopping:
                cell = todo.pop(0)
                cell.dir.mkdir(parents=True, exist_ok=True)
                cmd = cell.command()
                log.info("%s %s/%s seed %d: %s", "resume" if "resume=" in cmd[-1] else "start", cell.protocol,
                         cell.estimator, cell.seed, shlex.join(cmd[1:]))
                with open(cell.dir / "console.log", "ab") as out:
                    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                    if cell.overrides and any(o.startswith("threads=") for o in cell.overrides):
                        env["OMP_NUM_THREADS"] = next(o for o in cell.overrides if o.startswith("threads="))[8:]
                    running[subprocess.Popen(cmd, cwd=REPO_DIR, stdout=out, stderr=subprocess.STDOUT, env=env,
                                             preexec_fn=_die_with_parent)] = cell
            for p in list(running):
                try:
                    rc = p.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    continue
                cell = running.pop(p)
                if rc == 0 and cell.state == "done":
                    m = cell.metrics or {}
                    log.info("done %s/%s seed %d: test -ELBO %.2f", cell.protocol, cell.estimator, cell.seed,
                             m.get("test_elbo_discrete", math.nan))
                elif not stopping:
                    failed[str(cell.dir)] = rc
                    log.error("failed %s/%s seed %d (exit %d): see %s", cell.protocol, cell.estimator, cell.seed,
                              rc, cell.dir / "console.log")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stopping:
        raise SystemExit(128 + stopping[0])
    return failed


# -- aggregation -------------------------------------------------------------------------------------------------

def read_curves(run_dir: Path) -> Dict[str, List[float]]:
    """Per-epoch test curves from a run's TensorBoard events (one value per epoch, the last written wins: a resumed
    run may have logged an epoch twice before its purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # "No path found after ..." for every finished file
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 1, "histograms": 1,
                                                       "tensors": 1})
    ea.Reload()
    curves = {}
    for tag in CURVE_TAGS:
        if tag in ea.Tags()["scalars"]:
            by_step = {e.step: e.value for e in ea.Scalars(tag)}
            curves[tag] = [by_step[s] for s in sorted(by_step)]
    return curves


def aggregate(cells: List[Cell], out_dir: Path) -> dict:
    """results.json, results.md and one figure per protocol from the finished cells."""
    rows = []
    for protocol in dict.fromkeys(c.protocol for c in cells):
        for estimator in dict.fromkeys(c.estimator for c in cells if c.protocol == protocol):
            group = [c for c in cells if c.protocol == protocol and c.estimator == estimator]
            done = [c for c in group if c.state == "done"]
            metrics = [c.metrics for c in done]
            row = {"protocol": protocol, "estimator": estimator, "n": len(done), "planned": len(group),
                   "epochs": group[0].epochs, "seeds": [c.seed for c in done]}
            for key in ("test_elbo_discrete", "test_iw_bound", "test_loss"):
                values = [m[key] for m in metrics if isinstance(m.get(key), (int, float))]
                if values:
                    mean, std = mean_std(values)
                    row[key] = {"mean": mean, "std": std, "n": len(values),
                                "values": values}
            row["published"] = published_for(group[0].experiment, group[0].shape, estimator)
            row["curves"] = {str(c.seed): read_curves(c.dir) for c in done}
            rows.append(row)
    result = {"rows": rows, "cells": [{"dir": str(c.dir), "state": c.state, "overrides": c.overrides}
                                      for c in cells]}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=1) + "\n", "results")
    atomic_write_text(out_dir / "results.md", tables(rows) + "\n", "results")
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        draw_bands([r for r in rows if r["protocol"] == protocol], out_dir / f"{protocol}.png", protocol)
    return result


def _pm(stat: Optional[dict]) -> str:
    if not stat:
        return "–"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if stat["n"] > 1 else f"{stat['mean']:.2f}"


def tables(rows: List[dict]) -> str:
    """One Markdown table per protocol, best mean first (by the IW bound where every row has one, else by the
    discrete -ELBO: both are bounds comparable across estimators; the relaxed loss is not)."""
    lines = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        group = [r for r in rows if r["protocol"] == protocol]
        key = "test_iw_bound" if all("test_iw_bound" in r for r in group) else "test_elbo_discrete"
        group.sort(key=lambda r: r.get(key, {}).get("mean", math.inf))
        label = "IW bound (k from the preset)" if key == "test_iw_bound" else "test discrete −ELBO"
        lines += [f"### {protocol}, {group[0]['epochs']} epochs", "",
                  f"| estimator | {label}: mean ± std | n | published | source |", "| --- | ---: | ---: | ---: | --- |"]
        for r in group:
            pub = r.get("published") or {}
            n = f"{r['n']}" if r["n"] == r["planned"] else f"{r['n']} of {r['planned']}"
            lines.append(f"| `{r['estimator']}` | {_pm(r.get(key))} | {n} | "
                         f"{pub.get('value', '–')} | {pub.get('source', '')} |")
        lines.append("")
    return "\n".join(lines).rstrip()


COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf",
           "#bcbd22")


def draw_bands(rows: List[dict], path: Path, title: str, tag: str = "test/elbo_discrete") -> None:
    """Mean test curve over seeds per estimator, with a +-1 std band (PIL: torchvision already brings it)."""
    from PIL import Image, ImageDraw

    series = {}
    for r in rows:
        curves = [c[tag] for c in r["curves"].values() if c.get(tag)]
        if curves:
            n = min(len(c) for c in curves)
            stats = [mean_std([c[i] for c in curves]) for i in range(n)]
            series[r["estimator"]] = stats
    if not series:
        return
    w, h, left, right, top, bottom = 900, 560, 70, 170, 40, 50
    finals = [m for s in series.values() for m, _ in s[len(s) // 10:]]
    lo, hi = min(finals) - 1, min(max(finals), min(finals) + 40)  # the first epochs would flatten the rest
    n = max(len(s) for s in series.values())
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image, "RGBA")

    def xy(i, v):
        y = top + (h - top - bottom) * (1 - (min(max(v, lo), hi) - lo) / (hi - lo or 1))
        return left + (w - left - right) * i / max(n - 1, 1), y

    for k in range(6):
        v = lo + (hi - lo) * k / 5
        _, y = xy(0, v)
        d.line([left, y, w - right, y], fill=(220, 220, 220))
        d.text((5, y - 6), f"{v:.1f}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    d.text((left, h - bottom + 15), f"epoch 1 .. {n}", fill="black")
    d.text((left, 12), f"{title}: {tag}, mean over seeds +- 1 std (nats, lower is better)", fill="black")
    for k, (est, stats) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        band = [xy(i, m + s) for i, (m, s) in enumerate(stats)] + \
            [xy(i, m - s) for i, (m, s) in reversed(list(enumerate(stats)))]
        if len(band) > 2:
            d.polygon(band, fill=(*rgb, 60))
        d.line([xy(i, m) for i, (m, _) in enumerate(stats)], fill=colour, width=2)
        y = top + 18 * k
        d.line([w - right + 10, y + 6, w - right + 30, y + 6], fill=colour, width=3)
        d.text((w - right + 35, y), est, fill="black")
    atomic_write(path, lambda f: image.save(f, format="png"), "figure")


@hydra.main(version_base="1.3", config_path="../configs", config_name="study")
@entry_point
def main(cfg: DictConfig) -> int:
    check_schema(cfg, StudyConfig)
    cells = make_cells(cfg)
    out = Path(cfg.dir)
    if cfg.action == "list":
        for c in cells:
            print(f"{c.state:8s} {shlex.join(c.command()[1:])}")
        return 0
    failed = run_cells(cells, cfg.jobs) if cfg.action == "run" else {}
    aggregate(cells, out)
    print(tables(aggregate_rows(out)))
    log.info("wrote %s, %s and the figures", out / "results.json", out / "results.md")
    if failed:
        raise UserError(f"{len(failed)} cell(s) failed: {', '.join(failed)} (each one's console.log says why); "
                        "run the study again to retry them")
    return 0


def aggregate_rows(out_dir: Path) -> List[dict]:
    return json.loads((Path(out_dir) / "results.json").read_text())["rows"]


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
