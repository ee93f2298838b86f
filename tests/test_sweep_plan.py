"""vae/tools/sweep_plan.py: a sweep checks the jobs it will run, not the defaults, before the first one starts; it refuses
only what cannot run, in one line; and every sweep gets a directory of its own."""
from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path

import pytest
import torch

from support import REPO, run_train, tiny_overrides
from vae.tools import sweep_plan
from vae.common.errors import UserError


@pytest.fixture(autouse=True)
def process_math_settings():
    """The checks set the first job's threads and subnormal flush for this process: put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def multirun_config(sweep_dir: Path, *overrides: str, data_root: Path):
    """The config `python train.py -m <overrides>` hands the start-up callback (the swept values left out), inside
    Hydra's global context, whose config loader composes the jobs."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    args = ["debug=tiny", f"data.root={data_root}", f"hydra.sweep.dir={sweep_dir}", *overrides]
    return GlobalHydra.instance().hydra.compose_config(config_name="config", overrides=args,
                                                      run_mode=RunMode.MULTIRUN, with_log_configuration=False)


@pytest.fixture
def hydra_context():
    from hydra import initialize_config_dir

    from vae.settings.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield


@pytest.fixture
def start(hydra_context, tiny_data, tmp_path):
    """Start a sweep as Hydra does, up to its first job: every configured callback's on_multirun_start, in order.
    Returns the sweep directory."""
    from hydra.utils import instantiate

    def start_sweep(*overrides: str, sweep_dir: Path = None) -> Path:
        sweep_dir = sweep_dir or tmp_path / "sweep"
        config = multirun_config(sweep_dir, *overrides, data_root=tiny_data)
        for callback in config.hydra.callbacks.values():
            instantiate(callback).on_multirun_start(config=config, config_name="config")
        return sweep_dir
    return start_sweep


def refusal(start, capsys, *overrides: str, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        start(*overrides, **kw)
    err = capsys.readouterr().err
    assert e.value.code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --- the jobs, not the defaults ---------------------------------------------------------------------------------

def test_settings_valid_for_every_job_pass(start, caplog):
    """`estimator_samples=4` is wrong for the default estimator, right for both swept ones."""
    start("estimator=rloo,gumbel_rao", "estimator_samples=4")
    assert "cannot run" not in caplog.text


def test_combinations_that_cannot_run_are_named_before_the_first_job(start, caplog):
    start("estimator=rloo,gumbel,sf", "estimator_samples=4", "lr=0.001,0.01")
    warning = caplog.text
    assert "4 combinations of this sweep cannot run" in warning
    for name in ("estimator=gumbel lr=0.001", "estimator=gumbel lr=0.01", "estimator=sf lr=0.01"):
        assert f"{name}: estimator_samples=4 is not allowed" in warning
    assert "estimator=rloo" not in warning


def test_a_sweep_of_which_no_job_can_run_is_refused(start, capsys, tmp_path):
    err = refusal(start, capsys, "temperature=-1,-2")
    assert "no job of this sweep can run: temperature=-1: temperature=-1.0 is not allowed" in err
    assert "temperature=-2: temperature=-2.0 is not allowed" in err
    assert not (tmp_path / "sweep").exists()  # nothing left behind


def test_a_setting_no_job_can_run_with_reads_as_for_a_single_run(start, capsys):
    err = refusal(start, capsys, "temperature=1.0,2.0", "estimator=sf", "estimator_samples=4")
    assert err.startswith("error: estimator_samples=4 is not allowed with estimator=sf")


def test_too_many_jobs_are_refused_before_any_is_built(start, capsys, tmp_path):
    err = refusal(start, capsys, "seed=range(0,100000)", "lr=range(1,100001)", "hard=true,false")
    assert "this sweep would run over 200,040,002 jobs (over 10,000 seed x over 10,000 lr x 2 hard)" in err
    assert "at most 10,000" in err
    assert not (tmp_path / "sweep").exists()


def test_counting_does_not_expand(monkeypatch):
    """10^10 values are counted, not listed: len(range) for integer ranges, at most limit + 1 steps otherwise."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (o,) = OverridesParser.create().parse_overrides(["seed=range(0,10000000000)"])
    assert sweep_plan.count_values(o, 10) == 11
    (o,) = OverridesParser.create().parse_overrides(["lr=range(0.0,1e9,0.5)"])
    assert sweep_plan.count_values(o, 10) == 11


@pytest.mark.parametrize("overrides, message", [
    (("latent_dim=4,abc",), "the combination latent_dim=abc cannot be composed: ConfigCompositionException: Error "
                            "merging override latent_dim=abc (ValidationError: Value 'abc' of type 'str' could not be "
                            "converted to Integer)"),
    (("temperature=interval(1,2)",), "temperature=interval(1,2): Hydra's basic sweeper runs lists, ranges and globs "
                                     "of values, not interval sweeps"),
    (("seed=range(0,4,0)",), "seed=range(0,4,0) cannot be expanded"),
    (("hydra/launcher=joblib", "hydra.launcher.n_jobs=0", "hard=true,false"),
     "hydra.launcher.n_jobs=0 is not allowed"),
])
def test_what_the_plugins_would_raise_is_one_line(start, capsys, overrides, message):
    assert message in refusal(start, capsys, *overrides)


# --- searches (Optuna) ------------------------------------------------------------------------------------------

def test_a_search_passes_when_its_fixed_settings_fit_some_searched_values(start):
    start("hparams_search=optuna", "temp_min=1.5")  # the default temperature 1.0 is below; the search reaches 2.0


def test_a_search_whose_fixed_settings_fit_no_searched_value_is_refused(start, capsys):
    err = refusal(start, capsys, "hparams_search=optuna", "temp_min=3")
    assert "no trial of this search can run" in err and "temperature=2.0" in err
    assert "temp_min=3.0 is not allowed: must be <= temperature (2.0)" in err


@pytest.mark.parametrize("overrides, message", [
    (("lr=tag(log, interval(0, 0.1))",), "lr=tag(log, interval(0, 0.1)) is not a search range Optuna accepts: "
                                          "ValueError: The `low` value must be larger than 0"),
    (("temperature=interval(2, 1)",), "temperature=interval(2, 1) is not a search range Optuna accepts"),
    (("hydra.sweeper.n_trials=0",), "hydra.sweeper.n_trials=0 is not allowed"),
    (("hydra.sweeper.n_jobs=0",), "hydra.sweeper.n_jobs=0 is not allowed"),
    (("hydra.sweeper.max_failure_rate=2",), "hydra.sweeper.max_failure_rate=2.0 is not allowed"),
])
def test_bad_search_settings_are_one_line(start, capsys, overrides, message):
    assert message in refusal(start, capsys, "hparams_search=optuna", *overrides)


def test_the_search_preset_goes_on_after_a_failed_trial(hydra_context, tiny_data, tmp_path):
    cfg = multirun_config(tmp_path, "hparams_search=optuna", data_root=tiny_data)
    assert cfg.hydra.sweeper.max_failure_rate == 1.0  # Optuna's default, 0, ends the search at the first failure


def test_one_failed_trial_does_not_end_the_search(tiny_data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(tiny_data, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    # One trial per batch: with max_failure_rate below 1 the first failed trial would end the search.
    proc = run_train(["-m", *args, "debug=tiny", "epochs=1", "latent_dim=4", f"hydra.sweep.dir={sweep_dir}",
                      "hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                      "hydra.sweeper.sampler.seed=1", "temperature=choice(-1.0,1.0)"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (sweep_dir / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done", "failed"}, rows


# --- the sweep directory ----------------------------------------------------------------------------------------

def test_sweeps_started_in_the_same_second_get_directories_of_their_own(tmp_path):
    first = tmp_path / "12-00-00"
    assert sweep_plan.new_dir(str(first)) == str(first)
    first.mkdir()
    assert sweep_plan.new_dir(str(first)) == f"{first}_2"
    Path(f"{first}_2").mkdir()
    assert sweep_plan.new_dir(str(first)) == f"{first}_3"


def test_a_sweep_started_in_the_same_second_as_another_runs_in_a_directory_of_its_own(tiny_data, tmp_path):
    """As the default `hydra.sweep.dir` does with <date>/<time>; every job (and the summary) follows the new name."""
    other = tmp_path / "12-00-00"
    (other / "0_hard=false" / ".hydra").mkdir(parents=True)  # the other sweep, running
    (other / "0_hard=false" / ".hydra" / "overrides.yaml").write_text("- hard=false\n")
    args = [a for a in tiny_overrides(tiny_data, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    proc = run_train(["-m", *args, "debug=tiny", "latent_dim=4", "hydra.sweep.dir=${new_dir:%s}" % other,
                      "hard=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    mine = tmp_path / "12-00-00_2"
    with (mine / "summary.csv").open(newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["status"] == "done" and (mine / row["dir"] / "checkpoints" / "last.pt").is_file()
    assert sorted(p.name for p in other.iterdir()) == ["0_hard=false"]


def test_the_default_sweep_directory_is_a_new_one(hydra_context, tiny_data, tmp_path):
    from omegaconf import OmegaConf

    cfg = multirun_config(tmp_path, data_root=tiny_data)
    default = OmegaConf.load(REPO / "configs" / "config.yaml").hydra.sweep
    assert OmegaConf.to_container(default, resolve=False)["dir"].startswith("${new_dir:")
    assert cfg.hydra.sweep.dir == str(tmp_path)  # an explicit one is taken as it is


def test_a_sweep_directory_in_use_is_refused(start, capsys, tmp_path):
    sweep_dir = tmp_path / "busy"
    sweep_dir.mkdir()
    fd = os.open(sweep_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another sweep, running
        os.write(fd, b"4242\n")
        err = refusal(start, capsys, "hard=true,false", sweep_dir=sweep_dir)
    finally:
        os.close(fd)
    assert f"hydra.sweep.dir='{sweep_dir}' is in use by another sweep (pid 4242)" in err


def test_a_sweep_directory_that_holds_a_sweep_is_refused(start, capsys, tmp_path):
    sweep_dir = tmp_path / "old"
    (sweep_dir / "0_hard=true" / ".hydra").mkdir(parents=True)
    (sweep_dir / "0_hard=true" / ".hydra" / "overrides.yaml").write_text("- hard=true\n")
    err = refusal(start, capsys, "hard=true,false", sweep_dir=sweep_dir)
    assert f"hydra.sweep.dir='{sweep_dir}' already holds a sweep (the job 0_hard=true)" in err
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0_hard=true"]  # the lock file is gone again


def test_an_unusable_sweep_directory_is_named_as_such(start, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    err = refusal(start, capsys, "hard=true,false", sweep_dir=tmp_path / "file" / "sweep")
    assert "hydra.sweep.dir=" in err and "hydra.run.dir" not in err


def test_a_claimed_directory_is_locked_until_the_sweep_ends(tmp_path):
    sweep_dir = tmp_path / "mine"
    created = sweep_plan.claim_sweep_dir(sweep_dir)
    assert created == [sweep_dir]
    with pytest.raises(UserError, match="is in use by another sweep"):
        sweep_plan.claim_sweep_dir(sweep_dir)  # a second open file: as another process would see it
    sweep_plan.release(sweep_dir, created)
    assert not sweep_dir.exists()
