"""vae/sweep.py: the sweep summary ranks jobs by a number that compares across estimators and averages seeds."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from support import run_train, tiny_overrides
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
