"""vae/common/atomic.py: a write is the old file or the new one, and never replaces what is not a regular file."""
from __future__ import annotations

import os
import socket

import pytest

from vae.common.atomic import WriteFailed, atomic_write_text, not_a_regular_file
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
