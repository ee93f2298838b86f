"""An experiment tracker besides TensorBoard: MLflow, optional and offline (`tracker=mlflow`, docs/tracking.md).

A trainer callback that gives an MLflow run what TensorBoard gets as scalars (train/* every log_interval steps,
test/* and val/* every epoch, at the same steps), the run's settings as parameters (the config flattened to
`data.root`-style keys) and, when the run ends, metrics.json's numbers as its final metrics and its status. The
default store is MLflow's file store, a folder that needs no server and no network; any MLflow tracking URI works
(`sqlite:///...`, `http://...`).

MLflow is an extra (`pip install -e .[mlflow]`) and is imported only when tracker=mlflow. A failure of the store
in the middle of a run is a warning, not the end of the run: TensorBoard, the checkpoints and metrics.json hold
everything, and minutes of training are worth more than a second copy of their scalars.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from vae.common.atomic import atomic_write_text
from vae.settings.config import estimator_name
from vae.common.errors import UserError, describe
from vae.core.schedule import lr_moves
from vae.settings.usage import show

log = logging.getLogger("train")
TRACKERS = ("none", "mlflow")
INSTALL = "pip install -e '.[mlflow]' (or pip install mlflow-skinny)"
# In the run directory: a resume in place continues the same MLflow run. Only a run that has logged to TensorBoard
# holds it (the tracker starts after TensorBoardLog), so a new run's directory never does (check_new_run_dir).
RUN_ID_FILE = "mlflow_run_id"
BATCH = 100  # MLflow takes at most 100 parameters per log_batch call
MAX_PARAM = 6000  # and parameter values of at most 6000 characters


def check_tracker(tracker: DictConfig) -> None:
    """Before the run writes anything: the tracker it names (a known name: its rule in vae/settings/config.py) is
    installed."""
    if tracker.name == "mlflow" and importlib.util.find_spec("mlflow") is None:
        raise UserError(f"tracker=mlflow needs MLflow, which is not installed here: {INSTALL}; "
                        "or train without it (tracker=none)")


def tracking_uri(where: str) -> str:
    """A plain path (the file store) as MLflow's `file:` URI; a URI as it is."""
    if re.match(r"^[A-Za-z][\w+.-]*:", where) and not re.match(r"^[A-Za-z]:[\\/]", where):
        return where
    return Path(where).expanduser().absolute().as_uri()


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"data": {"root": x}} -> {"data.root": x}; values as typed on the command line."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + str(key)] = show(value)
    return out


class MlflowTracker:
    """A trainer callback (on_interval, on_epoch_end) logging to one MLflow run through MlflowClient (no global
    active run: sweeps and in-process tests keep their runs apart); a context manager that ends that run."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.uri = tracking_uri(cfg.tracker.tracking_uri)
        self.log_lr = lr_moves(cfg)  # a constant lr is the `lr` parameter itself
        if self.uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked; it is the store that
            # works with no server and no database, which is what an offline tracker needs.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline: no usage reports unless asked for
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        self.run_dir, self.failed, self.started = Path(run_dir), False, time.time()
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self._experiment(cfg.tracker.experiment)
            self.run_id = self._continued_run(experiment)
            if self.run_id is None:
                run = self.client.create_run(experiment, run_name="/".join(self.run_dir.parts[-2:]),
                                             tags={"run_dir": str(self.run_dir),
                                                   "estimator": estimator_name(cfg)})
                self.run_id = run.info.run_id
            self._log_params(cfg)
        except Exception as e:
            if getattr(self, "run_id", None) is not None:  # a run half set up: not left RUNNING forever
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, status="FAILED")
            raise UserError(f"tracker.tracking_uri={cfg.tracker.tracking_uri!r}: MLflow could not log there "
                            f"({describe(e, 160)}); choose another store, e.g. tracker.tracking_uri=<dir>, or train "
                            "without it (tracker=none)") from e
        atomic_write_text(self.run_dir / RUN_ID_FILE, f"{self.run_id}\n", "MLflow run id")
        log.info("MLflow: run %s in %s (experiment %r)", self.run_id, self.uri, cfg.tracker.experiment)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of the sweep created it a moment ago
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _continued_run(self, experiment: str) -> Optional[str]:
        """The MLflow run this run directory logged to before (a resume in place), if it is in this store."""
        try:
            run_id = (self.run_dir / RUN_ID_FILE).read_text().strip()
            run = self.client.get_run(run_id)
        except Exception:  # no file, or a run of another store
            return None
        if run.info.experiment_id != experiment:
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _log_params(self, cfg: DictConfig) -> None:
        params = flatten(OmegaConf.to_container(cfg, resolve=True))
        # MLflow parameters cannot change: a resume (epochs=20) keeps the first values and adds only new keys.
        logged = self.client.get_run(self.run_id).data.params
        changed = sorted(k for k in params if k in logged and logged[k] != params[k][:MAX_PARAM])
        if changed:
            log.info("MLflow keeps the parameters of the run's start; changed on resume: %s", ", ".join(changed))
        new = [self._param(k, v[:MAX_PARAM]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH])

    def _log(self, values: dict, step: int) -> None:
        if self.failed:
            return
        now = int(time.time() * 1000)
        try:
            self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step)
                                                        for k, v in values.items() if v is not None])
        except Exception as e:
            self.failed = True
            log.warning("MLflow logging failed (%s); the run goes on without it (TensorBoard and metrics.json have "
                        "every number)", describe(e, 160))

    def on_interval(self, trainer, means: List[float], grad_norm: Optional[float]) -> None:
        loss, bce, kl = means
        self._log({"train/loss": loss, "train/bce": bce, "train/kl": kl, "train/temperature": trainer.state.tau,
                   "train/grad_norm": grad_norm,
                   "train/lr": trainer.lr if self.log_lr else None},
                  trainer.state.step)

    def on_epoch_end(self, trainer, test: dict, is_best: bool, seconds: float) -> None:
        keys = ("loss", "bce", "kl", "elbo_discrete")
        values = {f"test/{k}": test[k] for k in keys}
        if "val" in test:  # the validation split's, which chooses best.pt
            values.update({f"val/{k}": test["val"][k] for k in keys})
        self._log(values, trainer.state.step)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """When the run ends, however it ends: metrics.json's numbers, if this run wrote it (a resume that trained
        nothing leaves it as it was), then the status: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
        metrics = self.run_dir / "metrics.json"
        try:
            if metrics.stat().st_mtime >= self.started:
                results = json.loads(metrics.read_text())
                self._log({k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                          int(results.get("step", 0)))
        except (OSError, ValueError):  # no metrics.json: the run stopped before its end
            pass
        status = ("FINISHED" if exc_type is None else
                  "KILLED" if issubclass(exc_type, (KeyboardInterrupt, SystemExit)) else "FAILED")
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("MLflow: could not mark run %s %s (%s)", self.run_id, status, describe(e, 160))


def trackers(cfg: DictConfig, run_dir: Path, held: contextlib.ExitStack) -> List[MlflowTracker]:
    """The run's tracker callbacks (the settings validated: check_tracker): none for tracker=none; for tracker=mlflow
    one, whose MLflow run ends when `held` closes, after metrics.json is written."""
    if cfg.tracker.name != "mlflow":
        return []
    return [held.enter_context(MlflowTracker(cfg, run_dir))]
