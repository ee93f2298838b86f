"""Run train.py with subnormal floats flushed to zero (torch.set_flush_denormal(True)) set before anything else.

    python scripts/train_flushed.py epochs=3 threads=1          # same arguments as train.py

Used by docs/denormals.md to compare a flushed run with a plain `python train.py ...` run (timings and the test
losses in metrics.json). Prints whether the CPU accepted the setting (it needs SSE3 on x86, or an Arm CPU).
"""
import runpy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    ok = torch.set_flush_denormal(True)
    print(f"torch.set_flush_denormal(True) -> {ok}", file=sys.stderr)
    if not ok:
        sys.exit("this CPU cannot flush subnormals to zero")
    sys.path.insert(0, str(REPO))
    sys.argv = [str(REPO / "train.py")] + sys.argv[1:]
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")
