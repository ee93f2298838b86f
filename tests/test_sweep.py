"""vae/sweep.py: the sweep summary ranks jobs by a number that compares across estimators and averages seeds; it lists
every job of `train.py -m`, failed and unfinished ones too, and `python -m vae.sweep` writes it again."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from support import assert_complete_jobs, multirun, run_script, run_train, summary_rows, tiny_overrides
from vae import sweep

BASE = {"epochs": 1, "step": 6, "tau": 0.5}


def make_job(sweep_dir: Path, num: int, overrides: list, metrics) -> None:
    """A finished (or, with metrics None, unfinished) job directory as Hydra and train.py leave it."""
    d = sweep_dir / f"{num}_{','.join(overrides)}"
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps({**BASE, **metrics, "overrides": overrides}))


def rows(path: Path) -> list:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def two_estimators_three_seeds(tmp_path) -> Path:
    """gumbel has the lower (relaxed) test loss in every seed, st_gumbel the better discrete -ELBO."""
    num = 0
    for estimator, elbo, relaxed in (("gumbel", 100.0, 90.0), ("st_gumbel", 98.0, 99.0)):
        for seed in range(3):
            make_job(tmp_path, num, [f"estimator={estimator}", f"seed={seed}"],
                     {"test_loss": relaxed + seed, "test_elbo_discrete": elbo + seed})
            num += 1
    return tmp_path


def test_jobs_rank_by_the_discrete_elbo_never_the_relaxed_loss(two_estimators_three_seeds):
    jobs = sweep.summarize(two_estimators_three_seeds, echo=False)
    assert sweep.rank_metric(jobs) == "test_elbo_discrete"
    assert [j.num for j in sweep.ranked(jobs)] == [3, 4, 0, 5, 1, 2]
    text = (two_estimators_three_seeds / "summary.md").read_text()
    assert "Best: job 3 (`estimator=st_gumbel seed=0`), test_elbo_discrete 98.000" in text
    assert [r["job"] for r in rows(two_estimators_three_seeds / "summary.csv")] == ["3", "4", "0", "5", "1", "2"]


def test_seeds_are_grouped_into_mean_and_std_per_estimator(two_estimators_three_seeds, capsys):
    sweep.summarize(two_estimators_three_seeds)
    printed = capsys.readouterr().out
    text = (two_estimators_three_seeds / "summary.md").read_text()
    for shown in (printed, text):
        st, gumbel = shown.index("| st_gumbel |    3 |  99.00 ± 1.00 (n=3)"), shown.index("| gumbel    |    3 | 101.00")
        assert st < gumbel  # best mean first
        assert "Best over seeds: `estimator=st_gumbel`, test_elbo_discrete 99.00 ± 1.00 (n=3)" in shown
    groups = rows(two_estimators_three_seeds / "summary_groups.csv")
    assert [g["estimator"] for g in groups] == ["st_gumbel", "gumbel"]
    assert groups[0]["test_elbo_discrete_mean"] == "99.0" and groups[0]["test_elbo_discrete_std"] == "1.0"
    assert groups[0]["test_elbo_discrete_n"] == "3" and groups[0]["seeds"] == "0 1 2"
    assert groups[1]["test_loss_mean"] == "91.0"  # the relaxed loss is reported, not ranked on


def test_the_iw_bound_ranks_when_every_finished_job_has_one(tmp_path):
    make_job(tmp_path, 0, ["lr=0.1"], {"test_loss": 80.0, "test_elbo_discrete": 90.0, "test_iw_bound": 88.0})
    make_job(tmp_path, 1, ["lr=0.01"], {"test_loss": 85.0, "test_elbo_discrete": 95.0, "test_iw_bound": 87.0})
    make_job(tmp_path, 2, ["lr=0.001"], None)  # unfinished: does not count
    jobs = sweep.summarize(tmp_path, echo=False)
    assert sweep.rank_metric(jobs) == "test_iw_bound" and [j.num for j in sweep.ranked(jobs)] == [1, 0, 2]
    assert "Best first by test_iw_bound" in (tmp_path / "summary.md").read_text()
    make_job(tmp_path, 3, ["lr=0.0001"], {"test_loss": 70.0, "test_elbo_discrete": 91.0})  # no bound
    jobs = sweep.summarize(tmp_path, echo=False)
    assert sweep.rank_metric(jobs) == "test_elbo_discrete" and [j.num for j in sweep.ranked(jobs)] == [0, 3, 1, 2]


def test_a_group_averages_its_finished_jobs_only(tmp_path):
    make_job(tmp_path, 0, ["lr=0.1", "seed=0"], {"test_loss": 1.0, "test_elbo_discrete": 90.0})
    make_job(tmp_path, 1, ["lr=0.1", "seed=1"], {"test_loss": 1.0, "test_elbo_discrete": float("nan")})  # diverged
    make_job(tmp_path, 2, ["lr=0.1", "seed=2"], {"error": "out of memory"})
    make_job(tmp_path, 3, ["lr=0.01", "seed=0"], {"test_loss": 1.0, "test_elbo_discrete": 92.0})
    make_job(tmp_path, 4, ["lr=0.01", "seed=1"], {"test_loss": 1.0, "test_elbo_discrete": 94.0})
    sweep.summarize(tmp_path, echo=False)
    groups = rows(tmp_path / "summary_groups.csv")
    assert [(g["lr"], g["jobs"], g["test_elbo_discrete_n"]) for g in groups] == [("0.1", "3", "1"), ("0.01", "2", "2")]
    assert groups[1]["test_elbo_discrete_std"] == str(2 ** 0.5)  # the sample standard deviation (n - 1)


def test_no_groups_without_several_seeds(tmp_path):
    make_job(tmp_path, 0, ["lr=0.1", "seed=0"], {"test_loss": 1.0, "test_elbo_discrete": 90.0})
    make_job(tmp_path, 1, ["lr=0.01", "seed=1"], {"test_loss": 1.0, "test_elbo_discrete": 91.0})
    (tmp_path / sweep.GROUPS_CSV).write_text("stale\n")
    sweep.summarize(tmp_path, echo=False)
    assert "Over seeds" not in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / sweep.GROUPS_CSV).exists()


def test_a_two_estimator_sweep_over_seeds_runs_and_is_summarised(tiny_data, tmp_path):
    """The valid sweep that the start-up check once refused (estimator_samples=4 does not suit the default
    estimator, gumbel), run over seeds: every job runs, and the summary groups the seeds per estimator."""
    sweep_dir = tmp_path / "sweep"
    args = [a for a in tiny_overrides(tiny_data, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    proc = run_train(["-m", *args, "debug=tiny", "latent_dim=4", f"hydra.sweep.dir={sweep_dir}",
                      "estimator=rloo,gumbel_rao", "estimator_samples=4", "seed=0,1,2"], timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    jobs = rows(sweep_dir / "summary.csv")
    assert len(jobs) == 6 and {j["status"] for j in jobs} == {"done"}
    elbos = [float(j["test_elbo_discrete"]) for j in jobs]
    assert elbos == sorted(elbos)
    groups = rows(sweep_dir / "summary_groups.csv")
    assert sorted(g["estimator"] for g in groups) == ["gumbel_rao", "rloo"]
    assert all(g["test_elbo_discrete_n"] == "3" and g["seeds"] == "0 1 2" for g in groups)
    means = [float(g["test_elbo_discrete_mean"]) for g in groups]
    assert means == sorted(means)
    assert "## Over seeds" in proc.stdout and "± " in proc.stdout and "Best first by test_elbo_discrete" in proc.stdout


# --- sweeps through train.py -m: every job and the summary -----------------------------------------------------

@pytest.fixture(scope="module")
def grid_sweep(tiny_data, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("grid") / "sweep"
    proc = multirun(tiny_data, sweep_dir, "hard=true,false")
    return sweep_dir, proc


def test_multirun_writes_every_job_and_the_summary(grid_sweep):
    sweep_dir, proc = grid_sweep
    rows = assert_complete_jobs(sweep_dir, 2)
    assert {r["hard"] for r in rows} == {"True", "False"}       # the swept key is a column
    assert "data.verify" not in rows[0]                          # ... the fixed ones are not
    assert "| job | status | hard" in proc.stdout and "tensorboard --logdir" in proc.stdout
    assert sorted(Path(r["dir"]).parts[0].split("_")[0] for r in rows) == ["0", "1"]  # <num>_<overrides>


def test_summary_cli_lists_unfinished_jobs(grid_sweep, tmp_path):
    sweep_dir = tmp_path / "copy"
    shutil.copytree(grid_sweep[0], sweep_dir, ignore=shutil.ignore_patterns("*.pt", "events.*"))
    (sweep_dir / "summary.csv").unlink()
    unfinished = sweep_dir / summary_rows(grid_sweep[0])[0]["dir"]
    (unfinished / "metrics.json").unlink()                   # e.g. still running on the cluster
    proc = run_script([str(sweep_dir)], script="vae.sweep", timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = summary_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["done", "missing"] and rows[1]["test_loss"] == ""
    assert "1 of 2 jobs have no metrics.json" in proc.stdout


def test_summary_cli_rejects_a_directory_without_jobs(tmp_path):
    proc = run_script([str(tmp_path)], script="vae.sweep", timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_summary_ranks_finished_jobs_and_puts_diverged_ones_last(tmp_path):
    def job(num, overrides, metrics):
        d = tmp_path / f"{num}_{','.join(overrides)}"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        if metrics is not None:
            (d / "metrics.json").write_text(json.dumps({**metrics, "overrides": overrides}))

    base = {"epochs": 1, "step": 6, "tau": 0.5}
    job(0, ["lr=0.1", "seed=1"], {"test_loss": float("nan"), "test_elbo_discrete": float("nan"), **base})
    job(1, ["lr=0.001", "seed=1"], {"test_loss": 90.0, "test_elbo_discrete": 95.0, "test_iw_bound": 88.0, **base})
    job(2, ["lr=0.01", "seed=1"], {"test_loss": 80.0, "test_elbo_discrete": 85.0, **base})
    job(3, ["lr=0.0001", "seed=1"], None)
    jobs = sweep.summarize(tmp_path, echo=False)
    assert [j.num for j in sweep.ranked(jobs)] == [2, 1, 0, 3]
    rows = summary_rows(tmp_path)
    assert list(rows[0])[:6] == ["job", "status", "lr", "test_loss", "test_elbo_discrete", "test_iw_bound"]
    assert rows[1]["test_iw_bound"] == "88.0" and rows[0]["test_iw_bound"] == ""
    text = (tmp_path / "summary.md").read_text()
    assert "Same in every job: `seed=1`" in text and "Best: job 2 (`lr=0.01`)" in text


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
