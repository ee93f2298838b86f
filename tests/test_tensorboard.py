"""vae/training/tensorboard.py: the HParams tab holds every setting that can tell two runs apart, and shows the ones people
compare first.

Also: vae/training/tensorboard.py: the event file is written wherever the run directory is, whatever its name and the locale."""
from __future__ import annotations

import subprocess
import sys


import pytest
from omegaconf import OmegaConf

from support import compose_train
from vae.training.tensorboard import NOT_HPARAMS, SHOWN_HPARAMS, log_hparams
from support import REPO, subprocess_env, tiny_overrides


def task_config(*overrides):
    cfg = compose_train(*overrides)
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def written_hparams(tmp_path, *overrides):
    """(the Experiment, {name: value} of the run) as log_hparams writes them into the run's event file."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    log_hparams(writer, task_config(*overrides), {"test/loss": 100.0, "test/elbo_discrete": 101.0})
    writer.close()
    experiment, values = None, None
    for path in tmp_path.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    if data.HasField("experiment"):
                        experiment = data.experiment
                    if data.HasField("session_start_info"):
                        values = {k: getattr(x, x.WhichOneof("kind")) for k, x in
                                  data.session_start_info.hparams.items()}
    return experiment, values


def leaves(cfg, prefix=""):
    out = []
    for k, v in cfg.items():
        out += leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def test_every_setting_that_can_change_results_is_a_column(tmp_path):
    experiment, values = written_hparams(tmp_path, "estimator=rloo", "estimator_samples=4", "baseline_decay=0.8",
                                         "optimizer=radam", "threads=1", "log_interval=7")
    names = {info.name for info in experiment.hparam_infos}
    settings = set(leaves(OmegaConf.to_container(task_config(), resolve=True)))
    assert names == settings - set(NOT_HPARAMS) == set(values)
    for name in ("estimator_samples", "baseline_decay", "optimizer.name", "optimizer.betas", "data.name",
                 "model.name", "lr", "seed", "temperature", "eval.iw_samples"):
        assert name in names
    assert not names & {"threads", "log_interval", "device", "compile", "data.root", "resume"}
    assert values["estimator_samples"] == 4 and values["baseline_decay"] == 0.8 and values["optimizer.name"] == "radam"
    assert {m.name.tag for m in experiment.metric_infos} == {"test/loss", "test/elbo_discrete"}


@pytest.mark.parametrize("overrides, estimator, samples", [
    (("estimator=rloo", "estimator_samples=8"), "rloo", 8),
    (("estimator=rloo",), "rloo", 2),             # null: the estimator's own default, as the run used it
    (("estimator=gumbel_rao",), "gumbel_rao", 10),
    (("hard=true",), "st_gumbel", 1),              # hard=true trains st_gumbel
])
def test_the_estimator_and_its_samples_are_those_the_run_used(tmp_path, overrides, estimator, samples):
    _, values = written_hparams(tmp_path, *overrides)
    assert (values["estimator"], values["estimator_samples"]) == (estimator, samples)


def test_estimator_seed_lr_and_temperature_are_shown_before_any_column_is_ticked(tmp_path):
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

    experiment, _ = written_hparams(tmp_path)
    _sort_and_reduce_to_hparams_limit(experiment)  # TensorBoard's order: `differs` first, then by name ...
    shown = [i.name for i in sorted(experiment.hparam_infos, key=lambda i: not i.differs)][:5]  # ... then 5 shown
    assert set(shown) == set(SHOWN_HPARAMS) >= {"estimator", "seed", "lr", "temperature"}


def test_settings_out_of_the_hparams_tab_are_out_of_run_names_too():
    from hydra import compose, initialize_config_dir

    from vae.settings.config import CONFIG_DIR

    exclude = OmegaConf.load(REPO / "configs" / "config.yaml").hydra.job.config.override_dirname.exclude_keys
    assert set(exclude) - {"hydra.run.dir", "hydra.sweep.dir"} == set(NOT_HPARAMS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        run_dir = compose("config", overrides=["threads=1", "log_interval=5", "compile=false", "temperature=2.0"],
                          return_hydra_config=True).hydra.run.dir
    assert run_dir.endswith("_temperature=2.0"), run_dir


def test_a_non_ascii_run_directory_under_the_c_locale(tiny_data, tmp_path):
    """LC_ALL=C without UTF-8 mode: Python decodes the name into surrogates, which TensorBoard's UTF-8 calls refuse
    and the locale's ASCII refuses in the other direction."""
    from test_train import events

    run_dir = tmp_path / "résumé"
    overrides = tiny_overrides(tiny_data, run_dir)
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir")] + [f"hydra.run.dir='{run_dir}'"]
    env = subprocess_env(LC_ALL="C", PYTHONUTF8="0")
    env.pop("LANG", None), env.pop("LC_CTYPE", None)
    proc = subprocess.run([sys.executable, "train.py", *overrides], cwd=REPO, env=env, capture_output=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr + proc.stdout and b"Logging error" not in proc.stderr + proc.stdout
    assert events(run_dir).Scalars("test/loss")
    assert f"run directory {run_dir}" in (run_dir / "train.log").read_text(encoding="utf-8")
