"""vae/common/atomic.py: a write is the old file or the new one (a kill -9 mid-write included), never replaces what is
not a regular file, and fails in one line whatever the failure's type."""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from support import REPO
from vae.common.atomic import WriteFailed, atomic_write_text, not_a_regular_file, remove_stray_temporaries
from vae.common.errors import UserError


def special_files(tmp_path):
    """A FIFO, a directory and a socket, as `out=` might name them by mistake (never the real /dev/null)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return {"a FIFO": fifo, "a directory": directory, "a socket": sock_path}, sock


def test_a_target_that_is_not_a_regular_file_is_refused_and_kept(tmp_path):
    targets, sock = special_files(tmp_path)
    try:
        for kind, path in targets.items():
            assert not_a_regular_file(path) == kind
            with pytest.raises(WriteFailed) as e:
                atomic_write_text(path, "{}\n", "metrics")
            assert isinstance(e.value, UserError) and f"it is {kind}, not a regular file" in str(e.value)
            assert "\n" not in str(e.value)
            assert not_a_regular_file(path) == kind  # still there, as it was
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo", "sock"]  # no temporary file left
    finally:
        sock.close()


def test_a_link_to_a_special_file_is_refused_too(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "out.json"
    link.symlink_to(fifo)
    with pytest.raises(WriteFailed, match="it is a FIFO"):
        atomic_write_text(link, "{}\n")
    assert link.is_symlink()


def test_regular_files_and_new_files_are_written(tmp_path):
    assert not_a_regular_file(tmp_path / "new") is None
    atomic_write_text(tmp_path / "new", "a")
    atomic_write_text(tmp_path / "new", "b")
    assert (tmp_path / "new").read_text() == "b" and not_a_regular_file(tmp_path / "new") is None


SAVER = r"""
import sys, torch
from vae.training.checkpoint import save_checkpoint
i = 0
while True:
    i += 1
    save_checkpoint({"format": "gumbel-vae/1", "i": i, "blob": torch.full((8_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_9_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoints" / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(path)], cwd=REPO)
    try:
        deadline = time.time() + 60
        # wait until a complete file exists and the next write is in progress
        while time.time() < deadline and not (path.exists() and any(".tmp-" in p.name for p in path.parent.iterdir())):
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait()
    assert any(".tmp-" in p.name for p in path.parent.iterdir()), "the kill did not land during a write"
    ckpt = torch.load(path, weights_only=True)
    assert torch.equal(ckpt["blob"], torch.full((8_000_000,), float(ckpt["i"])))
    removed = remove_stray_temporaries(path.parent)
    assert removed and not any(".tmp-" in p.name for p in path.parent.iterdir())


def test_every_write_failure_is_one_line_whatever_its_type(tmp_path):
    from vae.common.atomic import WriteFailed, atomic_write, atomic_write_text

    path = tmp_path / "metrics.json"
    atomic_write_text(path, "{}")

    def like_torch_save(f):  # torch.save reports ENOSPC as its own RuntimeError, the OSError as its context
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1615808 vs 1615760")

    with pytest.raises(WriteFailed, match=r"could not write metrics .*metrics.json: No space left on device "
                                          r"\(free disk space.*the previous metrics.json is intact"):
        atomic_write(path, like_torch_save, "metrics")
    with pytest.raises(WriteFailed, match="PytorchStreamWriter failed"):  # its own words when no OSError is attached
        atomic_write(path, lambda f: (_ for _ in ()).throw(RuntimeError("PytorchStreamWriter failed writing file")))
    with pytest.raises(OSError):  # still an OSError for code that writes on a best-effort basis
        atomic_write(path, lambda f: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(TypeError):  # a bug in what is written is not a disk problem
        atomic_write(path, lambda f: f.write("text, not bytes"))
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
