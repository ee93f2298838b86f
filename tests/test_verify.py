"""vae/data/verify.py: the files' checksums, and the cache that spares re-reading them."""
from __future__ import annotations


def test_split_md5_takes_a_vouched_files_md5_from_the_cache_and_rehashes_a_changed_one(tmp_path, monkeypatch):
    """A run records the MD5 of its test files (data_fingerprint) at every start: files the verification cache vouches
    for are not read again, and a file changed since is hashed afresh."""
    import os
    import time

    from omegaconf import OmegaConf

    from idx import make_tiny_dataset
    from vae.data import SPLITS, verify
    from vae.data.verify import file_digest, save_cache, split_md5, stamp

    raw = make_tiny_dataset(tmp_path)
    cfg = OmegaConf.create({"name": "mnist", "root": str(tmp_path)})
    names = SPLITS["test"]
    truth = {n: file_digest(raw / n) for n in names}
    old = time.time_ns() - 10**9  # files older than the cache: the cache's entries can be trusted
    for n in names:
        os.utime(raw / n, ns=(old, old))
    save_cache(raw, {n: {"md5": truth[n], **stamp(os.stat(raw / n))} for n in names})
    hashed = []
    real = verify.file_digest
    monkeypatch.setattr(verify, "file_digest", lambda path, *a, **k: hashed.append(path.name) or real(path, *a, **k))
    assert split_md5(cfg, "test") == truth and hashed == []
    with open(raw / names[0], "r+b") as f:  # changed after the cache vouched for it
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    got = split_md5(cfg, "test")
    assert hashed == [names[0]] and got[names[0]] == real(raw / names[0]) != truth[names[0]]
