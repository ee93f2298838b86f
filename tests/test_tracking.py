"""tracker=mlflow: a real local MLflow store, read back through MLflow's own client, holds the run's parameters,
its per-epoch and per-interval scalars and metrics.json's numbers; without MLflow, one line says what to install."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from support import compose_train, train_in_process
from vae.training.plan import check_run
from vae.common.errors import UserError
from vae.training.tracking import RUN_ID_FILE, MlflowTracker, flatten, trackers, tracking_uri


def client_of(store: Path):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store.as_uri())


def only_run(store: Path):
    client = client_of(store)
    experiment = client.get_experiment_by_name("gumbel-vae")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def history(client, run_id: str, key: str) -> list:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def tracked_run(tiny_data, tmp_path_factory):
    pytest.importorskip("mlflow")
    tmp = tmp_path_factory.mktemp("tracked")
    store, run_dir = tmp / "mlruns", tmp / "run"
    metrics = train_in_process(tiny_data, run_dir, "tracker=mlflow", f"tracker.tracking_uri={store}", "epochs=2")
    return store, run_dir, metrics


def test_the_store_holds_params_scalars_and_final_metrics(tracked_run):
    store, run_dir, metrics = tracked_run
    client, run = only_run(store)
    assert run.info.status == "FINISHED"
    assert run.data.tags["run_dir"] == str(run_dir) and run.data.tags["estimator"] == "gumbel"
    params = run.data.params
    assert params["latent_dim"] == "30" and params["estimator"] == "gumbel" and params["epochs"] == "2"
    assert params["data.verify"] == "false" and params["tracker.name"] == "mlflow"
    assert params["eval.batch_size"] == "50" and params["optimizer.betas"] == "[0.9,0.999]"

    # every epoch's test scalars, at the step TensorBoard puts them (6 steps per epoch on 300 images, batch 50)
    test_loss = history(client, run.info.run_id, "test/loss")
    assert [step for step, _ in test_loss] == [6, 12]
    assert test_loss[-1][1] == pytest.approx(metrics["test_loss"])
    for key in ("test/bce", "test/kl", "test/elbo_discrete"):
        assert len(history(client, run.info.run_id, key)) == 2, key
    # the train scalars every log_interval (2) steps
    for key in ("train/loss", "train/bce", "train/kl", "train/temperature"):
        assert [step for step, _ in history(client, run.info.run_id, key)] == [2, 4, 6, 8, 10, 12], key

    # metrics.json's numbers, under its names
    final = run.data.metrics
    for key in ("test_loss", "test_elbo_discrete", "epochs", "step", "tau", "train_seconds"):
        assert final[key] == pytest.approx(metrics[key]), key
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run.info.run_id
    assert history(client, run.info.run_id, "val/loss") == []  # debug=tiny: no validation split


def test_the_validation_split_scalars_go_to_mlflow_too(tiny_data, tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    metrics = train_in_process(tiny_data, tmp_path / "run", "tracker=mlflow", f"tracker.tracking_uri={store}",
                               "data.val_size=100")
    client, run = only_run(store)
    for key in ("val/loss", "val/bce", "val/kl", "val/elbo_discrete"):
        assert [step for step, _ in history(client, run.info.run_id, key)] == [4], key  # 200 images: 4 steps
    assert run.data.metrics["val_loss"] == pytest.approx(metrics["val_loss"])


def test_a_resume_in_place_continues_the_same_mlflow_run(tiny_data, tmp_path):
    pytest.importorskip("mlflow")
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    train_in_process(tiny_data, run_dir, "tracker=mlflow", f"tracker.tracking_uri={store}")
    # the checkpoint remembers tracker=mlflow and its store: the resume needs no tracker settings
    train_in_process(tiny_data, tmp_path / "other", f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    client, run = only_run(store)
    assert [step for step, _ in history(client, run.info.run_id, "test/loss")] == [6, 12]
    assert run.info.status == "FINISHED" and run.data.params["epochs"] == "1"  # MLflow keeps a run's first values
    assert run.data.metrics["epochs"] == 2


def test_tracker_none_writes_no_store(tiny_data, tmp_path):
    store = tmp_path / "mlruns"
    train_in_process(tiny_data, tmp_path / "run", f"tracker.tracking_uri={store}")
    assert not store.exists() and not (tmp_path / "run" / RUN_ID_FILE).exists()


def test_without_mlflow_one_line_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(UserError) as e:
        check_run(compose_train("tracker=mlflow"))
    message = str(e.value)
    assert message.startswith("tracker=mlflow needs MLflow") and "pip install -e '.[mlflow]'" in message
    assert "\n" not in message
    check_run(compose_train())  # tracker=none needs nothing


def test_an_unknown_tracker_is_refused():
    with pytest.raises(UserError, match=r"^tracker.name='wandb' is not allowed: one of none, mlflow \(choose with "
                                        r"tracker=none\|mlflow\)"):
        check_run(compose_train("tracker.name=wandb"))


def test_a_store_mlflow_cannot_open_is_one_line(tmp_path):
    pytest.importorskip("mlflow")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = compose_train("tracker=mlflow", f"tracker.tracking_uri={blocker / 'mlruns'}")
    with pytest.raises(UserError) as e, contextlib.ExitStack() as held:
        trackers(cfg, tmp_path / "run", held)
    assert str(e.value).startswith("tracker.tracking_uri=") and "\n" not in str(e.value)


def test_a_store_failing_mid_run_is_a_warning_and_the_run_goes_on(tmp_path, caplog):
    pytest.importorskip("mlflow")
    cfg = compose_train("tracker=mlflow", f"tracker.tracking_uri={tmp_path / 'mlruns'}")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = MlflowTracker(cfg, run_dir)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    tracker.client.log_batch = full_disk
    state = type("State", (), {"step": 2, "tau": 1.0})
    trainer = type("Trainer", (), {"state": state})
    tracker.on_interval(trainer, [1.0, 0.5, 0.5], None)
    tracker.on_interval(trainer, [1.0, 0.5, 0.5], None)  # one warning, not one per interval
    assert tracker.failed
    assert [r.message for r in caplog.records].count(caplog.records[-1].message) == 1
    assert "MLflow logging failed" in caplog.text and "No space left" in caplog.text


def test_tracking_uri_makes_a_folder_a_file_uri_and_keeps_uris():
    assert tracking_uri("/tmp/mlruns") == "file:///tmp/mlruns"
    assert tracking_uri("rel/mlruns") == (Path.cwd() / "rel" / "mlruns").as_uri()
    for uri in ("file:///x/mlruns", "sqlite:///x/mlflow.db", "http://localhost:5000"):
        assert tracking_uri(uri) == uri


def test_flatten_writes_values_as_the_command_line_does():
    assert flatten({"a": None, "b": True, "c": {"d": [1, 2], "e": 1e-3}}) == {
        "a": "null", "b": "true", "c.d": "[1,2]", "c.e": "0.001"}



@pytest.mark.parametrize("exit_by,status", [(SystemExit(130), "KILLED"), (RuntimeError("boom"), "FAILED"),
                                            (None, "FINISHED")])
def test_the_mlflow_run_ends_with_how_the_run_ended(tmp_path, exit_by, status):
    pytest.importorskip("mlflow")
    store = tmp_path / "mlruns"
    cfg = compose_train("tracker=mlflow", f"tracker.tracking_uri={store}")
    (tmp_path / "run").mkdir()
    with pytest.raises(type(exit_by)) if exit_by is not None else contextlib.nullcontext():
        with contextlib.ExitStack() as held:
            assert len(trackers(cfg, tmp_path / "run", held)) == 1
            if exit_by is not None:
                raise exit_by
    assert only_run(store)[1].info.status == status


def test_tracker_none_gives_no_callback(tmp_path):
    with contextlib.ExitStack() as held:
        assert trackers(compose_train(), tmp_path, held) == []
