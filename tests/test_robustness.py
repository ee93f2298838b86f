"""Faults and exact resume: signals, kill -9 while saving, non-finite loss, write errors."""
from __future__ import annotations

import errno
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from support import REPO, run_train, subprocess_env, tiny_overrides, train_in_process
from idx import make_tiny_dataset
from vae.training import checkpoint as ckpt_io
from vae.common.atomic import remove_stray_temporaries
from vae.common.errors import UserError


@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory):
    """A finished 1-epoch run on tiny data whose temperature has annealed (tau at the end != temperature). Tests
    that write into a run use a copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train_in_process(tiny_data, run_dir, "anneal_rate=0.1", "anneal_interval=1", "temp_min=0.3")
    return run_dir


def copy_run(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Enough images for 500 steps per epoch at batch_size=4: time to land a signal mid-epoch."""
    root = tmp_path_factory.mktemp("long")
    make_tiny_dataset(root, n_train=2000, n_test=40, seed=1)
    return root


def long_overrides(data_root, run_dir, *extra):
    return tiny_overrides(data_root, run_dir, "batch_size=4", "log_interval=50", "latent_dim=8",
                          "anneal_interval=7", "anneal_rate=1e-3", *extra)


def interrupt_during(args, wait_for: str, sig, delay: float = 0.4, ready=None) -> subprocess.CompletedProcess:
    """Start train.py, wait for a line containing `wait_for`, let it run `delay` s more (or until `ready()`), then
    send `sig`."""
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if wait_for in line:
            break
    if ready is None:
        time.sleep(delay)
    else:
        deadline = time.time() + 120
        while not ready() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out) + rest, "")


def logged_past(run_dir, step: int):
    """A `ready` for interrupt_during: the event file holds train scalars of a step after `step` (the end of epoch
    1), so the run is inside epoch 2. The epoch's log line alone is printed before the epoch's checkpoint, images and
    flush: a signal sent a fixed delay after it can land before epoch 2's first step on a loaded machine."""
    from tb_events import steps_on_disk

    return lambda: max(steps_on_disk(run_dir), default=0) > step


def model_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(long_data, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    proc = run_train(long_overrides(long_data, straight, "epochs=4"))
    assert proc.returncode == 0, proc.stderr

    proc = interrupt_during(long_overrides(long_data, broken, "epochs=4"), "epoch 1/4", signal.SIGTERM,
                            ready=logged_past(broken, 500))
    assert proc.returncode == 143, proc.stdout
    assert "resume=" in proc.stdout and "SIGTERM" in proc.stdout
    ckpt = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500, (ckpt["epoch"], ckpt["epoch_step"])

    proc = run_train([f"resume={broken / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'again'}"])
    assert proc.returncode == 0, proc.stderr
    a, b = model_of(straight / "checkpoints" / "last.pt"), model_of(broken / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # TensorBoard: the same scalar steps as the uninterrupted run, none twice
    from test_train import scalar_steps

    assert scalar_steps(broken, "train/loss") == scalar_steps(straight, "train/loss")
    assert scalar_steps(broken, "test/loss") == scalar_steps(straight, "test/loss")


def test_ctrl_c_saves_and_exits_130(long_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = interrupt_during(long_overrides(long_data, run_dir, "epochs=3"), "epoch 1/3", signal.SIGINT,
                            ready=logged_past(run_dir, 500))
    assert proc.returncode == 130, proc.stdout
    assert "Traceback" not in proc.stdout
    ckpt = ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] > 0
    # Saved on the signal, mid-epoch 2: the epoch-1 checkpoint (step 500, epoch_step 0), written before the
    # signal, would satisfy the check above on its own.
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500, (ckpt["epoch"], ckpt["epoch_step"])
    assert ckpt["step"] == 500 + ckpt["epoch_step"] and ckpt["step"] % 500 != 0
    # the event file was flushed and closed: the scalars written before the signal are readable
    from test_train import scalar_steps

    assert scalar_steps(run_dir, "train/loss")


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(tiny_overrides(tiny_data, run_dir, "epochs=1")).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = run_train([f"resume={last}", "epochs=3", "lr=1e30", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert proc.returncode == 3, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "NaN" in message and "at step" in message and "lr" in message and "temp_min" in message
    assert "Traceback" not in proc.stderr
    assert last.read_bytes() == before
    assert torch.isfinite(torch.cat([v.flatten().float() for v in model_of(last).values()])).all()


SAVER = r"""
import sys, torch
from vae.training.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint({"format": "gumbel-vae/1", "i": i, "blob": torch.full((8_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO)
    try:
        deadline = time.time() + 60
        # wait until a complete file exists and the next write is in progress
        while time.time() < deadline and not (path.exists() and any(".tmp-" in p.name for p in path.parent.iterdir())):
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait()
    assert any(".tmp-" in p.name for p in path.parent.iterdir()), "the kill did not land during a write"
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["blob"], torch.full((8_000_000,), float(ckpt["i"])))
    removed = remove_stray_temporaries(path.parent)
    assert removed and not any(".tmp-" in p.name for p in path.parent.iterdir())


def test_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save_checkpoint({"format": "gumbel-vae/1", "v": torch.ones(3)}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*intact"):
        ckpt_io.save_checkpoint({"format": "gumbel-vae/1", "v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_compiler_that_fails_falls_back_to_eager(tiny_data, tmp_path):
    # torch.compile on a CPU needs a C++ compiler; a broken one must cost a warning, never the run. (A fresh
    # Inductor cache, or a cached kernel from an earlier run would hide the broken compiler.)
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "epochs=1", "compile=true"),
                     env_extra={"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 0, proc.stderr
    assert "compile=true failed here" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file()


# --- start-up checks: one line and no run directory, whatever the failure ----------------------------------------

def validate_on_start(capsys, *overrides, run_dir):
    """What ValidateOnStart does with `python train.py <overrides>`: its exit status and the lines it printed."""
    from support import compose_train
    from vae.training.plan import ValidateOnStart

    cfg = compose_train(*overrides, f"hydra.run.dir={run_dir}", run_dir=run_dir)
    with pytest.raises(SystemExit) as e:
        ValidateOnStart().on_run_start(cfg)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("overrides,needle", [
    (["device=cudaa"], "device='cudaa'"),
    (["device=cuda:abc"], "device='cuda:abc'"),
    (["seed=99999999999999999999"], "seed=99999999999999999999"),
    (["seed=-1"], "seed=-1"),
    (["threads=100000"], "threads=100000"),
    (["latent_dim=100000", "categorical_dim=1000"], "latent_dim=100000 x categorical_dim=1000"),
    (["eval.iw_samples=100000", "eval.iw_chunk=100000", "eval.batch_size=1000"], "eval.iw_chunk=100000"),
    (["prior_samples=1000000"], "prior_samples=1000000"),
    (["data.binarize_seed=-5"], "data.binarize_seed=-5"),
])
def test_start_up_checks_name_the_setting_in_one_line(tiny_data, tmp_path, capsys, overrides, needle):
    code, lines = validate_on_start(capsys, f"data.root={tiny_data}", *overrides, run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_an_unexpected_failure_in_the_start_up_checks_exits_too(tiny_data, tmp_path, capsys, monkeypatch):
    import vae.training.plan

    def broken(*a, **k):
        raise ValueError("Overflow when unpacking long long")

    monkeypatch.setattr(vae.training.plan, "make_plan", broken)
    code, lines = validate_on_start(capsys, f"data.root={tiny_data}", run_dir=tmp_path / "run")
    assert code == 1 and len(lines) == 1 and "ValueError: Overflow" in lines[0], lines


def test_a_bad_device_name_leaves_no_run_directory(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "device=cudaa"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "device='cudaa'" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides,needle", [
    ({"device": "cuda:abc"}, "device='cuda:abc'"),
    ({"device": "cudaa"}, "device='cudaa'"),
    ({"seed": 2**64}, "seed="),
    ({"prior_samples": 10**6}, "prior_samples="),
])
def test_evaluate_settings_are_checked_before_the_checkpoint_is_read(tmp_path, overrides, needle):
    from vae.evaluate import EvaluateConfig, evaluate
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {"checkpoint": str(tmp_path / "x.pt"), **overrides})
    with pytest.raises(UserError, match=needle):
        evaluate(cfg)


def test_evaluate_refuses_an_iw_chunk_that_cannot_fit(finished_run):
    from vae.evaluate import EvaluateConfig, evaluate
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
        "checkpoint": str(finished_run / "checkpoints" / "last.pt"), "device": "cpu", "iw_samples": 100000,
        "iw_chunk": 100000})
    with pytest.raises(UserError, match="iw_chunk=100000 samples x batch_size=1000"):
        evaluate(cfg)


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 102400000000 bytes. Error code 12 (Cannot allocate memory)")


def test_out_of_memory_names_the_settings_that_size_it(tiny_data, tmp_path, monkeypatch):
    from vae.core import metrics
    from vae.training.trainer import Trainer

    def no_memory(*a, **k):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(metrics, "iw_bound", no_memory)
    with pytest.raises(UserError, match=r"out of memory in the importance-weighted bound.*eval.batch_size=50 x "
                                        r"eval.iw_chunk=100"):
        train_in_process(tiny_data, tmp_path / "iw", "eval.iw_samples=10")
    monkeypatch.setattr(Trainer, "fit", no_memory)
    with pytest.raises(UserError, match=r"out of memory while training.*batch_size=50.*latent_dim x categorical_dim"):
        train_in_process(tiny_data, tmp_path / "fit")


# --- a full disk: one line, the previous checkpoint intact, whatever type the failure arrives as -----------------

def limit_file_size(limit: int):
    """For preexec_fn: files may not grow beyond `limit` bytes, as on a full disk (write() fails with EFBIG rather
    than the process being killed by SIGXFSZ)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_saving_ends_the_run_in_one_line_and_keeps_the_checkpoint(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    # The checkpoint (~15 MB) no longer fits; the event file and the log (a few KB) still do.
    args = [f"resume={last}", "epochs=2", f"hydra.run.dir={tmp_path / 'r2'}"]
    proc = subprocess.run([sys.executable, "train.py", *args],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240,
                          preexec_fn=limit_file_size(2_000_000))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: could not write checkpoint {last}"), lines
    assert "File too large" in lines[0] and "the previous last.pt is intact" in lines[0]
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".tmp-*"))


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


def test_every_write_failure_is_one_line_whatever_its_type(tmp_path):
    from vae.common.atomic import WriteFailed, atomic_write, atomic_write_text

    path = tmp_path / "metrics.json"
    atomic_write_text(path, "{}")

    def like_torch_save(f):  # torch.save reports ENOSPC as its own RuntimeError, the OSError as its context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1615808 vs 1615760")

    with pytest.raises(WriteFailed, match=r"could not write metrics .*metrics.json: No space left on device "
                                          r"\(free disk space.*the previous metrics.json is intact"):
        atomic_write(path, like_torch_save, "metrics")
    with pytest.raises(WriteFailed, match="PytorchStreamWriter failed"):  # its own words when no OSError is attached
        atomic_write(path, lambda f: (_ for _ in ()).throw(RuntimeError("PytorchStreamWriter failed writing file")))
    with pytest.raises(OSError):  # still an OSError for code that writes on a best-effort basis
        atomic_write(path, lambda f: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(TypeError):  # a bug in what is written is not a disk problem
        atomic_write(path, lambda f: f.write("text, not bytes"))
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


# --- Ctrl-C / SIGTERM during the importance-weighted bound ---------------------------------------------------------

def test_sigterm_during_the_final_iw_bound_stops_at_once_and_keeps_what_is_done(tiny_data, tmp_path):
    # k=200000 on 100 test images takes minutes here; the stop must take seconds.
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, run_dir, "epochs=1", "eval.iw_samples=200000")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "epoch 1/1 |" in line:  # the last log line before the bound
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    output = "".join(out) + rest
    assert time.monotonic() - t0 < 15, output
    assert proc.returncode == 143, output
    assert "Traceback" not in output
    assert "python -m vae.evaluate checkpoint=" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test_loss" in metrics and "test_iw_bound" not in metrics
    assert "SIGTERM" in metrics["stopped"]
    assert ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_a_second_signal_is_heard_and_changes_nothing(capsys):
    import os

    from vae.training.progress import StopFlag

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop() and stop.name in ("SIGINT", "SIGTERM")
    assert "stopping, please wait" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back as it was


class StopAfter:
    """A stand-in for StopFlag that says "stop" from its n-th question on."""

    name, exit_code = "SIGTERM", 143

    def __init__(self, n):
        self.asked, self.n = 0, n

    def at_once(self, doing):
        import contextlib

        return contextlib.nullcontext()

    def __call__(self):
        self.asked += 1
        return self.asked >= self.n


def test_iw_bound_stops_between_chunks():
    from vae.core import metrics
    from vae.data.device_data import DeviceSplit
    from vae.core.model import CategoricalVAE

    split = DeviceSplit(torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8), torch.device("cpu"), "none")
    model = CategoricalVAE(3, 4)
    stop = StopAfter(3)
    assert metrics.iw_bound(model, split, k=1000, chunk=10, batch_size=10, generator=torch.Generator(),
                            should_stop=stop) is None
    assert stop.asked == 3  # two chunks done, then stopped: not the 200 chunks of the whole split
    full = metrics.iw_bound(model, split, k=20, chunk=10, batch_size=10, generator=torch.Generator().manual_seed(0))
    assert full == metrics.iw_bound(model, split, k=20, chunk=10, batch_size=10,
                                    generator=torch.Generator().manual_seed(0), should_stop=lambda: False)


def test_evaluate_stops_during_the_iw_bound_and_writes_nothing(finished_run, tmp_path, capsys):
    from omegaconf import OmegaConf

    from vae.evaluate import EvaluateConfig, run

    ckpt = copy_run(finished_run, tmp_path / "run") / "checkpoints" / "last.pt"
    cfg = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
        "checkpoint": str(ckpt), "device": "cpu", "iw_samples": 100000, "iw_chunk": 10, "batch_size": 50})
    stop = StopAfter(5)
    with pytest.raises(SystemExit) as e:
        run(cfg, stop)
    assert e.value.code == 143 and stop.asked == 5
    captured = capsys.readouterr()
    assert "discrete -ELBO" in captured.out and "stopped by SIGTERM" in captured.err
    assert not list(ckpt.parent.glob("last.*.json")) and not list(ckpt.parent.glob("*.png"))


# --- a sweep with a failed job --------------------------------------------------------------------------------------

def test_a_failed_job_is_listed_in_the_sweep_summary(tiny_data, tmp_path):
    import csv

    sweep_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(tiny_data, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    proc = run_train(["-m", *args, "debug=tiny", f"hydra.sweep.dir={sweep_dir}", "temperature=1.0,-1"])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"every job that ran is listed in {sweep_dir / 'summary.md'}" in proc.stderr
    rows = {r["temperature"]: r for r in csv.DictReader((sweep_dir / "summary.csv").open())}
    assert rows["1.0"]["status"] == "done" and float(rows["1.0"]["test_loss"]) > 0
    assert rows["-1"]["status"] == "failed" and rows["-1"]["error"].startswith("temperature=-1.0 is not allowed")
    summary = (sweep_dir / "summary.md").read_text()
    assert "| failed |" in summary and "Job 1 (`temperature=-1`) failed: temperature=-1.0 is not allowed" in summary


# --- where a resumed run writes --------------------------------------------------------------------------------------

def test_resuming_a_copied_checkpoint_writes_into_the_new_run_directory(finished_run, tiny_data, tmp_path, caplog):
    downloads = tmp_path / "home" / "Downloads"
    downloads.mkdir(parents=True)
    copied = downloads / "model.pt"
    shutil.copy(finished_run / "checkpoints" / "last.pt", copied)
    new = tmp_path / "new"
    with caplog.at_level("INFO", logger="train"):
        result = train_in_process(tiny_data, new, f"resume={copied}", "epochs=2")
    assert "not in a run's checkpoints/ directory, so this run writes into its new run directory" in caplog.text
    assert result["epochs"] == 2
    assert (new / "checkpoints" / "last.pt").is_file() and list(new.glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["Downloads"]  # nothing in the grandparent
    assert [p.name for p in downloads.iterdir()] == ["model.pt"]


def test_a_run_directory_that_cannot_be_written_is_not_resumed_in_place(finished_run, tiny_data, tmp_path,
                                                                         monkeypatch):
    import os

    import vae.training.rundir

    run_dir = copy_run(finished_run, tmp_path / "run")
    before = sorted(p.name for p in run_dir.rglob("*"))
    real_access = os.access
    # We run as root here, for whom chmod does not make a directory read-only: say it is.
    monkeypatch.setattr(vae.training.rundir.os, "access", lambda p, mode: False if str(p).startswith(str(run_dir))
                        else real_access(p, mode))
    new = tmp_path / "new"
    train_in_process(tiny_data, new, f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert (new / "checkpoints" / "last.pt").is_file() and (new / "metrics.json").is_file()
    assert sorted(p.name for p in run_dir.rglob("*")) == before


def test_resuming_best_pt_does_not_overwrite_the_runs_later_last_pt(finished_run, tiny_data, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    last = (run_dir / "checkpoints" / "last.pt").read_bytes()
    new = tmp_path / "new"
    train_in_process(tiny_data, new, f"resume={run_dir / 'checkpoints' / 'best.pt'}", "epochs=2")
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == last
    assert (new / "checkpoints" / "last.pt").is_file()


# --- one run per run directory ---------------------------------------------------------------------------------------

def test_a_second_run_in_a_run_directory_in_use_refuses(tiny_data, tmp_path):
    from vae.training.rundir import locked

    run_dir = tmp_path / "run"
    with locked(run_dir):  # another train.py, training there now
        with pytest.raises(UserError, match=f"run directory {run_dir} is in use by another train.py"):
            train_in_process(tiny_data, run_dir)
    assert not (run_dir / "checkpoints").exists()
    train_in_process(tiny_data, run_dir)  # released: the directory can be used


def test_a_resume_of_a_run_being_trained_refuses(finished_run, tiny_data, tmp_path):
    from vae.training.rundir import locked

    run_dir = copy_run(finished_run, tmp_path / "run")
    with locked(run_dir):
        with pytest.raises(UserError, match="being trained by another process"):
            train_in_process(tiny_data, tmp_path / "new", f"resume={run_dir / 'checkpoints' / 'last.pt'}",
                             "epochs=2")


def test_a_new_run_does_not_overwrite_a_finished_one(finished_run, tiny_data, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run"):
        train_in_process(tiny_data, run_dir)
    # On the command line the refusal comes before Hydra writes its .hydra/ files over the run's.
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("the run's own\n")
    proc = run_train(tiny_overrides(tiny_data, run_dir))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "the run's own\n"
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts} == before


HOLD_THE_LOCK = r"""
import sys, time
from vae.training.rundir import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_kill_9_leaves_no_stale_lock(tmp_path):
    from vae.training.rundir import locked

    proc = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            with locked(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()
    with locked(tmp_path):  # the kernel released it with the process
        pass


# --- resuming a finished run, and resuming with other data -----------------------------------------------------------

def test_resuming_a_finished_run_reports_its_own_numbers_and_keeps_its_metrics(finished_run, tiny_data, tmp_path,
                                                                               caplog):
    from omegaconf import OmegaConf

    import train as train_script
    from support import compose_train
    from hydra.core.hydra_config import HydraConfig
    from vae.evaluate import EvaluateConfig, evaluate

    run_dir = copy_run(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["tau"] < 1.0  # annealed: a test pass at the schedule's start would differ
    before = (run_dir / "metrics.json").read_text()
    original = json.loads(before)

    cfg = compose_train("debug=tiny", f"data.root={tiny_data}", f"hydra.run.dir={tmp_path / 'r2'}", f"resume={last}",
                        run_dir=tmp_path / "r2")
    HydraConfig.instance().set_config(cfg)
    try:
        with caplog.at_level("INFO", logger="train"):
            loss = train_script.train(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    finally:
        HydraConfig.instance().cfg = None
    assert loss == original["test_loss"]                      # the saved tau, the saved weights: the same number
    assert (run_dir / "metrics.json").read_text() == before  # its overrides and timings are the run's own
    assert "metrics.json kept as it was" in caplog.text
    # ... and vae.evaluate scores the same checkpoint the same way (same batches, same seed)
    result = evaluate(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
        "checkpoint": str(last), "device": "cpu", "batch_size": 50, "iw_samples": 2}))
    assert result["tau"] == saved["tau"] and result["metrics"]["loss"] == pytest.approx(loss, rel=1e-6)


def test_extending_a_run_keeps_its_overrides_and_appends_the_resumes(finished_run, tiny_data, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    original = json.loads((run_dir / "metrics.json").read_text())["overrides"]
    metrics = train_in_process(tiny_data, tmp_path / "r2", f"resume={run_dir / 'checkpoints' / 'last.pt'}",
                               "epochs=2")
    assert metrics["epochs"] == 2 and metrics["overrides"] == original
    assert metrics["resumes"] == [["debug=tiny", f"data.root={tiny_data}",
                                   f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2"]]


@pytest.mark.parametrize("override", ["data.binarize=dynamic", "data=fashion_mnist", "data.binarize_seed=3"])
def test_resuming_with_other_data_is_refused(finished_run, tiny_data, tmp_path, override):
    run_dir = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(UserError, match=r"was trained on other data: data[.]\w+=.* in the checkpoint but"):
        train_in_process(tiny_data, tmp_path / "r2", f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2",
                         override)


# --- forged or damaged checkpoints with the right format tag ---------------------------------------------------------

def _forge(ckpt, change):
    change(ckpt)
    return ckpt


CUDA_RNG_STATE = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset

FORGERIES = {
    "config not a mapping": (lambda c: c.update(config=[1, 2, 3]), "config is a list, not a mapping"),
    "config of another version": (lambda c: c["config"].update(no_such_setting=1), "does not fit this version"),
    "empty optimizer state": (lambda c: c["optimizer"].update(state={}), "no state for parameter 0 after"),
    "no optimizer groups": (lambda c: c["optimizer"].update(param_groups=[]), "optimizer state is not Adam's"),
    "empty rng states": (lambda c: c.update(rng={}), "random-number states"),
    "an empty rng state": (lambda c: c["rng"].update(noise=torch.zeros(0, dtype=torch.uint8)), "random-number"),
    "epoch a string": (lambda c: c.update(epoch="1"), "epoch='1' is not an integer"),
    "epoch a float": (lambda c: c.update(epoch=1.5), "epoch=1.5 is not an integer"),
    "no running sums": (lambda c: c.pop("epoch_sums"), "lacks epoch_sums"),
    "running sums of another shape": (lambda c: c.update(interval_sums=torch.zeros(2)), "interval_sums"),
    "tau not a number": (lambda c: c.update(tau="hot"), "tau='hot'"),
    "estimator not a mapping": (lambda c: c.update(estimator=[0.5]), "estimator state is not a mapping"),
    "a newer format": (lambda c: c.update(format="gumbel-vae/2"), "has format 'gumbel-vae/2'"),
    "CUDA random streams on a CPU": (lambda c: c["rng"].update({k: CUDA_RNG_STATE for k in c["rng"]}),
                                     "written on a CUDA GPU; resume it with device=cuda"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_a_damaged_checkpoint_is_one_line_and_writes_nothing(finished_run, tiny_data, tmp_path, name):
    change, needle = FORGERIES[name]
    forged = tmp_path / "forged.pt"
    torch.save(_forge(torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True), change), forged)
    new = tmp_path / "new"
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")) as e:
        train_in_process(tiny_data, new, f"resume={forged}", "epochs=2")
    assert "\n" not in str(e.value)
    assert not list(new.glob("events.*")) and not (new / "checkpoints" / "last.pt").exists()


# --- messages that must not lie --------------------------------------------------------------------------------------

def test_divergence_before_the_first_checkpoint_says_none_was_written(tiny_data, tmp_path):
    from vae.common.errors import TrainingDiverged

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train_in_process(tiny_data, run_dir, "lr=1e30")
    assert str(e.value).endswith("no checkpoint had been written yet") and "was kept" not in str(e.value)
    assert not (run_dir / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("name", ["my runs/run 1", "0_lr=0.001,temperature=0.5"])  # spaces; a sweep job's directory
def test_the_printed_resume_command_can_be_pasted(tiny_data, tmp_path, monkeypatch, caplog, name):
    import os

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from vae.training.progress import ProgressBar

    # SIGTERM to this process at the first step: train.py's own handler, its save and its message.
    monkeypatch.setattr(ProgressBar, "on_step", lambda self, trainer: os.kill(os.getpid(), signal.SIGTERM))
    run_dir = tmp_path / name
    with pytest.raises(SystemExit) as e, caplog.at_level("INFO", logger="train"):
        train_in_process(tiny_data, run_dir, "epochs=2")
    assert e.value.code == 143
    line = caplog.text[caplog.text.index("Resume with:"):].splitlines()[1]
    argv = shlex.split(line)  # as a shell reads it
    assert argv[:2] == ["python", "train.py"] and len(argv) == 3
    resume = OverridesParser.create().parse_overrides(argv[2:])[0]  # ... and then Hydra
    assert resume.key_or_group == "resume" and resume.value() == str(run_dir / "checkpoints" / "last.pt")
    assert ckpt_io.load_checkpoint(resume.value())["step"] == 1


# --- hostile but realistic -------------------------------------------------------------------------------------------

def test_sigterm_during_start_up_exits_at_once_without_a_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = interrupt_during(tiny_overrides(tiny_data, run_dir, "epochs=1"), "run directory", signal.SIGTERM,
                            delay=0.0)
    assert proc.returncode == 143, proc.stdout
    assert "stopped by SIGTERM during start-up; nothing to save" in proc.stdout and "Traceback" not in proc.stdout
    assert not (run_dir / "checkpoints").exists()


def test_data_root_pointing_at_a_file_is_one_line(tiny_data, tmp_path, capsys):
    a_file = next((tiny_data / "MNIST" / "raw").iterdir())
    code, lines = validate_on_start(capsys, f"data.root={a_file}", run_dir=tmp_path / "run")
    assert code == 2 and len(lines) == 1 and "is a file, not a directory" in lines[0], lines


def test_resume_of_a_run_directory_points_at_its_last_checkpoint(finished_run, tiny_data, tmp_path, capsys):
    code, lines = validate_on_start(capsys, f"data.root={tiny_data}", f"resume={finished_run}", run_dir=tmp_path / "r")
    assert code == 2 and len(lines) == 1 and "is a directory, not a checkpoint" in lines[0], lines
    assert f"did you mean resume={finished_run / 'checkpoints' / 'last.pt'}?" in lines[0]
