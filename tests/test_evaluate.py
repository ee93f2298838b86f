"""`python -m vae.evaluate`: end to end on a tiny checkpoint and dataset, the test set it scores, its errors, its
settings checked before the checkpoint is read, and a stop during the importance-weighted bound."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from idx import make_tiny_dataset
from support import StopAfter, copy_run
from vae.core import metrics
from vae.pictures import latents
from vae.training.checkpoint import FORMAT
from vae.settings.config import REPO_DIR, Config
from vae.data import load_split
from vae.data.device_data import make_splits
from vae.common.errors import UserError
from vae.evaluate import EvaluateConfig, evaluate, load_test_split
from vae.core.model import CategoricalVAE

N_TRAIN, N_TEST = 40, 12


def write_checkpoint(tmp_path: Path, binarize="static", **config) -> Path:
    """A checkpoint shaped like train.py's: the full resolved Config as a plain dict, an untrained model."""
    root = tmp_path / "data"
    make_tiny_dataset(root, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    cfg = OmegaConf.merge(OmegaConf.structured(Config), {
        "latent_dim": 3, "categorical_dim": 4, "hard": True, **config,
        "data": {"root": str(root), "download": False, "sources": ["local"], "verify": False,
                 "binarize": binarize, "binarize_seed": 5}})
    torch.manual_seed(0)
    model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim, cfg.prior)
    ckpt = {"format": FORMAT, "model": model.state_dict(),
            "optimizer": torch.optim.Adam(model.parameters()).state_dict(),
            "epoch": 3, "epoch_step": 0, "step": 30, "tau": 0.8, "rng": {},
            "config": OmegaConf.to_container(cfg, resolve=True)}
    path = tmp_path / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    return subprocess.run([sys.executable, "-m", "vae.evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_command_end_to_end(tmp_path):
    torch.set_flush_denormal(False)  # as the command below (flush_denormal=false), whatever ran before in this process
    ckpt = write_checkpoint(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # flush_denormal=false: the numbers are recomputed below in this process, which does not flush.
    proc = run_cli(f"checkpoint={ckpt}", "iw_samples=10", "iw_chunk=3", "batch_size=5", "device=cpu",
                   "flush_denormal=false", "threads=1", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    # stdout is a pipe here, no terminal: progress comes as log lines, one per tenth of the images done (batches of
    # 5 of 12 images: 41%, 83%, 100%).
    progress = [line for line in proc.stdout.splitlines() if "IW bound k=10: " in line]
    assert [p.split(": ", 1)[1].split(")")[0] for p in progress[-3:]] == \
        ["5/12 images (41%", "10/12 images (83%", "12/12 images (100%"], proc.stdout
    assert "IW bound, k=10" in proc.stdout and "discrete -ELBO" in proc.stdout
    assert "code usage, 3 variables x 4 classes" in proc.stdout
    assert all(row in proc.stdout for row in ("active variables (KL > 0.01 nats)", "perplexity", "confidence"))

    result = json.loads((ckpt.parent / "best.metrics.json").read_text())
    assert (result["k"], result["epoch"], result["step"], result["tau"], result["hard"]) == (10, 3, 30, 0.8, True)
    assert result["n_images"] == N_TEST and result["device"] == "cpu" and result["seconds"] > 0
    # The run the checkpoint comes from: hard=true is straight-through Gumbel-softmax.
    assert result["run"] == {"estimator": "st_gumbel", "seed": 0, "lr": 1e-3, "optimizer": "adam", "data": "mnist"}
    m = result["metrics"]
    assert set(m) == {"loss", "bce", "kl", "elbo_discrete", "iw_bound"}
    assert all(math.isfinite(v) and v > 0 for v in m.values()), m
    assert m["loss"] == pytest.approx(m["bce"] + m["kl"], rel=1e-6)
    # E[IW bound] <= discrete -ELBO; with k=10 on 12 images the estimate's noise is far below 1 nat.
    assert m["iw_bound"] <= m["elbo_discrete"] + 1.0

    # The numbers are those of the metrics on the training run's own static test draw (train, then test, from
    # one generator seeded with binarize_seed), each metric from a fresh generator seeded with `seed`.
    data_cfg = OmegaConf.create(torch.load(ckpt, weights_only=True)["config"]["data"])
    _, test, _ = make_splits(load_split(data_cfg, "train")[0], load_split(data_cfg, "test")[0], "cpu", "static", 5)
    model = CategoricalVAE(3, 4)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    want = metrics.evaluate_split(model, test, tau=0.8, hard=True, generator=torch.Generator().manual_seed(0),
                                  batch_size=5)
    want["iw_bound"] = metrics.iw_bound(model, test, k=10, chunk=3, batch_size=5,
                                        generator=torch.Generator().manual_seed(0))
    for name, value in want.items():
        assert m[name] == pytest.approx(value, rel=1e-6), name
    # ... and the bound is one: with 4**3 = 64 codes, -log p(x) <= E[IW bound] is known exactly. A missing log k
    # would put the estimate log 10 = 2.3 nats below -log p(x), which the one-sided 1-nat check above lets through.
    from test_train import exact_nll

    nll = exact_nll(model, torch.cat(list(test.batches(N_TEST))))
    assert nll - 0.2 < m["iw_bound"], (nll, m["iw_bound"], m["elbo_discrete"])
    usage = latents.code_usage(model, test, batch_size=5)
    got = result["latents"]
    assert (got["latent_dim"], got["categorical_dim"], got["active_kl"]) == (3, 4, 0.01)
    assert got["perplexity"] == pytest.approx(usage["perplexity"].tolist(), rel=1e-5, abs=1e-7)
    assert got["kl_per_variable"] == pytest.approx(usage["kl_per_variable"].tolist(), rel=1e-5, abs=1e-7)
    assert got["perplexity_mean"] == pytest.approx(usage["perplexity_mean"], rel=1e-5, abs=1e-7)
    assert got["confidence"] == pytest.approx(usage["confidence"], rel=1e-5, abs=1e-7)
    assert got["active"] == usage["active"] and f"{got['active']} / 3" in proc.stdout
    assert all(1 <= p <= 4 + 1e-9 for p in got["perplexity"]) and 0.25 <= got["confidence"] <= 1

    with Image.open(ckpt.parent / "best.prior_samples.png") as im:
        assert im.size == (8 * 30 + 2, 8 * 30 + 2)  # 64 digits of 28 px, 8 per row, 2 px padding
    with Image.open(ckpt.parent / "best.reconstructions.png") as im:
        assert im.size == (8 * 30 + 2, 2 * 30 + 2)  # 8 originals above 8 reconstructions
    for name in ("traversal", "usage", "class_means"):  # the pictures of the code, as TensorBoard's latents/<name>
        with Image.open(ckpt.parent / f"best.{name}.png") as im:
            assert im.size == (4 * 30 + 2, 3 * 30 + 2), name  # a row per variable (3 < traversal_rows), K columns
    assert set(result["images"]) == {"prior_samples", "reconstructions", "traversal", "usage", "class_means"}
    assert all(Path(p).is_file() for p in result["images"].values())
    assert list(cwd.iterdir()) == [], "evaluation wrote into the working directory"
    assert not list(ckpt.parent.glob("*.tmp-*"))


def test_missing_checkpoint_exits_2_with_one_line(tmp_path):
    proc = run_cli(f"checkpoint={tmp_path / 'nope.pt'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint=") and "no such file" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def eval_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {"device": "cpu", **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"checkpoint": None}, "checkpoint is required"),
    ({"iw_samples": 0}, "iw_samples=0"),
    ({"iw_chunk": -1}, "iw_chunk=-1"),
    ({"device": "gpu"}, "device='gpu'"),
    ({"traversal_rows": 0}, "traversal_rows=0"),
    ({"active_kl": -0.5}, "active_kl=-0.5"),
    ({"threads": 0}, "threads=0"),
    ({"threads": 10 ** 6}, "threads=1000000"),
])
def test_bad_settings_are_user_errors(tmp_path, overrides, message):
    """Checked before the checkpoint is even opened (it does not exist here)."""
    with pytest.raises(UserError, match=message):
        evaluate(eval_cfg(**{"checkpoint": str(tmp_path / "unread.pt"), **overrides}))


def test_corrupt_checkpoint_and_wrong_architecture_are_user_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        evaluate(eval_cfg(checkpoint=str(bad)))
    ckpt = write_checkpoint(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["latent_dim"] = 5  # the weights are for 3 variables
    torch.save(state, ckpt)
    with pytest.raises(UserError, match="do not fit"):
        evaluate(eval_cfg(checkpoint=str(ckpt)))


@pytest.mark.parametrize("binarize", ["none", "dynamic", "static"])
def test_test_split_follows_the_checkpoints_binarization(tmp_path, binarize):
    ckpt = write_checkpoint(tmp_path, binarize=binarize)
    data_cfg = OmegaConf.create(torch.load(ckpt, weights_only=True)["config"]["data"])
    split = load_test_split(data_cfg, torch.device("cpu"))
    x = torch.cat(list(split.batches(5)))
    raw = load_split(data_cfg, "test")[0].view(N_TEST, -1).float() / 255
    if binarize == "none":
        torch.testing.assert_close(x, raw)
        return
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    # One fixed draw: scoring the split twice (or with every metric) sees the same binary images.
    torch.testing.assert_close(torch.cat(list(split.batches(5, torch.Generator().manual_seed(9)))), x)
    assert torch.equal(torch.cat(list(load_test_split(data_cfg, torch.device("cpu")).batches(5))), x)
    # ... and a draw of these images: black pixels stay 0, white ones 1.
    assert torch.all(x[raw == 0] == 0) and torch.all(x[raw == 1] == 1)


def test_run_settings_name_the_estimator_of_old_and_new_checkpoints():
    from vae.evaluate import run_settings

    # A checkpoint from before estimators and optimizers were settings: Gumbel-softmax with Adam, as it was then.
    assert run_settings({"hard": False, "seed": 3, "lr": 0.001}) == {"estimator": "gumbel", "seed": 3, "lr": 0.001}
    assert run_settings({"hard": True, "seed": 3})["estimator"] == "st_gumbel"
    new = {"hard": False, "estimator": "rloo", "estimator_samples": 4, "seed": 1, "lr": 5e-4,
           "optimizer": {"name": "radam", "betas": [0.9, 0.999]}, "data": {"name": "fashion_mnist"}}
    assert run_settings(new) == {"estimator": "rloo", "estimator_samples": 4, "seed": 1, "lr": 5e-4,
                                 "optimizer": "radam", "data": "fashion_mnist"}


def test_a_closed_stdout_costs_no_result(tmp_path):
    """`python -m vae.evaluate ... | head -1`: the results are written first; the print that fails is silent."""
    ckpt = write_checkpoint(tmp_path)
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "vae.evaluate", f"checkpoint={ckpt}", "iw_samples=2",
                               "device=cpu"], cwd=tmp_path, stdout=write, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO_DIR), "OMP_NUM_THREADS": "1"}, timeout=300)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert json.loads((ckpt.parent / "best.metrics.json").read_text())["k"] == 2


# --- the test set is the run's own, and is never downloaded ---------------------------------------------------------

def test_a_missing_data_root_is_named_and_never_recreated_or_downloaded(tmp_path, monkeypatch):
    import shutil

    import vae.data.sources as sources

    ckpt = write_checkpoint(tmp_path)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["data"].update(download=True, sources=["local", "torchvision", "registry"])  # as by default
    torch.save(state, ckpt)
    shutil.rmtree(tmp_path / "data")
    monkeypatch.setattr(sources, "fetch", lambda *a: pytest.fail("evaluate tried to fetch the dataset"))
    with pytest.raises(UserError) as e:
        evaluate(eval_cfg(checkpoint=str(ckpt), iw_samples=2))
    message = str(e.value)
    assert message.startswith(f"the checkpoint's test set is not in {tmp_path / 'data' / 'MNIST' / 'raw'} "
                              f"(data.root='{tmp_path / 'data'}' as the run recorded it)")
    assert "pass data_root=<dir> holding MNIST/raw/" in message and "\n" not in message
    assert not (tmp_path / "data").exists()


def test_test_files_that_differ_from_the_recorded_ones_are_refused(tmp_path):
    from idx import md5_sums

    ckpt = write_checkpoint(tmp_path)
    raw = tmp_path / "data" / "MNIST" / "raw"
    state = torch.load(ckpt, weights_only=True)
    state["data_md5"] = {k: v for k, v in md5_sums(raw).items() if k.startswith("t10k")}
    torch.save(state, ckpt)
    evaluate(eval_cfg(checkpoint=str(ckpt), iw_samples=2))  # the run's own files: fine
    other = tmp_path / "other"
    make_tiny_dataset(other, n_train=N_TRAIN, n_test=N_TEST, seed=1)  # same names and shapes, other images
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte is not the file this run was tested on .*"
                                        f"data_root='{other}'"):
        evaluate(eval_cfg(checkpoint=str(ckpt), iw_samples=2, data_root=str(other)))


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_checkpoint_that_is_not_a_file_says_what_it_is(tmp_path, kind):
    path = tmp_path / "best.pt"
    os.mkfifo(path) if kind == "fifo" else path.mkdir()
    with pytest.raises(UserError, match="is a FIFO, not a checkpoint file" if kind == "fifo" else "is a directory"):
        evaluate(eval_cfg(checkpoint=str(path)))


def test_an_unreadable_checkpoint_is_called_unreadable(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(ckpt))

    monkeypatch.setattr(torch, "load", denied)  # root reads any file: deny as the system does for other users
    with pytest.raises(UserError, match=r"cannot be read: Permission denied; make it readable") as e:
        evaluate(eval_cfg(checkpoint=str(ckpt)))
    assert "corrupt" not in str(e.value) and "best.pt of the same run" not in str(e.value)


def test_results_go_to_out_when_asked(tmp_path):
    ckpt = write_checkpoint(tmp_path)
    before = sorted(p.name for p in ckpt.parent.iterdir())
    result = evaluate(eval_cfg(checkpoint=str(ckpt), iw_samples=2, out=str(tmp_path / "results")))
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before
    assert json.loads((tmp_path / "results" / "best.metrics.json").read_text())["k"] == 2
    assert Path(result["images"]["traversal"]).parent == tmp_path / "results"


def test_results_that_cannot_be_written_beside_the_checkpoint_point_to_out(tmp_path, monkeypatch):
    ckpt = write_checkpoint(tmp_path)
    (ckpt.parent / "best.metrics.json").mkdir()  # something that is not a file took the result's name
    monkeypatch.setattr(metrics, "evaluate_split", lambda *a, **k: pytest.fail("evaluation ran"))
    with pytest.raises(UserError, match="best.metrics.json is a directory, not a file.*write the results elsewhere "
                                        "with out=<dir>"):
        evaluate(eval_cfg(checkpoint=str(ckpt), iw_samples=2))


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
