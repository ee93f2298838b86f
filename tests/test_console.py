"""vae/common/console.py: a reader of the output that leaves early costs nothing."""
from __future__ import annotations

import os
import subprocess
import sys

from support import REPO, subprocess_env

READER_GONE = r"""
import logging, sys
from vae.common.console import readers_may_leave
handler = logging.StreamHandler(sys.stdout)
logging.basicConfig(level=logging.INFO, handlers=[handler])
with readers_may_leave():
    for i in range(1000):
        print("line", i)
        logging.getLogger("x").info("log line %d", i)
    open(sys.argv[1], "w").write("done")
"""


def test_a_reader_that_leaves_early_costs_nothing(tmp_path):
    """`command | head -1`: once the pipe is closed, prints and log lines go nowhere and the work goes on."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-c", READER_GONE, str(tmp_path / "result")], cwd=REPO, stdout=write,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env(), timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == ""
    assert (tmp_path / "result").read_text() == "done"
