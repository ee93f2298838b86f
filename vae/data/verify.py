"""Whether the dataset files on disk can be trusted, and `prepare()`, which makes sure they can.

Every file is checked before it is trusted: its IDX structure (magic number, dims, exact size, labels < 10, as many
labels as images) and the official MD5 of the uncompressed file (`DATASETS` in vae/data/__init__.py;
`data.verify=false` skips the MD5s and says so). A file that passed is remembered in `raw/.verified.json` (size,
mtime, ctime, md5): no re-hashing unless it changed.

In a directory this process can write, `prepare()` holds a lock (`<root>/<Name>/.lock`) while it checks the files
and fetches missing ones (vae/data/sources.py), so two runs at once never leave a file a later run would trust.
A directory it cannot write (a read-only mount) is only read: complete files are checked the same way and served.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from vae.common.atomic import TMP_PREFIX, atomic_write_text
from vae.data import (FILE_NAMES, IMAGE_FILES, IMAGE_SHAPE, NUM_CLASSES, SPLITS, BadFile, DataError, Dataset, Log,
                      dataset, idx_dims, open_regular, raw_dir)

logger = logging.getLogger(__name__)


CACHE_NAME = ".verified.json"
LOCK_NAME = ".lock"
DOWNLOAD_PREFIX = ".download-"  # scratch directories of the download sources, removed under the lock
CHUNK = 1 << 20


def check_structure(path: Path, name: str) -> int:
    """Check a file in the role `name` says (images or labels); return how many items it holds."""
    dims = idx_dims(path)
    if name in IMAGE_FILES:
        if len(dims) != 3 or tuple(dims[1:]) != IMAGE_SHAPE:
            raise BadFile(f"wrong shape {dims}, expected (N, 28, 28) images")
        return dims[0]
    if len(dims) != 1:
        raise BadFile(f"wrong shape {dims}, expected (N,) labels")
    with open_regular(path) as f:
        labels = np.fromfile(f, dtype=np.uint8, offset=8)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise BadFile(f"label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return dims[0]


# --- hashing and the verification cache ---------------------------------------------------------------------

def file_digest(path: Path, algorithm: str = "md5", progress: Optional[bool] = False) -> str:
    """`progress`: a tqdm bar always (True), never (False) or on a terminal only (None, tqdm's own rule)."""
    from tqdm import tqdm

    # The MD5s only guard against damage (the wheel's sha256 guards against tampering); FIPS builds refuse
    # md5 unless told so.
    h = hashlib.new(algorithm, usedforsecurity=algorithm != "md5")
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, desc=f"{algorithm} {path.name}", unit="B",
                                     unit_scale=True, leave=False,
                                     disable=None if progress is None else not progress) as bar:
        while block := f.read(CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def split_md5(data_cfg, split: str) -> Dict[str, str]:
    """The MD5 of each file of `split` in data.root: what a checkpoint records of the data it was tested on. A file
    the verification cache vouches for (unchanged since it was hashed) is not read again."""
    raw = raw_dir(data_cfg)
    cache, cache_mtime = load_cache(raw)
    out = {}
    for name in SPLITS[split]:
        entry = cache.get(name)
        md5 = entry.get("md5") if isinstance(entry, dict) else None
        try:
            cached = md5 is not None and _trusted(entry, os.stat(raw / name), cache_mtime, md5)
        except OSError:
            cached = False
        out[name] = md5 if cached else file_digest(raw / name)
    return out


def stamp(st: os.stat_result) -> Dict[str, int]:
    # ctime too: writing a byte and then putting the old mtime back (os.utime) still changes the ctime.
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def load_cache(raw: Path) -> Tuple[Dict[str, dict], int]:
    """Entries of the verification cache, and the cache file's own mtime (0 when there is none)."""
    path = raw / CACHE_NAME
    try:
        with open_regular(path) as f:  # a FIFO in its place must not hang the run
            st = os.fstat(f.fileno())
            files = json.loads(f.read())["files"]
        return (files if isinstance(files, dict) else {}), st.st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError, BadFile):
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


def save_cache(raw: Path, files: Dict[str, dict]) -> None:
    # Best effort: without the cache the next run only costs a re-hash.
    try:
        atomic_write_text(raw / CACHE_NAME, json.dumps({"files": files}, indent=1))
    except OSError as e:
        logger.debug("data: could not write %s: %s", raw / CACHE_NAME, e)


# --- checking the files of one dataset in one directory ------------------------------------------------------

class ChecksumMismatch(Exception):
    def __init__(self, name: str, actual: str, expected: str):
        super().__init__(name)
        self.actual, self.expected = actual, expected


@dataclass
class Target:
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

    def md5(self, path: Path, name: str) -> str:
        """The file's md5, which must be the official one for `name`; raises ChecksumMismatch otherwise."""
        actual = file_digest(path, "md5", self.progress)
        if actual != self.checksums[name]:
            raise ChecksumMismatch(name, actual, self.checksums[name])
        return actual

    @property
    def verdict(self) -> str:
        return "verified (md5)" if self.verify else "checked (structure only; data.verify=false)"


def check_local(t: Target, write_cache: bool = True) -> List[str]:
    """Check the files already in raw/; return the missing ones. A damaged file stops the run: it is the user's
    data (or a finished download), so it is reported, not silently replaced."""
    if not t.raw.is_dir():
        return list(FILE_NAMES)
    cache, cache_mtime = load_cache(t.raw)
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
            counts[name] = check_structure(path, name)
            if t.verify:
                entry = cache.get(name)
                if _trusted(entry, st, cache_mtime, t.checksums[name]):
                    fresh[name] = entry
                    continue
                hashed = True
                fresh[name] = dict(stamp(st), md5=t.md5(path, name))
        except BadFile as e:
            raise DataError(f"{path} is damaged: {e}; delete it and {t.ds.rerun}") from None
        except ChecksumMismatch as e:
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
        save_cache(t.raw, fresh)
    return missing


# --- the lock ------------------------------------------------------------------------------------------------

def writable(path: Path) -> bool:
    # access() knows read-only mounts (EROFS, even for root) and permissions; the lock's open() below catches the
    # cases it gets wrong (some network file systems).
    return os.access(path, os.W_OK | os.X_OK)


def _open_lock(t: Target) -> Tuple[Optional[int], str]:
    """The open lock file, or None and why not when this process cannot write the dataset directory."""
    try:
        t.raw.mkdir(parents=True, exist_ok=True)
        for d in (t.dataset_dir, t.raw):
            if not writable(d):
                return None, f"{d} is read-only here"
        return os.open(t.dataset_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666), ""
    except OSError as e:
        return None, f"{e.strerror}: {e.filename}"


@contextlib.contextmanager
def _locked(fd: int, t: Target) -> Iterator[None]:
    """Hold an exclusive lock on the open lock file `fd`; another process preparing the same files waits here,
    then finds them in place."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t.log(f"data: waiting for another process preparing {t.dataset_dir} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(t: Target) -> None:
    """Temp files and download dirs of a killed run (only ever touched while holding the lock)."""
    for tmp in t.raw.glob(TMP_PREFIX + "*"):
        tmp.unlink(missing_ok=True)
    for scratch in t.dataset_dir.glob(DOWNLOAD_PREFIX + "*"):
        shutil.rmtree(scratch, ignore_errors=True)


# --- prepare -------------------------------------------------------------------------------------------------

def _unwritable(data_cfg, raw: Path, missing: List[str], why: str) -> DataError:
    them = "it" if len(missing) == 1 else "them"
    return DataError(f"data.root={str(data_cfg.root)!r} is not writable ({why}) and {raw} lacks "
                     f"{', '.join(missing)}: put {them} there, or make data.root writable (or choose another with "
                     f"data.root=<dir>) and {dataset(str(data_cfg.name)).rerun} to fetch {them}")


def check_root(data_cfg) -> None:
    """The check before a run writes anything (cheap: no hashing): a data root that this process cannot write
    must already hold the four files. prepare() checks them in full."""
    raw = raw_dir(data_cfg)
    missing = [name for name in FILE_NAMES if not (raw / name).is_file()]
    if not missing:
        return
    for d in (raw.parent, raw):  # the lock goes in the first, the files in the second
        while not d.exists() and d.parent != d:  # the nearest existing directory is where we would create
            d = d.parent
        if not d.is_dir() or not writable(d):
            raise _unwritable(data_cfg, raw, missing, f"{d} is not a writable directory")
