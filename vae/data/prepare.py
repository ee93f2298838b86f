"""prepare(): the four files of a dataset in `<root>/<Name>/raw`, checked (vae/data/verify.py) and, when some are
missing, fetched (vae/data/sources.py, imported only then). Kept apart from both so that neither imports the other
back: the sources build on the checks, and this module on both."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from vae.data import Log, dataset, raw_dir
from vae.data.verify import Target, _locked, _open_lock, _remove_leftovers, _unwritable, check_local

logger = logging.getLogger(__name__)


def prepare(data_cfg, log: Optional[Log] = None, checksums: Optional[Dict[str, str]] = None,
            progress: Optional[bool] = False) -> Path:
    """Make sure the four IDX files are in `<root>/<Name>/raw` and intact; return that directory.

    `checksums` replaces the official MD5s (tests with generated files); `progress` shows tqdm bars
    (None = on a terminal only). Raises DataError with one actionable line when nothing works.
    """
    log = log or logger.info
    ds = dataset(str(data_cfg.name))
    raw = raw_dir(data_cfg)
    t = Target(ds=ds, dataset_dir=raw.parent, raw=raw, checksums=dict(checksums or ds.md5),
               verify=bool(getattr(data_cfg, "verify", True)), progress=progress,
               system_path=getattr(data_cfg, "system_path", None), log=log)
    if not t.verify:
        logger.warning("data.verify=false: checksums NOT checked (only the IDX structure) in %s", raw)
    lock_fd, why = _open_lock(t)
    if lock_fd is None:
        # Read-only: nothing is written. Reading needs no lock (files only appear by rename: a reader sees all of
        # one or none of it); a cache found there is used but none is written, so the MD5s are computed on every
        # run (0.2 s for MNIST's 55 MB) rather than trusting a second cache kept elsewhere about shared files.
        missing = check_local(t, write_cache=False)
        if missing:
            raise _unwritable(data_cfg, raw, missing, why)
        log(f"data: {ds.title} served by local (read-only), 4 files {t.verdict}")
        return raw
    with _locked(lock_fd, t):
        _remove_leftovers(t)
        missing = check_local(t)
        if missing:
            log(f"data: trying local ... failed: missing {len(missing)} of 4 files in {raw}")
            from vae.data.sources import fetch  # torchvision, pip, pickles: only when a file must be fetched

            source = fetch(t, data_cfg, missing)
        else:
            log("data: trying local ... ok")
            source = "local"
    log(f"data: {ds.title} served by {source}, 4 files {t.verdict}")
    return raw
