"""vae/training/tensorboard.py: the HParams tab holds every setting that can tell two runs apart, and shows the ones people
compare first.

Also: vae/training/tensorboard.py: the event file is written wherever the run directory is, whatever its name and the locale.
A full disk is one line; after kill -9 and a resume each step is shown once (purge_step)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from support import compose_train
from vae.training.tensorboard import NOT_HPARAMS, SHOWN_HPARAMS, log_hparams
from support import REPO, limit_file_size, subprocess_env, tiny_overrides, train_in_process
from idx import make_tiny_dataset
from tb_events import steps_on_disk
from test_train import events


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


TENSORBOARD_ON_A_FULL_DISK = r"""
import sys, torch
from types import SimpleNamespace
from vae.common.errors import UserError
from vae.core.model import CategoricalVAE
from vae.training.tensorboard import TensorBoardLog
trainer = SimpleNamespace(state=SimpleNamespace(step=0, tau=1.0), model=CategoricalVAE(3, 4))
test = {"loss": 1.0, "bce": 1.0, "kl": 0.0, "elbo_discrete": 1.0}
try:
    with TensorBoardLog(sys.argv[1], None, torch.rand(8, 784), torch.zeros(64, 3, 4)) as tb:
        for step in range(1, 4):  # three epochs' scalars and image grids: more than the 20 KB the file may hold
            trainer.state.step = step
            tb.on_interval(trainer, [1.0, 1.0, 0.0], None)
            tb.on_epoch_end(trainer, test, True, 1.0)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_full_disk_under_tensorboard_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", TENSORBOARD_ON_A_FULL_DISK, str(tmp_path)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size(20_000))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write TensorBoard events" in lines[0] and "File too large" in lines[0], \
        proc.stderr  # and no "Exception in thread" from TensorBoard's writer thread


# --- kill -9 through train.py: a run killed after it logged past its last checkpoint resumes as if never killed ------
#
# The run is killed (SIGKILL: no handler, no flush, no cleanup) once its event file holds train scalars of steps
# after the epoch-1 checkpoint. Those steps are then logged twice on disk, by the killed run and by the resumed one;
# TensorBoard must show each once (the resumed writer's purge_step), a temporary file left in checkpoints/ must go,
# and the weights must be bitwise those of a run never interrupted.

STEPS_PER_EPOCH = 100  # 400 images, batch 4
SETTINGS = ("epochs=2", "batch_size=4", "log_interval=5", "latent_dim=8", "anneal_interval=7", "anneal_rate=1e-3")


def shown(run_dir, tag):
    """(step, value) of the scalars TensorBoard shows for `tag`."""
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


def test_kill_9_after_logging_past_the_checkpoint_then_resume(tmp_path):
    data = tmp_path / "data"
    make_tiny_dataset(data, n_train=4 * STEPS_PER_EPOCH, n_test=40, seed=2)
    killed = tmp_path / "killed"
    args = ["debug=tiny", f"data.root={data}", f"hydra.run.dir={killed}", *SETTINGS]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        # 2 train/* intervals into epoch 2: past the epoch-1 checkpoint, 90 steps before epoch 2's (step 200)
        while time.time() < deadline and proc.poll() is None:
            if max(steps_on_disk(killed), default=0) >= STEPS_PER_EPOCH + 10:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"train.py ended before it could be killed:\n{proc.stderr.read()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    last = killed / "checkpoints" / "last.pt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (STEPS_PER_EPOCH, 1, 0)
    logged_by_killed = sorted(set(steps_on_disk(killed)))
    assert logged_by_killed[-1] > STEPS_PER_EPOCH, "the killed run logged nothing past its checkpoint"
    stray = last.parent / ".tmp-killed-mid-save"
    stray.write_bytes(b"half a checkpoint")

    train_in_process(data, tmp_path / "unused", f"resume={last}")  # continues in its own run directory
    straight = tmp_path / "straight"
    train_in_process(data, straight, *SETTINGS)

    assert not stray.exists() and not list(last.parent.glob(".tmp-*"))
    # On disk the steps the killed run logged after its checkpoint are there twice ...
    on_disk = steps_on_disk(killed)
    twice = [s for s in logged_by_killed if s > STEPS_PER_EPOCH]
    assert all(on_disk.count(s) == 2 for s in twice), "the resumed run did not log those steps again"
    # ... and TensorBoard shows each once, with the uninterrupted run's values.
    for tag in ("train/loss", "train/temperature", "test/loss"):
        assert shown(killed, tag) == shown(straight, tag), tag
    a = torch.load(last, map_location="cpu", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in b["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(a["optimizer"]["state"][i][k], v), (i, k)
