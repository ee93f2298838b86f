"""Your own grayscale images: a `.npy`/`.npz` array or a folder of image files (`data=array`, `data=folder`).

    python train.py data=array data.path=faces.npy            # N x H x W, any H x W
    python train.py data=folder data.path=~/glyphs data.title=glyphs

Pixels become uint8 grey levels, as MNIST's are: uint8 as they are, bool as 0/255, floats in [0, 1] rounded to
the nearest of 256 levels, other integers in [0, 255] as they are. Labels are optional (only pictures use them;
-1 where there are none).

Splits: a `.npz` with `train` and `test` arrays (or Keras' `x_train`/`x_test`; labels `train_labels`/`y_train`...),
or a folder with `train/` and `test/` subfolders, is split as it comes; anything else is one pool of images from
which `data.test_size` (a fraction below 1, else a count) are drawn as the test set with `data.split_seed`. In a
folder, images in subfolders are labelled by subfolder name (sorted, from 0). Only regular files are read, and
every size is checked before an array is loaded.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from vae.data import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".pbm", ".tif", ".tiff", ".webp")
MAX_PIXELS = 2**14 * 2**14 // 16  # per image: 4096 x 4096 (an MLP's first layer holds 512 weights per pixel)
MAX_BYTES = 2**34  # 16 GiB of uint8 pixels: far beyond anything this trainer can hold on a device
Split = Tuple[torch.Tensor, torch.Tensor]


def title(data_cfg) -> str:
    """The name a dataset of ours is shown under: data.title, else the file's or folder's name."""
    if getattr(data_cfg, "title", None):
        return str(data_cfg.title)
    return Path(str(data_cfg.path)).expanduser().name.split(".")[0] or str(data_cfg.path)


def source_path(data_cfg) -> Path:
    """data.path, checked: an existing regular file (array) or directory (folder)."""
    if not getattr(data_cfg, "path", None):
        raise DataError(f"data={data_cfg.name} needs data.path=<{'file.npy or file.npz' if data_cfg.name == 'array' else 'a folder of images'}>")
    path = Path(str(data_cfg.path)).expanduser()
    want_dir = data_cfg.name == "folder"
    if not path.exists():
        raise DataError(f"data.path={str(data_cfg.path)!r}: no such {'folder' if want_dir else 'file'}")
    if want_dir and not path.is_dir():
        raise DataError(f"data.path={str(data_cfg.path)!r} is not a folder; for an array file use data=array")
    if not want_dir and not path.is_file():
        kind = "a folder (use data=folder)" if path.is_dir() else "not a regular file"
        raise DataError(f"data.path={str(data_cfg.path)!r} is {kind}; data=array reads a .npy or .npz file")
    if not want_dir and path.suffix not in (".npy", ".npz"):
        raise DataError(f"data.path={str(data_cfg.path)!r}: data=array reads .npy or .npz files")
    return path


def load(data_cfg) -> Tuple[Split, Split]:
    """((train images uint8 [N, H, W], labels int64 [N]), (test images, labels)) on the CPU."""
    path = source_path(data_cfg)
    if data_cfg.name == "folder":
        splits = _folder(path)
    elif path.suffix == ".npy":
        splits = {"all": (_array(np.load(path, mmap_mode="r", allow_pickle=False), path), None)}
    else:
        splits = _npz(path)
    if "all" in splits:
        images, labels = splits["all"]
        train, test = _split_off(images, labels, data_cfg.test_size, data_cfg.split_seed, path)
    else:
        train, test = splits["train"], splits["test"]
    result = []
    for name, (images, labels) in (("train", train), ("test", test)):
        if len(images) == 0:
            raise DataError(f"data.path={str(path)!r}: the {name} split is empty")
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        if len(labels) != len(images):
            raise DataError(f"data.path={str(path)!r}: {len(labels)} {name} labels for {len(images)} images")
        result.append((torch.from_numpy(np.ascontiguousarray(images)),
                       torch.from_numpy(np.asarray(labels).astype(np.int64))))
    if result[0][0].shape[1:] != result[1][0].shape[1:]:
        raise DataError(f"data.path={str(path)!r}: train images are {tuple(result[0][0].shape[1:])}, test images "
                        f"{tuple(result[1][0].shape[1:])}; they must have one size")
    return result[0], result[1]


def _array(a: np.ndarray, path: Path, key: str = "") -> np.ndarray:
    """Check shape, size and values of an image array, then return it as uint8 [N, H, W] (read into memory)."""
    where = f"{path}{'[' + key + ']' if key else ''}"
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        raise DataError(f"{where}: images must be an array N x H x W (grayscale), not shape {tuple(a.shape)}")
    n, h, w = a.shape
    if h < 2 or w < 2 or h * w > MAX_PIXELS:
        raise DataError(f"{where}: images of {h} x {w} pixels are not supported (2 x 2 up to 4096 x 4096)")
    if n * h * w > MAX_BYTES:
        raise DataError(f"{where}: {n} images of {h} x {w} are {n * h * w / 2**30:.0f} GiB of pixels, too many")
    if a.dtype == np.uint8:
        return np.array(a)
    if a.dtype == np.bool_:
        return np.array(a, dtype=np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        a = np.asarray(a, dtype=np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataError(f"{where}: float images must hold values in [0, 1] (found {np.nanmin(a):g} to "
                            f"{np.nanmax(a):g}); scale them, or save uint8 grey levels")
        return np.rint(a * 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"{where}: integer images must hold grey levels in [0, 255] (found {a.min()} to "
                            f"{a.max()})")
        return np.asarray(a, dtype=np.uint8)
    raise DataError(f"{where}: images of dtype {a.dtype} are not supported (uint8, bool or floats in [0, 1])")


def _labels(a: Optional[np.ndarray], path: Path, key: str) -> Optional[np.ndarray]:
    if a is None:
        return None
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise DataError(f"{path}[{key}]: labels must be a 1-d integer array, not {a.dtype} {tuple(a.shape)}")
    return np.asarray(a, dtype=np.int64)


def _npz(path: Path) -> dict:
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"data.path={str(path)!r} is not a readable .npz file ({e})") from None
    with z:
        keys = set(z.files)
        for train_key, test_key, labels in (("train", "test", ("train_labels", "test_labels")),
                                            ("x_train", "x_test", ("y_train", "y_test"))):
            if train_key in keys and test_key in keys:
                return {split: (_array(z[k], path, k), _labels(z[lk] if lk in keys else None, path, lk))
                        for split, k, lk in (("train", train_key, labels[0]), ("test", test_key, labels[1]))}
        image_keys = [k for k in ("images", "x", "arr_0") if k in keys] or sorted(keys)
        if len(image_keys) != 1 and not {"images", "x", "arr_0"} & keys:
            raise DataError(f"data.path={str(path)!r} holds {sorted(keys)}: name the arrays train and test (with "
                            "optional train_labels, test_labels), or save a single images array")
        label_key = next((k for k in ("labels", "y") if k in keys), None)
        return {"all": (_array(z[image_keys[0]], path, image_keys[0]),
                        _labels(z[label_key] if label_key else None, path, label_key or ""))}


def _folder(path: Path) -> dict:
    if (path / "train").is_dir() and (path / "test").is_dir():
        return {s: _read_images(path / s) for s in ("train", "test")}
    return {"all": _read_images(path)}


def _read_images(root: Path) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Every image file under `root` (sorted paths), as grayscale; labelled by subfolder when there are any."""
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files} - {"."})
    images: List[np.ndarray] = []
    for p in files:
        try:
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DataError(f"{p}: {im.width} x {im.height} pixels is too large (at most 4096 x 4096)")
                a = np.asarray(im.convert("L"))
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise DataError(f"{p}: not a readable image ({e})") from None
        if images and a.shape != images[0].shape:
            raise DataError(f"{p}: {a.shape[1]} x {a.shape[0]} pixels, but {files[0]} is {images[0].shape[1]} x "
                            f"{images[0].shape[0]}; all images must have one size")
        images.append(a)
    labels = None
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index.get(p.parent.relative_to(root).as_posix(), -1) for p in files], dtype=np.int64)
    return np.stack(images), labels


def _split_off(images: np.ndarray, labels: Optional[np.ndarray], test_size: float, seed: int, path: Path):
    """(train, test): `test_size` of the images (a fraction < 1, else a count) drawn with `seed`; both keep the
    file's order."""
    n = len(images)
    n_test = int(round(test_size * n)) if test_size < 1 else int(test_size)
    if not 1 <= n_test < n:
        raise DataError(f"data.test_size={test_size:g} leaves no {'test' if n_test < 1 else 'training'} images "
                        f"of the {n} in {path}; choose a fraction in (0, 1) or a count below {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    pick = (lambda idx: None) if labels is None else (lambda idx: labels[idx])
    return (images[train_idx], pick(train_idx)), (images[test_idx], pick(test_idx))
